"""Pruning target: ``--ratio F`` (fraction of dense parameters) or ``--layers N``."""
from __future__ import annotations

from dataclasses import dataclass

from harness.errors import UsageError
from harness.model.adapters import ModelAdapter
from harness.model.surgery import count_params


@dataclass
class Target:
    ratio: float | None = None
    layers: int | None = None

    def validate(self) -> None:
        if (self.ratio is None) == (self.layers is None):
            raise UsageError("give exactly one pruning target: --ratio F (0<F<1) or --layers N")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise UsageError(f"--ratio {self.ratio} is out of range; use a fraction strictly between 0 and 1, e.g. 0.25")
        if self.layers is not None and self.layers < 1:
            raise UsageError(f"--layers {self.layers} is out of range; remove at least 1 layer")

    def to_dict(self) -> dict:
        return {"ratio": self.ratio, "layers": self.layers}


def resolve_num_remove(target: Target, model, adapter: ModelAdapter) -> int:
    """Number of decoder layers n to remove.

    For a ratio, n is the layer count whose parameters come closest to ``ratio`` of the dense
    total (at least 1). Methods that add a replacement network end up with a smaller measured
    ratio; the reported ratio is always measured from parameter counts.
    """
    target.validate()
    L = adapter.num_layers
    if target.layers is not None:
        n = target.layers
    else:
        total = count_params(model)
        per_layer = count_params(adapter.layers[0])
        n = max(1, round(target.ratio * total / per_layer))
    if n >= L:
        raise UsageError(
            f"removing {n} layers does not fit a model with {L} decoder layers; ask for fewer "
            f"(--layers < {L} or a smaller --ratio)"
        )
    return n

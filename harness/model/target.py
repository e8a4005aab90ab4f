"""Pruning target: ``--ratio F`` (a fraction, counted on ``--ratio-basis``) or ``--layers N``.

Bases for ``--ratio``:

- ``params`` (default; what the papers count): a fraction of *all* dense parameters, embeddings
  included. LLM-Streamline and ShortGPT print 27.1% for 9 of Llama-2-7B's 32 layers (9 x 202M /
  6.74B) and 25.8% for OPT-1.3B; the paper configs keep this basis. On a model whose embeddings
  are a large share of its parameters (Gemma 3 270M: 63%) it asks for many more layers.
- ``layers``: a fraction of the decoder layers, n = round(F x L) (embeddings not counted).

A ``--ratio`` that resolves to more than half of the decoder layers is refused (one error line
naming the layer count and the alternatives); ``--layers N`` above half is done as asked, with a
warning; a ``params`` ratio on a model whose embeddings exceed a third of its parameters warns.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from harness.errors import UsageError
from harness.model.adapters import ModelAdapter
from harness.model.surgery import count_params


@dataclass
class Target:
    ratio: float | None = None
    layers: int | None = None
    basis: str = "params"  # what --ratio counts: params (all parameters) or layers (decoder layers)

    def validate(self) -> None:
        if (self.ratio is None) == (self.layers is None):
            raise UsageError("give exactly one pruning target: --ratio F (0<F<1) or --layers N")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise UsageError(f"--ratio {self.ratio} is out of range; use a fraction strictly between 0 and 1, e.g. 0.25")
        if self.layers is not None and self.layers < 1:
            raise UsageError(f"--layers {self.layers} is out of range; remove at least 1 layer")
        if self.basis not in BASES:
            raise UsageError(f"--ratio-basis {self.basis} is unknown; use one of: {', '.join(BASES)}")

    def to_dict(self) -> dict:
        out = {"ratio": self.ratio, "layers": self.layers}
        if self.ratio is not None:
            out["basis"] = self.basis
        return out


BASES = {"params": "all parameters, embeddings included (the papers' count)",
         "layers": "decoder layers (n = round(ratio x layers))"}
EMBEDDING_SHARE_WARN = 1 / 3  # a params-basis --ratio on a model whose embeddings exceed this share warns


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def resolve_num_remove(target: Target, model, adapter: ModelAdapter) -> int:
    """Number of decoder layers n to remove.

    For a ratio, n is the layer count whose parameters come closest to ``ratio`` of the dense
    total (at least 1). Methods that add a replacement network end up with a smaller measured
    ratio; the reported ratio is always measured from parameter counts.
    """
    target.validate()
    L = adapter.num_layers
    by_layers = None if target.ratio is None else max(1, _round_half_up(target.ratio * L))
    share = None  # the parameters outside the decoder layers (embeddings, final norm, untied head)
    if target.layers is not None:
        n = target.layers
    elif target.basis == "layers":
        n = by_layers
    else:
        total = count_params(model)
        per_layer = count_params(adapter.layers[0])
        n = max(1, round(target.ratio * total / per_layer))
        share = 1.0 - per_layer * L / total
        if share > EMBEDDING_SHARE_WARN and 2 * n <= L:
            _warn(f"--ratio {target.ratio} counts all parameters, and {100 * share:.0f}% of this model's are "
                  f"embeddings: it resolves to {n} of {L} decoder layers; --ratio-basis layers would remove "
                  f"{by_layers}")
    if n >= L:
        raise UsageError(
            f"removing {n} layers does not fit a model with {L} decoder layers; ask for fewer "
            f"(--layers < {L} or a smaller --ratio)"
        )
    if 2 * n > L:
        if target.layers is not None:
            _warn(f"--layers {n} removes more than half of this model's {L} decoder layers")
        elif share is not None:
            raise UsageError(
                f"--ratio {target.ratio} of all parameters resolves to {n} of {L} decoder layers "
                f"({100 * share:.0f}% of the parameters are embeddings and other non-layer weights); a --ratio "
                "that removes more than half of the layers is refused: use --ratio-basis layers (the ratio "
                f"counts decoder layers: {by_layers} layers) or --layers N")
        else:
            raise UsageError(f"--ratio {target.ratio} ({target.basis}) resolves to {n} of {L} decoder layers; a "
                             "--ratio that removes more than half of the layers is refused: ask for a smaller "
                             "ratio or pass --layers N explicitly")
    return n


_WARNED: set[str] = set()


def _warn(message: str) -> None:
    if message not in _WARNED:  # resolved before loading and again after: said once
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr)


def check_on_config(target: Target, config) -> int | None:
    """Resolve ``target`` on a weightless (meta-device) model built from ``config``, so a ratio that
    resolves to too many layers fails before the weights load. None when the model cannot be
    built from its config alone (the check then runs after loading)."""
    import torch
    from transformers import AutoModelForCausalLM

    from harness.model.adapters import get_adapter

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        adapter = get_adapter(model)
    except Exception:  # noqa: BLE001 - remote code, exotic configs: resolved after loading instead
        return None
    return resolve_num_remove(target, model, adapter)


def decoder_params_on_config(config) -> int | None:
    """Parameters of all decoder layers together, counted on a weightless (meta-device) model built
    from ``config``; None when it cannot be built from its config alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from harness.model.adapters import get_adapter

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        layers = get_adapter(model).layers
    except Exception:  # noqa: BLE001 - remote code, exotic configs: no check before loading
        return None
    return sum(p.numel() for p in layers.parameters())

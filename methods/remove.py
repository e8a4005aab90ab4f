"""Plain removal: drop the contiguous window LLM-Streamline would pick, with no replacement.

This is the "None" row of LLM-Streamline's Table 5. ``start`` forces the window's first layer;
``layers`` (slash-separated, e.g. ``layers=3/4/9``) removes an explicit list instead.
"""
from dataclasses import dataclass

from harness import (
    MethodContext,
    PruneResult,
    UsageError,
    WindowConfig,
    option,
    register_method,
    remove_layers,
)


@dataclass
class RemoveConfig(WindowConfig):
    layers: list[int] = option(default_factory=list, help="remove these layers (a/b/c) instead of a window")

    def validate(self, num_layers: int, num_remove: int) -> None:
        if self.layers:
            drop = sorted(set(self.layers))
            if drop[0] < 0 or drop[-1] >= num_layers or len(drop) >= num_layers:
                raise UsageError(f"remove.layers={self.layers} does not fit a model with {num_layers} layers")
            if len(drop) != num_remove:  # the record's target must say what was removed
                raise UsageError(f"remove.layers lists {len(drop)} layer(s) but the target removes {num_remove}; "
                                 f"pass --layers {len(drop)} with it")
        else:
            super().validate(num_layers, num_remove)


@register_method("remove", RemoveConfig, "Remove Streamline's most redundant contiguous window, no replacement")
def remove(ctx: MethodContext, cfg: RemoveConfig) -> PruneResult:
    n = ctx.num_remove
    if cfg.layers:
        drop = sorted(set(cfg.layers))
        remove_layers(ctx.adapter, drop)
        return PruneResult(model=ctx.model, removed_layers=drop, scores={"selection": "explicit"})
    ctx.check_window(n)
    stats = ctx.layer_stats()
    scores = stats.window_cos[n]
    start = cfg.start if cfg.start is not None else stats.best_window(n)
    drop = list(range(start, start + n))
    remove_layers(ctx.adapter, drop)
    return PruneResult(model=ctx.model, removed_layers=drop,
                       scores={"window_cos": scores, "start": start, "calibration_tokens": stats.tokens})

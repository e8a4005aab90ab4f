"""Angular distance (Gromov et al., 2024, "The Unreasonable Ineffectiveness of the Deeper Layers").

d(i) = mean over calibration sequences of arccos(cos(X_i[last], X_{i+n}[last])) / pi, where
X_i is the hidden state entering layer i (captured with hooks, before the final norm) and
``last`` is each sequence's last real token (the attention mask decides; pads never count).
The window i* = argmin_i d(i) (first minimum on ties) is removed: layers i*..i*+n-1, in one
shot. The statistics come from the harness's shared scoring pass (``ctx.layer_stats``, lags
{1, n}), so running angular next to streamline/shortgpt costs no extra forward pass.
Healing with (Q)LoRA is the generic ``+lora`` post-step, not part of this method.
"""
from dataclasses import dataclass

from harness import (
    MethodContext,
    PruneResult,
    WindowConfig,
    register_method,
    remove_layers,
)


@dataclass
class AngularConfig(WindowConfig):
    """``start`` forces the window's first layer (default: argmin of d)."""


@register_method("angular", AngularConfig,
                 "Gromov et al.: remove the n-layer window with the smallest last-token angular distance")
def angular(ctx: MethodContext, cfg: AngularConfig) -> PruneResult:
    n = ctx.num_remove
    ctx.check_window(n)
    stats = ctx.layer_stats(lags=(1, n))
    dist = stats.angular[n]  # dist[i] for i = 0..L-n
    start = cfg.start if cfg.start is not None else min(range(len(dist)), key=lambda i: (dist[i], i))
    drop = list(range(start, start + n))
    remove_layers(ctx.adapter, drop)
    return PruneResult(model=ctx.model, removed_layers=drop,
                       scores={"angular_distance": dist, "start": start, "calibration_sequences": stats.sequences})

"""ShortGPT (Men et al., 2024): remove the n layers with the lowest Block Influence.

BI_i = 1 - mean over real tokens of cos(X_i[t], X_{i+1}[t]) (the mean over real tokens, not
the released code's sum over padded batches). The removed layers need not be contiguous;
they are removed in one shot.
"""
from dataclasses import dataclass

from harness import (
    MethodConfig,
    MethodContext,
    PruneResult,
    register_method,
    remove_layers,
)


@dataclass
class ShortGPTConfig(MethodConfig):
    pass


@register_method("shortgpt", ShortGPTConfig, "ShortGPT: remove the n layers with the lowest Block Influence (BI)")
def shortgpt(ctx: MethodContext, cfg: ShortGPTConfig) -> PruneResult:
    ctx.check_window(ctx.num_remove)
    stats = ctx.layer_stats()
    bi = stats.block_influence()
    order = sorted(range(len(bi)), key=lambda i: (bi[i], i))
    drop = sorted(order[: ctx.num_remove])
    remove_layers(ctx.adapter, drop)
    return PruneResult(model=ctx.model, removed_layers=drop,
                       scores={"block_influence": bi, "calibration_tokens": stats.tokens})

"""LLM-Streamline (paper v1, Chen et al. 2024): prune the most redundant contiguous window and
train a lightweight MLP to stand in for it.

1. S(i) = mean over real tokens of cos(X_i, X_{i+n}); i* = argmax S(i) (one forward pass).
2. f = Linear(d, h) -> act -> Linear(h, d) is trained with MSE so that f(X_{i*}) ~ X_{i*+n}
   on activations of the dense model, streamed batch by batch (never all held at once).
3. Layers i*..i*+n-1 are removed and f runs in their place.
Defaults: h = 2d (the paper's Table 5 puts the MLP at ~1.3% of OPT-1.3B, i.e. 2*d*h ~ 4d^2),
ReLU, AdamW lr 4e-4 (the paper's OPT-1.3B/2.7B recipe), 5 epochs.
"""
from dataclasses import dataclass

from harness import (MethodConfig, MethodContext, MLPReplacement, PruneResult, UsageError, describe,
                     fit_to_boundaries, insert_replacement, register_method, remove_layers)


@dataclass
class StreamlineConfig(MethodConfig):
    hidden_size: int | None = None  # MLP width h; None = hidden_mult * d
    hidden_mult: float = 2.0
    activation: str = "relu"
    residual: bool = False  # the paper's MLP has none; True fits x + MLP(x)
    epochs: int = 5
    lr: float = 4e-4
    weight_decay: float = 0.0
    batch_size: int = 8  # sequences per forward pass and optimiser step
    train_samples: int | None = None  # None = as many as the calibration set (a separate draw)
    train_seq_len: int | None = None  # None = calibration sequence length
    start: int | None = None  # force the window start (default: argmax S(i))


@register_method("streamline", StreamlineConfig,
                 "LLM-Streamline: remove the most redundant contiguous window, train an MLP in its place")
def streamline(ctx: MethodContext, cfg: StreamlineConfig) -> PruneResult:
    n = ctx.num_remove
    ctx.check_window(n)
    if cfg.epochs < 0 or cfg.lr <= 0 or cfg.batch_size < 1:
        raise UsageError("streamline needs epochs >= 0, lr > 0 and batch_size >= 1")
    stats = ctx.layer_stats()
    scores = stats.window_cos[n]
    if cfg.start is not None:
        if not 0 <= cfg.start <= ctx.num_layers - n:
            raise UsageError(f"streamline.start={cfg.start}: a window of {n} layers does not fit there "
                             f"(use 0..{ctx.num_layers - n})")
        start = cfg.start
    else:
        start = stats.best_window(n)
    d = ctx.adapter.hidden_size
    h = cfg.hidden_size or max(1, int(round(cfg.hidden_mult * d)))
    mlp = MLPReplacement(d, h, activation=cfg.activation, residual=cfg.residual)
    ref = next(ctx.model.parameters())
    mlp.to(device=ref.device)  # trained in float32; cast to the model dtype on insertion
    train_n = cfg.train_samples or len(ctx.calibration)
    data = ctx.training_data(train_n, cfg.train_seq_len)
    train_log = fit_to_boundaries(ctx, mlp, data, start, start + n, epochs=cfg.epochs, lr=cfg.lr,
                                  batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, seed=ctx.seed,
                                  progress=ctx.progress)
    drop = list(range(start, start + n))
    remove_layers(ctx.adapter, drop)
    where = insert_replacement(ctx.adapter, start, mlp)
    return PruneResult(
        model=ctx.model, removed_layers=drop,
        scores={"window_cos": scores, "start": start, "calibration_tokens": stats.tokens},
        replacement={**describe(mlp), "position": start, "where": where},
        extra={"training": {**train_log, "data": data.description}},
    )

"""LLM-Streamline as released with the ICLR 2025 paper (Chen et al., "Streamlining Redundant Layers
to Compress Large Language Models"; RUCKBReasoning/LLM-Streamline at adf50ba): ``streamline-iclr``.

For n layers to remove:
1. Window of n+1 layers: S(i) = mean over the calibration tokens of cos(X_i, X_{i+n+1}); i* = the
   first argmax (the released per-block 0.5 + 0.5 cos mean ranks windows identically on unpadded
   blocks; the top boundary is taken before the final norm, the released code's after it).
2. Layers i*..i*+n are replaced by ONE decoder layer initialised from layer i* (net n removed).
3. Training: ``loss=mse`` (default) fits the new layer alone to X_{i*} -> X_{i*+n+1} with the model's
   own causal mask; ``loss=lm`` trains only its parameters with the causal-LM loss. 1 epoch, AdamW
   lr 2e-4, weight decay 1e-3, 8 blocks a step, ``train_samples`` blocks of the calibration source.

Released-code bugs not copied: OPT's random init ("opt_layer" vs "opt_Layer"), MSE training without
an attention mask, the LM path's substring match that also trains layers {i*}0..{i*}9, a top-window
target after the final norm, and the "best" state kept by reference. Not reproduced: gradient
accumulation, the cosine schedule, clipping at 5, betas (0.9, 0.95), dropout, bf16, the validation set.

Against ``streamline-layer`` (paper v1): that scores n-layer windows and removes net n-1 layers.
Details and the reasoning for each choice: docs/methods/streamline_iclr.md.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from harness import (
    MethodContext,
    PruneResult,
    UsageError,
    WindowConfig,
    describe_layer,
    fit_layer_to_boundaries,
    insert_layer_replacement,
    option,
    register_method,
    steps_for,
    train_lm,
    unwrap_layer,
)

LOSSES = ("mse", "lm")


@dataclass
class StreamlineICLRConfig(WindowConfig):
    start: int | None = option(None, "force the first layer of the n+1-layer window "
                                     "(default: argmax of cos(X_i, X_{i+n+1}))")
    loss: str = option("mse", "mse: fit layer(X_{i*}) ~ X_{i*+n+1} (released mseloss_entry); "
                              "lm: the model's LM loss, only the new layer trained (llmloss_entry)")
    epochs: int = option(1, "passes over the training blocks (released code: 1)")
    lr: float = option(2e-4, "AdamW learning rate, constant (released code: 2e-4 with a cosine schedule to 5e-5)")
    weight_decay: float = option(1e-3, "AdamW weight decay (released code: 1e-3)")
    batch_size: int = option(8, "blocks per optimiser step (released code: 8, with 16 accumulation steps)")
    train_samples: int | None = option(3000, "training blocks from the calibration source; "
                                             "None = as many as the calibration set")
    train_seq_len: int | None = option(None, "tokens per training block; None = calibration sequence length "
                                             "(released code: 2048)")

    def check(self) -> None:
        name = self.method_name
        if self.loss not in LOSSES:
            raise UsageError(f"{name}.loss={self.loss} is unknown; use mse or lm")
        if self.epochs < 0 or self.lr <= 0 or self.batch_size < 1 or self.weight_decay < 0:
            raise UsageError(f"{name} needs epochs >= 0, lr > 0, weight_decay >= 0 and batch_size >= 1")
        if (self.train_samples is not None and self.train_samples < 1) or \
                (self.train_seq_len is not None and self.train_seq_len < 2):
            raise UsageError(f"{name} needs train_samples >= 1 and train_seq_len >= 2")

    def validate(self, num_layers: int, num_remove: int) -> None:
        name = self.method_name
        width = num_remove + 1
        if num_remove < 1:
            raise UsageError(f"{name} removes net n >= 1 layers (it replaces n+1 layers by one); got n={num_remove}")
        if width > num_layers:
            raise UsageError(f"{name} replaces a window of n+1 = {width} layers by one, which does not fit a model "
                             f"with {num_layers} layers (n <= {num_layers - 1})")
        if self.start is not None and not 0 <= self.start <= num_layers - width:
            raise UsageError(f"{name}.start={self.start}: the window of n+1 = {width} layers starting there does "
                             f"not fit {num_layers} layers (use 0..{num_layers - width})")


@register_method("streamline-iclr", StreamlineICLRConfig,
                 "LLM-Streamline as released for ICLR 2025: the n+1 consecutive layers with the most similar "
                 "input and output replaced by one decoder layer initialised from the first (net n removed)")
def streamline_iclr(ctx: MethodContext, cfg: StreamlineICLRConfig) -> PruneResult:
    n = ctx.num_remove
    width = n + 1
    stats = ctx.layer_stats(lags=(1, width))
    window_cos = stats.window_cos[width]
    start = cfg.start if cfg.start is not None else stats.best_window(width)
    window = list(range(start, start + width))
    scores = {"window_cos": window_cos, "window_layers": width, "start": start,
              "similarity": f"mean over real tokens of cos(X_i, X_(i+{width}))", "calibration_tokens": stats.tokens}

    # MSE: calibration blocks; LM loss: the model's own format (reference models: episodes, answers scored)
    data = (ctx.lm_training_data if cfg.loss == "lm" else ctx.training_data)(
        cfg.train_samples or len(ctx.calibration), cfg.train_seq_len)
    # the copy is the method's own: the dense layer stays in place (shared) while the targets are computed
    layer = copy.deepcopy(unwrap_layer(ctx.adapter.layers[start]))
    training: dict = {}
    if cfg.loss == "mse":
        training = fit_layer_to_boundaries(ctx, layer, data, start, start + width, epochs=cfg.epochs, lr=cfg.lr,
                                           batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, seed=ctx.seed,
                                           progress=ctx.progress)
    positions = insert_layer_replacement(ctx.adapter, start, width, layer)
    if cfg.loss == "lm":
        steps = steps_for(len(data), cfg.batch_size, cfg.epochs)
        training = train_lm(ctx.model, list(layer.parameters()), data, steps=steps, lr=cfg.lr,
                            batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, seed=ctx.seed,
                            progress=ctx.progress, train_mode=False, desc="fit replacement layer (LM loss)")
        training["epochs"] = cfg.epochs
    replacement = {**describe_layer(layer, 1, "first"), "position": start, "positions": positions,
                   "replaces_layers": window, "init_from_layer": start}
    extra = {"streamline": {"variant": "iclr", "method": cfg.method_name, "window_layers": width,
                            "net_removed": n},
             "training": {**training, "data": data.description}}
    return PruneResult(model=ctx.model, removed_layers=window, scores=scores, replacement=replacement, extra=extra)

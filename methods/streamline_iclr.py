"""LLM-Streamline as released with the ICLR 2025 paper ("Streamlining Redundant Layers to
Compress Large Language Models", Chen et al.): ``streamline-iclr``.

What the released code does (GitHub RUCKBReasoning/LLM-Streamline, read at adf50ba;
``LLM_Streamline/get_cosine.py``, ``train_lightweightnetwork.py``, ``train_mseloss.py``,
``train_llmloss.py``) and what this method does, for n layers to remove:

1. **Window: n+1 consecutive layers.** Both entry points score windows of ``n+1`` layers:
   S(i) = cos(X_i, X_{i+n+1}) for i = 0..L-n-1, and take i* = argmax S(i) (first maximum on
   ties, like ``torch.argmax``). Here S(i) is the mean over every real token of the
   calibration set of cos(X_i[t], X_{i+n+1}[t]) (``ctx.layer_stats(lags=(1, n+1))``, shared
   with the other methods of the run). The released code maps each token's cosine to
   0.5 + 0.5*cos, averages it over the tokens of one 2048-token block, then averages the
   blocks. The affine map never changes the argmax, and with blocks that all have the same
   number of real tokens (the released code's and the harness's calibration blocks: fixed
   length, no padding) the mean of per-block means *is* the mean over all tokens, so the two
   rank windows identically. They can differ in two places only: (a) on padded data with
   blocks of unequal length (the per-block mean weights short blocks more; the harness never
   pads its calibration blocks), and (b) for the window that ends at the top: the released code
   takes ``hidden_states[L]`` from ``output_hidden_states``, which is *after* the final norm,
   while X_L here is the last decoder layer's output before it (ALGORITHMS.md). Its 50
   calibration blocks are drawn from SlimPajama's training split with an unseeded
   ``randperm``; here they are the run's seeded calibration set.
2. **Replacement.** Layers i*..i*+n (n+1 layers) are replaced by ONE decoder layer at position
   i*, initialised as a copy of layer i* (the first layer of the window; README: "the parameter
   weights of the first pruned layer are inherited"). The model loses n+1 layers and gains
   one: net n removed, final depth L-n. ``removed_layers`` lists the n+1 replaced layers
   (original indices); the measured ratio counts the new layer's parameters back in.
3. **Training**, ``loss=mse`` (default, the released ``mseloss_entry.py``): the new layer
   alone is trained so that layer(X_{i*}) ~ X_{i*+n+1}, MSE over real tokens, on activations of
   the dense model streamed batch by batch (``fit_layer_to_boundaries``: the layer gets the
   model's own arguments, causal mask included). ``loss=lm`` (``llmloss_entry.py``): the layer
   is inserted first and only its parameters are trained with the model's causal-LM loss
   (``train_lm``, gradient norm clipped at 1.0 like the released DeepSpeed config).
   Defaults follow the released ``args.py``: 1 epoch, AdamW lr 2e-4, weight decay 1e-3,
   8 blocks per step. Training blocks: ``train_samples`` (3,000) from the calibration source
   (the released code: 100,000 SlimPajama documents in 2048-token blocks).

Released-code bugs and pitfalls, documented and NOT copied:

- OPT: the init is requested as ``"opt_layer"`` but the copy branch tests ``"opt_Layer"``, so
  on the MSE path an OPT replacement starts from random weights. Here every family starts
  from layer i*'s weights (what the README and the Llama branch do).
- MSE path: the layer is called with hidden states and position ids only, no attention mask;
  with the pinned transformers (4.45.2, eager attention) that is bidirectional attention in
  training but causal at inference. Here it trains with the causal mask it runs with.
- LM path: the trainable set is every parameter whose name contains ``"layers.{i*}"``, a
  substring match, so for a one-digit i* the layers {i*}0..{i*}9 are trained too. Here only the
  new layer is trained.
- A window ending at the top is trained toward the *normed* ``hidden_states[L]``, which the
  pruned model then normalises again; here the target is the pre-norm X_L.
- The MSE trainer keeps the "best" validation state by reference to the live state_dict (in
  effect the last state) and fails when no epoch improves. Here the layer is the state after
  the last step (no validation set).

Not reproduced (differences in the recipe, not bugs): gradient accumulation (the released
effective batch is 8 x 16 blocks; here one optimiser step per ``batch_size`` blocks), its
cosine learning-rate schedule with warmup (min lr 5e-5; here the lr is constant), the MSE
path's gradient clipping at 5 (none here), the LM path's AdamW betas (0.9, 0.95) (here
torch's (0.9, 0.999)), dropout during training (both paths train in train mode; here the
layer trains in eval mode, no dropout), bf16 on 4 GPUs for the LM path, the held-out
validation set, and the SlimPajama domain mixture.

How it differs from ``streamline-layer`` (paper v1, Table 5 "Transformer Layer w/o params
sharing"): that method scores windows of n layers (cos(X_i, X_{i+n})) and replaces those n
layers with one decoder layer, so it removes net n-1 layers for the same n; this one scores
n+1 layers and removes net n. For the same ``--layers n`` the two leave L-n+1 and L-n layers.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

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

    method_name: ClassVar[str] = "streamline-iclr"

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
        if self.loss not in LOSSES:
            raise UsageError(f"{name}.loss={self.loss} is unknown; use mse or lm")
        if self.epochs < 0 or self.lr <= 0 or self.batch_size < 1 or self.weight_decay < 0:
            raise UsageError(f"{name} needs epochs >= 0, lr > 0, weight_decay >= 0 and batch_size >= 1")
        if (self.train_samples is not None and self.train_samples < 1) or \
                (self.train_seq_len is not None and self.train_seq_len < 2):
            raise UsageError(f"{name} needs train_samples >= 1 and train_seq_len >= 2")


@register_method("streamline-iclr", StreamlineICLRConfig,
                 "LLM-Streamline as released for ICLR 2025: the n+1 consecutive layers with the most similar "
                 "input and output replaced by one decoder layer initialised from the first (net n removed)")
def streamline_iclr(ctx: MethodContext, cfg: StreamlineICLRConfig) -> PruneResult:
    n = ctx.num_remove
    cfg.validate(ctx.num_layers, n)
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

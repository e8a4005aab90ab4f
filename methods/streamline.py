"""LLM-Streamline (paper v1, Chen et al. 2024): prune the most redundant contiguous window and
train a lightweight network to stand in for it.

1. S(i) = mean over real tokens of cos(X_i, X_{i+n}); i* = argmax S(i) (one forward pass).
2. A replacement f is fit so that f(X_{i*}) ~ X_{i*+n} on the dense model's activations, streamed
   batch by batch, or with the LM loss (``loss=lm``: f inserted, everything else frozen).
3. Layers i*..i*+n-1 are removed and f runs in their place; optional post-training of f alone
   with the LM loss (``post_train_steps``, the paper's Table 3 protocol).

One method name per replacement (paper Tables 5 and 6): ``streamline`` (MLP), ``-mlp-shared`` (one
MLP applied n times), ``-multi-mlp`` (one MLP per layer), ``-layer`` / ``-layer-shared`` (a decoder
layer, from the first pruned one), ``-none`` (nothing; heal with ``streamline-none+lora``).

Where it deviates from the paper (README "Streamline on a real model"): the default ``recipe=cpu``
fits 256 blocks (the paper: 3,000), starts the MLP at the identity (ReLU(x) - ReLU(-x) = x with
h = 2d, i.e. plain removal) instead of random weights, and fits with ``fit_loss=normed`` (1 - cos
after the model's final norm for a window ending at the top, else a cosine loss) instead of MSE;
``-o streamline.recipe=paper`` restores all three. Each run stores the fit's held-out loss beside
plain removal's and warns when the replacement is worse. Defaults otherwise the paper's (h = 2d,
ReLU, AdamW lr 4e-4, 5 epochs); the post-training lr and length are ours (the paper gives none).
The variants in full: docs/methods/streamline.md.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass

from harness import (
    ACTIVATIONS,
    CACHE_CHOICES,
    INITS,
    CHECKPOINT_CHOICES,
    DEFAULT_HIDDEN_MULT,
    MethodContext,
    MLPReplacement,
    MultiMLPReplacement,
    PruneResult,
    UsageError,
    WindowConfig,
    describe,
    describe_layer,
    fit_layer_to_boundaries,
    FIT_LOSSES,
    fit_to_boundaries,
    heldout_mse,
    identity_check,
    insert_layer_replacement,
    insert_replacement,
    mlp_width,
    option,
    register_method,
    remove_layers,
    steps_for,
    train_lm,
    unwrap_layer,
    use_checkpointing,
)

LOSSES = ("mse", "lm")
CPU_TRAIN_SAMPLES = 256
CPU_RECIPE = {"train_samples": CPU_TRAIN_SAMPLES, "init": "identity", "fit_loss": "normed"}
# paper v1, OPT-1.3B/2.7B: 3,000 samples, a fresh MLP, MSE
PAPER_RECIPE = {"train_samples": 3000, "init": "random", "fit_loss": "mse"}
LAYER_INITS = ("first", "random")


@dataclass
class StreamlineNoneConfig(WindowConfig):
    """``start`` forces the window's first layer (default: argmax S(i))."""


@dataclass
class _TrainedConfig(StreamlineNoneConfig):
    epochs: int = option(5, "passes over the training blocks")
    lr: float = option(4e-4, "AdamW learning rate (paper: 4e-4)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    batch_size: int = option(8, "sequences per forward pass and optimiser step")
    train_samples: int | None = option(CPU_TRAIN_SAMPLES, "training blocks (recipe=paper: 3,000, the paper's "
                                       "OPT-1.3B/2.7B recipe); None = as many as the calibration set")
    train_seq_len: int | None = option(None, "None = calibration sequence length")
    loss: str = option("mse", "mse: fit X_{i*} -> X_{i*+n}; lm: the model's LM loss, all else frozen")
    post_train_steps: int = option(0, "> 0: then train only the replacement with the LM loss (Table 3 protocol)")
    post_train_lr: float = option(1e-4, "post-training learning rate")
    post_train_batch_size: int = option(8, "post-training blocks per step")
    post_train_samples: int | None = option(None, "None = post_train_steps * post_train_batch_size blocks")
    post_train_text: str | None = option(None, ".txt/.jsonl file or Hub dataset id[:config]; None = calibration source")
    post_train_split: str = option("train", "with post_train_text")
    post_train_field: str = option("text", "with post_train_text")
    grad_checkpointing: str = option("auto", "auto|on|off: recompute decoder layers in the backward pass of the "
                                     "layer fit, LM-loss fit and post-training (auto: above 2B parameters)")
    activation_cache: str = option("ram", "none|ram|disk: keep the first epoch's streamed (input, target) "
                                   "activations for epochs 2..E (MSE fit), within activation_cache_gb")
    activation_cache_gb: float = option(2.0, "size limit of the activation cache (GiB); over it, every epoch streams")
    recipe: str = option("cpu", "cpu: 256 training blocks and MLPs that start at the identity (plain removal), "
                         "affordable on a CPU; paper: the paper's 3,000 blocks and fresh random MLPs (applied to "
                         "train_samples and init where they are left at their defaults)")

    def __post_init__(self):
        if self.recipe == "paper":
            for key, value in PAPER_RECIPE.items():
                if hasattr(self, key) and getattr(self, key) == CPU_RECIPE[key]:
                    setattr(self, key, value)
        super().__post_init__()

    def check(self) -> None:
        name = self.method_name
        if self.recipe not in ("cpu", "paper"):
            raise UsageError(f"{name}.recipe={self.recipe} is unknown; use cpu or paper")
        if self.grad_checkpointing not in CHECKPOINT_CHOICES:
            raise UsageError(f"{name}.grad_checkpointing={self.grad_checkpointing} is unknown; use auto, on or off")
        if self.activation_cache not in CACHE_CHOICES or not self.activation_cache_gb >= 0:
            raise UsageError(f"{name}.activation_cache must be none, ram or disk and activation_cache_gb >= 0")
        if self.epochs < 0 or self.lr <= 0 or self.batch_size < 1 or self.weight_decay < 0:
            raise UsageError(f"{name} needs epochs >= 0, lr > 0, batch_size >= 1 and weight_decay >= 0")
        if (self.train_samples is not None and self.train_samples < 1) or \
                (self.train_seq_len is not None and self.train_seq_len < 2):
            raise UsageError(f"{name} needs train_samples >= 1 and train_seq_len >= 2")
        if self.loss not in LOSSES:
            raise UsageError(f"{name}.loss={self.loss} is unknown; use mse or lm")
        if self.post_train_steps < 0 or self.post_train_lr <= 0 or self.post_train_batch_size < 1 or \
                (self.post_train_samples is not None and self.post_train_samples < 1):
            raise UsageError(f"{name} needs post_train_steps >= 0, post_train_lr > 0, post_train_batch_size >= 1 "
                             "and post_train_samples >= 1")


@dataclass
class StreamlineConfig(_TrainedConfig):
    hidden_size: int | None = option(None, "MLP width h; None = hidden_mult * d")
    hidden_mult: float = option(DEFAULT_HIDDEN_MULT, "MLP width as a multiple of d when hidden_size is None (paper: 2)")
    activation: str = option("relu", "MLP activation: relu, gelu, silu or tanh")
    residual: bool = option(False, "the paper's MLP has none; True fits x + MLP(x)")
    init: str = option("identity", "identity: the MLP starts at ReLU(x) - ReLU(-x) = x, i.e. plain removal of the "
                       "window (needs relu and h >= 2d); random: a fresh MLP (the paper's recipe)")
    heldout_samples: int = option(16, "blocks of the training draw held out to measure the fit's loss beside "
                                  "plain removal's (0 = not measured)")
    fit_loss: str = option("normed", "mse: the paper's; cosine: 1 - cos + log-norm-ratio^2 per token, blind to the "
                           "residual stream's scale; normed: for a window ending at the top, 1 - cos after the final "
                           "norm (what the LM head reads), else cosine (README: Streamline on a real model)")

    def check(self) -> None:
        super().check()
        name = self.method_name
        if self.activation not in ACTIVATIONS:
            raise UsageError(f"{name}.activation={self.activation} is unknown; use one of {', '.join(ACTIVATIONS)}")
        if (self.hidden_size is not None and self.hidden_size < 1) or self.hidden_mult <= 0:
            raise UsageError(f"{name} needs hidden_size >= 1 and hidden_mult > 0")
        if self.init not in INITS:
            raise UsageError(f"{name}.init={self.init} is unknown; use identity or random")
        if self.init == "identity" and not self.residual and \
                (self.activation != "relu" or (self.hidden_size is None and self.hidden_mult < 2)):
            raise UsageError(f"{name}.init=identity needs activation=relu and hidden_mult >= 2 (ReLU(x) - ReLU(-x) = x); "
                             f"pass -o {name}.init=random for a fresh MLP")
        if self.fit_loss not in FIT_LOSSES:
            raise UsageError(f"{name}.fit_loss={self.fit_loss} is unknown; use one of {', '.join(FIT_LOSSES)}")
        if self.heldout_samples < 0:
            raise UsageError(f"{name}.heldout_samples must be >= 0")


@dataclass
class StreamlineLayerConfig(_TrainedConfig):
    init: str = option("first", "first: a copy of the first pruned layer; random: a fresh layer")

    def check(self) -> None:
        super().check()
        if self.init not in LAYER_INITS:
            raise UsageError(f"{self.method_name}.init={self.init} is unknown; use first or random")


def _window(ctx: MethodContext, cfg) -> tuple[int, dict]:
    n = ctx.num_remove
    ctx.check_window(n)
    stats = ctx.layer_stats()
    start = cfg.start if cfg.start is not None else stats.best_window(n)
    return start, {"window_cos": stats.window_cos[n], "start": start, "calibration_tokens": stats.tokens}


def check_heldout(name: str, held: dict) -> dict:
    """Warn when the fitted replacement is further from the window's output on held-out blocks than
    plain removal is (the replacement then makes the model worse than no replacement)."""
    if not held["better_than_removal"]:
        key = "mse" if held["judged_by"] == "mse" else "cosine"
        print(f"warning: {name}: the replacement's held-out {key} loss {held[key]:.4g} is above plain removal's "
              f"{held['identity_' + key]:.4g}; it is likely worse than removing the window", file=sys.stderr)
    return held


def run_streamline(ctx: MethodContext, cfg, kind: str) -> PruneResult:
    n = ctx.num_remove
    start, scores = _window(ctx, cfg)
    drop = list(range(start, start + n))
    info = {"variant": kind, "method": cfg.method_name}
    if kind == "none":
        remove_layers(ctx.adapter, drop)
        return PruneResult(model=ctx.model, removed_layers=drop, scores=scores, extra={"streamline": info})
    data, heldout = _training_data(ctx, cfg)
    fit = dict(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
               seed=ctx.seed, progress=ctx.progress, activation_cache=cfg.activation_cache,
               activation_cache_gb=cfg.activation_cache_gb)
    checkpoint = use_checkpointing(cfg.grad_checkpointing, ctx.model)
    if kind in ("mlp", "mlp-shared", "multi-mlp"):
        module, training, replacement = _mlp_replacement(ctx, cfg, kind, start, data, heldout, fit)
    else:
        module, training, replacement = _layer_replacement(ctx, cfg, kind, start, data, fit, checkpoint)
    trainable = list(module.parameters())
    if cfg.loss == "lm":
        steps = steps_for(len(data), cfg.batch_size, cfg.epochs)
        training = train_lm(ctx.model, trainable, data, steps=steps, lr=cfg.lr, batch_size=cfg.batch_size,
                            weight_decay=cfg.weight_decay, seed=ctx.seed, progress=ctx.progress, train_mode=False,
                            desc="fit replacement (LM loss)", grad_checkpointing=checkpoint)
        training["epochs"] = cfg.epochs
    extra = {"streamline": info, "training": {**training, "data": data.description}}
    if cfg.post_train_steps > 0:
        extra["post_training"] = _post_train(ctx, cfg, trainable, checkpoint)
    return PruneResult(model=ctx.model, removed_layers=drop, scores=scores, replacement=replacement, extra=extra)


def _training_data(ctx: MethodContext, cfg):
    """(training blocks, held-out blocks or None). MSE fits activations on calibration blocks; the LM
    loss trains on the text in the model's own format (reference models: whole episodes, answers
    scored; any other model: the same blocks)."""
    train_n = cfg.train_samples or len(ctx.calibration)
    hold = getattr(cfg, "heldout_samples", 0) if cfg.loss == "mse" else 0
    data = (ctx.lm_training_data if cfg.loss == "lm" else ctx.training_data)(train_n + hold, cfg.train_seq_len)
    if hold and len(data) > hold:  # the training draw's last blocks: the fit never sees them
        return data.split(hold)
    return data, None


def _mlp_replacement(ctx: MethodContext, cfg, kind: str, start: int, data, heldout, fit: dict):
    """Build the MLP replacement, fit it (MSE) and judge it on the held-out blocks while the dense
    window is in place, then swap the window for it; (module, training log, replacement info)."""
    n = ctx.num_remove
    d = ctx.adapter.hidden_size
    h = mlp_width(d, cfg.hidden_size, cfg.hidden_mult)
    why = identity_check(d, h, cfg.activation) if cfg.init == "identity" and not cfg.residual else None
    if why:
        raise UsageError(f"{cfg.method_name}.init=identity is impossible here: {why}; "
                         f"pass -o {cfg.method_name}.init=random")
    if kind == "multi-mlp":
        module = MultiMLPReplacement(d, h, n, activation=cfg.activation, residual=cfg.residual, init=cfg.init)
    else:
        module = MLPReplacement(d, h, activation=cfg.activation, residual=cfg.residual,
                                repeat=n if kind == "mlp-shared" else 1, init=cfg.init)
    module.to(device=next(ctx.model.parameters()).device)  # fit in float32; cast to the model dtype on insertion
    training: dict = {}
    if cfg.loss == "mse" and kind == "multi-mlp":  # MLP k: X_{i*+k} -> X_{i*+k+1}, its own layer
        logs = [fit_to_boundaries(ctx, mlp, data, start + k, start + k + 1, fit_loss=cfg.fit_loss, **fit)
                for k, mlp in enumerate(module.mlps)]
        training = {"per_mlp": logs, "epoch_loss": [sum(v) / len(v) for v in zip(*(g["epoch_loss"] for g in logs))],
                    "loss": "mse"}
    elif cfg.loss == "mse":
        training = fit_to_boundaries(ctx, module, data, start, start + n, fit_loss=cfg.fit_loss, **fit)
    if heldout is not None:  # the dense window is still in place: its boundaries are the targets
        training["heldout"] = check_heldout(cfg.method_name,
                                            heldout_mse(ctx, module, heldout, start, start + n, cfg.batch_size,
                                                        fit_loss=cfg.fit_loss))
    training["init"] = "identity (plain removal)" if cfg.init == "identity" and not cfg.residual else \
        ("zero residual (plain removal)" if cfg.residual else "random")
    remove_layers(ctx.adapter, list(range(start, start + n)))
    where = insert_replacement(ctx.adapter, start, module)
    return module, training, {**describe(module), "position": start, "where": where}


def _layer_replacement(ctx: MethodContext, cfg, kind: str, start: int, data, fit: dict, checkpoint: bool):
    """A decoder layer (a copy of layer ``start``, or freshly initialised), fit with MSE (applied n
    times for layer-shared) and put in the window's place; (module, training log, replacement info)."""
    n = ctx.num_remove
    repeat = n if kind == "layer-shared" else 1
    if cfg.init == "first":  # a copy: the dense layer stays in place while the targets are computed
        module = copy.deepcopy(unwrap_layer(ctx.adapter.layers[start]))
    else:
        module = ctx.adapter.new_layer(start, init=True)  # the model's own initialisation
    training: dict = {}
    if cfg.loss == "mse":
        training = fit_layer_to_boundaries(ctx, module, data, start, start + n, repeat=repeat,
                                           grad_checkpointing=checkpoint, **fit)
    positions = insert_layer_replacement(ctx.adapter, start, n, module, repeat=repeat)
    return module, training, {**describe_layer(module, repeat, cfg.init), "position": start, "positions": positions,
                              "init_from_layer": start if cfg.init == "first" else None}


def _post_train(ctx: MethodContext, cfg, trainable: list, checkpoint: bool) -> dict:
    """The paper's post-training: the replacement alone, LM loss, on its own text."""
    pdata = ctx.lm_training_data(cfg.post_train_samples or cfg.post_train_steps * cfg.post_train_batch_size,
                                 cfg.train_seq_len, seed_offset=2, source=cfg.post_train_text,
                                 split=cfg.post_train_split if cfg.post_train_text else None,
                                 field=cfg.post_train_field if cfg.post_train_text else None)
    post = train_lm(ctx.model, trainable, pdata, steps=cfg.post_train_steps, lr=cfg.post_train_lr,
                    batch_size=cfg.post_train_batch_size, seed=ctx.seed + 1, progress=ctx.progress,
                    train_mode=False, desc="post-train replacement", grad_checkpointing=checkpoint)
    return {**post, "trained": "replacement only", "data": pdata.description}


VARIANTS = [
    ("streamline", "mlp", StreamlineConfig,
     "LLM-Streamline: remove the most redundant contiguous window, train an MLP in its place "
     "(Table 5 'MLP w/o params sharing', Table 6 'MLP')"),
    ("streamline-mlp-shared", "mlp-shared", StreamlineConfig,
     "LLM-Streamline with one MLP applied n times (Table 5 'MLP w/ params sharing')"),
    ("streamline-multi-mlp", "multi-mlp", StreamlineConfig,
     "LLM-Streamline with one MLP per removed layer, each fit to its own layer (Table 6 'Multiple MLP')"),
    ("streamline-layer", "layer", StreamlineLayerConfig,
     "LLM-Streamline with one decoder layer, init from the first pruned layer "
     "(Table 5 'Transformer Layer w/o params sharing'; net n-1 removed; the ICLR 2025 method is streamline-iclr)"),
    ("streamline-layer-shared", "layer-shared", StreamlineLayerConfig,
     "LLM-Streamline with one decoder layer applied n times (Table 5 'Transformer Layer w/ params sharing')"),
    ("streamline-none", "none", StreamlineNoneConfig,
     "LLM-Streamline's window removed, nothing inserted (Table 5 'None'; heal with streamline-none+lora)"),
]


def _register(name: str, kind: str, config: type, help: str) -> None:
    def prune(ctx: MethodContext, cfg) -> PruneResult:
        return run_streamline(ctx, cfg, kind)

    prune.__name__ = prune.__qualname__ = name.replace("-", "_")
    register_method(name, config, help)(prune)


for _name, _kind, _config, _help in VARIANTS:
    _register(_name, _kind, _config, _help)

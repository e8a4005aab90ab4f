"""Lightweight replacement networks and their streaming trainer.

``fit_to_boundaries`` trains a module f so that f(X_start) ~ X_end, with activations streamed
batch by batch from forward passes of the (partially pruned or dense) model: nothing is kept
between batches, so memory is the model plus one batch, whatever the number of samples.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class MLPReplacement(nn.Module):
    """Linear(d, h) -> activation -> Linear(h, d), optionally applied ``repeat`` times
    (parameter sharing) and optionally with a residual connection (x + MLP(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "relu",
                 repeat: int = 1, residual: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; choose from {', '.join(ACTIVATIONS)}")
        self.init_kwargs = dict(hidden_size=hidden_size, intermediate_size=intermediate_size,
                                activation=activation, repeat=repeat, residual=residual)
        self.up = nn.Linear(hidden_size, intermediate_size)
        self.act = ACTIVATIONS[activation]()
        self.down = nn.Linear(intermediate_size, hidden_size)
        self.repeat = repeat
        self.residual = residual
        if residual:  # start exactly at the identity (= plain removal) and improve from there
            nn.init.zeros_(self.down.weight)
            nn.init.zeros_(self.down.bias)

    def forward(self, x):
        for _ in range(self.repeat):
            y = self.down(self.act(self.up(x)))
            x = x + y if self.residual else y
        return x

    def extra_repr(self) -> str:
        return f"repeat={self.repeat}, residual={self.residual}"


def describe(module: nn.Module) -> dict:
    """Enough to rebuild ``module``: dotted class path and constructor kwargs."""
    cls = type(module)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "kwargs": getattr(module, "init_kwargs", {}),
            "params": sum(p.numel() for p in module.parameters())}


def build_from_description(desc: dict) -> nn.Module:
    import importlib

    module_name, _, qual = desc["class"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), qual)
    return cls(**desc.get("kwargs", {}))


def fit_to_boundaries(ctx, module: nn.Module, data, start: int, end: int, *, epochs: int, lr: float,
                      batch_size: int, weight_decay: float = 0.0, seed: int = 0, progress: bool = True) -> dict:
    """Train ``module`` with MSE so that module(X_start) ~ X_end over real tokens.

    Each epoch re-runs the model's forward pass up to X_end on ``batch_size`` sequences at a
    time (the pass stops there), then takes one optimiser step on that batch's real tokens.
    Returns a small training log (loss per epoch, steps, tokens, wall time).
    """
    torch.manual_seed(seed)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    module.train()
    ref = next(module.parameters())
    log = {"epoch_loss": [], "steps": 0, "tokens_per_epoch": 0, "optimizer": "AdamW", "lr": lr,
           "weight_decay": weight_decay, "epochs": epochs, "batch_size": batch_size, "loss": "mse"}
    t0 = time.perf_counter()
    n_batches = math.ceil(len(data) / batch_size)
    for epoch in range(epochs):
        total, tokens = 0.0, 0
        pairs = ctx.boundary_pairs(data, start, end, batch_size=batch_size)
        for states, mask in tqdm(pairs, total=n_batches, desc=f"fit replacement (epoch {epoch + 1}/{epochs})",
                                 disable=not progress):
            x = states[start][mask.to(states[start].device)].to(device=ref.device, dtype=ref.dtype)
            y = states[end][mask.to(states[end].device)].to(device=ref.device, dtype=ref.dtype)
            with torch.enable_grad():
                pred = module(x)
                loss = nn.functional.mse_loss(pred.float(), y.float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            total += loss.detach().item() * x.shape[0]
            tokens += x.shape[0]
            log["steps"] += 1
        log["epoch_loss"].append(total / max(tokens, 1))
        log["tokens_per_epoch"] = tokens
    module.eval()
    log["seconds"] = time.perf_counter() - t0
    return log


class MultiMLPReplacement(nn.Module):
    """One ``MLPReplacement`` per removed layer, applied in order (LLM-Streamline Table 6,
    "Multiple MLP"); MLP k stands in for the k-th layer of the window."""

    def __init__(self, hidden_size: int, intermediate_size: int, count: int, activation: str = "relu",
                 residual: bool = False):
        super().__init__()
        self.init_kwargs = dict(hidden_size=hidden_size, intermediate_size=intermediate_size, count=count,
                                activation=activation, residual=residual)
        self.mlps = nn.ModuleList(MLPReplacement(hidden_size, intermediate_size, activation, 1, residual)
                                  for _ in range(count))

    def forward(self, x):
        for mlp in self.mlps:
            x = mlp(x)
        return x


def fit_layer_to_boundaries(ctx, layer: nn.Module, data, start: int, end: int, *, repeat: int = 1, epochs: int,
                            lr: float, batch_size: int, weight_decay: float = 0.0, seed: int = 0,
                            progress: bool = True) -> dict:
    """Train a decoder layer (not part of the model) with MSE so that ``layer`` applied
    ``repeat`` times to X_start ~ X_end over real tokens.

    The layer is called with the very arguments the model passes to its layer ``start`` in the
    same forward pass (captured by a pre-hook): the causal attention mask, position ids and
    embeddings, with the cache left out. It trains in eval mode (no dropout), like the MLP fit.
    """
    from .adapters import first_tensor

    torch.manual_seed(seed)
    params = [p for p in layer.parameters()]
    flags = [(p, p.requires_grad) for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    layer.eval()
    captured: dict = {}

    def grab(_module, args, kwargs):
        captured["args"] = tuple(args[1:])
        captured["kwargs"] = {k: v for k, v in kwargs.items()
                              if k not in ("hidden_states", "past_key_values", "past_key_value", "use_cache")}

    log = {"epoch_loss": [], "steps": 0, "tokens_per_epoch": 0, "optimizer": "AdamW", "lr": lr,
           "weight_decay": weight_decay, "epochs": epochs, "batch_size": batch_size, "loss": "mse",
           "repeat": repeat, "layer_inputs": "the model's own arguments to layer start (causal mask)"}
    t0 = time.perf_counter()
    n_batches = math.ceil(len(data) / batch_size)
    handle = ctx.adapter.layers[start].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for epoch in range(epochs):
            total, tokens = 0.0, 0
            pairs = ctx.boundary_pairs(data, start, end, batch_size=batch_size)
            for states, mask in tqdm(pairs, total=n_batches, desc=f"fit layer (epoch {epoch + 1}/{epochs})",
                                     disable=not progress):
                x, y = states[start], states[end]
                mask = mask.to(x.device)
                with torch.enable_grad():
                    h = x
                    for _ in range(repeat):
                        h = first_tensor(layer(h, *captured["args"], use_cache=False, **captured["kwargs"]))
                    loss = nn.functional.mse_loss(h[mask].float(), y[mask].float())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                count = int(mask.sum())
                total += loss.detach().item() * count
                tokens += count
                log["steps"] += 1
            log["epoch_loss"].append(total / max(tokens, 1))
            log["tokens_per_epoch"] = tokens
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        opt.zero_grad(set_to_none=True)
    log["seconds"] = time.perf_counter() - t0
    return log


def describe_layer(layer: nn.Module, repeat: int, init: str) -> dict:
    """The manifest entry of a decoder-layer replacement (it is saved inside the checkpoint)."""
    cls = type(layer)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "kind": "decoder_layer", "repeat": repeat,
            "init": init, "params": sum(p.numel() for p in layer.parameters())}

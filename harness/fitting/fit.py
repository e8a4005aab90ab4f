"""Streaming trainers for replacement networks.

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

from harness.errors import MethodFailed
from harness.fitting.scale import ActivationCache, autocast_for, checkpointing


def check_loss(loss: float, what: str, epoch: int, step: int) -> None:
    """A non-finite training loss fails the method at once (its result would be garbage)."""
    if not math.isfinite(loss):
        raise MethodFailed(f"{what}: training loss became {loss} at epoch {epoch + 1}, step {step + 1}; "
                           "lower the learning rate")


FIT_LOSSES = ("mse", "cosine", "normed")


def boundary_loss(pred, y, kind: str = "mse", reader=None):
    """The replacement's training loss on (tokens, d) rows.

    ``mse``: the paper's mean squared error. ``cosine``: mean over tokens of (1 - cos(pred, y)) plus
    (log(|pred| / |y|))^2, i.e. direction and per-token scale, independent of how large the residual
    stream is; on Gemma 3 270M one dimension of the residual stream averages |x| = 36,000 against
    ~1,000 for the next, so MSE spends the fit on that one dimension. ``normed``: what reads X_end
    when that is the model's final norm (``reader``): 1 - cos(norm(pred), norm(y)), the vector the
    LM head sees (the norm's weight included: Gemma's scales some dimensions 300x and nearly zeroes
    the large one), blind to the scale the norm removes; without a reader it is ``cosine``."""
    if kind == "mse":
        return nn.functional.mse_loss(pred, y)
    if kind == "normed" and reader is not None:
        return (1 - nn.functional.cosine_similarity(reader(pred), reader(y), dim=-1)).mean()
    if kind in ("cosine", "normed"):
        cos = nn.functional.cosine_similarity(pred, y, dim=-1)
        ratio = torch.log(pred.norm(dim=-1).clamp(min=1e-6) / y.norm(dim=-1).clamp(min=1e-6))
        return (1 - cos).mean() + ratio.pow(2).mean()
    raise ValueError(f"unknown fit loss '{kind}'; choose from {', '.join(FIT_LOSSES)}")


def loss_reader(ctx, end: int, fit_loss: str):
    """For ``normed``: a frozen float32 copy of the final norm when X_end is the last layer's output
    (the module that reads it), else None (the loss is then ``cosine``)."""
    import copy

    norm = ctx.adapter.final_norm
    if fit_loss != "normed" or end != ctx.adapter.num_layers or norm is None:
        return None
    return copy.deepcopy(norm).float().requires_grad_(False)  # same device; its grads never touch the model


def fit_to_boundaries(ctx, module: nn.Module, data, start: int, end: int, *, epochs: int, lr: float,
                      batch_size: int, weight_decay: float = 0.0, seed: int = 0, progress: bool = True,
                      activation_cache: str = "none", activation_cache_gb: float = 2.0,
                      fit_loss: str = "mse") -> dict:
    """Train ``module`` so that module(X_start) ~ X_end over real tokens (``fit_loss``: see
    ``boundary_loss``).

    Each epoch re-runs the model's forward pass up to X_end on ``batch_size`` sequences at a
    time (the pass stops there), then takes one optimiser step on that batch's real tokens.
    With ``activation_cache`` (ram/disk, within ``activation_cache_gb``) the first epoch's
    (X_start, X_end) pairs are kept and epochs 2..E replay them instead of the forward pass
    (harness.fitting.scale). On CUDA the step runs under bf16 autocast.
    Returns a small training log (loss per epoch, steps, tokens, wall time).
    """
    torch.manual_seed(seed)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    module.train()
    ref = next(module.parameters())
    log = _new_log(lr, weight_decay, epochs, batch_size, fit_loss=fit_loss)
    t0 = time.perf_counter()
    reader = loss_reader(ctx, end, fit_loss)
    log["fit_loss_reader"] = type(reader).__name__ if reader is not None else None
    n_batches = math.ceil(len(data) / batch_size)
    model_ref = next(ctx.model.parameters())
    expect = 2 * int(data.attention_mask.sum()) * ctx.adapter.hidden_size * model_ref.element_size()
    cache = ActivationCache(activation_cache if epochs > 1 else "none", activation_cache_gb, n_batches, expect)

    def streamed():
        for states, mask in ctx.boundary_pairs(data, start, end, batch_size=batch_size):
            pair = (states[start][mask.to(states[start].device)], states[end][mask.to(states[end].device)])
            cache.add(pair)
            yield pair

    def step(pair):
        x = pair[0].to(device=ref.device, dtype=ref.dtype)
        y = pair[1].to(device=ref.device, dtype=ref.dtype)
        with torch.enable_grad(), autocast_for(ref.device):
            loss = boundary_loss(module(x).float(), y.float(), fit_loss, reader)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss.detach().item(), x.shape[0]

    _run_epochs(log, epochs, n_batches, cache, streamed, model_ref.device, step, "replacement", progress)
    module.eval()
    log["activation_cache"] = cache.describe()
    cache.close()
    log["seconds"] = time.perf_counter() - t0
    return log


def _new_log(lr: float, weight_decay: float, epochs: int, batch_size: int, **extra) -> dict:
    return {"epoch_loss": [], "steps": 0, "tokens_per_epoch": 0, "optimizer": "AdamW", "lr": lr,
            "weight_decay": weight_decay, "epochs": epochs, "batch_size": batch_size, "loss": "mse", **extra}


def _capture_layer_args(layer: nn.Module) -> tuple[dict, object]:
    """A pre-hook on ``layer`` keeping the arguments of its latest call besides the hidden states
    (mask, positions, embeddings; the cache left out); returns (that dict, the hook's handle)."""
    captured: dict = {}

    def grab(_module, args, kwargs):
        captured["args"] = tuple(args[1:])
        captured["kwargs"] = {k: v for k, v in kwargs.items()
                              if k not in ("hidden_states", "past_key_values", "past_key_value", "use_cache")}

    return captured, layer.register_forward_pre_hook(grab, with_kwargs=True)


def _run_epochs(log: dict, epochs: int, n_batches: int, cache, streamed, device, step, what: str,
                progress: bool) -> None:
    """The fits' shared loop: epoch 1 streams the model's boundary states (filling the activation
    cache), later epochs replay the cache when it holds them; ``step(item) -> (loss, tokens)`` takes
    one optimiser step; a non-finite loss fails the fit (check_loss)."""
    for epoch in range(epochs):
        total, tokens = 0.0, 0
        items = cache.replay(device) if cache.ready else streamed()
        for item in tqdm(items, total=n_batches, desc=f"fit {what} (epoch {epoch + 1}/{epochs})", disable=not progress):
            value, count = step(item)
            check_loss(value, f"{what} fit", epoch, log["steps"])
            log.setdefault("loss_first_step", value)
            total += value * count
            tokens += count
            log["steps"] += 1
        log["epoch_loss"].append(total / max(tokens, 1))
        log["tokens_per_epoch"] = tokens


@torch.no_grad()
def heldout_mse(ctx, module: nn.Module, data, start: int, end: int, batch_size: int = 8,
                fit_loss: str = "mse") -> dict:
    """The fit on blocks it never saw: MSE of module(X_start) against X_end over real tokens, beside
    the identity's (X_start against X_end: plain removal of the window). Run on the model whose
    layers start..end-1 are still in place."""
    module.eval()
    ref = next(module.parameters())
    reader = loss_reader(ctx, end, fit_loss)
    sums = {"mse": 0.0, "identity_mse": 0.0, "cosine": 0.0, "identity_cosine": 0.0}
    if reader is not None:
        sums.update(normed=0.0, identity_normed=0.0)
    tokens = 0
    for states, mask in ctx.boundary_pairs(data, start, end, batch_size=batch_size):
        x = states[start][mask.to(states[start].device)]
        y = states[end][mask.to(states[end].device)].float()
        pred = module(x.to(device=ref.device, dtype=ref.dtype)).float().to(y.device)
        n = y.shape[0]
        for name, p in (("", pred), ("identity_", x.float())):
            sums[name + "mse"] += float(boundary_loss(p, y, "mse")) * n
            sums[name + "cosine"] += float(boundary_loss(p, y, "cosine")) * n
            if reader is not None:
                sums[name + "normed"] += float(boundary_loss(p, y, "normed", reader)) * n
        tokens += n
    out = {k: v / max(tokens, 1) for k, v in sums.items()}
    for what, value in out.items():
        if not math.isfinite(value):
            raise MethodFailed(f"replacement fit: held-out {what} is {value}")
    key = "normed" if reader is not None else ("mse" if fit_loss == "mse" else "cosine")  # what the fit minimised
    return {**out, "judged_by": key, "ratio_to_identity": out[key] / out["identity_" + key] if out["identity_" + key] else None,
            "better_than_removal": out[key] <= out["identity_" + key], "blocks": len(data), "tokens": tokens,
            "sampled_with_replacement": bool(data.description.get("sampled_with_replacement"))}


def fit_layer_to_boundaries(ctx, layer: nn.Module, data, start: int, end: int, *, repeat: int = 1, epochs: int,
                            lr: float, batch_size: int, weight_decay: float = 0.0, seed: int = 0,
                            progress: bool = True, grad_checkpointing: bool = False,
                            activation_cache: str = "none", activation_cache_gb: float = 2.0) -> dict:
    """Train a decoder layer (not part of the model) with MSE so that ``layer`` applied ``repeat``
    times to X_start ~ X_end over real tokens, called with the model's own arguments to its layer
    ``start`` (mask, positions, embeddings: _capture_layer_args), in eval mode (no dropout).
    ``grad_checkpointing`` recomputes each application in the backward pass; ``activation_cache``
    replays epoch 1's (X_start, X_end, mask, arguments) in epochs 2..E (harness.fitting.scale); on
    CUDA the step runs under bf16 autocast."""
    from harness.model.adapters import first_tensor

    torch.manual_seed(seed)
    params = [p for p in layer.parameters()]
    flags = [(p, p.requires_grad) for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    layer.eval()
    log = _new_log(lr, weight_decay, epochs, batch_size, repeat=repeat,
                   layer_inputs="the model's own arguments to layer start (causal mask)")
    t0 = time.perf_counter()
    n_batches = math.ceil(len(data) / batch_size)
    captured, handle = _capture_layer_args(ctx.adapter.layers[start])
    device = next(layer.parameters()).device
    cache = ActivationCache(activation_cache if epochs > 1 else "none", activation_cache_gb, n_batches)

    def streamed():
        for states, mask in ctx.boundary_pairs(data, start, end, batch_size=batch_size):
            item = (states[start], states[end], mask, captured["args"], captured["kwargs"])
            cache.add(item)
            yield item

    def step(item):
        x, y, mask, args, kwargs = item
        mask = mask.to(x.device)
        with torch.enable_grad(), autocast_for(device), checkpointing([layer], grad_checkpointing):
            h = x
            for _ in range(repeat):
                h = first_tensor(layer(h, *args, use_cache=False, **kwargs))
            loss = nn.functional.mse_loss(h[mask].float(), y[mask].float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss.detach().item(), int(mask.sum())

    try:
        _run_epochs(log, epochs, n_batches, cache, streamed, device, step, "layer", progress)
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        opt.zero_grad(set_to_none=True)
        log["activation_cache"] = cache.describe()
        log["grad_checkpointing"] = bool(grad_checkpointing)
        cache.close()
    log["seconds"] = time.perf_counter() - t0
    return log

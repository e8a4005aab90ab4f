"""Training with the language-modelling loss, everything but a given set of parameters frozen.

Used by the LoRA post-step (only the adapters train) and by LLM-Streamline's LM-loss fit and
post-training (only the replacement trains). The loss is the model's own next-token
cross-entropy over real tokens (pads are labelled -100), or over the tokens the data's own
``labels`` score (a ``DocumentText`` draw: a reference model's episodes, the answers only).
"""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from harness.errors import MethodFailed
from harness.fitting.scale import autocast_for, checkpointing
from harness.model.adapters import get_adapter
from harness.model.loading import model_device


def lm_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens; ``labels=None`` labels every real token."""
    device = model_device(model)
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device)
    if labels is None:
        labels = input_ids.masked_fill(attention_mask == 0, -100)
    else:
        labels = labels.to(device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
    return out.loss


def steps_for(num_samples: int, batch_size: int, epochs: int) -> int:
    return epochs * math.ceil(num_samples / batch_size)


def train_lm(model, params, data, *, steps: int, lr: float, batch_size: int, weight_decay: float = 0.0,
             max_grad_norm: float | None = 1.0, seed: int = 0, progress: bool = True, train_mode: bool = True,
             desc: str = "LM training", grad_checkpointing: bool = False) -> dict:
    """AdamW on the LM loss for ``steps`` steps of ``batch_size`` blocks (_shuffled_batches); only
    ``params`` change. ``train_mode``: dropout on (e.g. LoRA's), else eval mode; every parameter's
    ``requires_grad`` and the model's mode are restored afterwards. ``grad_checkpointing``
    recomputes each decoder layer in the backward pass (harness.fitting.scale); on CUDA the steps
    run under bf16 autocast. Returns a log (loss curve, tokens, wall time)."""
    params = list(params)
    ids = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    for p in params:  # may include parameters not registered in ``model`` (they still need grads)
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n = len(data)
    losses: list[float] = []
    tokens = scored = 0
    data_labels = getattr(data, "labels", None)
    t0 = time.perf_counter()
    model.train(train_mode)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the HF model
    layers = list(get_adapter(base).layers) if grad_checkpointing else []
    try:
        with torch.enable_grad(), autocast_for(model_device(model)), checkpointing(layers, grad_checkpointing):
            for pick in tqdm(_shuffled_batches(n, steps, batch_size, seed), total=steps, desc=desc,
                             disable=not progress):
                input_ids, mask = data.input_ids[pick], data.attention_mask[pick]
                labels = None if data_labels is None else data_labels[pick]
                loss = lm_loss(model, input_ids, mask, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise MethodFailed(f"{desc}: training loss became {value} at step {len(losses) + 1}; "
                                       "lower the learning rate")
                opt.step()
                losses.append(value)
                tokens += int(mask.sum())
                scored += int(((mask if labels is None else (labels != -100).long())[:, 1:]).sum())
    finally:
        opt.zero_grad(set_to_none=True)
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return {
        "loss": "lm", "optimizer": "AdamW", "lr": lr, "weight_decay": weight_decay, "schedule": "constant",
        "max_grad_norm": max_grad_norm, "steps": steps, "batch_size": batch_size, "samples": n,
        "tokens": tokens, "scored_tokens": scored, "train_mode": train_mode,
        "grad_checkpointing": bool(grad_checkpointing),
        "trainable_params": sum(p.numel() for p in params), **_loss_summary(losses),
        "seconds": time.perf_counter() - t0,
    }


def _shuffled_batches(n: int, steps: int, batch_size: int, seed: int):
    """``steps`` batches of block indices: a seeded random order, reshuffled after every pass."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < min(batch_size, n):
            order += torch.randperm(n, generator=gen).tolist()
        pick, order = order[:batch_size], order[batch_size:]
        yield pick


def _loss_summary(losses: list[float]) -> dict:
    """The first and last tenth's mean loss, and the curve in at most ~50 points."""
    every = max(1, len(losses) // 50)
    curve = [sum(losses[i:i + every]) / len(losses[i:i + every]) for i in range(0, len(losses), every)]
    k = max(1, len(losses) // 10)
    return {"loss_first": sum(losses[:k]) / k if losses else None,
            "loss_last": sum(losses[-k:]) / k if losses else None,
            "loss_curve": curve, "loss_curve_every": every}

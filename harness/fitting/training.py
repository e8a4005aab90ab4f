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
from torch import nn
from tqdm.auto import tqdm

from harness.errors import MethodFailed
from harness.fitting.scale import autocast_for, checkpointing
from harness.model.adapters import get_adapter
from harness.model.adapters.base import after_head
from harness.model.loading import model_device


# Above this many bytes of float32 logits for one batch, the LM loss is computed in chunks of
# positions (Gemma 3 270M, 8 blocks of 512 tokens: 4.3 GB of logits, ~20 GB at the peak of a step).
LOGITS_BUDGET_BYTES = 256 * 2**20


def lm_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            labels: torch.Tensor | None = None, logits_budget: int = LOGITS_BUDGET_BYTES) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens; ``labels=None`` labels every real token.

    When the batch's logits would exceed ``logits_budget`` bytes (float32), the head and the loss run
    over chunks of the labelled positions under activation checkpointing (``_chunked_lm_loss``): the
    same loss and gradients as the model's own ``labels=`` path, without the [B, T, vocab] tensor."""
    device = model_device(model)
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device)
    if labels is None:
        labels = input_ids.masked_fill(attention_mask == 0, -100)
    else:
        labels = labels.to(device)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    vocab = getattr(getattr(head, "weight", None), "shape", (None,))[0]
    if isinstance(head, nn.Module) and vocab and input_ids.numel() * vocab * 4 > logits_budget:
        return _chunked_lm_loss(model, head, input_ids, attention_mask, labels,
                                rows=max(1, logits_budget // (vocab * 4)))
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
    return out.loss


def _chunked_lm_loss(model, head: nn.Module, input_ids, attention_mask, labels, rows: int) -> torch.Tensor:
    """The LM loss without materialising all logits: the model's own forward runs with a pre-hook
    that keeps the head's input [B, T, H] and lets the head see only position 0; its logits there
    (after the model's own post-head arithmetic) must equal ``after_head(config, head(.))`` on the
    same row, or this fails (an unknown step after the head is an error, never a silently
    different loss). Then cross-entropy is summed over chunks of ``rows`` labelled positions,
    each chunk's head and loss recomputed in the backward pass (torch.utils.checkpoint)."""
    from torch.utils.checkpoint import checkpoint

    kept: dict = {}

    def keep(_module, args):
        kept["hidden"] = args[0]
        return (args[0][:, :1],)

    handle = head.register_forward_pre_hook(keep)
    try:
        own = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        handle.remove()
    hidden = kept.get("hidden")
    config = getattr(model, "config", None)
    with torch.no_grad():
        mine = after_head(config, head(hidden[:, :1])) if hidden is not None else None
    if mine is None or own.shape != mine.shape or \
            not torch.allclose(own.float(), mine.float(), rtol=1e-4, atol=1e-4 * float(mine.abs().max()) + 1e-5):
        raise MethodFailed(f"the chunked LM loss cannot reproduce {type(model).__name__}'s logits from its LM head "
                           "(an unknown step between the head and the loss); train with a shorter "
                           "batch_size/seq_len or raise harness.fitting.training.LOGITS_BUDGET_BYTES")
    targets = labels[:, 1:]
    scored = targets != -100
    h, y = hidden[:, :-1][scored], targets[scored]
    if not y.numel():  # nothing labelled: the model's own loss is nan here too (train_lm then fails)
        return hidden.sum() * float("nan")

    def chunk_loss(h_chunk, y_chunk):
        return nn.functional.cross_entropy(after_head(config, head(h_chunk)).float(), y_chunk, reduction="sum")

    total = sum(checkpoint(chunk_loss, h[i:i + rows], y[i:i + rows], use_reentrant=False)
                for i in range(0, y.numel(), rows))
    return total / y.numel()


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

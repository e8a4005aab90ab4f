"""Training at scale: gradient checkpointing, bf16 autocast on CUDA, and a cache of streamed
activations for the replacement fit.

Gradient checkpointing (``grad_checkpointing=auto|on|off`` on LoRA and LLM-Streamline) keeps
only each decoder layer's input during the forward pass and recomputes the layer in the backward
pass: activation memory drops from every layer's intermediates to one hidden state per layer,
for about a third more compute. ``auto`` turns it on above ``CHECKPOINT_ABOVE_PARAMS``
parameters (7B-class models and up), where a batch of 8 x 2048-token sequences would otherwise
hold tens of GB of activations. It wraps the decoder layers' ``forward`` of the model being
trained (a shell's own module objects: the dense model is never touched) with PyTorch's
non-reentrant checkpoint, which also keeps dropout's random masks identical in the recompute -
so the trained weights are those of a run without it.

On CUDA the trainers run under ``torch.autocast(bfloat16)`` (matmuls in bf16, master weights,
optimizer state and the loss in float32); on CPU nothing changes.

``ActivationCache`` (``activation_cache=none|ram|disk`` with ``activation_cache_gb``) keeps the
(input, target) activations a replacement fit streams in its first epoch, so epochs 2..E do not
run the model's prefix again; a fit whose activations would exceed the limit streams as before.
The replayed tensors are the very values of the first epoch: the trained replacement is the
same with or without the cache.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("streamline_bench")

CHECKPOINT_ABOVE_PARAMS = 2_000_000_000
CHECKPOINT_CHOICES = ("auto", "on", "off")
CACHE_CHOICES = ("none", "ram", "disk")


def use_checkpointing(option: str, model: nn.Module) -> bool:
    """``on``/``off`` as given; ``auto``: on when ``model`` has more than CHECKPOINT_ABOVE_PARAMS parameters."""
    if option == "on":
        return True
    if option == "off":
        return False
    from harness.model.surgery import count_params

    return count_params(model) > CHECKPOINT_ABOVE_PARAMS


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


@contextlib.contextmanager
def checkpointing(layers, enabled: bool = True):
    """Run each module of ``layers`` under activation checkpointing while the block is active."""
    layers = [layer for layer in layers] if enabled else []
    saved = []
    for layer in layers:
        own = layer.__dict__.get("forward")  # an instance forward (accelerate's hook) is kept and wrapped
        saved.append((layer, own))
        layer.forward = _checkpointed(own if own is not None else layer.forward)
    try:
        yield
    finally:
        for layer, own in saved:
            if own is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = own


def autocast_for(device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (when bf16 is supported), nothing elsewhere."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(x) for x in obj.values())
    return 0


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(x, device) for x in obj)
    if isinstance(obj, list):
        return [_to(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class ActivationCache:
    """What one epoch of a fit streamed, replayed for the next epochs.

    ``mode``: ``none`` (stream every epoch), ``ram`` (host memory) or ``disk`` (a temporary
    folder, one file per batch, removed afterwards). ``limit_gb`` caps the cache; the caller
    gives the expected total (``expect_bytes``) when it knows it, else the first batch's size
    times ``batches`` is used. Over the limit, nothing is kept and every epoch streams.
    """

    def __init__(self, mode: str, limit_gb: float, batches: int, expect_bytes: int | None = None):
        if mode not in CACHE_CHOICES:
            raise ValueError(f"activation cache mode {mode!r}; use one of {', '.join(CACHE_CHOICES)}")
        self.mode = mode
        self.limit = int(limit_gb * 2**30)
        self.batches = batches
        self.expect = expect_bytes
        self.items: list = []
        self.bytes = 0
        self.enabled = mode != "none"
        self.dir: Path | None = None
        self.reason = "activation_cache=none" if mode == "none" else None
        if self.enabled and expect_bytes is not None and expect_bytes > self.limit:
            self._refuse(expect_bytes)

    def _refuse(self, need: int) -> None:
        self.enabled = False
        self.reason = f"needs {need / 2**30:.2f} GiB > activation_cache_gb={self.limit / 2**30:.2f}"
        log.info("activation cache off (%s): the prefix forward runs every epoch", self.reason)
        self.items.clear()

    def add(self, item) -> None:
        """Keep one batch's tensors (called in the first epoch, in order)."""
        if not self.enabled:
            return
        size = _nbytes(item)
        if not self.items and self.expect is None and size * self.batches > self.limit:
            self._refuse(size * self.batches)
            return
        self.bytes += size
        if self.bytes > self.limit:
            self._refuse(self.bytes)
            return
        if self.mode == "ram":
            self.items.append(_to(item, "cpu"))
        else:
            if self.dir is None:
                self.dir = Path(tempfile.mkdtemp(prefix=f"sb_actcache_{os.getpid()}_"))
            path = self.dir / f"{len(self.items):06d}.pt"
            torch.save(_to(item, "cpu"), path)
            self.items.append(path)

    @property
    def ready(self) -> bool:
        return self.enabled and len(self.items) == self.batches

    def replay(self, device):
        for item in self.items:
            if isinstance(item, Path):
                item = torch.load(item, weights_only=False)
            yield _to(item, device)

    def describe(self) -> dict:
        return {"mode": self.mode, "used": self.ready, "bytes": self.bytes if self.ready else 0,
                "limit_gb": self.limit / 2**30, **({"reason": self.reason} if self.reason else {})}

    def close(self) -> None:
        self.items = []
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

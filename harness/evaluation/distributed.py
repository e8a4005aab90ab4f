"""Data-parallel runs: ``torchrun --nproc_per_node N`` or ``accelerate launch --num_processes N``.

Every process runs the same sweep on its own full model (one GPU each, or one group of GPUs
with ``--device auto``). Pruning and scoring happen once per method in every process with the
same seed; ``same_on_every_rank`` checks that every process chose the same layers and
``broadcast_own_tensors`` makes every process's trained or merged tensors rank 0's, so all
ranks evaluate the identical model. lm-eval splits each task's requests across the processes
with its own mechanism (``rank``/``world_size`` of the LM object, see lmeval.make_lm) and
gathers the per-document results on rank 0; rank 0's result is then shared so every process
continues the sweep identically. Only rank 0 writes files (harness.io checks ``RANK``) and
prints.

Launchers set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``
and ``MASTER_PORT``; nothing here is specific to one launcher. CPU runs use the gloo backend,
CUDA runs NCCL.
"""
from __future__ import annotations

import os

import torch

from harness.model.placement import gpu_share


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def init(device: str) -> str:
    """Join the process group (once) when launched with WORLD_SIZE > 1; returns this process's
    device: ``cuda`` becomes ``cuda:LOCAL_RANK``; ``auto`` stays ``auto`` (loading restricts it to
    this process's share of the GPUs, harness.model.placement); ``cpu`` stays ``cpu``."""
    if world_size() <= 1:
        return device
    import torch.distributed as dist

    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(gpu_share()[0] if device == "auto" else local_rank())
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if device == "cuda":
        return f"cuda:{local_rank()}"
    return device


def broadcast_object(obj, src: int = 0):
    """``obj`` as rank ``src`` has it, on every rank (unchanged when not distributed)."""
    if not active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    if not active():
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def same_on_every_rank(value, what: str) -> None:
    """Raise if ``value`` (e.g. the removed layers) differs between processes."""
    if not active():
        return
    values = gather_objects(value)
    if any(v != values[0] for v in values[1:]):
        raise RuntimeError(f"{what} differs between processes ({values}); data-parallel runs need the same "
                           "plan on every rank: use the same seed and deterministic kernels "
                           "(torch.use_deterministic_algorithms)")


def broadcast_own_tensors(tensors) -> None:
    """Copy rank 0's values into every rank's ``[(name, tensor)]`` (a method's own tensors)."""
    if not active():
        return
    same_on_every_rank([(n, tuple(t.shape), str(t.dtype)) for n, t in tensors], "the pruned model's own tensors")
    nccl = torch.distributed.get_backend() == "nccl"
    with torch.no_grad():
        for _name, t in tensors:
            buf = t.data.to(torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
            torch.distributed.broadcast(buf, src=0)
            if buf is not t.data:
                t.data.copy_(buf)


def barrier() -> None:
    if active():
        torch.distributed.barrier()


_LM_CLASS = None


def hflm_class(fast: bool = False):
    """lm-eval's ``HFLM``, or in a data-parallel launch its subclass ``DataParallelHFLM``;
    ``fast=True``: that class with the fast loglikelihood path mixed in
    (``harness.evaluation.fastlm.FastLoglikelihood``, e.g. ``FastDataParallelHFLM``).

    HFLM given a model object (not a name) says rank 0 of 1; the subclass reports this
    process's rank and the world size - lm-eval's own mechanism: its evaluator then builds
    each task's requests for this rank's documents only (``doc_iterator(rank, world_size)``),
    pads the ranks to equal batch counts and gathers every document's metrics and samples on
    rank 0 (``gather_object``, HFLM's own). ``all_gather`` and ``barrier``, which HFLM routes
    through an ``accelerate.Accelerator`` it creates only for models it loads itself, come
    from torch.distributed here.
    """
    from harness.evaluation.fastlm import fast_class

    base = _base_class()
    return fast_class(base) if fast else base


def _base_class():
    global _LM_CLASS
    from lm_eval.models.huggingface import HFLM

    if not active():
        return HFLM
    if _LM_CLASS is None:
        class DataParallelHFLM(HFLM):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self._rank, self._world_size = rank(), world_size()

            def all_gather(self, tensor):
                flat = tensor.reshape(1) if tensor.dim() == 0 else tensor
                parts = [torch.empty_like(flat) for _ in range(self.world_size)]
                torch.distributed.all_gather(parts, flat)
                return torch.cat(parts)

            def barrier(self):
                barrier()

            def gather_object(self, obj, dst=0):
                """HFLM's gather, returned in document order: lm-eval gives rank r the documents
                r, r + W, r + 2W, ... and concatenates what ranks return, so the per-document lists
                are interleaved back here (into the first rank's entry) and every aggregate - a
                standard error's float sum included - is the one a single process computes."""
                parts = super().gather_object(obj, dst=dst)
                if parts is None or len(parts) < 2:
                    return parts
                return [_interleave_tree(parts)] + [_empty_tree(p) for p in parts[1:]]

        _LM_CLASS = DataParallelHFLM
    return _LM_CLASS


def _interleave(lists: list[list]) -> list:
    out = []
    for i in range(max((len(x) for x in lists), default=0)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


def _interleave_tree(parts: list):
    """``{task: list}`` or ``{task: {key: list}}`` from every rank -> one, lists interleaved."""
    first = parts[0]
    if isinstance(first, list):
        return _interleave(parts)
    if isinstance(first, dict):
        return {k: _interleave_tree([p[k] for p in parts]) for k in first}
    return first


def _empty_tree(part):
    if isinstance(part, list):
        return []
    if isinstance(part, dict):
        return {k: _empty_tree(v) for k, v in part.items()}
    return part

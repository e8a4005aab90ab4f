"""Which GPUs a process may fill with ``--device auto`` when several processes share a node.

A data-parallel launch (``torchrun --nproc_per_node P``, ``accelerate launch --num_processes P``)
with ``--device auto`` gives each process a contiguous share of the node's G GPUs (G / P each:
8 GPUs and 2 processes -> 0-3 and 4-7), and accelerate's ``device_map='auto'`` spreads that
process's model over its share only. One process (no launcher): every GPU.
"""
from __future__ import annotations

import os

import torch


def _env(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


def gpu_share() -> list[int]:
    count = torch.cuda.device_count()
    procs = max(1, _env("LOCAL_WORLD_SIZE", _env("WORLD_SIZE", 1)))
    if procs == 1 or count == 0:
        return list(range(count))
    per = max(1, count // procs)
    first = (_env("LOCAL_RANK", 0) * per) % count
    return list(range(first, min(first + per, count)))


def auto_max_memory(fraction: float = 0.9) -> dict | None:
    """``max_memory`` for ``device_map='auto'`` that keeps this process on its GPU share (None
    when there is no launcher or no GPU: accelerate's own default)."""
    if _env("WORLD_SIZE", 1) <= 1 or not torch.cuda.is_available():
        return None
    mine = set(gpu_share())
    out: dict = {i: (int(torch.cuda.get_device_properties(i).total_memory * fraction) if i in mine else 0)
                 for i in range(torch.cuda.device_count())}
    out["cpu"] = 0
    return out

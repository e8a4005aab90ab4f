"""What the fast loglikelihood paths share (fastlm.py, shared_context.py): the LM head's pre-hook
that keeps only the scored positions, and the once-per-reason fallback warning."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("harness.evaluation.fastlm")
_WARNED: set[str] = set()


def warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        log.warning("--eval-impl fast: %s; using lm-eval's own loglikelihood path for this model", reason)


class GatherScored:
    """Forward pre-hook for the LM head: keep the rows ``(row, pos)`` of the ``[B, T, H]`` input
    (``pos`` counted in lm-eval's padded input of length ``padded_len``; positions a model prepends
    itself, lm-eval's "virtual tokens", shift every position by ``T - padded_len``)."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, batch: int, padded_len: int):
        self.rows, self.cols, self.batch, self.padded_len = rows, cols, batch, padded_len
        self.calls = 0
        self.error: str | None = None

    def __call__(self, module, args):
        self.calls += 1
        hidden = args[0] if args else None
        if self.calls > 1 or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 \
                or hidden.shape[0] != self.batch or hidden.shape[1] < self.padded_len:
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            self.error = self.error or (f"the LM head was called {self.calls} time(s), on {shape}; expected once, on "
                                        f"[{self.batch}, >={self.padded_len}, hidden]")
            return None
        b, t, h = hidden.shape
        flat = (self.rows * t + self.cols + (t - self.padded_len)).to(hidden.device)
        return (hidden.reshape(b * t, h).index_select(0, flat).unsqueeze(0),) + tuple(args[1:])

"""``--eval-impl fast-shared``: the fast path, plus a context shared by several requests run once.

A multiple-choice document asks lm-eval for one request per choice, each ``context + choice``;
HFLM runs the context again for every choice. Here the requests (lm-eval's representatives after
its one-token-continuation grouping, in its order) are grouped by their *prefix*: the model input
(left-truncated to ``max_length`` as lm-eval does) up to and including the first scored position.
A group of two or more runs its prefix once (one row, ``use_cache=True``), then every member's
remaining continuation tokens as one right-padded batch against the prefix's KV cache repeated
per member (positions continue after the prefix, as in the full sequence). Requests alone in
their group go through the fast path's batches unchanged. Every request's answer is lm-eval's
(``FastLoglikelihood._answer``), only the forward passes are split differently, so numbers agree
with ``stock`` within float rounding (tests/test_fast_eval.py, with sliding-window layers).

Groups are per document, so forward passes carry a few rows (one per choice): fewer FLOPs, but
smaller batches than ``--eval-batch-size``; on CPU that wins, on a GPU it may not (opt-in).
A model whose forward returns no KV cache falls back to the plain fast path with one warning;
with ``--eval-batch-size auto`` (lm-eval's batch-size detection) contexts are not shared either.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from harness.evaluation.fastlm import _GatherScored, _warn_once


def score_shared(lm, re_ord, batch_size: int, res: list, pbar) -> None:
    """Score every representative of ``re_ord`` (an lm-eval Collator grouped by contexts),
    appending lm-eval's answers to ``res`` in the order ``re_ord.get_cache`` records."""
    reps = [req for chunk in re_ord.get_batched(n=0) for req in chunk]  # all, in lm-eval's order
    groups: OrderedDict[tuple, list] = OrderedDict()
    for req in reps:
        inp = lm._input(req[1], req[2])
        prefix = tuple(inp[:len(inp) - len(req[2]) + 1])  # through the first scored position
        groups.setdefault(prefix, []).append((req, inp))
    singles = [req for members in groups.values() if len(members) == 1 for req, _ in members]
    step = batch_size or len(singles)  # lm-eval's batch size 0: one batch
    for start in range(0, len(singles), max(step, 1)):
        lm._score_chunk(singles[start:start + step], re_ord, res, pbar)
    for prefix, members in groups.items():
        if len(members) < 2:
            continue
        scored = _score_group(lm, list(prefix), members) if lm.share_contexts else None
        if scored is None:  # no KV cache from this model: the plain fast path for the rest
            lm._score_chunk([req for req, _ in members], re_ord, res, pbar)
            continue
        lm._fast_verified = True  # a later structural failure is an error (fastlm), not a fallback
        for (req, _), logits in zip(members, scored, strict=True):
            lm._answer(req, logits, re_ord, res, pbar)


def _score_group(lm, prefix: list[int], members: list) -> list[torch.Tensor] | None:
    """``[contlen, vocab]`` log-probs per member: the prefix's last position (the first scored
    token of every member) from one prefix pass, the rest from one pass over the members'
    remaining inputs against the prefix's cache."""
    p = len(prefix)
    ids = torch.tensor([prefix], dtype=torch.long, device=lm.device)
    gather = _GatherScored(torch.zeros(1, dtype=torch.long), torch.tensor([p - 1]), 1, p)
    out = lm._head_call(gather, 1, lambda: lm._call(input_ids=ids, use_cache=True))
    cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        lm.share_contexts = False
        _warn_once(f"{type(lm.model).__name__} returned no KV cache, so shared contexts are not reused "
                   "(fast-shared runs as fast)")
        return None
    first = F.log_softmax(out.logits[0], dim=-1, dtype=lm.softmax_dtype)  # [1, vocab]
    rests = [inp[p:] for _, inp in members]  # each member's inputs after the prefix (contlen - 1 tokens)
    width = max(len(r) for r in rests)
    if width == 0:
        return [first for _ in members]
    k = len(members)
    cache.batch_repeat_interleave(k)
    rows = torch.cat([torch.full((len(r),), j, dtype=torch.long) for j, r in enumerate(rests)])
    cols = torch.cat([torch.arange(len(r), dtype=torch.long) for r in rests])
    pad = 0  # right padding, as lm-eval's pad_and_concat: later positions never reach earlier ones
    batch = torch.tensor([r + [pad] * (width - len(r)) for r in rests], dtype=torch.long, device=lm.device)
    gather = _GatherScored(rows, cols, k, width)
    out = lm._head_call(gather, rows.numel(), lambda: lm._call(input_ids=batch, past_key_values=cache,
                                                                 use_cache=True))
    rest = F.log_softmax(out.logits[0], dim=-1, dtype=lm.softmax_dtype).split([len(r) for r in rests], dim=0)
    return [torch.cat([first, r.to(first.device)], dim=0) for r in rest]

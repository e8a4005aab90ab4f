"""``--eval-impl fast-shared``: the fast path, plus a context shared by several requests run once.

A multiple-choice document asks lm-eval for one request per choice, each ``context + choice``;
HFLM runs the context again for every choice. Here the requests (lm-eval's representatives after
its one-token-continuation grouping, in its order) are grouped by their *prefix*: the model input
(left-truncated to ``max_length`` as lm-eval does) up to and including the first scored position.
A group of two or more runs its prefix once (``use_cache=True``), then every member's remaining
continuation tokens against that prefix's KV cache (positions continue after the prefix, as in
the full sequence). Several groups share each pair of passes: prefixes left-padded to end
together (attention mask; positions count from 0 in each row, and sliding windows measure true
distances because every prefix ends at the same cache index), members right-padded, as many
groups as keep both passes within the tokens of lm-eval's batch (``--eval-batch-size`` rows of
the longest input), so memory stays within ``stock``'s. Requests alone in their group go through
the fast path's batches unchanged. Every request's answer is lm-eval's
(``FastLoglikelihood._answer``); only the forward passes are split differently, so numbers agree
with ``stock`` within float rounding (tests/test_fast_eval.py, with sliding-window layers).
Opt-in: it saves FLOPs, but two passes per batch of documents, not measured on a GPU yet.
A model whose forward returns no KV cache falls back to the plain fast path with one warning;
with ``--eval-batch-size auto`` (lm-eval's batch-size detection) contexts are not shared either.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from harness.evaluation.scored import GatherScored, warn_once


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
    multi = [(list(prefix), members) for prefix, members in groups.items() if len(members) > 1]
    batch: list = []
    for i, group in enumerate(multi):  # several documents per forward pass, as many tokens as lm-eval's batch
        batch.append(group)
        if i + 1 == len(multi) or (batch_size and not _fits(batch + [multi[i + 1]], batch_size)):
            _run_groups(lm, batch, re_ord, res, pbar)
            batch = []


def _fits(batch: list, batch_size: int) -> bool:
    """Whether both passes over ``batch`` hold at most the tokens of lm-eval's batch of
    ``batch_size`` rows of its longest input (so memory stays within what ``stock`` uses)."""
    budget = batch_size * max(len(inp) for _, members in batch for _, inp in members)
    prefix_tokens = len(batch) * max(len(prefix) for prefix, _ in batch)
    rest_tokens = sum(len(m) for _, m in batch) * max(len(inp) - len(prefix) for prefix, m in batch for _, inp in m)
    return max(prefix_tokens, rest_tokens) <= budget


def _run_groups(lm, batch: list, re_ord, res: list, pbar) -> None:
    scored = _score_groups(lm, batch) if lm.share_contexts else None
    if scored is None:  # no KV cache from this model: the plain fast path for the rest
        lm._score_chunk([req for _, members in batch for req, _ in members], re_ord, res, pbar)
        return
    lm._fast_verified = True  # a later structural failure is an error (fastlm), not a fallback
    for (req, _), logits in zip([m for _, members in batch for m in members], scored, strict=True):
        lm._answer(req, logits, re_ord, res, pbar)


def _score_groups(lm, batch: list) -> list[torch.Tensor] | None:
    """``[contlen, vocab]`` log-probs per member of each ``(prefix, members)`` group: every
    prefix's last position (the first scored token of its members) from one pass over the
    prefixes, left-padded so that they end together (attention mask, positions from 0 in each
    row); the rest from one pass over all members' remaining inputs, right-padded, against the
    prefix cache selected per member (positions continue after each row's own prefix)."""
    lens = [len(prefix) for prefix, _ in batch]
    width_p = max(lens)
    dev = lm.device
    ids = torch.tensor([[0] * (width_p - n) + prefix for (prefix, _), n in zip(batch, lens)], dtype=torch.long,
                       device=dev)
    mask = torch.tensor([[0] * (width_p - n) + [1] * n for n in lens], dtype=torch.long, device=dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    g = len(batch)
    gather = GatherScored(torch.arange(g), torch.full((g,), width_p - 1), g, width_p)
    out = lm._head_call(gather, g, lambda: lm._call(input_ids=ids, attention_mask=mask, position_ids=pos,
                                                    use_cache=True))
    cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_select_indices"):
        lm.share_contexts = False
        warn_once(f"{type(lm.model).__name__} returned no KV cache, so shared contexts are not reused "
                   "(fast-shared runs as fast)")
        return None
    first = F.log_softmax(out.logits[0], dim=-1, dtype=lm.softmax_dtype)  # [g, vocab]
    owner = [j for j, (_, members) in enumerate(batch) for _ in members]
    rests = [inp[lens[j]:] for j, (_, members) in enumerate(batch) for _, inp in members]  # contlen - 1 each
    width = max(len(r) for r in rests)
    if width == 0:
        return [first[j:j + 1] for j in owner]
    cache.batch_select_indices(torch.tensor(owner, device=dev))  # each member's own prefix (repeated)
    k = len(rests)
    rows = torch.cat([torch.full((len(r),), m, dtype=torch.long) for m, r in enumerate(rests)])
    cols = torch.cat([torch.arange(len(r), dtype=torch.long) for r in rests])
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rests], dtype=torch.long, device=dev)  # right padding
    mask = torch.cat([mask[owner], torch.ones(k, width, dtype=torch.long, device=dev)], dim=1)
    pos = torch.tensor(lens, device=dev)[owner].unsqueeze(1) + torch.arange(width, device=dev)
    gather = GatherScored(rows, cols, k, width)
    out = lm._head_call(gather, rows.numel(), lambda: lm._call(input_ids=ids, attention_mask=mask, position_ids=pos,
                                                               past_key_values=cache, use_cache=True))
    rest = F.log_softmax(out.logits[0], dim=-1, dtype=lm.softmax_dtype).split([len(r) for r in rests], dim=0)
    return [torch.cat([first[j:j + 1], r.to(first.device)], dim=0) for j, r in zip(owner, rest)]

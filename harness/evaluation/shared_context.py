"""``--eval-impl fast-shared``: the fast path, plus a context shared by several requests run once.

A multiple-choice document asks lm-eval for one request per choice, each ``context + choice``;
HFLM runs the context again for every choice. Here the requests (lm-eval's representatives after
its one-token-continuation grouping, in its order) are grouped by their *prefix*: the model input
(left-truncated to ``max_length`` as lm-eval does) up to and including the first scored position.
A group of two or more is packed: its prefix once, then every member's remaining input tokens one
after another, with a 4-D attention mask in which a member's tokens see the prefix and their own
earlier tokens only, and position ids that continue after the prefix for every member (as in the
member's own full sequence). So each member's tokens compute exactly what they compute in
lm-eval's row, and the prefix's tokens run once. A pass takes rows as wide as the longest group
left, as many as the tokens of lm-eval's batch allow (``--eval-batch-size`` rows of the longest
input), and fills each row first-fit with whole groups (longest first; a group sees only its own
tokens), so little is padded. Requests alone in their group go through the fast path's batches
unchanged.

The mask reaches the attention through transformers' own mask handling (a 4-D mask is used as
given), which every family the adapters know goes through; the first packed group of each model is
also scored the plain way and compared (``_verified``), and a model whose numbers differ falls
back to the plain fast path with one warning. Sliding-window layers see the same mask, so a group
is packed only when its longest member fits in the window (then the window masks nothing);
longer ones take the plain path. Every request's answer is lm-eval's
(``FastLoglikelihood._answer``); only the forward passes are split differently, so numbers agree
with ``stock`` within float rounding (tests/test_fast_eval.py).
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
    window = _sliding_window(lm.model)
    fits = {p: len(m) > 1 and (window is None or max(len(inp) for _, inp in m) <= window) for p, m in groups.items()}
    packed = [(list(p), m) for p, m in groups.items() if fits[p]]
    plain = [req for p, m in groups.items() if not fits[p] for req, _ in m]
    step = batch_size or len(plain)  # lm-eval's batch size 0: one batch
    for start in range(0, len(plain), max(step, 1)):
        lm._score_chunk(plain[start:start + step], re_ord, res, pbar)
    budget = (batch_size or len(reps)) * max((len(inp) for m in groups.values() for _, inp in m), default=1)
    packed.sort(key=lambda g: -_group_len(g))
    while packed:
        rows, packed = _fill_rows(packed, budget)
        _run_rows(lm, rows, re_ord, res, pbar)


def _fill_rows(groups: list, budget: int) -> tuple[list, list]:
    """One forward pass: rows as wide as the longest group left (``groups`` sorted longest first),
    as many as ``budget`` tokens allow, each filled first-fit with whole groups; returns the rows
    (lists of groups) and the groups left for later passes."""
    width = _group_len(groups[0])
    rows, used, left = [], [], []
    for group in groups:
        n = _group_len(group)
        r = next((i for i, u in enumerate(used) if u + n <= width), None)
        if r is None and len(rows) < max(1, budget // width):
            rows.append([])
            used.append(0)
            r = len(rows) - 1
        if r is None:
            left.append(group)
        else:
            rows[r].append(group)
            used[r] += n
    return rows, left


def _sliding_window(model) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def _group_len(group) -> int:
    prefix, members = group
    return len(prefix) + sum(len(inp) - len(prefix) for _, inp in members)


def _run_rows(lm, rows: list, re_ord, res: list, pbar) -> None:
    members = [req for row in rows for _, m in row for req, _ in m]
    if not lm.share_contexts:  # the check below failed on an earlier batch
        lm._score_chunk(members, re_ord, res, pbar)
        return
    try:
        scored = _score_rows(lm, rows)
    except Exception as exc:  # noqa: BLE001 - e.g. an attention backend that refuses 4-D masks
        if lm._shared_verified:
            raise
        _fall_back(lm, f"{type(lm.model).__name__} cannot take packed rows ({type(exc).__name__}: {exc})")
        scored = None
    if scored is None or (not lm._shared_verified and not _verified(lm, rows[0][0], scored)):
        lm.share_contexts = False
        lm._score_chunk(members, re_ord, res, pbar)
        return
    lm._shared_verified = lm._fast_verified = True
    for req, logits in zip(members, scored, strict=True):
        lm._answer(req, logits, re_ord, res, pbar)


def _verified(lm, group, scored: list) -> bool:
    """The first packed group against the plain fast path on the same requests: a model that does
    not honour the 4-D mask or the position ids gives different numbers and is not packed."""
    plain = group[1]
    scored = scored[:len(plain)]
    width = max(len(inp) for _, inp in plain)
    ids = torch.tensor([inp + [0] * (width - len(inp)) for _, inp in plain], dtype=torch.long, device=lm.device)
    ref = lm._scored_log_probs(ids, [len(inp) for _, inp in plain], [len(req[2]) for req, _ in plain])
    tol = 1e-3 if torch.finfo(ref[0].dtype).bits >= 32 else 5e-2
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(ref, scored, strict=True))
    if diff > tol:
        _fall_back(lm, f"packing shared contexts changes {type(lm.model).__name__}'s log-probabilities "
                       f"(by {diff:.3g}; the model may not honour a 4-D attention mask)")
        return False
    return True


def _fall_back(lm, reason: str) -> None:
    lm._shared_fallback = reason
    warn_once(f"{reason}, so fast-shared runs as fast")


def _pack(rows: list, width: int):
    """Per row: token ids, position ids (from 0 in each group's prefix, continuing after it in each
    member), and per token its group in the row and its member (-1: the group's prefix; padding is
    group -1); plus every member's scored positions ``(row, col)``, in order."""
    ids, pos, grp, mem, rr, cc = [], [], [], [], [], []
    for r, row in enumerate(rows):
        row_ids, row_pos, row_grp, row_mem = [], [], [], []
        for g, (prefix, members) in enumerate(row):
            p, base = len(prefix), len(row_ids)
            row_ids += prefix
            row_pos += range(p)
            row_grp += [g] * p
            row_mem += [-1] * p
            for m, (_req, inp) in enumerate(members):
                rest = inp[p:]
                rr.append(torch.full((len(rest) + 1,), r, dtype=torch.long))
                cc.append(torch.tensor([base + p - 1] + list(range(len(row_ids), len(row_ids) + len(rest))),
                                       dtype=torch.long))
                row_ids += rest
                row_pos += range(p, p + len(rest))
                row_grp += [g] * len(rest)
                row_mem += [m] * len(rest)
        pad = width - len(row_ids)
        ids.append(row_ids + [0] * pad)
        pos.append(row_pos + [0] * pad)
        grp.append(row_grp + [-1] * pad)
        mem.append(row_mem + [-1] * pad)
    return ids, pos, grp, mem, torch.cat(rr), torch.cat(cc)


def _mask(grp: torch.Tensor, mem: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[B, 1, W, W]`` mask: token i sees token j <= i of its own group that is in the
    group's prefix or in i's own member (padding sees earlier padding only, never a real token)."""
    w = grp.shape[1]
    causal = torch.ones(w, w, dtype=torch.bool, device=grp.device).tril()
    same = grp[:, :, None] == grp[:, None, :]
    seen = (mem[:, None, :] == -1) | (mem[:, :, None] == mem[:, None, :])
    allowed = causal & same & seen
    return torch.zeros(allowed.shape, dtype=dtype, device=grp.device).masked_fill(
        ~allowed, torch.finfo(dtype).min).unsqueeze(1)


def _score_rows(lm, rows: list) -> list[torch.Tensor]:
    """``[contlen, vocab]`` log-probs per member of every group in ``rows`` (module docstring), in
    one forward pass."""
    width = max(sum(_group_len(g) for g in row) for row in rows)
    ids, pos, grp, mem, rr, cc = _pack(rows, width)
    dev = lm.device
    dtype = lm.mixed_precision_dtype or next(lm.model.parameters()).dtype
    mask = _mask(torch.tensor(grp, device=dev), torch.tensor(mem, device=dev),
                 dtype if dtype.is_floating_point else torch.float32)
    ids = torch.tensor(ids, dtype=torch.long, device=dev)
    pos = torch.tensor(pos, dtype=torch.long, device=dev)
    gather = GatherScored(rr, cc, len(rows), width)
    out = lm._head_call(gather, rr.numel(), lambda: lm._call(input_ids=ids, attention_mask=mask, position_ids=pos,
                                                             use_cache=False))
    logp = F.log_softmax(out.logits[0], dim=-1, dtype=lm.softmax_dtype)
    lens = [len(req[2]) for row in rows for _, m in row for req, _ in m]
    return list(logp.split(lens, dim=0))

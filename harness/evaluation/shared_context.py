"""``--eval-impl fast-shared``: the fast path, plus every token prefix that several requests share
run once.

A multiple-choice document asks lm-eval for one request per choice, each ``context + choice``;
HFLM runs the context again for every choice, and with few-shot prompts (MMLU 5-shot) every
question of a subject repeats the same examples. Here the requests (lm-eval's representatives
after its one-token-continuation grouping) are sorted by their model input (left-truncated to
``max_length`` as lm-eval does), so inputs sharing a prefix lie together, and packed into rows as a
token trie: a shared prefix appears once, each input's remaining tokens below it. The row is the
trie in depth-first order, so a token's ancestors are exactly the tokens before it whose subtree
holds it; the 4-D attention mask lets each token see its ancestors and itself only, and its
position id is its depth, i.e. its position in its own input. So every token computes what it
computes in lm-eval's row for its input, and shared tokens run once. A row holds at most twice
its longest input; rows are sorted by size and a pass takes as many as the tokens of lm-eval's
batch allow (``--eval-batch-size`` rows of the longest input), right-padded. An input that shares fewer than ``MIN_SHARED`` leading
tokens with both its neighbours goes through the fast path's plain batches instead.

The mask reaches the attention through transformers' own mask handling (a 4-D mask is used as
given). With sliding-window layers a row deeper than the window also needs the window's own mask:
it is passed as ``{"full_attention": ..., "sliding_attention": ...}``, which the models with mixed
layer types accept (Gemma 2/3, Qwen2, ...); a model that refuses it scores such rows the plain way.
The first packed row, and the first row deeper than the window, are also scored the plain way and
compared (``_verified``); a model whose numbers differ, or whose forward raises, falls back to the
plain fast path with one warning. Every request's answer is lm-eval's
(``FastLoglikelihood._answer``); only the forward passes are split differently, so numbers agree
with ``stock`` within float rounding (tests/test_fast_eval.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.evaluation.scored import GatherScored, warn_once


def score_shared(lm, re_ord, batch_size: int, res: list, pbar) -> None:
    """Score every representative of ``re_ord`` (an lm-eval Collator grouped by contexts),
    appending lm-eval's answers to ``res`` in the order ``re_ord.get_cache`` records."""
    reps = [req for chunk in re_ord.get_batched(n=0) for req in chunk]  # all, in lm-eval's order
    items = sorted(((req, lm._input(req[1], req[2])) for req in reps), key=lambda it: it[1])
    items, alone = _sharing(items)
    step = max(batch_size or len(alone), 1)  # lm-eval's batch size 0: one batch
    for start in range(0, len(alone), step):
        lm._score_chunk(alone[start:start + step], re_ord, res, pbar)
    if not items:
        return
    budget = (batch_size or len(items)) * max(len(inp) for _, inp in items)  # lm-eval's batch of tokens
    rows = sorted(_rows(items), key=lambda row: -row[1])
    start = 0
    while start < len(rows):
        stop = start + max(1, budget // rows[start][1])
        _run_rows(lm, [items for items, _size in rows[start:stop]], re_ord, res, pbar)
        start = stop


MIN_SHARED = 8  # tokens an input must share with a neighbour to be packed


def _sharing(items: list) -> tuple[list, list]:
    """The sorted items that share at least MIN_SHARED leading tokens with a neighbour (packed),
    and the requests of the others (plain batches: a packed row's explicit mask costs attention
    time that a prefix of a few tokens does not win back)."""
    near = [0] * len(items)
    for k in range(1, len(items)):
        n = _lcp(items[k - 1][1], items[k][1])
        near[k - 1], near[k] = max(near[k - 1], n), max(near[k], n)
    return ([it for it, n in zip(items, near) if n >= MIN_SHARED],
            [it[0] for it, n in zip(items, near) if n < MIN_SHARED])


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _rows(items: list) -> list[tuple[list, int]]:
    """Consecutive (sorted) items, as many per row as keep its trie within twice its longest input
    (so a row's attention, which the mask makes dense, stays within 4x that of its longest input);
    each row with its trie's size in tokens."""
    rows, longest, prev = [], 0, None
    for req, inp in items:
        grow = len(inp) - (_lcp(prev, inp) if prev is not None else 0)
        if rows and rows[-1][1] + grow <= 2 * max(longest, len(inp)):
            rows[-1][0].append((req, inp))
            rows[-1][1] += grow
            longest = max(longest, len(inp))
        else:
            rows.append([[(req, inp)], len(inp)])
            longest = len(inp)
        prev = inp
    return [(row, size) for row, size in rows]


class _Row:
    """One row's trie in depth-first order: token ids, depths, subtree ends, and per item the
    row indices of its scored positions."""

    def __init__(self, items: list):
        self.ids: list[int] = []
        self.depth: list[int] = []
        self.end: list[int] = []
        self.scored: list[list[int]] = []
        path: list[int] = []
        prev = None
        for req, inp in items:
            keep = _lcp(prev, inp) if prev is not None else 0
            path = path[:keep]
            for d in range(keep, len(inp)):
                path.append(len(self.ids))
                self.ids.append(inp[d])
                self.depth.append(d)
                self.end.append(0)
            for node in path:  # sorted order: later items only extend a subtree
                self.end[node] = len(self.ids)
            self.scored.append(path[len(inp) - len(req[2]):])
            prev = inp

    def __len__(self) -> int:
        return len(self.ids)


def _pass_tensors(rows: list[_Row], width: int, dev):
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    depth = torch.zeros(len(rows), width, dtype=torch.long)
    end = torch.arange(1, width + 1).repeat(len(rows), 1)  # padding: a leaf of its own
    for r, row in enumerate(rows):
        n = len(row)
        ids[r, :n] = torch.tensor(row.ids)
        depth[r, :n] = torch.tensor(row.depth)
        end[r, :n] = torch.tensor(row.end)
    return ids.to(dev), depth.to(dev), end.to(dev)


def _mask(depth: torch.Tensor, end: torch.Tensor, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """Additive ``[B, 1, W, W]`` mask: token i sees token j iff j is i's ancestor or i itself
    (j <= i < end[j]), and with ``window`` only if their depths differ by less than it."""
    w = depth.shape[1]
    idx = torch.arange(w, device=depth.device)
    allowed = (idx[None, None, :] <= idx[None, :, None]) & (idx[None, :, None] < end[:, None, :])
    if window is not None:
        allowed &= (depth[:, :, None] - depth[:, None, :]) < window
    return torch.zeros(allowed.shape, dtype=dtype, device=depth.device).masked_fill(
        ~allowed, torch.finfo(dtype).min).unsqueeze(1)


def _sliding_window(model) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def _run_rows(lm, items_rows: list, re_ord, res: list, pbar) -> None:
    members = [req for items in items_rows for req, _ in items]
    rows = [_Row(items) for items in items_rows]
    window = _sliding_window(lm.model)
    deep = window is not None and max(max(r.depth) for r in rows) >= window
    if not lm.share_contexts or (deep and lm._shared_deep_fallback):
        lm._score_chunk(members, re_ord, res, pbar)
        return
    check = not lm._shared_verified or (deep and not lm._shared_deep_verified)
    try:
        scored = _score_rows(lm, rows, window if deep else None)
    except Exception as exc:  # noqa: BLE001 - e.g. an attention backend that refuses 4-D masks
        if not check:
            raise
        _fall_back(lm, f"{type(lm.model).__name__} cannot take packed rows ({type(exc).__name__}: {exc})", deep)
        scored = None
    if scored is None or (check and not _verified(lm, items_rows[0], scored, deep)):
        lm._score_chunk(members, re_ord, res, pbar)
        return
    lm._shared_verified = lm._fast_verified = True
    lm._shared_deep_verified = lm._shared_deep_verified or deep
    for req, logits in zip(members, scored, strict=True):
        lm._answer(req, logits, re_ord, res, pbar)


def _verified(lm, items: list, scored: list, deep: bool) -> bool:
    """The first row of a pass against the plain fast path on the same requests: a model that does
    not honour the mask or the position ids gives different numbers and is not packed."""
    scored = scored[:len(items)]
    ref = lm._plain_log_probs([req for req, _ in items])
    tol = 1e-3 if torch.finfo(ref[0].dtype).bits >= 32 else 5e-2
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(ref, scored, strict=True))
    if diff > tol:
        _fall_back(lm, f"packing shared prefixes changes {type(lm.model).__name__}'s log-probabilities "
                       f"(by {diff:.3g}; the model may not honour a 4-D attention mask)", deep)
        return False
    return True


def _fall_back(lm, reason: str, deep: bool) -> None:
    """Deep rows only (a model that refuses the per-layer-type masks) or everything."""
    if deep and lm._shared_verified:
        lm._shared_deep_fallback = True
        warn_once(f"{reason}, so inputs longer than the sliding window are not packed")
        return
    lm.share_contexts = False
    lm._shared_fallback = reason
    warn_once(f"{reason}, so fast-shared runs as fast")


def _score_rows(lm, rows: list[_Row], window: int | None) -> list[torch.Tensor]:
    """``[contlen, vocab]`` log-probs per item of every row (module docstring), one forward pass."""
    width = max(len(r) for r in rows)
    dev = lm.device
    ids, depth, end = _pass_tensors(rows, width, dev)
    dtype = lm.mixed_precision_dtype or next(lm.model.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    mask = _mask(depth, end, dtype)
    if window is not None:
        mask = {"full_attention": mask, "sliding_attention": _mask(depth, end, dtype, window)}
    rr = torch.cat([torch.full((len(s),), r, dtype=torch.long) for r, row in enumerate(rows) for s in row.scored])
    cc = torch.tensor([c for row in rows for s in row.scored for c in s], dtype=torch.long)
    gather = GatherScored(rr, cc, len(rows), width)
    out = lm._head_call(gather, rr.numel(), lambda: lm._call(input_ids=ids, attention_mask=mask, position_ids=depth,
                                                             use_cache=False))
    logp = F.log_softmax(out.logits[0], dim=-1, dtype=lm.softmax_dtype)
    return list(logp.split([len(s) for row in rows for s in row.scored], dim=0))

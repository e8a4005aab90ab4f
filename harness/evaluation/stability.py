"""Stability (LLM-Streamline, ICLR 2025 version): does the pruned model keep the dense one's answers?

Definition (shared/papers/ALGORITHMS.md, "Stability (ICLR version)"): for each multiple-choice
item k of a task,

    s_k     = standard deviation over the choices of the dense model's per-choice scores
    w_k     = exp(s_k) / sum_j exp(s_j)               (a softmax over the task's items)
    agree_k = 1 if the pruned and the dense model are both right or both wrong, else 0
    Stability = sum_k w_k * agree_k                   (in [0, 1]; 1 = same right/wrong pattern)

Scores (``scores=``, CLI ``--stability-scores``):

- ``sum`` (the default): lm-eval's *summed log-likelihood* of each choice's continuation.
- ``mean``: the per-token mean log-likelihood (the sum divided by the continuation's token count,
  counted with lm-eval's own tokenization of the item), i.e. minus the log of the choice's
  perplexity: per token, like the OpenCompass perplexities the paper used, but on the log scale
  (the paper's spread is that of the perplexities themselves; OpenCompass's PPL mode also
  averages over its prompt, while lm-eval scores the continuation only).

Neither reproduces the paper's numbers exactly (different tool, different scale); ``sum`` stays
the default so that earlier results keep their values. The standard deviation is the
population one (ddof=0). "Right" is lm-eval's per-item ``acc`` (argmax of the summed
log-likelihood) or ``acc_norm`` (argmax of the length-normalised one), so each task gets one
stability per metric; the report uses the same metric as the task's accuracy column. The
weights come from the chosen scores of the dense model.

How much a stability value measures: the softmax concentrates on the items with the largest
spread, and summed log-likelihoods spread widely (long continuations), so a few items can carry
almost all the weight. Each task's result therefore carries ``n_eff = 1 / sum_k w_k^2``, the
effective number of items (n_eff = n for equal weights, 1 when one item has all the weight).

The released script instead adds up the *first* ``#agreements`` weights (in item order),
whatever items agreed. That bug is available only as ``variant="released_prefix_sum"``; the
harness itself always reports the definition above.

Per-sample data is kept compactly (per task, per item: the choices' log-likelihoods, their
continuations' token counts, and the acc / acc_norm flags) in a gzip side file next to each
result JSON.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from harness.io import read_json_gz, write_json_gz_atomic

SAMPLES_FORMAT = 1
VARIANTS = ("definition", "released_prefix_sum")
SCORES = ("sum", "mean")
DEFAULT_SCORES = "sum"
SCORE_NOTES = {
    "sum": "lm-eval summed log-likelihood per choice; population std; softmax over a task's items",
    "mean": "lm-eval log-likelihood per choice divided by its continuation's token count (per-token mean); "
            "population std; softmax over a task's items",
}


def check_scores(scores: str) -> str:
    if scores not in SCORES:
        from harness.errors import UsageError

        raise UsageError(f"unknown stability scores '{scores}'; use one of {', '.join(SCORES)}")
    return scores


def item_weights(dense_scores: Sequence[Sequence[float]]) -> list[float]:
    """``w_k = softmax_k(std of item k's scores)`` (population std, max subtracted: no overflow)."""
    spreads = []
    for scores in dense_scores:
        vals = [float(v) for v in scores]
        mean = sum(vals) / len(vals)
        spreads.append(math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)))
    top = max(spreads)
    expd = [math.exp(s - top) for s in spreads]
    total = sum(expd)
    return [e / total for e in expd]


def effective_items(weights: Sequence[float]) -> float:
    """``1 / sum_k w_k^2``: n for equal weights, 1 when one item carries all the weight."""
    return float(1.0 / sum(w * w for w in weights))


def stability(dense_scores: Sequence[Sequence[float]], dense_correct: Sequence[bool],
              pruned_correct: Sequence[bool], variant: str = "definition") -> float:
    """Stability of one task: ``sum_k w_k * agree_k`` (see the module docstring).

    ``dense_scores[k]`` are the dense model's scores of item k's choices; ``*_correct[k]`` say
    whether each model answered item k right. ``variant="released_prefix_sum"`` reproduces the
    released script's bug (sum of the first ``#agreements`` weights) and exists only for
    comparison with its numbers.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown stability variant '{variant}'; use one of {', '.join(VARIANTS)}")
    k = len(dense_scores)
    if not (k == len(dense_correct) == len(pruned_correct)):
        raise ValueError("dense_scores, dense_correct and pruned_correct must have one entry per item")
    if k == 0:
        raise ValueError("stability needs at least one item")
    weights = item_weights(dense_scores)
    agree = [bool(a) == bool(b) for a, b in zip(dense_correct, pruned_correct)]
    if variant == "released_prefix_sum":
        return float(sum(weights[: sum(agree)]))
    return float(sum(w for w, a in zip(weights, agree) if a))


# --- per-sample data -----------------------------------------------------------------------

def _loglik(resp) -> float | None:
    """lm-eval logs a loglikelihood response as ``(ll, is_greedy)`` (possibly nested once)."""
    while isinstance(resp, (list, tuple)) and len(resp) == 1 and isinstance(resp[0], (list, tuple)):
        resp = resp[0]
    if isinstance(resp, (list, tuple)) and resp and isinstance(resp[0], (int, float)):
        return float(resp[0])
    if isinstance(resp, (int, float)) and not isinstance(resp, bool):
        return float(resp)
    return None


def continuation_token_counts(lm, arguments) -> list[int] | None:
    """Token count of each request's continuation, tokenised exactly as lm-eval's ``loglikelihood``
    does (``lm`` is the lm-eval model object that scored them: its ``_encode_pair``, and the
    prefix token for an empty context). None when the requests are not (context, continuation)."""
    counts = []
    for args in arguments or []:
        if not (isinstance(args, (list, tuple)) and len(args) == 2 and all(isinstance(a, str) for a in args)):
            return None
        context, continuation = args
        if context == "":
            enc = lm.tok_encode(continuation, add_special_tokens=False)
            counts.append(len(enc) - (1 if enc and enc[0] == lm.prefix_token_id else 0))
        else:
            counts.append(len(lm._encode_pair(context, continuation)[1]))
    return counts or None


def annotate_token_counts(lm, samples: dict) -> None:
    """Add ``continuation_tokens`` (one count per request) to each logged lm-eval sample row."""
    for rows in (samples or {}).values():
        for row in rows:
            counts = continuation_token_counts(lm, row.get("arguments"))
            if counts is not None:
                row["continuation_tokens"] = counts


def compact_samples(samples: dict) -> dict:
    """Reduce lm-eval's ``out["samples"]`` to what stability needs.

    Returns ``{"format": 1, "tasks": {task: {"doc_id": [...], "ll": [[...], ...], "ntok": [[...] | None,
    ...], "acc": [...], "acc_norm": [...]}}}``. ``ntok`` are the continuations' token counts
    (from ``annotate_token_counts``; None for an item without them). Only multiple-choice tasks
    (items with per-choice log-likelihoods and an ``acc`` flag) are kept; with several filters,
    the first one logged per item is used.
    """
    tasks = {}
    for task, rows in (samples or {}).items():
        out = {"doc_id": [], "ll": [], "ntok": [], "acc": [], "acc_norm": []}
        seen = set()
        for row in rows:
            if "acc" not in row or row.get("doc_id") in seen:
                continue
            lls = [_loglik(r) for r in row.get("filtered_resps", [])]
            if not lls or any(v is None for v in lls):
                continue
            ntok = row.get("continuation_tokens")
            ntok = [int(v) for v in ntok] if isinstance(ntok, (list, tuple)) and len(ntok) == len(lls) else None
            seen.add(row["doc_id"])
            out["doc_id"].append(int(row["doc_id"]))
            out["ll"].append(lls)
            out["ntok"].append(ntok)
            out["acc"].append(float(row["acc"]))
            out["acc_norm"].append(None if row.get("acc_norm") is None else float(row["acc_norm"]))
        if out["doc_id"]:
            tasks[task] = out
    return {"format": SAMPLES_FORMAT, "score": "lm-eval summed log-likelihood per choice (ll), "
            "continuation token counts (ntok)", "tasks": tasks}


def item_scores(task_data: dict, indices: Sequence[int], scores: str = DEFAULT_SCORES) -> list[list[float]] | None:
    """The per-choice scores of the given items: summed log-likelihoods, or per-token means
    (None when an item lacks token counts, e.g. a side file written before they were kept)."""
    check_scores(scores)
    lls = [task_data["ll"][i] for i in indices]
    if scores == "sum":
        return lls
    ntoks = task_data.get("ntok") or [None] * len(task_data["ll"])
    out = []
    for i, ll in zip(indices, lls):
        counts = ntoks[i]
        if not counts or len(counts) != len(ll) or any(c <= 0 for c in counts):
            return None
        out.append([v / c for v, c in zip(ll, counts)])
    return out


def samples_path(result_path) -> Path:
    """The side file of a result JSON: ``<stem>.samples.json.gz`` in the same folder."""
    p = Path(result_path)
    return p.with_name(p.stem + ".samples.json.gz")


def save_samples(result_path, compact: dict) -> Path:
    path = samples_path(result_path)
    write_json_gz_atomic(path, compact)
    return path


def load_samples(result_path) -> dict | None:
    path = samples_path(result_path)
    if not path.is_file():
        return None
    data = read_json_gz(path)
    return data if isinstance(data, dict) and data.get("format") == SAMPLES_FORMAT else None


def compare(dense: dict, pruned: dict, variant: str = "definition", scores: str = DEFAULT_SCORES) -> dict | None:
    """Stability of a pruned model against the dense one, per task and metric.

    Items are matched by ``doc_id``; only items both models answered count (``n``); ``n_eff`` is
    the effective number of items behind the value (``1 / sum_k w_k^2``). ``scores`` picks the
    per-choice score the weights come from (``sum`` | ``mean``, see the module docstring).
    Returns ``{"tasks": {task: {"acc": s, "acc_norm": s | None, "n": k, "n_eff": e}}, "mean":
    {...}, "scores": ..., ...}`` or None when no task overlaps. With ``scores="mean"``, tasks
    whose dense side file has no token counts are listed under ``missing_token_counts``.
    """
    check_scores(scores)
    if not dense or not pruned:
        return None
    out, missing = {}, []
    for task, d in dense.get("tasks", {}).items():
        p = pruned.get("tasks", {}).get(task)
        if not p:
            continue
        p_index = {doc: i for i, doc in enumerate(p["doc_id"])}
        pairs = [(i, p_index[doc]) for i, doc in enumerate(d["doc_id"]) if doc in p_index]
        if not pairs:
            continue
        values = item_scores(d, [i for i, _ in pairs], scores)
        if values is None:
            missing.append(task)
            continue
        weights = item_weights(values)
        row = {"n": len(pairs), "n_eff": effective_items(weights)}
        for metric in ("acc", "acc_norm"):
            dv = [d[metric][i] for i, _ in pairs]
            pv = [p[metric][j] for _, j in pairs]
            if any(v is None for v in dv + pv):
                row[metric] = None
                continue
            value = stability(values, [v > 0.5 for v in dv], [v > 0.5 for v in pv], variant)
            row[metric] = value if math.isfinite(value) else None  # non-finite dense scores: undefined, not NaN
        out[task] = row
    if not out:
        return None
    mean = {}
    for metric in ("acc", "acc_norm"):
        vals = [r[metric] for r in out.values()]
        mean[metric] = None if any(v is None for v in vals) else sum(vals) / len(vals)
    mean["n_eff"] = sum(r["n_eff"] for r in out.values()) / len(out)
    block = {"definition": "sum_k w_k*agree_k, w = softmax_k(std of dense per-choice scores); "
                           "n_eff = 1/sum_k w_k^2 (effective number of items)",
             "variant": variant, "scores": scores, "score": SCORE_NOTES[scores], "tasks": out, "mean": mean}
    if missing:
        block["missing_token_counts"] = missing
    return block


def has_token_counts(samples: dict | None) -> bool:
    """Whether a side file carries the continuations' token counts (``scores="mean"`` needs them)."""
    tasks = (samples or {}).get("tasks") or {}
    return bool(tasks) and all(t.get("ntok") and all(c for c in t["ntok"]) for t in tasks.values())


def rescored(record: dict, dense: dict | None, pruned: dict | None, scores: str) -> dict | None:
    """A stored run's stability block for ``scores``: unchanged when it already used them, else
    recomputed from the two side files (``None`` values keep the stored block)."""
    block = record.get("stability")
    if not block or block.get("scores", "sum") == scores or not dense or not pruned:
        return block
    return compare(dense, pruned, block.get("variant", "definition"), scores) or block

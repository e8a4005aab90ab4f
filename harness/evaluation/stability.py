"""Stability (LLM-Streamline, ICLR 2025 version): does the pruned model keep the dense one's answers?

Definition (shared/papers/ALGORITHMS.md, "Stability (ICLR version)"): for each multiple-choice
item k of a task,

    s_k     = standard deviation over the choices of the dense model's per-choice scores
    w_k     = exp(s_k) / sum_j exp(s_j)               (a softmax over the task's items)
    agree_k = 1 if the pruned and the dense model are both right or both wrong, else 0
    Stability = sum_k w_k * agree_k                   (in [0, 1]; 1 = same right/wrong pattern)

Scores used here: lm-eval's *summed log-likelihood* of each choice (the paper used
OpenCompass perplexities); the standard deviation is the population one (ddof=0). "Right"
is lm-eval's per-item ``acc`` (argmax of the summed log-likelihood) or ``acc_norm`` (argmax
of the length-normalised one), so each task gets one stability per metric; the report uses
the same metric as the task's accuracy column. The weights always come from the summed
log-likelihoods.

The released script instead adds up the *first* ``#agreements`` weights (in item order),
whatever items agreed. That bug is available only as ``variant="released_prefix_sum"``; the
harness itself always reports the definition above.

Per-sample data is kept compactly (per task, per item: the choices' log-likelihoods and the
acc / acc_norm flags) in a gzip side file next to each result JSON.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from harness.io import read_json_gz, write_json_gz_atomic

SAMPLES_FORMAT = 1
VARIANTS = ("definition", "released_prefix_sum")
SCORE_NOTE = "lm-eval summed log-likelihood per choice; population std; softmax over a task's items"


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
    spreads = []
    for scores in dense_scores:
        vals = [float(v) for v in scores]
        mean = sum(vals) / len(vals)
        spreads.append(math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)))
    top = max(spreads)  # softmax with the maximum subtracted: no overflow for large spreads
    expd = [math.exp(s - top) for s in spreads]
    total = sum(expd)
    weights = [e / total for e in expd]
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


def compact_samples(samples: dict) -> dict:
    """Reduce lm-eval's ``out["samples"]`` to what stability needs.

    Returns ``{"format": 1, "tasks": {task: {"doc_id": [...], "ll": [[...], ...], "acc": [...],
    "acc_norm": [...]}}}``. Only multiple-choice tasks (items with per-choice log-likelihoods
    and an ``acc`` flag) are kept; with several filters, the first one logged per item is used.
    """
    tasks = {}
    for task, rows in (samples or {}).items():
        out = {"doc_id": [], "ll": [], "acc": [], "acc_norm": []}
        seen = set()
        for row in rows:
            if "acc" not in row or row.get("doc_id") in seen:
                continue
            lls = [_loglik(r) for r in row.get("filtered_resps", [])]
            if not lls or any(v is None for v in lls):
                continue
            seen.add(row["doc_id"])
            out["doc_id"].append(int(row["doc_id"]))
            out["ll"].append(lls)
            out["acc"].append(float(row["acc"]))
            out["acc_norm"].append(None if row.get("acc_norm") is None else float(row["acc_norm"]))
        if out["doc_id"]:
            tasks[task] = out
    return {"format": SAMPLES_FORMAT, "score": "lm-eval summed log-likelihood per choice", "tasks": tasks}


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


def compare(dense: dict, pruned: dict, variant: str = "definition") -> dict | None:
    """Stability of a pruned model against the dense one, per task and metric.

    Items are matched by ``doc_id``; only items both models answered count (``n``). Returns
    ``{"tasks": {task: {"acc": s, "acc_norm": s | None, "n": k}}, "mean": {...}, ...}`` or
    None when no task overlaps.
    """
    if not dense or not pruned:
        return None
    out = {}
    for task, d in dense.get("tasks", {}).items():
        p = pruned.get("tasks", {}).get(task)
        if not p:
            continue
        p_index = {doc: i for i, doc in enumerate(p["doc_id"])}
        pairs = [(i, p_index[doc]) for i, doc in enumerate(d["doc_id"]) if doc in p_index]
        if not pairs:
            continue
        scores = [d["ll"][i] for i, _ in pairs]
        row = {"n": len(pairs)}
        for metric in ("acc", "acc_norm"):
            dv = [d[metric][i] for i, _ in pairs]
            pv = [p[metric][j] for _, j in pairs]
            if any(v is None for v in dv + pv):
                row[metric] = None
                continue
            value = stability(scores, [v > 0.5 for v in dv], [v > 0.5 for v in pv], variant)
            row[metric] = value if math.isfinite(value) else None  # non-finite dense scores: undefined, not NaN
        out[task] = row
    if not out:
        return None
    mean = {}
    for metric in ("acc", "acc_norm"):
        vals = [r[metric] for r in out.values()]
        mean[metric] = None if any(v is None for v in vals) else sum(vals) / len(vals)
    return {"definition": "sum_k w_k*agree_k, w = softmax_k(std of dense per-choice scores)",
            "variant": variant, "score": SCORE_NOTE, "tasks": out, "mean": mean}

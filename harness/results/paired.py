"""Paired comparison of two pruned models on the same items: is a difference in Per. more than the
items' noise?

Two methods evaluated on the same ``--limit`` items differ item by item, and most items are answered
alike by both. A table's Per. difference therefore says nothing about significance by itself: on 200
items, 2.7 Per. can be five items. This module reads the per-item right/wrong flags kept in each
run's side file (``<run>.samples.json.gz``, see ``harness.evaluation.stability``) and gives, for each
run against a reference method at the same target and seed:

- the Per. difference ``Per.(run) - Per.(reference)``, recomputed from the items (it equals the
  tables' when every item is in both side files);
- a 95% paired bootstrap interval for it: items are resampled with replacement within each task,
  the same draw for the run, the reference and the dense model (Per. divides by the dense Ave.), so
  the interval carries the correlation between the two models' answers; 10,000 draws, seed 0;
- the discordant items: how many the run gets right and the reference wrong, and the reverse (the
  counts behind McNemar's test).

Per. here is the tables' (``100 x Ave. / dense Ave.``, Ave. the mean over the tasks of each task's
accuracy). A task whose column is a group (e.g. mmlu) pools its subtasks' items, which is lm-eval's
size-weighted group accuracy. Only accuracy columns (``acc``, ``acc_norm``) have per-item flags; a
table with any other averaged column (a generation task's exact match) is not compared, and says so.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pandas as pd

from harness.errors import UsageError
from harness.evaluation.stability import load_samples
from harness.results import report

RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95
ITEM_METRICS = ("acc", "acc_norm")


def _flags(samples: dict, leaves: list[str], metric: str) -> dict | None:
    """``{(leaf, doc_id): 0/1}`` of one column's items, or None when a leaf has no flags."""
    out = {}
    for leaf in leaves:
        data = ((samples or {}).get("tasks") or {}).get(leaf)
        if not data or any(v is None for v in data.get(metric) or [None]):
            return None
        out.update({(leaf, doc): float(v) for doc, v in zip(data["doc_id"], data[metric])})
    return out


def _columns(dense_run: dict, spec) -> tuple[list[tuple[str, str]], str | None]:
    """The averaged columns as ``(task, metric)``, or a reason they cannot be compared item by item."""
    cols = []
    for task in dense_run["metrics"]:
        value, metric = report.pick_metric(dense_run["metrics"][task], task, *spec)
        if not report.higher_is_better(dense_run, task, metric):
            continue  # a perplexity column is not in Ave.
        if metric.split("/")[0] not in ITEM_METRICS:
            return [], f"column {task} shows {metric}, which has no per-item flags (only acc and acc_norm do)"
        cols.append((task, metric.split("/")[0]))
    return (cols, None) if cols else ([], "no accuracy column")


def _matrices(runs: list[dict], dense_run: dict, cols, loaded: dict) -> tuple[list[np.ndarray] | None, str | None]:
    """Per column, an items x runs 0/1 matrix of the items every run answered (dense first);
    ``loaded`` keeps each side file read once (dense and the reference are in every pair)."""
    samples = []
    for run in runs:
        path = run.get("_path")
        if path and path not in loaded:
            loaded[path] = load_samples(path)
        s = loaded.get(path) if path else None
        if s is None:
            return None, f"{run['method']} has no per-item side file (.samples.json.gz)"
        samples.append(s)
    out = []
    for task, metric in cols:
        leaves = report.leaf_tasks(dense_run, task)
        flags = [_flags(s, leaves, metric) for s in samples]
        missing = [r["method"] for r, f in zip(runs, flags) if f is None]
        if missing:
            return None, f"{', '.join(missing)}: no {metric} flags for {task} in the side file"
        common = sorted(set.intersection(*(set(f) for f in flags)))
        if not common:
            return None, f"no item of {task} is in every run's side file"
        out.append(np.array([[f[k] for f in flags] for k in common]))
    return out, None


def _per(means: np.ndarray) -> np.ndarray:
    """Per. of each run (columns 1..) from per-task means ``[..., task, run]`` (dense in column 0);
    NaN where the dense Ave. is 0 (Per. undefined, as in the tables)."""
    ave = means.mean(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ave[..., :1] > 0, 100.0 * ave[..., 1:] / ave[..., :1], np.nan)


def compare(mats: list[np.ndarray], resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Per.(run) - Per.(reference) for item matrices with columns (dense, run, reference): the
    observed value, its paired bootstrap interval and the discordant counts."""
    rng = np.random.default_rng(seed)
    observed = _per(np.stack([m.mean(axis=0) for m in mats]))
    if not np.isfinite(observed).all():
        raise ValueError("the dense model answers none of these items: Per. is undefined")
    boot = np.empty((resamples, len(mats), mats[0].shape[1]))
    for t, m in enumerate(mats):
        idx = rng.integers(0, len(m), size=(resamples, len(m)))
        boot[:, t, :] = m[idx].mean(axis=1)
    per = _per(boot)
    diffs = per[:, 0] - per[:, 1]  # run - reference
    lo, hi = np.nanquantile(diffs, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])  # draws where dense got 0 left out
    run_right = sum(int(((m[:, 1] > 0.5) & (m[:, 2] < 0.5)).sum()) for m in mats)
    ref_right = sum(int(((m[:, 1] < 0.5) & (m[:, 2] > 0.5)).sum()) for m in mats)
    return {"per": float(observed[0]), "ref_per": float(observed[1]), "diff": float(observed[0] - observed[1]),
            "low": float(lo), "high": float(hi), "items": int(sum(len(m) for m in mats)),
            "run_only": run_right, "ref_only": ref_right}


def _key(run: dict) -> tuple:
    return report.target_key(run), run.get("seed")


def paired_tables(runs: list[dict], reference: str, metric_spec: str | None = None,
                  method_order: list[str] | None = None, preset: str | None = None,
                  labels: dict | None = None) -> list:
    """One ``(title, DataFrame, notes)`` per comparable group holding ``reference``: every other
    method's run against the reference run at the same target and seed."""
    if not any(r["method"] == reference for r in runs):
        have = sorted({r["method"] for r in runs if r["method"] != "dense"})
        raise UsageError(f"--paired {reference}: no run of '{reference}' here; the runs' methods: {', '.join(have)}")
    spec = report.parse_metric_spec(metric_spec, preset)
    titles = report.group_titles(runs)
    tables, loaded = [], {}
    for dense_run, group in report.comparable_groups(runs):
        refs = {_key(r): r for r in group if r["method"] == reference and r.get("status") != "failed"}
        if not refs:
            continue
        cols, why = _columns(dense_run, spec)
        rows, notes = [], []
        spans = report.spans_targets(group)
        for run in sorted(report.method_runs(group, method_order), key=report.target_key):
            ref = refs.get(_key(run))
            if run["method"] == reference or ref is None or run.get("status") == "failed" or why:
                continue
            mats, problem = _matrices([dense_run, run, ref], dense_run, cols, loaded)
            label = report.row_label(run, labels)
            row = OrderedDict(Method=label)
            if spans:
                row["Target"] = report.target_label(run)
            if mats is None:
                notes.append(f"{label}: not compared ({problem})")
                continue
            try:
                c = compare(mats)
            except ValueError as e:
                notes.append(f"{label}: not compared ({e})")
                continue
            row.update({"Per.": c["per"], f"Per. {reference}": c["ref_per"], "\u0394 Per.": c["diff"],
                        "95% low": c["low"], "95% high": c["high"], "items": str(c["items"]),
                        "only run right": str(c["run_only"]), f"only {reference} right": str(c["ref_only"])})
            rows.append(row)
        if why:
            notes.append(f"not compared: {why}")
        notes.append(f"\u0394 Per. = the run's Per. minus {reference}'s at the same target, from the items both "
                     f"answered; 95% low/high: paired bootstrap over items within each task ({RESAMPLES:,} draws, "
                     f"seed {SEED}; the same draw for the run, {reference} and dense). An interval that holds 0 is "
                     "a difference the items cannot tell from noise.")
        title = titles.get(report.eval_group_key(dense_run), report.model_display_name(dense_run["model"]["name"]))
        tables.append((f"{title}: paired against {reference}", pd.DataFrame(rows), notes))
    return tables

"""What each run took, from the ``timings`` of its record: one row per run (dense first, then by target
and method), wall-clock minutes per stage, the commit it ran at and its torch threads. Written as
``costs.md/csv/tex`` beside the results table, so that "what did this cost" is read from the records,
not retyped.

Stages (a record's ``timings``, in seconds): scoring = ``score_shared`` (the pass every method at a
target shares; the first run to need it pays it) + ``score`` (a method's own); post-training = every
``post_step.*`` (LoRA); fit = ``prune`` minus its scoring and post-training (training a replacement,
LaCo's search, or nothing but surgery); tasks = ``eval``; perplexity = ``ppl``; efficiency = ``efficiency``;
for the dense model also ``load``. A run that reused another's evaluation (the same network) has no
task, perplexity or efficiency time of its own.
"""
from __future__ import annotations

import pandas as pd

from harness.results.report import (comparable_groups, group_titles, eval_group_key, method_runs, row_label,
                                    target_key, target_label)


def _minutes(seconds: float | None) -> float | None:
    return None if seconds is None else seconds / 60.0


def cost_row(run: dict, labels: dict | None = None) -> dict:
    """One run's row: minutes per stage (None where the stage did not run), total, commit, threads."""
    t = run.get("timings") or {}
    steps = [v for k, v in t.items() if k.startswith("post_step.")]
    post = sum(steps) if steps else None
    scoring = t.get("score_shared", 0.0) + t.get("score", 0.0) if "score_shared" in t or t.get("score") else None
    fit = None
    if "prune" in t:  # prune includes its own scoring ("score") and every post-step
        fit = max(t["prune"] - t.get("score", 0.0) - (post or 0.0), 0.0)
    secs = {"Scoring": scoring, "Fit": fit, "Post-train": post, "Tasks": t.get("eval"), "Perplexity": t.get("ppl"),
            "Efficiency": t.get("efficiency")}
    env = run.get("environment") or {}
    row = {"Method": row_label(run, labels), "Target": "-" if run["method"] == "dense" else target_label(run)}
    row.update({k: _minutes(v) for k, v in secs.items()})
    known = [v for v in secs.values() if v is not None] + ([t["load"]] if "load" in t else [])
    row["Total"] = _minutes(sum(known)) if known else None
    row["Reused"] = (run.get("reused_evaluation") or {}).get("method") or "-"
    row["Threads"] = str(env.get("torch_threads", "-"))
    row["Commit"] = (env.get("git_commit") or "-")[:7]
    return row


def cost_tables(runs: list[dict], method_order: list[str] | None = None, labels: dict | None = None):
    """``(title, DataFrame, notes)`` per comparable group with timings; [] when no run has any."""
    if not any(r.get("timings") for r in runs):
        return []
    titles = group_titles(runs)
    out = []
    for dense_run, group in comparable_groups(runs):
        others = sorted(method_runs(group, method_order), key=target_key)  # stable: method order within a target
        rows = [cost_row(r, labels) for r in [dense_run, *others]]
        notes = ["Wall-clock minutes of each stage, from each run's JSON (timings): Scoring = the layer-score pass "
                 "(shared by the methods at a target; the first run to need it pays it), Fit = pruning minus "
                 "scoring and post-training (a replacement's training, LaCo's search), Post-train = LoRA, "
                 "Tasks = lm-eval, Perplexity = wikitext-2 perplexity, Efficiency = the timed speed and memory runs; Total adds "
                 "them (and the dense model's load). Reused: the run whose evaluation this one reused (same "
                 "network). Times depend on what else ran on the machine: compare them within one sweep."]
        out.append((f"{titles.get(eval_group_key(dense_run), dense_run['model']['name'])}: minutes per stage",
                    pd.DataFrame(rows), notes))
    return out

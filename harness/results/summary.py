"""The cross-model summary of ``--report`` over a folder with several models: one models x methods
table of Per. (and each model's dense Ave.) per evaluation protocol, before the per-model tables.

Runs are merged into one summary only when their protocol agrees: the tasks, ``--limit``, the
few-shot setting, the dtype and the table metric. Runs of another protocol get their own summary,
whose title names it; nothing is averaged across protocols.
"""
from __future__ import annotations

from collections import OrderedDict

import pandas as pd

from harness.io import canonical
from harness.results.report import (
    build_target_tables,
    comparable_groups,
    model_display_name,
    parse_metric_spec,
    protocol_label,
)


def protocol_key(run: dict) -> str:
    ev = run.get("eval") or {}
    return canonical({"tasks": sorted(run.get("metrics") or {}), "limit": ev.get("limit"),
                      "num_fewshot": ev.get("num_fewshot"), "dtype": run["model"].get("dtype")})


def summary_tables(runs: list[dict], metric_spec: str | None = None, method_order: list[str] | None = None,
                   **options) -> list[tuple]:
    """``(title, DataFrame, notes)`` per protocol when the runs hold two or more models, else []."""
    groups = comparable_groups(runs)
    if len({model_display_name(d["model"]["name"]) for d, _g in groups}) < 2:
        return []
    default, per_task = parse_metric_spec(metric_spec, options.get("preset"))
    metric = default + "".join(f", {t}={m}" for t, m in sorted(per_task.items()))
    by_protocol: "OrderedDict[str, list]" = OrderedDict()
    for dense, group in groups:
        by_protocol.setdefault(protocol_key(dense), []).append((dense, group))
    options = {k: v for k, v in options.items() if k in ("preset", "labels")}
    out = []
    for members in by_protocol.values():
        rows, methods = [], []
        for dense, group in members:
            ((_title, df, _notes),) = build_target_tables(group, metric_spec, method_order, **options)
            spans = df["Target"].nunique() > 2  # "-" for dense plus more than one target
            for target in [t for t in dict.fromkeys(df["Target"]) if t != "-"] or ["-"]:
                row = {"Model": model_display_name(dense["model"]["name"]) + (f" ({target})" if spans else ""),
                       "Target": target, "Dense Ave.": df["Ave."].iloc[0]}
                for _i, r in df[df["Target"] == target].iterrows():
                    row[r["Method"]] = r["Per."]
                    methods.append(r["Method"])
                rows.append(row)
        columns = ["Model", "Target", "Dense Ave.", *dict.fromkeys(methods)]
        first = members[0][0]
        tasks = ", ".join(sorted(first.get("metrics") or {}))
        title = f"Summary: Per. by model and method [{protocol_label(first)}; {len(first.get('metrics') or {})} tasks]"
        notes = [f"Protocol of every row: {protocol_label(first)}; tasks {tasks}; table metric {metric}.",
                 "Cells: Per. = Ave. / the model's dense Ave. x 100 at that target (Target: layers removed or "
                 "ratio asked); the per-model tables follow. Runs of another protocol are summarised separately."]
        out.append((title, pd.DataFrame(rows, columns=columns), notes))
    return out

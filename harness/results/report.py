"""Tables rendered from result JSON files (pandas + tabulate): Markdown, CSV and LaTeX.

Rows: the dense model, then one per method. Columns: measured pruning ratio, one score per
task (the table's metric choice, printed with the table), "Ave." (mean over tasks) and
"Per." (retained performance = Ave. / dense Ave. x 100, a ratio of means as in ShortGPT's
and LLM-Streamline's tables), and wikitext-2 perplexity when it was measured.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pandas as pd

from harness.errors import UsageError
from harness.io import canonical, write_text_atomic

TASK_LABELS = {
    "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande", "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c", "openbookqa": "OBQA", "boolq": "BoolQ",
}


def parse_metric_spec(spec: str | None) -> tuple[str, dict[str, str]]:
    """``acc`` | ``acc_norm`` | ``acc,hellaswag=acc_norm,...`` -> (default, per-task)."""
    default, per_task = "acc", {}
    for part in (spec or "acc").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            task, metric = part.split("=", 1)
            per_task[task.strip()] = metric.strip()
        else:
            default = part
    for m in [default, *per_task.values()]:
        if m not in ("acc", "acc_norm"):
            raise UsageError(f"unknown table metric '{m}'; use acc or acc_norm (optionally per task: hellaswag=acc_norm)")
    return default, per_task


def pick_metric(row: dict, task: str, default: str, per_task: dict) -> tuple[float | None, str]:
    want = per_task.get(task, default)
    if row.get(want) is not None:
        return row[want], want
    if row.get("acc") is not None:  # e.g. winogrande/boolq have no acc_norm in lm-eval
        return row["acc"], "acc"
    return None, want


def stability_cell(run: dict, tasks: list[str], default: str, per_task: dict) -> float | None:
    """Mean over tasks of the run's stability vs the dense model (x100), each task on its table metric."""
    block = (run.get("stability") or {}).get("tasks") or {}
    values = []
    for t in tasks:
        row = block.get(t) or {}
        want = per_task.get(t, default)
        value = row.get(want) if row.get(want) is not None else row.get("acc")  # as pick_metric falls back
        if value is None:
            return None
        values.append(100.0 * value)
    return sum(values) / len(values) if values else None


def stability_items_cell(run: dict, tasks: list[str]) -> float | None:
    """Mean over tasks of the effective number of items behind each stability (``n_eff``)."""
    block = (run.get("stability") or {}).get("tasks") or {}
    values = [(block.get(t) or {}).get("n_eff") for t in tasks]
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def _items_note(runs: list[dict]) -> str:
    ns = sorted({row["n"] for r in runs for row in ((r.get("stability") or {}).get("tasks") or {}).values()
                 if row.get("n")})
    if not ns:
        return ""
    return f"; out of {ns[0]} items per task" if len(ns) == 1 else f"; out of {ns[0]}-{ns[-1]} items per task"


def eval_group_key(run: dict) -> str:
    """Runs are comparable when model, evaluation config and dtype agree."""
    return canonical({"model": run["model"]["name"], "eval": run["eval"], "dtype": run["model"].get("dtype")})


def build_tables(runs: list[dict], metric_spec: str | None = None, method_order: list[str] | None = None):
    """Return a list of ``(title, DataFrame, notes)``, one per comparable group of runs."""
    default, per_task = parse_metric_spec(metric_spec)
    groups: "OrderedDict[str, list[dict]]" = OrderedDict()
    for run in runs:
        groups.setdefault(eval_group_key(run), []).append(run)
    tables = []
    for _key, group in groups.items():
        dense = [r for r in group if r["method"] == "dense"]
        if not dense:
            continue
        dense_run = max(dense, key=lambda r: r["environment"].get("created", ""))
        others = [r for r in group if r["method"] != "dense"]
        if method_order:
            rank = {m: i for i, m in enumerate(method_order)}
            others.sort(key=lambda r: (rank.get(r["method"], len(rank)), r["method"], r.get("_path", "")))
        else:
            others.sort(key=lambda r: (r["method"], r.get("_path", "")))
        tasks = list(dense_run["metrics"].keys())
        used = {}
        rows = []
        dense_avg = None
        for run in [dense_run, *others]:
            row = OrderedDict()
            failed = run.get("status") == "failed"  # shown as failed: no number in any column, Per. included
            row["Method"] = (run.get("label") or run["method"]) + (" [failed]" if failed else "")
            ratio = None if failed else (run.get("params") or {}).get("ratio", 0.0)
            row["Ratio"] = None if ratio is None else 100.0 * ratio
            scores = []
            for t in tasks:
                value, used_metric = pick_metric(run["metrics"].get(t, {}), t, default, per_task)
                used[t] = used_metric
                row[TASK_LABELS.get(t, t)] = None if value is None else 100.0 * value
                if value is not None:
                    scores.append(100.0 * value)
            avg = sum(scores) / len(scores) if scores and len(scores) == len(tasks) else None
            if run is dense_run:
                dense_avg = avg
            row["Ave."] = avg
            row["Per."] = (100.0 * avg / dense_avg) if (avg is not None and dense_avg) else None
            if any(r.get("stability") for r in group):
                row["Stab."] = stability_cell(run, tasks, default, per_task)
                row["n_eff"] = stability_items_cell(run, tasks)
            if any("perplexity" in r and r["perplexity"] for r in group):
                ppl = (run.get("perplexity") or {}).get("ppl")
                row["PPL"] = ppl
            rows.append(row)
        df = pd.DataFrame(rows)
        model = dense_run["model"]["name"]
        notes = [
            "Metric per task: " + ", ".join(f"{TASK_LABELS.get(t, t)}={used[t]}" for t in tasks)
            + " (lm-eval, x100). Ratio: measured from parameter counts (removed - added) / dense.",
            "Per. = Ave. / dense Ave. x 100.",
        ]
        for r in others:
            if r.get("status") == "failed":
                notes.append(f"{r.get('label') or r['method']} [failed]: {r.get('failure')}")
        if any(r.get("stability") for r in group):
            kinds = sorted({(r.get("stability") or {}).get("scores", "sum") for r in group if r.get("stability")})
            what = {"sum": "summed log-likelihoods", "mean": "per-token mean log-likelihoods"}
            notes.append("Stab. = stability vs the dense model (LLM-Streamline, ICLR 2025): sum_k w_k*agree_k, "
                         "w = softmax over a task's items of the std of the dense model's per-choice lm-eval "
                         + " / ".join(what.get(k, k) for k in kinds)
                         + "; agree = both right or both wrong on the task's metric; mean over tasks, x100. "
                         "n_eff = effective number of items behind it, 1/sum_k w_k^2 (mean over tasks"
                         + _items_note(group) + ").")
        ev = dense_run["eval"]
        if ev.get("limit"):
            notes.append(f"--limit {ev['limit']}: each task scored on its first {ev['limit']} items only.")
        if ev.get("ppl") and dense_run.get("perplexity"):
            p = dense_run["perplexity"]
            notes.append(f"PPL: wikitext-2 test, window {p['seq_len']}, stride {p['stride']}, {p['windows']} windows.")
        tables.append((f"{model}", df, notes))
    return tables


def _fmt(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for col in out.columns:
        if col in TEXT_COLUMNS:
            continue
        digits = 2 if col == "PPL" or col in RATIO_COLUMNS else 1
        out[col] = out[col].map(lambda v: "-" if v is None or pd.isna(v) else f"{v:.{digits}f}")
    return out


def _tabulate(df: pd.DataFrame, tablefmt: str) -> str:
    """Cells are formatted strings already: tabulate must not re-parse them (it printed 25.0 as 25)."""
    from tabulate import tabulate

    align = ["left" if col == "Method" else "right" for col in df.columns]
    return tabulate(_fmt(df), headers="keys", tablefmt=tablefmt, showindex=False, disable_numparse=True,
                    colalign=align)


def render_markdown(tables) -> str:
    parts = []
    for title, df, notes in tables:
        parts.append(f"### {title}\n")
        parts.append(_tabulate(df, "github"))
        parts.append("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return "\n".join(parts)


def render_text(tables) -> str:
    parts = []
    for title, df, notes in tables:
        parts.append(f"Model: {title}")
        parts.append(_tabulate(df, "simple"))
        parts.extend(notes)
        parts.append("")
    return "\n".join(parts)


def render_csv(tables) -> str:
    frames = []
    for title, df, _notes in tables:
        d = df.copy()
        d.insert(0, "Model", title)
        frames.append(d)
    if not frames:
        return ""
    return pd.concat(frames, ignore_index=True).to_csv(index=False, float_format="%.4f")


def render_latex(tables) -> str:
    parts = []
    for title, df, notes in tables:
        parts.append(f"% {title}\n% " + "\n% ".join(notes))
        parts.append(_tabulate(df, "latex_booktabs"))
    return "\n".join(parts) + "\n"


def write_reports(tables, out_dir: Path, stem: str = "table") -> list[Path]:
    out_dir = Path(out_dir)
    paths = []
    for ext, render in (("md", render_markdown), ("csv", render_csv), ("tex", render_latex)):
        p = out_dir / f"{stem}.{ext}"
        write_text_atomic(p, render(tables))
        paths.append(p)
    return paths


# --- sweeps: rows grouped by target, a methods x targets table of Per., efficiency columns (issue 12) ---

TEXT_COLUMNS = ("Method", "Target")
RATIO_COLUMNS = ("Speedup", "Dec. Speedup", "Ideal", "Mem.")


def target_key(run: dict) -> tuple:
    """Sort key and identity of a run's target as asked: layers first (by n), then ratios."""
    t = run.get("target") or {}
    if t.get("layers") is not None:
        return (0, float(t["layers"]))
    if t.get("ratio") is not None:
        return (1, float(t["ratio"]))
    return (-1, 0.0)


def target_label(run: dict) -> str:
    t = run.get("target") or {}
    n = t.get("num_remove")
    if t.get("layers") is not None:
        return f"n={t['layers']}"
    if t.get("ratio") is not None:
        return f"ratio {t['ratio']:g}" + (f" (n={n})" if n is not None else "")
    return "-"


def efficiency_cells(run: dict) -> dict:
    """Speedup (prefill latency), Dec. Speedup (decode tokens/s), Ideal (1 / (1 - removed FLOP
    share)) and Mem. (peak memory), each as a ratio to the dense model measured in the same process."""
    eff = run.get("efficiency") or {}
    if run.get("method") == "dense":
        return {c: (1.0 if eff else None) for c in RATIO_COLUMNS}
    vs = eff.get("vs_dense") or {}
    return {"Speedup": vs.get("prefill_speedup"), "Dec. Speedup": vs.get("decode_speedup"),
            "Ideal": vs.get("ideal_speedup"), "Mem.": vs.get("memory_ratio")}


def efficiency_note(runs: list[dict]) -> str | None:
    eff = next((r["efficiency"] for r in runs if r.get("efficiency")), None)
    if not eff:
        return None
    st = eff.get("settings", {})
    return ("Efficiency, ratios to the dense model measured in the same process on "
            f"{st.get('device', '?')} ({st.get('dtype', '?')}, {st.get('torch_threads', '?')} threads), median of "
            f"{st.get('repeats', '?')} runs after {st.get('warmup', '?')} warm-up: Speedup = dense / pruned prefill "
            f"latency ({st.get('batch_size', '?')}x{st.get('seq_len', '?')} tokens); Dec. Speedup = pruned / dense "
            f"decode tokens/s with KV cache ({st.get('decode_batch_size', '?')}x{st.get('new_tokens', '?')} new "
            f"tokens after {st.get('decode_prompt_len', '?')}); Ideal = 1 / (1 - removed share of forward FLOPs/token "
            f"at context {st.get('seq_len', '?')}, replacement networks counted); Mem. = pruned / dense peak memory "
            "(weights + peak activations and KV cache). Absolute values are in each run's JSON (efficiency).")


def build_target_tables(runs: list[dict], metric_spec: str | None = None, method_order: list[str] | None = None,
                        efficiency: bool = False, **options):
    """Like ``build_tables``, with a ``Target`` column and the rows grouped by target (dense once,
    first), plus the efficiency ratios when asked. Returns ``(title, DataFrame, notes)`` tables."""
    groups: "OrderedDict[str, list[dict]]" = OrderedDict()
    for run in runs:
        groups.setdefault(eval_group_key(run), []).append(run)
    tables = []
    for group in groups.values():
        dense = [r for r in group if r["method"] == "dense"]
        if not dense:
            continue
        dense_run = max(dense, key=lambda r: r["environment"].get("created", ""))
        by_target: "OrderedDict[tuple, list[dict]]" = OrderedDict()
        for run in sorted((r for r in group if r["method"] != "dense"), key=target_key):
            by_target.setdefault(target_key(run), []).append(run)
        frames, notes, title = [], [], None
        for i, subset in enumerate(by_target.values() or [[]]):
            built = build_tables([dense_run, *subset], metric_spec, method_order, **options)
            if not built:
                continue
            title, df, sub_notes = built[0]
            custom = options.get("labels") or {}
            labels = {(custom.get(r["method"]) or r.get("label") or r["method"]): r for r in subset}
            df = df.copy()
            rows_runs = [dense_run] + [labels.get(str(m).replace(" [failed]", "")) for m in df["Method"].iloc[1:]]
            df.insert(1, "Target", ["-"] + [target_label(r) if r else "-" for r in rows_runs[1:]])
            if efficiency:
                cells = [efficiency_cells(r) if r else {} for r in rows_runs]
                for col in RATIO_COLUMNS:
                    df[col] = [c.get(col) for c in cells]
            frames.append(df if i == 0 else df.iloc[1:])
            notes += [n for n in sub_notes if n not in notes]
        if not frames:
            continue
        if efficiency:
            note = efficiency_note(group)
            if note:
                notes.append(note)
        tables.append((title, pd.concat(frames, ignore_index=True), notes))
    return tables


def build_compact_table(runs: list[dict], metric_spec: str | None = None, method_order: list[str] | None = None,
                        **options):
    """Methods x targets: each method's Per. at each target (one table per comparable group)."""
    out = []
    for title, df, _notes in build_target_tables(runs, metric_spec, method_order, **options):
        body = df.iloc[1:]
        if body.empty:
            continue
        targets = list(OrderedDict.fromkeys(body["Target"]))
        rows = OrderedDict()
        for _, r in body.iterrows():
            rows.setdefault(r["Method"], {"Method": r["Method"]})[r["Target"]] = r["Per."]
        compact = pd.DataFrame([{"Method": m, **{t: v.get(t) for t in targets}} for m, v in rows.items()],
                               columns=["Method", *targets])
        out.append((f"{title}: Per. by target", compact,
                    ["Per. (retained performance, Ave. / dense Ave. x 100) of each method at each target "
                     "(n = layers removed; measured ratios in the table above)."]))
    return out


def spans_targets(runs: list[dict]) -> bool:
    return len({target_key(r) for r in runs if r.get("method") != "dense"}) > 1

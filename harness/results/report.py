"""Tables rendered from result JSON files (pandas + tabulate): Markdown, CSV and LaTeX.

Rows: the dense model, then one per method. Columns: measured pruning ratio, one score per
task (the table's metric choice, printed with the table), "Ave." (mean over tasks) and
"Per." (retained performance = Ave. / dense Ave. x 100, a ratio of means as in ShortGPT's
and LLM-Streamline's tables), and wikitext-2 perplexity when it was measured.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.errors import UsageError
from harness.io import canonical, write_text_atomic
from harness.results.cache import without_location

TASK_LABELS = {
    "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande", "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c", "openbookqa": "OBQA", "boolq": "BoolQ", "mmlu": "MMLU", "cmmlu": "CMMLU",
    "commonsense_qa": "CoQA", "race": "Race-H", "wsc": "WSC",
}


# Metrics lm-eval reports as fractions: shown x100 (every other metric as lm-eval reports it).
PERCENT_METRICS = {"acc", "acc_norm", "acc_mutual_info", "exact_match", "em", "f1", "mcc", "brier_score",
                   "contains", "prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                   "inst_level_loose_acc"}
ROW_KEYS = ("n", "n_shot")  # per-column bookkeeping in a metrics row, not metrics

# --table-preset: the metric each paper reports per task (default, {task: metric}); see README
# "Reproducing a paper's protocol" for where each choice comes from.
PRESETS = {
    # LLM-Streamline Table 3 (OPT-1.3B dense row = lm-eval acc_norm for PIQA/HellaSwag/ARC; WinoGrande,
    # OpenBookQA, BoolQ, MMLU as acc); configs/streamline_table3_opt-1.3b.yaml
    "streamline": ("acc", {"piqa": "acc_norm", "hellaswag": "acc_norm", "arc_easy": "acc_norm",
                           "arc_challenge": "acc_norm"}),
    # ShortGPT (OpenCompass PPL mode): acc everywhere, HellaSwag length-normalised (configs/shortgpt_main_*.yaml)
    "shortgpt": ("acc", {"hellaswag": "acc_norm"}),
    # LLM-Pruner Table 1 (LLaMA-7B dense row: HellaSwag 73.0 and OBQA 42.4 are only reachable as acc_norm;
    # BoolQ, PIQA, WinoGrande as acc); the lm-eval convention of its evaluation script
    "llm-pruner": ("acc", {"hellaswag": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm",
                           "openbookqa": "acc_norm"}),
}


def parse_metric_spec(spec: str | None, preset: str | None = None) -> tuple[str, dict[str, str]]:
    """``acc`` | ``acc_norm`` | ``acc,hellaswag=acc_norm,...`` (any metric lm-eval reports) ->
    (default, per-task). A preset's choices come first; the spec's own entries override them."""
    if preset is not None and preset not in PRESETS:
        raise UsageError(f"unknown --table-preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    default, per_task = PRESETS[preset][0] if preset else "acc", dict(PRESETS[preset][1]) if preset else {}
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            task, metric = (x.strip() for x in part.split("=", 1))
            if not task or not metric:
                raise UsageError(f"--table-metric item '{part}': write TASK=METRIC, e.g. hellaswag=acc_norm")
            per_task[task] = metric
        else:
            default = part
    return default, per_task


def check_metric_spec(spec: str | None, column_metrics: dict[str, list[str] | None]) -> None:
    """--table-metric against the run's columns (``{column: metrics it reports}``, None = not known
    before it runs): a per-task entry must name a column of this run and a metric that column
    reports; the default must be reported by some column."""
    import difflib

    default, per_task = parse_metric_spec(spec)
    for task, metric in per_task.items():
        if task not in column_metrics:
            close = difflib.get_close_matches(task, list(column_metrics), n=3, cutoff=0.6)
            raise UsageError(f"--table-metric names '{task}', which is not a task of this run"
                             + (f"; did you mean {', '.join(close)}?" if close else
                                f"; the run's tasks: {', '.join(column_metrics)}"))
        known = column_metrics[task]
        if known is not None and metric.split("/")[0] not in known:
            raise UsageError(f"--table-metric {task}={metric}: '{task}' does not report {metric}; "
                             f"it reports {', '.join(known)}")
    known_all = [m for ms in column_metrics.values() if ms is not None for m in ms]
    if known_all and all(ms is not None for ms in column_metrics.values()) \
            and default.split("/")[0] not in known_all:
        raise UsageError(f"--table-metric '{default}' is reported by no task of this run; "
                         f"they report {', '.join(sorted(set(known_all)))}")


def run_column_metrics(runs: list[dict]) -> dict[str, list[str]]:
    """{column: metrics reported} over the stored runs (for --report's --table-metric check)."""
    out: dict[str, list[str]] = {}
    for run in runs:
        for task, row in (run.get("metrics") or {}).items():
            known = out.setdefault(task, [])
            known.extend(m for m in _metrics_of(row) if m not in known)
    return out


def _metrics_of(row: dict) -> list[str]:
    return [k for k in row if k not in ROW_KEYS and not k.endswith("_stderr") and row[k] is not None]


def pick_metric(row: dict, task: str, default: str, per_task: dict) -> tuple[float | None, str]:
    """The table value of one column: the per-task metric (as asked; checked before the run), else
    the default, else ``acc`` (winogrande/boolq have no acc_norm), else the task's first metric."""
    want = per_task.get(task, default)
    if row.get(want) is not None:
        return row[want], want
    if task in per_task:
        return None, want
    for m in ("acc", *_metrics_of(row)):
        if row.get(m) is not None:
            return row[m], m
    return None, want


def scale(metric: str) -> float:
    """x100 for fractions (accuracy, F1, MCC, exact match), 1 for everything else (perplexities, BLEU)."""
    return 100.0 if metric.split("/")[0] in PERCENT_METRICS else 1.0


def higher_is_better(run: dict, task: str, metric: str) -> bool:
    hib = ((run.get("eval_details") or {}).get("higher_is_better") or {}).get(task) or {}
    value = hib.get(metric.split("/")[0])
    if value is None:
        return not any(w in metric for w in ("perplexity", "bits_per_byte", "ppl"))
    return bool(value)


def _fit_worse(run: dict) -> bool:
    """A replacement fit whose held-out MSE ended above plain removal's (methods/streamline.py)."""
    if run.get("status") == "failed":  # a failed run shows no numbers and no verdict
        return False
    held = ((run.get("manifest") or {}).get("training") or {}).get("heldout")
    return isinstance(held, dict) and held.get("better_than_removal") is False


def model_display_name(name: str) -> str:
    """The model's name for tables: ``ref-opt-16l``, ``opt-1.3b`` (a Hub id's or a folder's last part)."""
    text = str(name).rstrip("/\\")
    return text.replace("\\", "/").rsplit("/", 1)[-1] or text


def column_label(task: str) -> str:
    return TASK_LABELS.get(task, task)


def leaf_tasks(run: dict, name: str) -> list[str]:
    groups = (run.get("eval_details") or {}).get("groups") or {}
    if name not in groups:
        return [name]
    return [leaf for child in groups[name] for leaf in leaf_tasks(run, child)]


def _stability_row(run: dict, task: str) -> dict:
    """The stability row of a column; for a group (mmlu), its subtasks' rows pooled: each value
    the item-weighted mean over the subtasks."""
    block = (run.get("stability") or {}).get("tasks") or {}
    if task in block or task not in ((run.get("eval_details") or {}).get("groups") or {}):
        return block.get(task) or {}
    rows = [block.get(leaf) for leaf in leaf_tasks(run, task)]
    if not rows or any(not r or not r.get("n") for r in rows):
        return {}
    total = sum(r["n"] for r in rows)
    out = {"n": total}
    for key in rows[0]:
        if key != "n" and all(isinstance(r.get(key), (int, float)) for r in rows):
            out[key] = sum(r[key] * r["n"] for r in rows) / total
    if "n_eff" in out:  # item weights n_j/N x w_k: 1 / sum_j (n_j/N)^2 / n_eff_j, not a mean of n_eff
        out["n_eff"] = 1.0 / sum((r["n"] / total) ** 2 / r["n_eff"] for r in rows)
    return out


def stability_cell(run: dict, tasks: list[str], default: str, per_task: dict) -> float | None:
    """Mean over tasks of the run's stability vs the dense model (x100), each task on its table metric
    (a group column: its subtasks' stabilities, item-weighted)."""
    values = []
    for t in tasks:
        row = _stability_row(run, t)
        want = per_task.get(t, default)
        value = row.get(want) if row.get(want) is not None else row.get("acc")  # as pick_metric falls back
        if value is None:
            return None
        values.append(100.0 * value)
    return sum(values) / len(values) if values else None


def stability_items_cell(run: dict, tasks: list[str]) -> float | None:
    """Mean over tasks of the effective number of items behind each stability (``n_eff``)."""
    values = [_stability_row(run, t).get("n_eff") for t in tasks]
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
    """Runs are comparable when model, evaluation config and dtype agree. Where the local data lay
    is not part of it (the run key holds the data's content: runner._eval_key)."""
    return canonical({"model": run["model"]["name"], "eval": without_location(run["eval"] or {}),
                      "dtype": run["model"].get("dtype")})


def slot_key(run: dict) -> str:
    """The table cell a run fills: its evaluation, row label, target and seed. Two stored runs in one
    slot (e.g. the same method run again with other calibration: a new run key) would be two rows that
    look alike; a table shows one of them."""
    return canonical({"eval": eval_group_key(run), "label": run.get("label") or run["method"],
                      "target": run.get("target"), "seed": run.get("seed")})


def newest_per_slot(runs: list[dict]) -> tuple[list[dict], list[tuple[dict, dict]]]:
    """The runs with one per slot, the newest by its record's creation time (ties: the later file);
    returns them (in the given order) and the (left out, kept) pairs."""
    def when(run: dict) -> tuple:
        return ((run.get("environment") or {}).get("created") or "", run.get("_path") or "")

    keys = [slot_key(run) for run in runs]
    best: dict[str, dict] = {}
    for key, run in zip(keys, runs):
        if key not in best or when(run) >= when(best[key]):
            best[key] = run
    kept = [r for key, r in zip(keys, runs) if best[key] is r]
    return kept, [(r, best[key]) for key, r in zip(keys, runs) if best[key] is not r]


def protocol_label(run: dict) -> str:
    """The evaluation protocol of a run in a few words: items, shots, dtype."""
    ev = run.get("eval") or {}
    limit = f"--limit {ev['limit']}" if ev.get("limit") else "all items"
    shots = ev.get("num_fewshot")
    shot = "" if shots in (None, "", {}) else f", {shots}-shot" if not isinstance(shots, dict) else \
        ", few-shot " + ",".join(f"{k}={v}" for k, v in sorted(shots.items()))
    return f"{limit}{shot}, {run['model'].get('dtype') or '?'}"


def group_titles(runs: list[dict]) -> dict[str, str]:
    """{eval_group_key: table title}: the model's name, and its protocol where the same model has
    several (runs with different --limit are never two tables with the same header)."""
    groups = comparable_groups(runs)
    names = [model_display_name(d["model"]["name"]) for d, _g in groups]
    out = {}
    for (dense, _g), name in zip(groups, names):
        title = name if names.count(name) == 1 else f"{name} [{protocol_label(dense)}]"
        if title in out.values():  # same model, protocol differing elsewhere (tasks, perplexity settings)
            title += f" [{eval_group_key(dense)[-8:]}]"
        out[eval_group_key(dense)] = title
    return out


def comparable_groups(runs: list[dict]) -> list[tuple[dict, list[dict]]]:
    """``(dense run, runs)`` per comparable group (``eval_group_key``, in first-seen order); the
    newest dense run of a group stands for it, and a group without one is left out."""
    groups: "OrderedDict[str, list[dict]]" = OrderedDict()
    for run in runs:
        groups.setdefault(eval_group_key(run), []).append(run)
    out = []
    for group in groups.values():
        dense = [r for r in group if r["method"] == "dense"]
        if dense:
            out.append((max(dense, key=lambda r: (r.get("environment") or {}).get("created", "")), group))
    return out


def _leaf_count(details: dict, name: str) -> int:
    groups = (details or {}).get("groups") or {}
    if name not in groups:
        return 1
    return sum(_leaf_count(details, c) for c in groups[name])


def _shots(run: dict, task: str):
    details = run.get("eval_details") or {}
    n_shot = details.get("n_shot") or {}
    if task in n_shot:
        return n_shot[task]
    groups = details.get("groups") or {}
    values = set()
    stack = [task]
    while stack:
        name = stack.pop()
        if name in groups:
            stack.extend(groups[name])
        elif name in n_shot:
            values.add(n_shot[name])
    return values.pop() if len(values) == 1 else None


STAB_MIN_ITEMS = 30  # below this many effective items a stability is a handful of items' agreement


@dataclass(frozen=True)
class _TableSpec:
    """How a table shows its runs (build_tables' settings, parsed once)."""
    default: str
    per_task: dict
    labels: dict
    stderr: bool
    all_stability: bool
    preset: str | None

    def label(self, run: dict) -> str:
        return row_label(run, self.labels)


def build_tables(runs: list[dict], metric_spec: str | None = None, method_order: list[str] | None = None, *,
                 preset: str | None = None, labels: dict | None = None, stderr: bool = False,
                 all_stability: bool = False, titles: dict | None = None):
    """Return a list of ``(title, DataFrame, notes)``, one per comparable group of runs.

    Rows: dense first, then the methods in ``method_order`` (e.g. the order of --methods), then
    any others by name. ``labels`` ({method: text}) replaces row labels; ``stderr`` adds lm-eval's
    standard error of each score (shown as ``value ± stderr``; CSV: its own column). Stab. is shown
    where its n_eff reaches ``STAB_MIN_ITEMS`` (every one with ``all_stability``)."""
    default, per_task = parse_metric_spec(metric_spec, preset)
    spec = _TableSpec(default, per_task, labels or {}, stderr, all_stability, preset)
    tables = []
    titles = titles if titles is not None else group_titles(runs)
    for dense_run, group in comparable_groups(runs):
        others = method_runs(group, method_order)
        tasks = list(dense_run["metrics"].keys())
        used = {}
        rows = []
        for run in [dense_run, *others]:
            rows.append(_table_row(run, dense_run, group, tasks, spec, used, rows[0]["Ave."] if rows else None))
        rows, seeds = collapse_seeds(rows, [dense_run, *others])
        notes = _table_notes(dense_run, group, others, tasks, used, spec, seeds)
        model = model_display_name(dense_run["model"]["name"])
        tables.append((titles.get(eval_group_key(dense_run), model), pd.DataFrame(rows), notes))
    return tables


def row_label(run: dict, labels: dict | None = None) -> str:
    """A run's row label: ``labels[method]`` (--labels), else the run's own label, else its method."""
    return (labels or {}).get(run["method"]) or run.get("label") or run["method"]


def method_runs(group: list[dict], method_order: list[str] | None) -> list[dict]:
    """The group's method runs (dense left out) in ``method_order``, then the rest by name."""
    others = [r for r in group if r["method"] != "dense"]
    rank = {m: i for i, m in enumerate(method_order or [])}
    others.sort(key=lambda r: (rank.get(r["method"], len(rank)), r["method"], r.get("_path", "")))
    return others


def _table_row(run: dict, dense_run: dict, group: list[dict], tasks: list[str], spec: _TableSpec, used: dict,
               dense_avg: float | None) -> OrderedDict:
    """One run's row: label, ratio, a score per task (± stderr), Ave., Per., Stab./n_eff, PPL;
    ``used`` collects the metric shown per task; ``dense_avg`` is None for the dense row itself."""
    row = OrderedDict()
    failed = run.get("status") == "failed"  # shown as failed: no number in any column, Per. included
    row["Method"] = spec.label(run) + (" [failed]" if failed else "") + (" [fit>removal]" if _fit_worse(run) else "")
    ratio = None if failed else (run.get("params") or {}).get("ratio", 0.0)
    row["Ratio"] = None if ratio is None else 100.0 * ratio
    scores, averaged = [], 0
    for t in tasks:
        metrics = run["metrics"].get(t, {})
        value, used_metric = pick_metric(metrics, t, spec.default, spec.per_task)
        used[t] = used_metric
        k = scale(used_metric)
        hib = higher_is_better(dense_run, t, used_metric)
        header = column_label(t) + ("" if hib else " \u2193")
        row[header] = None if value is None else k * value
        if spec.stderr:
            se = metrics.get(f"{used_metric}_stderr")
            row[header + " \u00b1"] = None if se is None else k * se
        if hib:  # Ave. is over the higher-is-better columns (a perplexity column is not averaged)
            averaged += 1
            if value is not None:
                scores.append(k * value)
    avg = sum(scores) / len(scores) if scores and len(scores) == averaged else None
    base = avg if run is dense_run else dense_avg
    row["Ave."] = avg
    row["Per."] = (100.0 * avg / base) if (avg is not None and base) else None
    if any(r.get("stability") for r in group):
        row["Stab."] = stability_cell(run, tasks, spec.default, spec.per_task)
        row["n_eff"] = stability_items_cell(run, tasks)
        if not spec.all_stability and (row["n_eff"] is None or row["n_eff"] < STAB_MIN_ITEMS):
            row["Stab."] = None  # too few effective items to mean anything; --all-stability shows it
    if any("perplexity" in r and r["perplexity"] for r in group):
        row["PPL"] = (run.get("perplexity") or {}).get("ppl")
    return row


def _table_notes(dense_run: dict, group: list[dict], others: list[dict], tasks: list[str], used: dict,
                 spec: _TableSpec, seeds: list) -> list[str]:
    """The lines under a table: metrics, Per., shots, groups, stderr, flagged runs, Stab., seeds,
    --limit and perplexity settings."""
    shown = ", ".join(f"{column_label(t)}={used[t]}" + ("" if scale(used[t]) == 100.0 else " (as reported)")
                      for t in tasks)
    notes = [
        "Metric per task: " + shown + " (lm-eval; fractions x100)"
        + (f", preset {spec.preset}" if spec.preset else "")
        + ". Ratio: measured from parameter counts (removed - added) / dense.",
        "Per. = Ave. / dense Ave. x 100."
        + ("" if all(higher_is_better(dense_run, t, used[t]) for t in tasks) else
           " Ave. is over the higher-is-better columns (\u2193: lower is better, not averaged)."),
    ]
    notes += _protocol_notes(dense_run, group, tasks, used)
    if spec.stderr:
        notes.append("\u00b1: lm-eval's standard error of each score (same scale).")
    notes += _flag_notes(others, spec)
    if any(r.get("stability") for r in group):
        notes.append(_stability_note(group, spec.all_stability))
    if seeds:
        notes.append(f"A row of n seeds shows the mean \u00b1 the standard deviation over its seeds (runs that differ "
                     f"only in --seed: calibration draw and training; seeds {', '.join(map(str, seeds))})"
                     + ("; lm-eval's stderr is not shown on those rows." if spec.stderr else "."))
    ev = dense_run["eval"]
    if ev.get("limit"):
        notes.append(f"--limit {ev['limit']}: each task scored on its first {ev['limit']} items only.")
    if ev.get("ppl") and dense_run.get("perplexity"):
        p = dense_run["perplexity"]
        notes.append(f"PPL: wikitext-2 test, window {p['seq_len']}, stride {p['stride']}, {p['windows']} windows.")
    return notes


def _protocol_notes(dense_run: dict, group: list[dict], tasks: list[str], used: dict) -> list[str]:
    """Few-shot counts, lm-eval group columns and the evaluation's own notes."""
    notes = []
    shots = {t: _shots(dense_run, t) for t in tasks}
    if any(v not in (None, 0) for v in shots.values()):
        notes.append("Few-shot examples per task: "
                     + ", ".join(f"{column_label(t)} {'?' if v is None else v}" for t, v in shots.items())
                     + " (lm-eval's sampler and seed).")
    details = dense_run.get("eval_details") or {}
    for t in tasks:
        if t in (details.get("groups") or {}):
            notes.append(f"{column_label(t)} = lm-eval's '{t}' group score ({used[t]} aggregated as its group "
                         f"config says over {_leaf_count(details, t)} subtasks); each subtask's metrics are in "
                         "the run JSON (eval_details.subtasks)"
                         + ("; its Stab. is the subtasks' stabilities, item-weighted." if
                            any(r.get("stability") for r in group) else "."))
    return notes + list(details.get("notes") or [])


def _flag_notes(others: list[dict], spec: _TableSpec) -> list[str]:
    """Why a row is marked [fit>removal] or [failed]."""
    notes = []
    for r in others:
        if _fit_worse(r):
            held = r["manifest"]["training"]["heldout"]
            key = "cosine" if held.get("judged_by") == "cosine" else "mse"
            notes.append(f"{spec.label(r)} [fit>removal]: its replacement's "
                         f"held-out {key} loss {held[key]:.4g} is above plain removal's {held['identity_' + key]:.4g} "
                         "(the replacement moves the window's output further from the dense model's than nothing would).")
        if r.get("status") == "failed":
            notes.append(f"{spec.label(r)} [failed]: {r.get('failure')}")
    twins = {}
    for r in others:  # identical networks: one evaluation shown on several rows
        reused = r.get("reused_evaluation")
        if reused:
            twins.setdefault(reused.get("method", "?"), []).append(spec.label(r))
    for source, labels in twins.items():
        notes.append(f"{', '.join(labels)}: the same network as {source}'s run (equal fingerprints), so its "
                     "evaluation was reused, not repeated.")
    return notes


def _stability_note(group: list[dict], all_stability: bool) -> str:
    kinds = sorted({(r.get("stability") or {}).get("scores", "sum") for r in group if r.get("stability")})
    what = {"sum": "summed log-likelihoods", "mean": "per-token mean log-likelihoods"}
    return ("Stab. = stability vs the dense model (LLM-Streamline, ICLR 2025): sum_k w_k*agree_k, "
            "w = softmax over a task's items of the std of the dense model's per-choice lm-eval "
            + " / ".join(what.get(k, k) for k in kinds)
            + "; agree = both right or both wrong on the task's metric; mean over tasks, x100. "
            "n_eff = effective number of items behind it, 1/sum_k w_k^2 (mean over tasks"
            + _items_note(group) + ")"
            + ("." if all_stability else f"; Stab. is shown where n_eff >= {STAB_MIN_ITEMS} "
               "(--all-stability shows every one)."))


SEEDS_SUFFIX = re.compile(r" \(\d+ seeds\)$")


def collapse_seeds(rows: list[dict], runs: list[dict]) -> tuple[list[dict], list]:
    """Rows of runs that differ only in their seed (same label) become one row: each number the mean
    over the seeds, its ``±`` the sample standard deviation, the label ``LABEL (n seeds)``. Returns
    the rows and the seeds seen in collapsed rows (empty when nothing was collapsed)."""
    import statistics

    by_label: "OrderedDict[str, list[tuple[dict, dict]]]" = OrderedDict()
    for row, run in zip(rows, runs):
        by_label.setdefault(row["Method"], []).append((row, run))
    out, seen = [], set()
    for label, members in by_label.items():
        seeds = [run.get("seed") for _row, run in members]
        if len(members) < 2 or len(set(seeds)) < len(seeds) or "[failed]" in label:
            out += [row for row, _run in members]
            continue
        seen.update(seeds)
        merged = OrderedDict(Method=f"{label} ({len(members)} seeds)")
        for col in members[0][0]:
            if col == "Method" or col.endswith(" \u00b1"):
                continue
            values = [row.get(col) for row, _run in members]
            if any(v is None for v in values):
                merged[col] = None
                continue
            merged[col] = statistics.fmean(values)
            if col not in ("Ratio", "n_eff"):
                merged[col + " \u00b1"] = statistics.stdev(values)
        out.append(merged)
    return out, sorted(seen, key=str)


def _is_score_column(df: pd.DataFrame, col: str) -> bool:
    cols = list(df.columns)
    if "Ave." not in cols or col in TEXT_COLUMNS or col.endswith("\u00b1"):
        return False
    first = cols.index("Ratio") + 1 if "Ratio" in cols else 1
    return first <= cols.index(col) < cols.index("Ave.")


def retained_tables(tables) -> list:
    """Per-task retained performance: each score / the dense score x 100 (a lower-is-better
    column, marked \u2193: dense / score x 100), and Per. as in the main table."""
    out = []
    for title, df, _notes in tables:
        body = OrderedDict((c, df[c]) for c in df.columns if c in TEXT_COLUMNS or c == "Ratio")
        dense = df.iloc[0]
        for col in df.columns:
            if not _is_score_column(df, col):
                continue
            d = dense[col]
            lower = col.endswith("\u2193")

            def ratio(v, d=d, lower=lower):
                if v is None or pd.isna(v) or d is None or pd.isna(d) or d == 0 or (lower and v == 0):
                    return None
                return 100.0 * (d / v if lower else v / d)
            body[col] = df[col].map(ratio)
        body["Per."] = df["Per."]
        out.append((f"{title}: retained performance per task (% of dense)", pd.DataFrame(body),
                    ["Each score / the dense model's score x 100 (a lower-is-better column: dense / score x 100); "
                     "Per. = Ave. / dense Ave. x 100 (a ratio of means, as in the main table)."]))
    return out


def _fmt(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for col in out.columns:
        if col in TEXT_COLUMNS:
            continue
        digits = 2 if col == "PPL" or col in RATIO_COLUMNS or col.startswith("PPL") else 1
        out[col] = out[col].map(lambda v, d=digits: "-" if v is None or pd.isna(v) else
                                (v if isinstance(v, str) else f"{v:.{d}f}"))
    for col in list(out.columns):  # "score ± stderr" in one cell
        if col.endswith(" \u00b1") and col[:-2] in out.columns:
            base = col[:-2]
            out[base] = [v if e == "-" or v == "-" else f"{v} \u00b1 {e}" for v, e in zip(out[base], out[col])]
            out = out.drop(columns=[col])
    return out


def _tabulate(df: pd.DataFrame, tablefmt: str) -> str:
    """Cells are formatted strings already: tabulate must not re-parse them (it printed 25.0 as 25)."""
    from tabulate import tabulate

    align = ["left" if col in ("Method", "Model") else "right" for col in df.columns]
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
        parts.append(title if title.startswith("Summary:") else f"Model: {title}")
        parts.append(_tabulate(df, "simple"))
        parts.extend(notes)
        parts.append("")
    return "\n".join(parts)


def render_csv(tables) -> str:
    frames = []
    for title, df, _notes in tables:
        d = df.copy()
        if "Model" not in d.columns:  # the cross-model summary has its own
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

TEXT_COLUMNS = ("Method", "Target", "Model")
RATIO_COLUMNS = ("Speedup", "Dec. Speedup", "Ideal", "Mem.")
EFFICIENCY_COLUMNS = ("Speedup", "Speedup IQR", "Dec. Speedup", "Dec. IQR", "Ideal", "Mem.")


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
        return {c: (1.0 if eff and c in RATIO_COLUMNS else None) for c in EFFICIENCY_COLUMNS}
    vs = eff.get("vs_dense") or {}
    return {"Speedup": vs.get("prefill_speedup"), "Speedup IQR": _iqr(vs.get("prefill_speedup_iqr")),
            "Dec. Speedup": vs.get("decode_speedup"), "Dec. IQR": _iqr(vs.get("decode_speedup_iqr")),
            "Ideal": vs.get("ideal_speedup"), "Mem.": vs.get("memory_ratio")}


def _iqr(pair) -> str | None:
    return None if not pair else f"{pair[0]:.2f}\u2013{pair[1]:.2f}"


def efficiency_note(runs: list[dict]) -> str | None:
    eff = next((r["efficiency"] for r in runs if r.get("efficiency")), None)
    if not eff:
        return None
    st = eff.get("settings", {})
    return ("Efficiency, ratios to the dense model measured in the same process on "
            f"{st.get('device', '?')} ({st.get('dtype', '?')}, {st.get('torch_threads', '?')} threads), median of "
            f"{st.get('repeats', '?')} runs after {st.get('warmup', '?')} warm-up (IQR: quartiles of the ratio over the "
            "interleaved dense/pruned pairs of timed runs): Speedup = dense / pruned prefill "
            f"latency ({st.get('batch_size', '?')}x{st.get('seq_len', '?')} tokens); Dec. Speedup = pruned / dense "
            f"decode tokens/s with KV cache ({st.get('decode_batch_size', '?')}x{st.get('new_tokens', '?')} new "
            f"tokens after {st.get('decode_prompt_len', '?')}); Ideal = 1 / (1 - removed share of forward FLOPs/token "
            f"at context {st.get('seq_len', '?')}, replacement networks counted); Mem. = pruned / dense peak memory "
            "(weights + peak activations and KV cache). Absolute values are in each run's JSON (efficiency).")


def build_target_tables(runs: list[dict], metric_spec: str | None = None, method_order: list[str] | None = None,
                        efficiency: bool = False, **options):
    """Like ``build_tables``, with a ``Target`` column and the rows grouped by target (dense once,
    first), plus the efficiency ratios when asked. Returns ``(title, DataFrame, notes)`` tables."""
    tables = []
    titles = group_titles(runs)
    for dense_run, group in comparable_groups(runs):
        by_target: "OrderedDict[tuple, list[dict]]" = OrderedDict()
        for run in sorted((r for r in group if r["method"] != "dense"), key=target_key):
            by_target.setdefault(target_key(run), []).append(run)
        frames, notes, title = [], [], None
        for i, subset in enumerate(by_target.values() or [[]]):
            built = build_tables([dense_run, *subset], metric_spec, method_order, titles=titles, **options)
            if not built:
                continue
            title, df, sub_notes = built[0]
            custom = options.get("labels") or {}
            labels = {(custom.get(r["method"]) or r.get("label") or r["method"]): r for r in subset}
            df = df.copy()
            rows_runs = [dense_run] + [labels.get(SEEDS_SUFFIX.sub("", str(m)).replace(" [failed]", ""))
                                       for m in df["Method"].iloc[1:]]
            df.insert(1, "Target", ["-"] + [target_label(r) if r else "-" for r in rows_runs[1:]])
            if efficiency:
                cells = [efficiency_cells(r) if r else {} for r in rows_runs]
                for col in EFFICIENCY_COLUMNS:
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

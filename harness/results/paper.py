"""``--paper FILE``: a paper's typed numbers (``results/paper/*.yaml``) beside ours.

A paper file holds one table of a paper: where it comes from, its columns (each with the lm-eval
task that stands in for it, or none, and ``protocol_differs``) and its rows (model, method,
label, measured ratio or layers removed, value per column, the printed Ave. and Per.). The
format is described in results/paper/ and README "Reproducing the papers".

For every run of ours whose model (as the table shows it: ``opt-1.3b`` for ``facebook/opt-1.3b``)
and method match a paper row, the comparison table prints our row, the paper's row and the
delta (ours - paper) per column. When the paper gives several rows of one method (one per
ratio), the row whose measured ratio is nearest ours within ``RATIO_TOLERANCE`` matches (or the
row giving exactly our number of layers removed). Paper rows of methods the harness does not
implement (``method: null``) and of methods this run did not include print as paper-only rows
when they belong to a ratio shown in the table. Columns marked ``protocol_differs`` carry a
dagger, explained under the table.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from harness.errors import UsageError
from harness.results import report

RATIO_TOLERANCE = 0.02  # |paper ratio - our measured ratio| for a row to match (ratios are fractions)
DAGGER = "\u2020"
DELTA = "\u0394"
MISMATCH = "\u2021"  # our metric for this column is not the paper's (an explicit --table-metric/--table-preset)

TOP_KEYS = {"paper", "table", "source", "protocol", "columns", "notes", "rows", "claims"}
COLUMN_KEYS = {"task", "metric", "protocol_differs", "note"}
ROW_KEYS = {"model", "method", "label", "ratio", "layers", "values", "avg", "retained", "note", "table", "options"}
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class PaperColumn:
    name: str
    task: str | None
    metric: str | None
    protocol_differs: bool
    note: str | None = None


@dataclass
class PaperRow:
    index: int
    model: str
    method: str | None
    label: str
    ratio: float | None
    layers: int | None
    values: dict
    avg: float | None = None
    retained: float | None = None
    note: str | None = None
    table: str | None = None
    options: dict | None = None


@dataclass
class PaperTable:
    path: str
    paper: str
    table: str
    source: str | None
    protocol: str | None
    columns: OrderedDict[str, PaperColumn]
    rows: list
    notes: list = field(default_factory=list)
    claims: list = field(default_factory=list)

    @property
    def title(self) -> str:
        short = self.paper.split(" (")[0]
        return f"{short}, {self.table}"


# ---------------------------------------------------------------- loading and validation

def resolve_path(path: str) -> Path:
    """The file as given (relative to the current directory), else relative to the project root
    (configs name ``results/paper/...``, which then work from any directory)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_absolute() and (REPO_ROOT / p).is_file():
        return REPO_ROOT / p
    raise UsageError(f"--paper file '{path}' does not exist; pass one of the files in "
                     f"{REPO_ROOT / 'results' / 'paper'} (e.g. results/paper/streamline_table3.yaml)")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_paper(path: str) -> PaperTable:
    """Read and check a paper file; every problem is one UsageError naming the file and the entry."""
    import yaml

    p = resolve_path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UsageError(f"paper file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise UsageError(f"paper file {path} is not a text file") from None

    def bad(where: str, what: str):
        return UsageError(f"paper file {path}: {where}: {what}")

    if not isinstance(data, dict):
        raise UsageError(f"paper file {path} must be a mapping with keys paper, table, columns, rows")
    _check_top(data, bad)
    columns = _paper_columns(data.get("columns"), bad)
    rows_raw = data.get("rows")
    if not isinstance(rows_raw, list):
        raise bad("rows", "missing or not a list (write rows: [] for a paper with no per-task rows)")
    rows = [_paper_row(i, r, columns, bad) for i, r in enumerate(rows_raw)]
    notes = data.get("notes") or []
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise bad("notes", "must be a list of texts")
    claims = data.get("claims") or []
    if not isinstance(claims, list) or not all(isinstance(c, dict) and isinstance(c.get("quote"), str)
                                               for c in claims):
        raise bad("claims", "must be a list of mappings, each with a quote")
    return PaperTable(path=str(path), paper=data["paper"].strip(), table=data["table"].strip(),
                      source=data.get("source"), protocol=data.get("protocol"), columns=columns, rows=rows,
                      notes=list(notes), claims=list(claims))


def _check_top(data: dict, bad) -> None:
    unknown = sorted(set(map(str, data)) - TOP_KEYS)
    if unknown:
        raise bad("top level", f"unknown key(s) {', '.join(unknown)}; keys are {', '.join(sorted(TOP_KEYS))}")
    for key in ("paper", "table"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise bad(key, "missing or not a text")
    for key in ("source", "protocol"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise bad(key, "must be a text")


def _paper_columns(cols_raw, bad) -> OrderedDict[str, PaperColumn]:
    if cols_raw is None:
        cols_raw = {}
    if not isinstance(cols_raw, dict):
        raise bad("columns", "must map column names to {task, metric, protocol_differs}")
    columns: OrderedDict[str, PaperColumn] = OrderedDict()
    for name, spec in cols_raw.items():
        where = f"columns.{name}"
        if not isinstance(spec, dict):
            raise bad(where, "must be a mapping {task: ..., metric: ..., protocol_differs: true|false}")
        extra = sorted(set(map(str, spec)) - COLUMN_KEYS)
        if extra:
            raise bad(where, f"unknown key(s) {', '.join(extra)}; keys are {', '.join(sorted(COLUMN_KEYS))}")
        task, metric, note = spec.get("task"), spec.get("metric"), spec.get("note")
        if task is not None and (not isinstance(task, str) or not task.strip()):
            raise bad(where, "task must be an lm-eval task name or null (no lm-eval counterpart)")
        if metric is not None and not isinstance(metric, str):
            raise bad(where, "metric must be a text or null")
        differs = spec.get("protocol_differs", False)
        if not isinstance(differs, bool):
            raise bad(where, f"protocol_differs must be true or false, got {differs!r}")
        if note is not None and not isinstance(note, str):
            raise bad(where, "note must be a text")
        columns[str(name)] = PaperColumn(str(name), task, metric, differs, note)
    return columns


def _paper_row(i: int, r, columns: dict, bad) -> PaperRow:
    where = f"rows[{i}]"
    if not isinstance(r, dict):
        raise bad(where, "must be a mapping with model, method, label, ratio, values")
    if isinstance(r.get("label"), str):
        where += f" ({r['label']})"
    extra = sorted(set(map(str, r)) - ROW_KEYS)
    if extra:
        raise bad(where, f"unknown key(s) {', '.join(extra)}; keys are {', '.join(sorted(ROW_KEYS))}")
    if not isinstance(r.get("model"), str) or not r["model"].strip():
        raise bad(where, "model is missing (a Hub id such as facebook/opt-1.3b)")
    if "method" not in r:
        raise bad(where, "method is missing (a harness method name, or null for a method it does not implement)")
    method = r["method"]
    if method is not None and (not isinstance(method, str) or not method.strip()):
        raise bad(where, "method must be a method name or null")
    if not isinstance(r.get("label"), str) or not r["label"].strip():
        raise bad(where, "label is missing (the row's name in the paper)")
    ratio, layers = r.get("ratio"), r.get("layers")
    if ratio is None and layers is None:
        raise bad(where, "give ratio (the printed ratio / 100) or layers (layers removed)")
    if ratio is not None and not (_number(ratio) and 0.0 <= ratio < 1.0):
        raise bad(where, f"ratio must be a fraction in [0, 1), got {ratio!r}")
    if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 0):
        raise bad(where, f"layers must be a whole number >= 0, got {layers!r}")
    values = _row_values(r.get("values"), columns, where, bad)
    for key in ("avg", "retained"):
        if r.get(key) is not None and not _number(r[key]):
            raise bad(where, f"{key} must be a finite number or null, got {r[key]!r}")
    for key in ("note", "table"):
        if r.get(key) is not None and not isinstance(r[key], str):
            raise bad(where, f"{key} must be a text")
    if r.get("options") is not None and not isinstance(r["options"], dict):
        raise bad(where, "options must be a mapping")
    return PaperRow(index=i, model=r["model"], method=method, label=r["label"],
                    ratio=None if ratio is None else float(ratio), layers=layers, values=values,
                    avg=r.get("avg"), retained=r.get("retained"), note=r.get("note"),
                    table=r.get("table"), options=r.get("options"))


def _row_values(values, columns: dict, where: str, bad) -> dict:
    if not isinstance(values, dict):
        raise bad(where, "values must map column names to numbers")
    for col, v in values.items():
        if str(col) not in columns:
            raise bad(where, f"values names column '{col}', which is not under columns "
                             f"({', '.join(columns) or 'none'})")
        if v is not None and not _number(v):
            raise bad(where, f"values.{col} must be a finite number or null, got {v!r}")
    return {str(k): (None if v is None else float(v)) for k, v in values.items()}


# ---------------------------------------------------------------- matching

def model_key(name: str) -> str:
    """A model as the tables name it, case-folded: ``facebook/opt-1.3b`` and ``/x/opt-1.3b/`` -> ``opt-1.3b``."""
    return report.model_display_name(name).lower()


def measured_ratio(run: dict) -> float | None:
    ratio = (run.get("params") or {}).get("ratio")
    if ratio is None and run.get("method") == "dense":
        return 0.0
    if ratio is None:  # a failed run: the target as asked
        ratio = (run.get("target") or {}).get("ratio")
    return ratio


def layers_removed(run: dict) -> int | None:
    if run.get("method") == "dense":
        return 0
    return (run.get("target") or {}).get("num_remove")


def paper_layers(row: PaperRow, num_layers: int) -> int | None:
    """The layers a ratio-only paper row removed from a model of ``num_layers`` layers: the papers'
    models (Llama-2, OPT >= 1.3B) keep their embeddings under 10% of the parameters, so their printed
    parameter ratio is close to the share of layers removed (Llama-2-7B: 27.1% = 9 of 32)."""
    if row.layers is not None:
        return row.layers
    return None if row.ratio is None else int(round(row.ratio * num_layers))


def layers_agree(run: dict, row: PaperRow) -> bool:
    """A ratio-matched row also removed about as many layers as the run (within 5% of the depth, at
    least 1): a parameter ratio on a model whose embeddings dominate (Gemma 3 270M: 63%) resolves to
    far more layers than the papers' rows at the same ratio, and such runs are not compared."""
    n, total = layers_removed(run), (run.get("model") or {}).get("num_layers")
    if run.get("method") == "dense" or not isinstance(n, int) or not isinstance(total, int) or total < 1:
        return True
    theirs = paper_layers(row, total)
    return theirs is None or abs(theirs - n) <= max(1, round(0.05 * total))


def _options_match(run: dict, row: PaperRow) -> bool:
    """A row with ``options`` (Table 4: train_samples) matches only runs whose method used them."""
    if not row.options:
        return True
    config = run.get("method_config") or {}
    return all(k in config and config[k] == v for k, v in row.options.items())


def match_rows(run: dict, rows: list, tolerance: float = RATIO_TOLERANCE) -> list:
    """The paper rows of the run's model and method (and options, where the row gives them) at the
    run's target: the row(s) giving exactly its number of layers removed, else those whose ratio is
    nearest its measured ratio (within ``tolerance``; several when the paper prints more than one
    row there, e.g. ShortGPT / ShortGPT*)."""
    key = model_key(run["model"]["name"])
    same = [r for r in rows if r.method is not None and r.method == run.get("method") and model_key(r.model) == key
            and _options_match(run, r)]
    n = layers_removed(run)
    exact = [r for r in same if r.layers is not None and n is not None and r.layers == n]
    if exact:
        return exact
    ratio = measured_ratio(run)
    if ratio is None:
        return []
    near = [(abs(r.ratio - ratio), r) for r in same if r.ratio is not None and abs(r.ratio - ratio) <= tolerance
            and layers_agree(run, r)]
    if not near:
        return []
    best = min(d for d, _ in near)
    return [r for d, r in near if d - best <= 1e-9]


# ---------------------------------------------------------------- the comparison table

def _our_value(run: dict, task: str, default: str, per_task: dict) -> tuple[float | None, str]:
    metrics = (run.get("metrics") or {}).get(task)
    if metrics is None or run.get("status") == "failed":
        return None, per_task.get(task, default)
    value, used = report.pick_metric(metrics, task, default, per_task)
    return (None if value is None else report.scale(used) * value), used


def _mean(values: list) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{v:+.1f}"


def _sub(a, b):
    return None if a is None or b is None else a - b


def comparison_tables(runs: list[dict], paper: PaperTable, metric_spec: str | None = None, *,
                      preset: str | None = None, labels: dict | None = None, method_order: list | None = None,
                      tolerance: float = RATIO_TOLERANCE) -> list[tuple]:
    """One ``(title, DataFrame | None, notes)`` per comparable group of runs (model + evaluation
    config, as in the main table). The DataFrame is None when no paper row is for that model."""
    if not paper.rows:  # a file with claims only: claims_text prints them
        return []
    default, per_task = report.parse_metric_spec(metric_spec, preset)
    chose_default = preset is not None or any(p.strip() and "=" not in p for p in (metric_spec or "").split(","))
    labels = labels or {}
    return [_compare_group(dense_run, group, paper, default,
                           per_task if chose_default else _with_paper_metrics(paper, dense_run, per_task),
                           labels, method_order, tolerance)
            for dense_run, group in report.comparable_groups(runs)]


def paper_metric(col: PaperColumn, model: str) -> str | None:
    """The lm-eval metric the paper file gives for ``col`` on ``model``: a plain name, or one of
    ``"acc_norm (opt-1.3b) / acc (opt-2.7b)"`` by model; None when it names no usable metric."""
    if _plain_metric(col.metric):
        return col.metric
    for metric, name in re.findall(r"([A-Za-z_]\w*) \(([^)]+)\)", col.metric or ""):
        if model_key(name) == model_key(model):
            return metric
    return None


def _with_paper_metrics(paper: PaperTable, dense_run: dict, per_task: dict) -> dict:
    """Each column in the paper's own metric for this model, except tasks whose metric the user
    chose explicitly (``TASK=METRIC``); used when no default metric or preset was chosen."""
    out = dict(per_task)
    for col in paper.columns.values():
        metric = paper_metric(col, dense_run["model"]["name"])
        if col.task is not None and col.task not in out and metric is not None:
            out[col.task] = metric
    return out


@dataclass
class _Columns:
    """The paper's columns one comparison shows, and how a cell, Ave. and Per. are read on each side."""
    compared: list
    headers: dict
    all_compared: bool
    default: str
    per_task: dict
    used_metric: dict = field(default_factory=dict)
    paper_dense_avg: float | None = None

    def ours(self, run: dict) -> dict:
        cells = {}
        for c in self.compared:
            value, used = _our_value(run, c.task, self.default, self.per_task)
            self.used_metric.setdefault(c.name, used)
            cells[c.name] = value
        return cells

    def paper_avg(self, row: PaperRow):
        if self.all_compared and row.avg is not None:
            return row.avg
        return _mean([row.values.get(c.name) for c in self.compared])

    def paper_per(self, row: PaperRow):
        if self.all_compared and row.retained is not None:
            return row.retained
        avg = self.paper_avg(row)
        return None if avg is None or not self.paper_dense_avg else 100.0 * avg / self.paper_dense_avg


def _columns_for(paper, dense_run: dict, default, per_task) -> tuple[_Columns, list[str], dict]:
    """The paper's columns whose lm-eval task this run evaluated; the skipped ones (why); the
    paper's metric per compared column."""
    compared, skipped = [], []
    for col in paper.columns.values():
        if col.task is None:
            skipped.append(f"{col.name} (no lm-eval task)")
        elif col.task not in (dense_run.get("metrics") or {}):
            skipped.append(f"{col.name} ({col.task} not in this run)")
        else:
            compared.append(col)
    theirs = {c.name: paper_metric(c, dense_run["model"]["name"]) for c in compared}
    differs = {c.name for c in compared if theirs[c.name] not in (None, per_task.get(c.task, default))}
    headers = {c.name: c.name + (DAGGER if c.protocol_differs else "") + (MISMATCH if c.name in differs else "")
               for c in compared}
    return _Columns(compared, headers, len(compared) == len(paper.columns), default, per_task), skipped, theirs


def _compare_group(dense_run, group, paper, default, per_task, labels, method_order, tolerance):
    """The comparison table of one comparable group of runs."""
    model = report.model_display_name(dense_run["model"]["name"])
    title = f"{model} vs {paper.title}"
    mine = [r for r in paper.rows if model_key(r.model) == model_key(dense_run["model"]["name"])]
    if not mine:
        models = sorted({report.model_display_name(r.model) for r in paper.rows})
        line = (f"No row of {paper.title} ({paper.path}) is for model {model}; its rows are for "
                f"{', '.join(models)}: nothing to compare.")
        return (title, None, [line])
    others = [r for r in group if r["method"] != "dense"]
    rank = {m: i for i, m in enumerate(method_order or [])}
    others.sort(key=lambda r: (rank.get(r["method"], len(rank)), report.target_key(r), r["method"],
                               r.get("_path", "")))
    cols, skipped, theirs = _columns_for(paper, dense_run, default, per_task)
    paper_dense = next((r for r in mine if r.method == "dense"), None)
    cols.paper_dense_avg = cols.paper_avg(paper_dense) if paper_dense else None
    our_dense_avg = _mean(list(cols.ours(dense_run).values()))
    records, shown_paper, shown_ratios = [], [], []
    for run in [dense_run, *others]:
        records += _run_rows(run, our_dense_avg, mine, cols, labels, tolerance, shown_paper, shown_ratios)
    run_methods = {r["method"] for r in group}
    ratios = shown_ratios + [r.ratio for r in shown_paper if r.ratio is not None]
    extra = [r for r in mine if r not in shown_paper and (r.method is None or r.method not in run_methods)
             and r.ratio is not None and any(abs(r.ratio - x) <= tolerance for x in ratios)]
    for prow in extra:
        records.append(_paper_record(prow, cols.compared, cols.headers, cols.paper_avg(prow), cols.paper_per(prow)))
    elsewhere = [r for r in mine if r not in shown_paper and r not in extra]
    df = pd.DataFrame(records, columns=["Method", "Source", "Ratio", *cols.headers.values(), "Ave.", "Per."])
    notes = _notes(paper, cols.compared, skipped, cols.used_metric, cols.all_compared, shown_paper + extra,
                   elsewhere, tolerance, bool(shown_paper), model, theirs)
    return (title, df, notes)


def _run_rows(run: dict, our_dense_avg: float | None, mine: list, cols: _Columns, labels: dict, tolerance: float,
              shown_paper: list, shown_ratios: list) -> list[dict]:
    """One run's row, then each paper row it matches with the delta row (none for a failed run)."""
    failed = run.get("status") == "failed"
    label = labels.get(run["method"]) or run.get("label") or run["method"]
    cells = cols.ours(run)
    avg = _mean([cells[c.name] for c in cols.compared])
    ratio = measured_ratio(run)
    per = None if avg is None or not our_dense_avg else 100.0 * avg / our_dense_avg
    h = cols.headers
    rows = [{"Method": label + (" [failed]" if failed else ""), "Source": "ours",
             "Ratio": None if failed or ratio is None else 100.0 * ratio,
             **{h[c.name]: cells[c.name] for c in cols.compared}, "Ave.": avg, "Per.": per}]
    if ratio is not None:
        shown_ratios.append(ratio)
    for prow in match_rows(run, mine, tolerance):
        shown_paper.append(prow)
        p_avg, p_per = cols.paper_avg(prow), cols.paper_per(prow)
        rows.append(_paper_record(prow, cols.compared, h, p_avg, p_per))
        if failed:
            continue
        rows.append({"Method": f"{DELTA} vs {prow.label}", "Source": f"{DELTA}",
                     "Ratio": _signed(_sub(None if ratio is None else 100.0 * ratio,
                                           None if prow.ratio is None else 100.0 * prow.ratio)),
                     **{h[c.name]: _signed(_sub(cells[c.name], prow.values.get(c.name))) for c in cols.compared},
                     "Ave.": _signed(_sub(avg, p_avg)), "Per.": _signed(_sub(per, p_per))})
    return rows


def _paper_record(prow: PaperRow, compared, headers, avg, per) -> dict:
    label = prow.label + ("" if prow.method else " (not in the harness)")
    return {"Method": label, "Source": "paper", "Ratio": None if prow.ratio is None else 100.0 * prow.ratio,
            **{headers[c.name]: prow.values.get(c.name) for c in compared}, "Ave.": avg, "Per.": per}


def _plain_metric(text: str | None) -> bool:
    return bool(text) and re.fullmatch(r"[A-Za-z_][\w/,]*", text) is not None


def _notes(paper: PaperTable, compared, skipped, used_metric, all_compared, shown, elsewhere, tolerance,
           any_match, model, theirs) -> list[str]:
    notes = [f"Paper: {paper.paper}, {paper.table}" + (f"; source: {paper.source}" if paper.source else "")
             + f" ({paper.path}).",
             (f"Rows: ours (this run), paper (as printed), {DELTA} = ours - paper (points; Ratio in percentage "
              f"points). A paper row matches a run of the same model and method whose measured ratio is within "
              f"{100 * tolerance:g} points of the paper's (or that removed the paper's number of layers).")]
    if not any_match:
        notes.append(f"No run of this folder matches a paper row of {model} (method and ratio); the paper rows "
                     "shown are the ones at this run's ratios.")
    metric_text = []
    for c in compared:
        text = f"{c.name}={c.task}:{used_metric.get(c.name, '?')}"
        if _plain_metric(c.metric) and c.metric != used_metric.get(c.name):
            text += f" (paper file: {c.metric})"
        metric_text.append(text)
    notes.append("Ours: lm-eval " + ", ".join(metric_text) + " (x100; the paper's metric unless chosen with "
                 "--table-metric/--table-preset).")
    mismatched = [f"{c.name} (ours {used_metric.get(c.name, '?')}, paper {theirs[c.name]})" for c in compared
                  if theirs[c.name] not in (None, used_metric.get(c.name, theirs[c.name]))]
    if mismatched:
        notes.append(f"{MISMATCH} not the paper's metric, by the table-metric choice: " + ", ".join(mismatched)
                     + "; these deltas compare different metrics.")
    if all_compared:
        notes.append("Ave./Per. of paper rows as printed; ours: mean of the same columns and Ave. / our dense Ave.")
    else:
        notes.append(f"Ave./Per. over the {len(compared)} compared columns only, for both sides (the paper's "
                     f"printed Ave./Per. cover all {len(paper.columns)} of its columns).")
    if skipped:
        notes.append("Not compared: " + ", ".join(skipped) + ".")
    marked = [c for c in compared if c.protocol_differs]
    if marked:
        notes.append(f"{DAGGER} the paper measured this column with a different protocol than ours: "
                     + (paper.protocol or "see the paper file"))
        col_notes = [f"{c.name}: {c.note}" for c in marked if c.note]
        if col_notes:
            notes.append("Columns: " + "; ".join(col_notes) + ".")
    for r in shown:
        if r.note:
            ratio = "" if r.ratio is None else f" {100 * r.ratio:.1f}%"
            notes.append(f"paper row {r.label}{ratio}: {r.note}")
    if elsewhere:
        notes.append(f"{len(elsewhere)} more paper row(s) for {model} at other targets: "
                     + ", ".join(f"{r.label} " + (f"{100 * r.ratio:.1f}%" if r.ratio is not None else f"n={r.layers}")
                                 for r in elsewhere) + " (run at those targets to compare them).")
    notes.extend(paper.notes)
    return notes


def claims_text(paper: PaperTable, runs: list[dict], metric_spec: str | None = None, *,
                preset: str | None = None) -> str:
    """A paper file with no per-task rows: its quoted claims, each followed by our runs of the same
    method (measured ratio and Per.) so the two numbers stand side by side."""
    if not paper.claims:
        return ""
    default, per_task = report.parse_metric_spec(metric_spec, preset)
    lines = [f"Claims of {paper.title} ({paper.path}; no per-task rows in the paper file):"]
    dense_avg = {}
    for run in runs:
        if run["method"] == "dense":
            tasks = list(run.get("metrics") or {})
            dense_avg[report.eval_group_key(run)] = (tasks, _mean([_our_value(run, t, default, per_task)[0]
                                                                    for t in tasks]))
    for claim in paper.claims:
        figures = ", ".join(f"{k} {v}" for k, v in claim.items() if k not in ("quote", "method", "model", "note")
                            and v is not None)
        lines.append(f"- \"{claim['quote']}\"" + (f" [{figures}]" if figures else ""))
        for run in runs:
            if run["method"] != claim.get("method") or run.get("status") == "failed":
                continue
            tasks, d_avg = dense_avg.get(report.eval_group_key(run), (None, None))
            if not tasks:
                continue
            avg = _mean([_our_value(run, t, default, per_task)[0] for t in tasks])
            per = None if avg is None or not d_avg else 100.0 * avg / d_avg
            ratio = measured_ratio(run)
            lines.append(f"    ours: {run['method']} on {report.model_display_name(run['model']['name'])}, "
                         f"ratio {100 * (ratio or 0):.1f}%, Per. " + ("-" if per is None else f"{per:.1f}")
                         + f" over {len(tasks)} tasks")
    return "\n".join(lines)


def render_comparison(runs: list[dict], paper: PaperTable, metric_spec: str | None = None, **options):
    """(text to print, tables to write): the comparison tables, lines for models without paper
    rows, and the claims of a paper file that has only claims."""
    tables = comparison_tables(runs, paper, metric_spec, **options)
    parts = []
    for title, df, notes in tables:
        if df is None:
            parts.append(f"Paper comparison, {title}: " + " ".join(notes))
            continue
        parts.append(report.render_text([(f"{title} (paper comparison)", df, notes)]))
    claims = claims_text(paper, runs, metric_spec, preset=options.get("preset"))
    if claims:
        parts.append(claims)
    written = [(t, df, n) for t, df, n in tables if df is not None]
    return "\n".join(parts).rstrip() + "\n", written

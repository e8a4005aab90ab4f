"""Golden results and regression checks.

``run_benchmarks.py ... --write-golden results/golden/NAME.json`` stores the command line of a
run and every metric it produced. ``run_benchmarks.py --check results/golden/NAME.json
[--tolerance X]`` re-runs exactly that command line (fresh, into a temporary directory, so no
cached result can mask a change), prints a per-method, per-task diff table and fails (exit 1)
when any metric moves more than the tolerance from golden, either way (an unexplained improvement is a
change too; ``--accept-better`` lets rises pass), or a golden method/task/metric is missing.
"""
from __future__ import annotations

import json
from pathlib import Path

from harness.errors import RegressionFailure, UsageError
from harness.io import write_json_atomic
from harness.results.store import environment

GOLDEN_SCHEMA = 1
CHECKED_METRICS = ("acc", "acc_norm")
DEFAULT_TOLERANCE = 0.02  # 2 points of accuracy; one suite item is 0.33 points


def _metrics_by_method(records: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for rec in records:
        tasks = {}
        for task, m in rec["metrics"].items():
            tasks[task] = {k: m[k] for k in CHECKED_METRICS if k in m}
        out[rec["method"]] = tasks
    return out


def write_golden(path: str | Path, argv: list[str], records: list[dict]) -> Path:
    path = Path(path)
    golden = {
        "schema": GOLDEN_SCHEMA,
        "argv": list(argv),
        "command": "python run_benchmarks.py " + " ".join(argv),
        "metrics": _metrics_by_method(records),
        "ratios": {r["method"]: r["params"].get("ratio") for r in records},
        "removed_layers": {r["method"]: r["manifest"].get("removed_layers", []) for r in records},
        "environment": environment(),
    }
    write_json_atomic(path, golden)
    return path


def load_golden(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"golden file '{path}' does not exist; write one with --write-golden (see README)")
    try:
        golden = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"golden file '{path}' is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if golden.get("schema") != GOLDEN_SCHEMA or not isinstance(golden.get("argv"), list):
        raise UsageError(f"golden file '{path}' is not a golden result (schema {GOLDEN_SCHEMA} with argv)")
    return golden


def compare(golden: dict, records: list[dict], tolerance: float,
            accept_better: bool = False) -> tuple[list[dict], list[str]]:
    """Rows of (method, task, metric, golden, now, diff, status) and the failure messages."""
    now = _metrics_by_method(records)
    failed = {r["method"]: r.get("failure") for r in records if r.get("status") == "failed"}
    rows, failures = [], []
    for method, tasks in golden["metrics"].items():
        for task, metrics in tasks.items():
            for metric, g in metrics.items():
                v = now.get(method, {}).get(task, {}).get(metric)
                if v is None and method in failed:  # a failed run has no numbers: never compared as one
                    status = "FAILED"
                    failures.append(f"{method} {task} {metric}: the method failed ({failed[method]})")
                elif v is None:
                    status = "MISSING"
                    failures.append(f"{method} {task} {metric}: in the golden file but not produced now")
                elif v < g - tolerance:
                    status = "FAIL"
                    failures.append(f"{method} {task} {metric}: {100 * v:.2f} < golden {100 * g:.2f} - "
                                    f"tolerance {100 * tolerance:.2f}")
                elif v > g + tolerance:
                    status = "better"
                    if not accept_better:
                        status = "CHANGED"
                        failures.append(f"{method} {task} {metric}: {100 * v:.2f} > golden {100 * g:.2f} + "
                                        f"tolerance {100 * tolerance:.2f} (pass --accept-better to allow rises, "
                                        "or regenerate the golden file)")
                else:
                    status = "ok"
                rows.append({"method": method, "task": task, "metric": metric, "golden": 100 * g,
                             "now": None if v is None else 100 * v,
                             "diff": None if v is None else 100 * (v - g), "status": status})
    return rows, failures


def render_diff(rows: list[dict]) -> str:
    from tabulate import tabulate

    table = [[r["method"], r["task"], r["metric"], f"{r['golden']:.2f}",
              "-" if r["now"] is None else f"{r['now']:.2f}",
              "-" if r["diff"] is None else f"{r['diff']:+.2f}", r["status"]] for r in rows]
    return tabulate(table, headers=["Method", "Task", "Metric", "Golden", "Now", "Diff", "Status"])


def check_tolerance(tolerance: float) -> None:
    if not 0 <= tolerance < 1:
        raise UsageError(f"--tolerance {tolerance} is out of range; give a fraction of accuracy, e.g. 0.02")


def check(golden: dict, records: list[dict], tolerance: float, echo=print, accept_better: bool = False) -> None:
    """Print the diff table; raise ``RegressionFailure`` naming every metric outside golden ± tolerance
    (only below it with ``accept_better``)."""
    rows, failures = compare(golden, records, tolerance, accept_better)
    echo(render_diff(rows))
    if failures:
        raise RegressionFailure(f"{len(failures)} metric(s) outside golden ± {tolerance}: " + "; ".join(failures))
    echo(f"regression check passed: {len(rows)} metrics within tolerance {tolerance} of the golden file")

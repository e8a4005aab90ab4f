"""Experiment tracking (``--wandb PROJECT``, off by default): each run of the invocation becomes one
Weights & Biases run (config: method, options, target, model, evaluation, calibration, seed; summary:
every task metric, perplexity, ratio, Ave. and Per. of the table), and one more run of the
invocation holds the printed tables and the figures.

W&B because it is what this field logs to: lm-eval's own ``--wandb_args``, and the default of
transformers' Trainer. Offline unless the user sets ``WANDB_MODE`` (``wandb sync DIR`` uploads later):
the harness never opens a network connection by itself. The files go to ``<output>/<model>/wandb/``.
"""
from __future__ import annotations

import os
from pathlib import Path

from harness.errors import UsageError


def _flat_metrics(rec: dict) -> dict:
    out = {}
    for task, row in (rec.get("metrics") or {}).items():
        for metric, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{task}/{metric}"] = value
    ppl = (rec.get("perplexity") or {}).get("ppl")
    if ppl is not None:
        out["perplexity"] = ppl
    ratio = (rec.get("params") or {}).get("ratio")
    if ratio is not None:
        out["ratio"] = ratio
    return out


def _table_cells(tables) -> dict:
    """{row label: {"Ave.": ..., "Per.": ...}} from the first table (the run's main one)."""
    if not tables:
        return {}
    _title, df, _notes = tables[0]
    cells = {}
    for _i, row in df.iterrows():
        cells[str(row["Method"])] = {k: row[k] for k in ("Ave.", "Per.") if k in df.columns and row[k] is not None}
    return cells


def log_to_wandb(project: str, records: list[dict], tables, folder: Path, group: str) -> list[str]:
    """One W&B run per record plus one for the tables and figures; returns the runs' local folders."""
    try:
        import wandb
    except ImportError:
        raise UsageError("--wandb needs the wandb package: pip install wandb==0.31.0 (or pip install -e '.[track]')"
                         ) from None
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cells = _table_cells(tables)
    dirs = []
    for rec in records:
        label = rec.get("label") or rec["method"]
        config = {k: rec.get(k) for k in ("method", "label", "method_config", "target", "eval", "calibration", "seed")}
        config["model"] = (rec.get("model") or {}).get("name")
        run = wandb.init(project=project, name=label, group=group, dir=str(folder), config=config,
                         job_type="dense" if rec["method"] == "dense" else "pruned", reinit="create_new")
        summary = _flat_metrics(rec)
        summary.update({k: float(v) for k, v in cells.get(label, {}).items() if v == v})
        summary["status"] = rec.get("status", "ok")
        run.summary.update(summary)
        dirs.append(run.dir)
        run.finish()
    run = wandb.init(project=project, name=f"{group} tables", group=group, dir=str(folder), job_type="report",
                     reinit="create_new")
    from harness.results.report import _fmt

    for i, (title, df, _notes) in enumerate(tables):
        run.log({f"table_{i}": wandb.Table(dataframe=_fmt(df))})
        run.summary[f"table_{i}_title"] = title
    images = {p.stem: wandb.Image(str(p)) for p in sorted(folder.glob("*.png"))}
    if images:
        run.log(images)
    dirs.append(run.dir)
    run.finish()
    # finish() can return before W&B's service process has closed the offline transaction logs; wait
    # for it, so the files are complete (for `wandb sync`, or a reader) when the command returns.
    wandb.teardown()
    return dirs

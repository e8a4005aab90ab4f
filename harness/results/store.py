"""Result store: one JSON per (model, method, config); where it goes and what environment it records."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path

from harness.io import config_hash
from harness.results.record import is_record

PACKAGES = ("torch", "transformers", "lm_eval", "accelerate", "datasets", "peft", "tokenizers", "numpy")


def slug(name: str) -> str:
    name = str(name).rstrip("/")
    if os.path.isdir(os.path.expanduser(name)):
        name = os.path.basename(os.path.abspath(os.path.expanduser(name)))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def run_path(output_dir: str, model_name: str, method: str, key: dict) -> Path:
    return Path(output_dir) / slug(model_name) / f"{slug(method)}__{config_hash(key)}.json"


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    import torch

    return {
        "versions": package_versions(),
        "git_commit": git_commit(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def record_problem(data: dict) -> str | None:
    """What makes a parsed result record unusable for a table, or None: the typed record's fields
    (results.record.RunRecord) with the types the tables read."""
    from harness.results.record import REQUIRED_KEYS

    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        return f"lacks {', '.join(missing)}"
    if not isinstance(data["method"], str) or not isinstance(data["label"], str):
        return "method and label must be strings"
    if data.get("status", "ok") not in ("ok", "failed"):
        return f"status {data.get('status')!r} is neither ok nor failed"
    for key in ("model", "eval", "metrics", "params", "environment"):
        if not isinstance(data[key], dict):
            return f"'{key}' must be an object"
    for column, row in data["metrics"].items():
        if not isinstance(row, dict):
            return f"metrics.{column} must be an object"
        for metric, value in row.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                return f"metrics.{column}.{metric} is {type(value).__name__}, not a number"
    ratio = data["params"].get("ratio")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))):
        return "params.ratio is not a number"
    return None


def _refuse_constant(token):
    raise ValueError(f"{token} is not a JSON number")


def run_identity(data: dict) -> str:
    """Two copies of one run (e.g. a folder copied into the report tree) share this."""
    return json.dumps([data.get(k) for k in ("method", "label", "method_config", "model", "eval", "target",
                                             "calibration", "seed")], sort_keys=True, default=str)


def load_runs(directory: str) -> list[dict]:
    """Every result JSON under ``directory`` (recursively), read strictly (strict JSON: no NaN or
    Infinity; the typed record's fields, ``record_problem``); a damaged record is named and left
    out with a warning, never rendered; copies of one run count once. Non-result JSON files
    (lm-eval's, scores, manifests) are skipped quietly."""
    import sys

    runs, seen = [], {}
    for path in sorted(Path(directory).rglob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
        except (ValueError, UnicodeDecodeError) as exc:  # a result cut short, or NaN written by hand
            print(f"warning: {path} does not parse as strict JSON (truncated, or NaN/Infinity written into it: "
                  f"{str(exc)[:80]}); left out of the tables; re-run the benchmark to recompute it", file=sys.stderr)
            continue
        if not (isinstance(data, dict) and "schema" in data and "method" in data):
            continue  # not a result record
        problem = record_problem(data) if is_record(data) else "is not a result record of this version"
        if problem:
            print(f"warning: {path} {problem if problem.startswith('is ') else 'is damaged: ' + problem}; "
                  "left out of the tables", file=sys.stderr)
            continue
        key = run_identity(data)
        if key in seen:
            print(f"warning: {path} is a copy of {seen[key]}; counted once", file=sys.stderr)
            continue
        seen[key] = path
        data["_path"] = str(path)
        runs.append(data)
    return runs

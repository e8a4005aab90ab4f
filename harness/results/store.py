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


def load_runs(directory: str) -> list[dict]:
    """Every result JSON under ``directory`` (recursively), skipping non-result files."""
    runs = []
    for path in sorted(Path(directory).rglob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):  # a result cut short: say so, never drop it silently
            import sys

            print(f"warning: {path} does not parse (truncated?); left out of the tables; re-run the benchmark "
                  "to recompute it", file=sys.stderr)
            continue
        if is_record(data):
            data["_path"] = str(path)
            runs.append(data)
    return runs

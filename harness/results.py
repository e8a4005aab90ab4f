"""Result store: one JSON per (model, method, config), written atomically."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path

SCHEMA_VERSION = 1
PACKAGES = ("torch", "transformers", "lm_eval", "accelerate", "datasets", "peft", "tokenizers", "numpy")


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(obj) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:12]


def slug(name: str) -> str:
    name = str(name).rstrip("/")
    if os.path.isdir(os.path.expanduser(name)):
        name = os.path.basename(os.path.abspath(os.path.expanduser(name)))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def run_path(output_dir: str, model_name: str, method: str, key: dict) -> Path:
    return Path(output_dir) / slug(model_name) / f"{slug(method)}__{config_hash(key)}.json"


def _write_atomic(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a temp file in the same directory, fsync, then rename over ``path``:
    a reader sees the old file or the whole new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    _write_atomic(path, (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8"))


def write_json_gz_atomic(path: Path, data) -> None:
    """Gzipped compact JSON, written atomically (mtime 0: same data, same bytes)."""
    import gzip

    raw = json.dumps(data, separators=(",", ":"), default=str).encode("utf-8")
    _write_atomic(path, gzip.compress(raw, mtime=0))


def read_json_gz(path: Path):
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(path, text.encode("utf-8"))


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
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and data.get("schema") == SCHEMA_VERSION and "method" in data:
            data["_path"] = str(path)
            runs.append(data)
    return runs

"""A result cache that cannot lie.

A run's key (see ``run_path``) names everything its numbers depend on by content, not by
location: the model's config plus a fingerprint of its files (content hash for small files;
name, size and modification time for large weight shards), the calibration text's hash, and
the hash of every task data file the evaluation reads. Moving the clone, the model folder or
the data folder keeps the key; editing any of them changes it.

A cached file that does not parse is moved aside (``NAME.corrupt``) with a warning and the run
is recomputed; temp files of killed atomic writes are removed when a run starts.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from harness.io import canonical, file_sha256, quarantine, remove_stale_temp_files
from harness.results.record import is_record

CONTENT_HASH_MAX = 64 << 20  # files up to this size are hashed by content; larger ones by name/size/mtime
_SKIP = (".md", ".lock", ".tmp", ".corrupt")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def files_fingerprint(paths, root: Path | None = None) -> dict:
    """``{name: fingerprint}`` for each file: its sha256, or ``size:mtime_ns`` when larger than
    ``CONTENT_HASH_MAX`` (multi-GB weight shards). Names are relative to ``root`` when given."""
    out = {}
    for p in sorted(Path(x) for x in paths):
        name = str(p.relative_to(root)) if root is not None and p.is_relative_to(root) else p.name
        st = p.stat()
        out[name] = file_sha256(p) if st.st_size <= CONTENT_HASH_MAX else f"size={st.st_size}:mtime={st.st_mtime_ns}"
    return out


def model_identity(name: str, model_args: dict | None = None) -> dict:
    """What the model *is*, not where it lies: for a local folder, its config.json content and
    a fingerprint of its files (weights, tokenizer); for a GGUF model, the GGUF file's sha256
    (the converted folder is derived from it); for a Hub id, the id."""
    from harness.model.loading import looks_like_path, source_info

    info = source_info(name, model_args)
    if info is not None:
        return {"gguf": info}
    path = Path(os.path.expanduser(name))
    if not (looks_like_path(name) and path.is_dir()):
        return {"hub_id": name}
    config = path / "config.json"
    try:
        cfg = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        cfg = None
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and not p.name.endswith(_SKIP)]
    digest = hashlib.sha256(canonical(files_fingerprint(files, path)).encode()).hexdigest()
    return {"config": cfg, "files_sha256": digest}


def calibration_identity(source: str) -> dict:
    """A local calibration file by content; a Hub dataset by its id."""
    from harness.signals.calibration import _is_local

    if _is_local(source):
        p = Path(source).expanduser()
        if p.is_file():
            return {"file_sha256": file_sha256(p), "suffix": p.suffix}
    return {"hub": source}


def without_location(ev: dict) -> dict:
    """An evaluation dict with where its local data lies (``data_dir``, ``suite``) replaced by
    ``True``: runs on the same data in another folder are the same runs (the data's content is in
    the run key's ``data``)."""
    return {k: (True if k in ("data_dir", "suite") and v else v) for k, v in ev.items()}


def data_identity(files, root) -> dict:
    """Task data files by content (names relative to their folder)."""
    return files_fingerprint(files, Path(root) if root else None)


def read_cached(path: Path, what: str = "result") -> dict | None:
    """The cached record at ``path``; None when absent. A file that does not parse (or is not a
    record) is moved aside as ``*.corrupt`` with a warning, so the run is recomputed."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ok = is_record(data) if what == "result" else isinstance(data, dict)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        ok = False
    if not ok:
        moved = quarantine(path)
        _warn(f"cached {what} {path} does not parse; moved it to {moved.name} and recomputing this run")
        return None
    data["_path"] = str(path)
    return data


def read_cached_gz(path: Path, loader, what: str = "per-item samples"):
    """``loader(path)`` or None; an unreadable gzip/JSON file is moved aside with a warning."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = loader(path)
    except (OSError, EOFError, ValueError, UnicodeDecodeError):  # gzip/JSON errors are ValueError or OSError
        data = None
    if data is None:
        moved = quarantine(path)
        _warn(f"cached {what} {path} does not parse; moved it to {moved.name} and recomputing this run")
    return data


def clean_output_dir(output_dir) -> list[Path]:
    """Remove temp files that killed atomic writes left under ``output_dir``."""
    removed = remove_stale_temp_files(output_dir)
    if removed:
        _warn(f"removed {len(removed)} temp file(s) left by an interrupted write under {output_dir}")
    return removed

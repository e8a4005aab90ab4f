"""Files: canonical JSON and its hash, and atomic writers (a reader sees the old file or the whole
new one, never half of it)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(obj) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:12]


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

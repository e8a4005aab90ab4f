"""Files: canonical JSON and its hash, and atomic writers (a reader sees the old file or the whole
new one, never half of it).

Written files honour the umask (0644 under the usual 022), like any file ``open`` creates;
results are strict JSON (a NaN or infinity is a bug upstream, never a stored value)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp"
_TMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # .NAME.XXXXXXXX.tmp, as mkstemp names them here


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(obj) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:12]


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def _write_atomic(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a temp file in the same directory, fsync, then rename over ``path``:
    a reader sees the old file or the whole new one, never half of it. The file gets the
    umask's mode (mkstemp's own 0600 would hide results from colleagues).
    In a data-parallel launch only rank 0 writes (the other processes hold the same results)."""
    if os.environ.get("RANK", "0") != "0":
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def dumps_strict(data, **kw) -> str:
    """JSON text; NaN or infinity anywhere is a ``ValueError`` naming where it is."""
    try:
        return json.dumps(data, allow_nan=False, default=str, **kw)
    except ValueError:
        from harness.finite import first_nonfinite

        where = first_nonfinite(data)
        raise ValueError(f"refusing to write a non-finite number to JSON (at {where or '?'})") from None


def write_json_atomic(path: Path, data: dict) -> None:
    _write_atomic(path, (dumps_strict(data, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def write_json_gz_atomic(path: Path, data) -> None:
    """Gzipped compact JSON, written atomically (mtime 0: same data, same bytes)."""
    import gzip

    raw = dumps_strict(data, separators=(",", ":")).encode("utf-8")
    _write_atomic(path, gzip.compress(raw, mtime=0))


def read_json_gz(path: Path):
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(path, text.encode("utf-8"))


def remove_stale_temp_files(directory) -> list[Path]:
    """Delete the temp files a killed atomic write left behind (``.NAME.XXXXXXXX.tmp``, as
    ``_write_atomic`` names them) anywhere under ``directory``; returns what was removed."""
    root = Path(directory)
    removed = []
    if not root.is_dir():
        return removed
    for p in root.rglob(f".*{TMP_SUFFIX}"):
        if p.is_file() and _TMP_NAME.match(p.name):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def quarantine(path, reason: str = "") -> Path:
    """Move an unreadable file aside as ``NAME.corrupt`` (numbered if that exists); returns the new path."""
    path = Path(path)
    target = path.with_name(path.name + ".corrupt")
    k = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt{k}")
        k += 1
    os.replace(path, target)
    return target


def file_sha256(path, chunk: int = 1 << 20) -> str:
    """Content hash of one file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def apply_umask(folder) -> None:
    """Give every file directly in ``folder`` the umask's mode (files that libraries write through
    temp files, e.g. transformers' ``model.safetensors``, come out 0600 otherwise)."""
    mode = file_mode()
    for p in Path(folder).iterdir():
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)

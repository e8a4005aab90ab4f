"""Files: canonical JSON and its hash, and atomic writers (a reader sees the old file or the whole
new one, never half of it).

Written files honour the umask (0644 under the usual 022), like any file ``open`` creates;
results are strict JSON (a NaN or infinity is a bug upstream, never a stored value)."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from harness.errors import UsageError
from harness.finite import first_nonfinite, map_leaves

TMP_SUFFIX = ".tmp"
_TMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # .NAME.XXXXXXXX.tmp, as mkstemp names them here


_SHIPPED_DIR = Path(__file__).resolve().parents[1] / "reference"  # reference models, suite, calibration
_SHARED_DIR = _SHIPPED_DIR.parents[1] / "shared"  # ../shared beside the clone: the benchmark data (CI's layout)
_TEMP_WORKDIR = re.compile(r"^(?:.*[/\\])?(sb_[a-z]+)_[^/\\]+[/\\](.+)$")  # harness.io.make_temp_dir's folders


def _shipped_relative(value):
    """An absolute path into the shipped ``reference/`` folder or into ``../shared`` relative to the clone;
    a file in one of the harness's temporary work folders as ``<sb_kind>/<name>`` (the folder is
    gone when the run ends); anything else unchanged."""
    if not isinstance(value, str) or not os.path.isabs(value):
        return value
    if any(value == str(d) or value.startswith(str(d) + os.sep) for d in (_SHIPPED_DIR, _SHARED_DIR)):
        return os.path.relpath(value, _SHIPPED_DIR.parent).replace(os.sep, "/")
    m = _TEMP_WORKDIR.match(value)
    if m and value.startswith(tempfile.gettempdir()):
        return f"<{m.group(1)}>/{m.group(2)}"
    return value


def repo_relative(data):
    """A copy of JSON-like ``data`` in which every absolute path into the shipped ``reference/`` or
    ``../shared`` is written relative to the clone (``reference/suite``, ``../shared/data``) and the harness's temp
    work files by name, so result files and manifests committed from one clone name no path of its
    machine."""
    return map_leaves(data, _shipped_relative)


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
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename != str(path):  # name the file meant, not the temp file
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def dumps_strict(data, **kw) -> str:
    """JSON text; NaN or infinity anywhere is a ``ValueError`` naming where it is."""
    try:
        return json.dumps(data, allow_nan=False, default=str, **kw)
    except ValueError:
        where = first_nonfinite(data)
        raise ValueError(f"refusing to write a non-finite number to JSON (at {where or '?'})") from None


def write_json_atomic(path: Path, data: dict) -> None:
    _write_atomic(path, (dumps_strict(data, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def write_json_gz_atomic(path: Path, data) -> None:
    """Gzipped compact JSON, written atomically (mtime 0: same data, same bytes)."""
    raw = dumps_strict(data, separators=(",", ":")).encode("utf-8")
    _write_atomic(path, gzip.compress(raw, mtime=0))


def read_json_gz(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(path, text.encode("utf-8"))


def remove_stale_temp_files(directory, min_age_s: float = 30.0, max_depth: int = 4) -> list[Path]:
    """Delete the temp files a killed atomic write left behind (``.NAME.XXXXXXXX.tmp``, as
    ``_write_atomic`` names them) under ``directory`` (results sit at most ``max_depth`` folders
    down; hidden folders are skipped). Only files untouched for ``min_age_s`` go: a write in flight
    from another run sharing the folder takes milliseconds. Returns what was removed."""
    import time

    root = Path(directory)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    now = time.time()
    base_depth = len(root.parts)
    for folder, dirs, files in os.walk(root):
        depth = len(Path(folder).parts) - base_depth
        dirs[:] = [d for d in dirs if not d.startswith(".")] if depth < max_depth else []
        for name in files:
            if not _TMP_NAME.match(name):
                continue
            p = Path(folder) / name
            try:
                if now - p.stat().st_mtime >= min_age_s:
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


# --- reading checks: a file the run will read, opened and its records checked --------------------

_PROBE_BYTES = 1 << 16


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _check_not_binary(path: Path, what: str) -> None:
    with open(path, "rb") as fh:
        head = fh.read(_PROBE_BYTES)
    if path.suffix == ".gz":
        if head[:2] != b"\x1f\x8b":
            raise UsageError(f"{what} '{path}' is not a gzip file; re-create it (see shared/data/SOURCES.md)")
        try:
            with gzip.open(path, "rb") as fh:
                head = fh.read(_PROBE_BYTES)
        except (OSError, EOFError) as exc:
            raise UsageError(f"{what} '{path}' is a damaged or truncated gzip file ({exc}); re-create it") from None
    if b"\x00" in head:
        raise UsageError(f"{what} '{path}' is a binary file, not text; pass a UTF-8 text or JSON-lines file")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a multi-byte character cut by the probe
            raise UsageError(f"{what} '{path}' is not UTF-8 text (byte {exc.start}); pass a UTF-8 file") from None


def iter_jsonl(path, what: str):
    """``(line number, record)`` for every non-blank line of a JSON-lines file (``.gz`` too); a line
    that is not a JSON object, a truncated file or bad UTF-8 is one UsageError naming ``what``."""
    path = Path(path)
    try:
        with _open_text(path) as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    last = "the last line" if not line.endswith("\n") else f"line {line_no}"
                    hint = " (the file looks truncated)" if not line.endswith("\n") else ""
                    raise UsageError(f"{what} '{path}' {last} is not valid JSON{hint}; "
                                     "re-create the file (one JSON object per line)") from None
                if not isinstance(row, dict):
                    raise UsageError(f"{what} '{path}' line {line_no} is not a JSON object")
                yield line_no, row
    except (OSError, EOFError) as exc:  # a truncated gzip stream
        raise UsageError(f"{what} '{path}' cannot be read to the end ({type(exc).__name__}: {exc}); "
                         "the file looks truncated") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} '{path}' is not UTF-8 text ({exc.reason}); pass a UTF-8 file") from None


def check_jsonl_file(path, what: str, fields: tuple[str, ...] = (), row_check=None) -> int:
    """A JSON-lines file whose every line is a JSON object holding ``fields`` (and passing
    ``row_check(row) -> problem or None``, e.g. harness.evaluation.rows); missing, empty, binary,
    truncated or wrong-schema files and bad rows are one error naming the file and line. Returns
    the number of records."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} '{path}' does not exist")
    if path.stat().st_size == 0:
        raise UsageError(f"{what} '{path}' is empty")
    _check_not_binary(path, what)
    n = 0
    for line_no, row in iter_jsonl(path, what):
        missing = [f for f in fields if f not in row]
        if missing:
            raise UsageError(f"{what} '{path}' line {line_no} lacks field(s) {', '.join(missing)} "
                             f"(has {', '.join(list(row)[:8])}); is it the right file?")
        problem = row_check(row) if row_check is not None else None
        if problem:
            raise UsageError(f"{what} '{path}' line {line_no}: {problem}; fix or remove that row")
        n += 1
    if n == 0:
        raise UsageError(f"{what} '{path}' holds no records")
    return n


def check_text_file(path, what: str) -> None:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} '{path}' does not exist")
    _check_not_binary(path, what)
    try:
        with _open_text(path) as fh:
            text = fh.read(_PROBE_BYTES * 16)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} '{path}' cannot be read as text ({type(exc).__name__})") from None
    if not text.strip():
        raise UsageError(f"{what} '{path}' is empty; pass a file with text in it")


# --- temporary folders: named by their process, removed by the next run when that process is gone

TEMP_KINDS = ("sb_tasks", "sb_actcache", "sb_check")
_TEMP_NAME = re.compile(r"(?P<kind>sb_[a-z]+)_(?P<pid>\d+)_")


def make_temp_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A temporary folder that says which process made it (``<kind>_<pid>_…``), so a run killed with
    SIGKILL (which runs no clean-up) leaves a folder ``clean_stale_temp_dirs`` recognises."""
    return tempfile.TemporaryDirectory(prefix=f"{kind}_{os.getpid()}_")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale_temp_dirs(root: str | None = None) -> list[Path]:
    """Remove this harness's temporary folders whose process no longer runs; returns them."""
    import shutil

    removed = []
    base = Path(root or tempfile.gettempdir())
    try:
        entries = list(base.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP_NAME.match(p.name)
        if not m or m["kind"] not in TEMP_KINDS or not p.is_dir() or p.is_symlink():
            continue
        if int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed

"""Runs claimed by the process running them, so that several processes can share one sweep.

Started twice on the same sweep (``run_benchmarks.py --config X`` on two GPUs, or on two cores with
one thread each), two processes split its runs instead of doing each one twice. Before a run starts,
its process takes an exclusive ``flock(2)`` on ``NAME.claim`` beside the run's JSON and writes its
pid, host and start time into it. A process that finds a run claimed skips it and says who holds it;
the dense run, which every other run needs, is waited for instead. The kernel drops a lock when its
process ends, however it ends (``kill -9`` included), so a claim never outlives its process: the next
process simply takes the run over. The file is removed when the run ends.

Claims need ``fcntl`` (Linux, macOS). Without it, or inside a data-parallel group (whose ranks run
every run together), every run is run as before, unclaimed.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not coordinated between processes
    fcntl = None

SUFFIX = ".claim"


def claim_path(path: Path) -> Path:
    """``NAME.claim`` for the run whose record is ``NAME.json``."""
    return Path(path).with_suffix(SUFFIX)


class Claim:
    """A held claim (``fd`` is None when claims are off: releasing it does nothing)."""

    def __init__(self, path: Path, fd: int | None, waited: bool = False):
        self.path, self._fd, self.waited = path, fd, waited

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # removed while still locked: whoever opens the name later makes a new file, and a process
            # that opened this one before the unlink finds it unlinked once it locks it (_lock) and retries
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        finally:
            os.close(fd)  # closing the descriptor drops the lock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _lock(path: Path, block: bool) -> int | None:
    """A descriptor of ``path`` locked by this process, or None when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
            except BlockingIOError:  # held; or probed this instant by `report` (in_progress): look again
                time.sleep(0.05)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            st = os.stat(path)
            mine = os.fstat(fd)
            current = (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)  # its holder removed it between our open and our lock: take the new one


def _write_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)


def holder(path: Path) -> str:
    """Who holds the claim on ``path``'s run, in words (``pid 123 on host h since ...``)."""
    try:
        info = json.loads(claim_path(path).read_text(encoding="utf-8"))
        return f"pid {int(info['pid'])} on host {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # being written this instant, or already gone
        return "another process"


def enabled() -> bool:
    from harness.evaluation import distributed

    return fcntl is not None and distributed.world_size() <= 1


def try_claim(path: Path) -> Claim | None:
    """The claim on ``path``'s run, or None when another process holds it."""
    cpath = claim_path(path)
    if not enabled():
        return Claim(cpath, None)
    cpath.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock(cpath, block=False)
    if fd is None:
        return None
    _write_holder(fd)
    return Claim(cpath, fd)


def wait_claim(path: Path, what: str, echo=print) -> Claim:
    """The claim on ``path``'s run, waiting (with one line saying for whom) while another process holds it."""
    claim = try_claim(path)
    if claim is not None:
        return claim
    echo(f"{what}: another process is running it ({holder(path)}); waiting for it")
    cpath = claim_path(path)
    fd = _lock(cpath, block=True)
    _write_holder(fd)
    return Claim(cpath, fd, waited=True)


def in_progress(folder: Path) -> list[tuple[str, str]]:
    """``(run file stem, holder)`` for each run under ``folder`` that a live process is running now
    (its claim is locked); a claim file left by a killed process holds no lock and is not listed."""
    if fcntl is None:
        return []
    out = []
    for cpath in sorted(Path(folder).rglob(f"*{SUFFIX}")):
        try:
            fd = os.open(cpath, os.O_RDONLY)
        except OSError:  # removed as its run ended
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a shared lock only probes: never held past here
        except BlockingIOError:
            out.append((cpath.stem, holder(cpath)))
        finally:
            os.close(fd)
    return out

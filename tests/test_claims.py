"""Processes sharing one sweep (harness.results.claim): each run is run by one of them, a run claimed by a
live process is left to it, the dense run is waited for, and a claim dies with its process."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
from conftest import REPO, shared_data_or_skip

from harness.cli import main
from harness.results import claim

pytestmark = pytest.mark.skipif(claim.fcntl is None, reason="claims need fcntl (not on Windows)")

HOLD = """
import sys, time
from pathlib import Path
from harness.results import claim
c = claim.try_claim(Path(sys.argv[1]))
print("held" if c is not None else "refused", flush=True)
time.sleep(600)
"""


def test_a_claim_excludes_others_and_dies_with_its_process(tmp_path):
    run = tmp_path / "remove__abc.json"
    held = claim.try_claim(run)
    assert held is not None and claim.claim_path(run).is_file()
    assert claim.try_claim(run) is None  # a second open file (as another process has) is refused
    assert claim.holder(run).startswith(f"pid {os.getpid()} on host ")
    held.release()
    assert not claim.claim_path(run).exists()  # removed when the run ends
    again = claim.try_claim(run)
    assert again is not None
    again.release()

    # another process holds it; killed with SIGKILL, its claim file stays but holds nothing
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert claim.try_claim(run) is None
        assert claim.holder(run).startswith(f"pid {proc.pid} on host ")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert claim.claim_path(run).is_file()
    taken = claim.try_claim(run)
    assert taken is not None
    assert claim.holder(run).startswith(f"pid {os.getpid()} ")
    taken.release()


def _argv(model_dir, data, out, methods):
    return ["--model", str(model_dir), "--data-dir", str(data), "--tasks", "piqa", "--limit", "8",
            "--layers", "2", "--calib-samples", "4", "--calib-seq-len", "32", "--no-progress",
            "--methods", methods, "--output-dir", str(out)]


def _run_files(folder, method):
    return sorted(p for p in folder.iterdir() if p.name.startswith(f"{method}__"))


def test_a_claimed_run_is_left_to_its_holder_and_dense_is_waited_for(tiny_opt_dir, tmp_path, capsys, monkeypatch):
    data = shared_data_or_skip()
    out = tmp_path / "runs"
    argv = _argv(tiny_opt_dir, data, out, "remove,laco")
    assert main(argv) == 0
    capsys.readouterr()
    folder = out / tiny_opt_dir.name
    (laco_json,) = [p for p in _run_files(folder, "laco") if p.suffix == ".json"]
    saved = tmp_path / "saved"
    saved.mkdir()
    for p in _run_files(folder, "laco"):
        shutil.move(str(p), saved / p.name)

    # laco is claimed by "another process" (a second open file here): left to it, not run, not tabled
    held = claim.try_claim(laco_json)
    try:
        assert main(argv) == 0
        text = capsys.readouterr().out
    except BaseException:
        held.release()
        raise
    assert f"laco: another process is running it (pid {os.getpid()} on host " in text
    assert "laco: pruning" not in text and not laco_json.exists()
    assert "1 run(s) were left to other processes" in text
    # `report` on the folder names the run still in progress; a killed process's claim is not named
    held2 = claim.try_claim(folder / "streamline__zzz.json")
    (folder / "shortgpt__dead.claim").write_text('{"pid": 1, "host": "h", "since": "s"}')
    try:
        assert main(["report", str(folder)]) == 0
        text = capsys.readouterr().out
    finally:
        held.release()
        held2.release()
    assert f"note: {laco_json.stem} is still running (pid {os.getpid()} on host " in text
    assert "note: streamline__zzz is still running" in text and "shortgpt__dead" not in text
    (folder / "shortgpt__dead.claim").unlink()
    table = (folder / "table.md").read_text()
    assert "remove" in table and "laco" not in table

    # the holder finishes it between this process's look and its claim: taken as it is, not run again
    real_try = claim.try_claim

    def finishes_first(path):
        if path == laco_json:
            for p in saved.iterdir():
                (shutil.copytree if p.is_dir() else shutil.copy2)(p, folder / p.name)
        return real_try(path)

    monkeypatch.setattr(claim, "try_claim", finishes_first)
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "laco: finished by another process meanwhile" in text and "laco: pruning" not in text
    monkeypatch.setattr(claim, "try_claim", real_try)
    assert "laco" in (folder / "table.md").read_text()

    # the dense run is being evaluated elsewhere: waited for (here its holder ends without a record,
    # so this process evaluates it once the claim is free)
    (dense_json,) = [p for p in _run_files(folder, "dense") if p.suffix == ".json"]
    dense_json.unlink()
    held = claim.try_claim(dense_json)
    real_lock, timers = claim._lock, []

    def release_soon(path, block):  # the holder ends half a second after this process starts waiting
        if block:
            timers.append(threading.Timer(0.5, held.release))
            timers[-1].start()
        return real_lock(path, block)

    monkeypatch.setattr(claim, "_lock", release_soon)
    try:
        assert main(argv) == 0
    finally:
        for t in timers:
            t.join()
        held.release()
    assert len(timers) == 1
    text = capsys.readouterr().out
    assert "dense: another process is running it" in text and "waiting for it" in text
    assert text.index("waiting for it") < text.index("dense: evaluating")
    assert dense_json.is_file() and not claim.claim_path(dense_json).exists()


def test_two_processes_on_one_sweep_run_each_run_once(tiny_opt_dir, tmp_path):
    data = shared_data_or_skip()
    out = tmp_path / "runs"
    methods = "remove,shortgpt,laco,streamline-none"
    argv = [sys.executable, "run_benchmarks.py", *_argv(tiny_opt_dir, data, out, methods)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    procs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    both = "".join(outs)
    assert both.count("dense: evaluating") == 1, outs  # the other one waited for it, or found it done
    for method in methods.split(","):
        assert both.count(f"{method}: pruning") == 1, (method, outs)  # run by exactly one of them
    folder = out / tiny_opt_dir.name
    records = [json.loads(p.read_text()) for p in folder.glob("*__*.json")]
    assert sorted(r["method"] for r in records) == sorted(["dense", *methods.split(",")])
    assert not list(folder.glob("*.claim"))

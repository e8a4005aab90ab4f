"""Data-parallel evaluation: 2 processes (torchrun, gloo on CPU) give the metrics of 1 process.

lm-eval splits each task's documents across the ranks (its own rank/world-size mechanism,
through the rank-aware HFLM of harness.evaluation.distributed) and gathers them on rank 0; only
rank 0 writes results and prints. The built-in reference model and suite keep this fast.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "reference" / "models" / "ref-opt-12l"
SUITE = REPO / "reference" / "suite"


def _args(out: Path) -> list[str]:
    return ["run_benchmarks.py", "--model", str(MODEL), "--suite", str(SUITE), "--limit", "12",
            "--methods", "remove,streamline", "-o", "streamline.epochs=1", "-o", "streamline.train_samples=8",
            "--calib-samples", "8", "--calib-seq-len", "32", "--eval-batch-size", "4",
            "--output-dir", str(out), "--no-progress"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")
    return env


def _close(x, y, path="stability"):
    if isinstance(x, dict):
        assert set(x) == set(y), path
        for k in x:
            _close(x[k], y[k], f"{path}.{k}")
    elif isinstance(x, float) and isinstance(y, float):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-9), path
    else:
        assert x == y, path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _results(out: Path) -> dict:
    found = {}
    for path in sorted(out.rglob("*.json")):
        rec = json.loads(path.read_text())
        if isinstance(rec, dict) and "method" in rec and "metrics" in rec:
            found[rec["method"]] = rec
    return found


@pytest.mark.skipif(not MODEL.is_dir(), reason="reference model not in the checkout")
def test_two_processes_give_the_metrics_of_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, *_args(one)], cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(_free_port())]
    dp = subprocess.run(launch + _args(two), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert dp.returncode == 0, dp.stderr[-3000:]

    a, b = _results(one), _results(two)
    assert set(a) == set(b) == {"dense", "remove", "streamline"}
    for method in a:
        assert b[method]["metrics"] == a[method]["metrics"], method
        assert b[method]["manifest"]["removed_layers"] == a[method]["manifest"]["removed_layers"]
        # every document was evaluated exactly once across the two ranks
        assert all(row.get("n") == 12 for row in b[method]["metrics"].values() if isinstance(row, dict))
    # stability compares per-document log-likelihoods: a rank batches other documents together, so
    # they agree to float rounding (padding changes the matmul shapes), not bit for bit
    _close(b["streamline"]["stability"], a["streamline"]["stability"])
    # rank 0 alone printed: each run's line appears once
    assert dp.stdout.count("dense: evaluating") == 1
    assert dp.stdout.count("remove: pruning") == 1

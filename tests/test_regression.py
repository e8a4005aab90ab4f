"""Golden files and --check: a drop beyond the tolerance fails with exit 1 and names the metric."""
import json

import pytest

from harness import reference as R
from harness.cli import main
from harness.results.regression import compare


def _rec(method, **tasks):
    return {"method": method, "metrics": {t: {"acc": v, "acc_norm": v, "acc_stderr": 0.01} for t, v in tasks.items()},
            "params": {"ratio": 0.0}, "manifest": {}}


def test_compare_flags_changes_beyond_tolerance_either_way():
    golden = {"metrics": {"dense": {"a": {"acc": 0.9}}, "remove": {"a": {"acc": 0.6}, "b": {"acc": 0.5}}}}
    rows, fails = compare(golden, [_rec("dense", a=0.89), _rec("remove", a=0.57, b=0.55)], tolerance=0.02)
    status = {(r["method"], r["task"]): r["status"] for r in rows}
    assert status == {("dense", "a"): "ok", ("remove", "a"): "FAIL", ("remove", "b"): "CHANGED"}
    assert len(fails) == 2 and "remove a acc" in fails[0] and "--accept-better" in fails[1]
    rows, fails = compare(golden, [_rec("dense", a=0.89), _rec("remove", a=0.57, b=0.55)], tolerance=0.02,
                          accept_better=True)
    assert {(r["method"], r["task"]): r["status"] for r in rows}[("remove", "b")] == "better"
    assert len(fails) == 1 and "remove a acc" in fails[0]
    rows, fails = compare(golden, [_rec("dense", a=0.9)], tolerance=0.02)
    assert sum(r["status"] == "MISSING" for r in rows) == 2 and len(fails) == 2


def test_write_golden_then_check(tiny_opt_dir, tmp_path, capsys):
    if not (R.SUITE_DIR / "suite.json").is_file():
        pytest.skip("reference/suite not generated; run python -m harness.reference.train")
    golden = tmp_path / "golden.json"
    args = ["--model", str(tiny_opt_dir), "--suite", str(R.SUITE_DIR), "--methods", "remove,shortgpt",
            "--layers", "2", "--limit", "6", "--calib-data", str(R.CALIBRATION_PATH), "--calib-samples", "4",
            "--calib-seq-len", "32", "--no-progress"]
    assert main(args + ["--output-dir", str(tmp_path / "runs"), "--write-golden", str(golden)]) == 0
    g = json.loads(golden.read_text())
    assert "--output-dir" not in g["argv"] and "--write-golden" not in g["argv"]
    assert set(g["metrics"]) == {"dense", "remove", "shortgpt"}
    assert set(g["metrics"]["remove"]) == set(json.loads((R.SUITE_DIR / "suite.json").read_text())["tasks"])
    capsys.readouterr()

    assert main(["--check", str(golden), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "regression check passed" in out and "Golden" in out

    g["metrics"]["shortgpt"]["sum"]["acc"] += 0.5  # a golden we cannot reach: must fail
    golden.write_text(json.dumps(g))
    assert main(["--check", str(golden), "--tolerance", "0.01", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "shortgpt sum acc" in err and err.strip().splitlines()[-1].startswith("regression:")


def test_check_bad_inputs_exit_2(tmp_path, capsys):
    assert main(["--check", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["--check", str(bad)]) == 2
    assert main(["--tolerance", "0.1", "--methods", "remove"]) == 2

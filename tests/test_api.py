"""The Python API (harness.run / harness.report) and a light `import harness`."""
import subprocess
import sys

import pytest

from conftest import REPO


def test_import_harness_does_not_import_torch():
    code = ("import sys, harness, harness.defaults; from harness import UsageError; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_readme_example_runs(tmp_path, monkeypatch):
    """The README's notebook example, with the output folder in tmp_path."""
    import harness

    monkeypatch.chdir(tmp_path)
    res = harness.run(model="ref-opt-12l", methods=["streamline", "remove"], layers=1, limit=3, calib_samples=8,
                      method_options={"streamline": {"epochs": 1, "train_samples": 4}}, output_dir="runs",
                      no_progress=True)
    df = res.table
    assert list(df["Method"])[0] == "Dense" and {"remove", "Ave.", "Per."} <= set(df["Method"]) | set(df.columns)
    assert sorted(r["method"] for r in res.records) == ["dense", "remove", "streamline"]
    back = harness.report("runs/ref-opt-12l")
    assert back.table.equals(df)
    with pytest.raises(harness.UsageError, match="unknown method"):
        harness.run(model="ref-opt-12l", methods=["nope"], output_dir="runs")

"""costs.md/csv/tex: what each run took, rendered from the records' timings (harness/results/costs.py)."""
import csv
import json

import pytest
from conftest import shared_data_or_skip

from harness.cli import main
from harness.results.costs import cost_row, cost_tables


def _run(method, timings, **extra):
    return {"method": method, "model": {"name": "m"}, "eval": {}, "target": {"layers": 2, "num_remove": 2},
            "metrics": {"piqa": {"acc": 0.5}}, "timings": timings,
            "environment": {"git_commit": "0123456789abcdef", "torch_threads": 1}, **extra}


def test_stages_split_pruning_into_scoring_fit_and_post_training():
    row = cost_row(_run("streamline+lora", {"score_shared": 60.0, "score": 30.0, "prune": 330.0,
                                            "post_step.lora": 240.0, "eval": 600.0, "ppl": 120.0,
                                            "efficiency": 90.0}))
    assert row["Scoring"] == pytest.approx(1.5)  # shared pass + the method's own, in minutes
    assert row["Fit"] == pytest.approx(1.0)  # prune 330 s less its scoring (30) and LoRA (240)
    assert row["Post-train"] == pytest.approx(4.0)
    assert (row["Tasks"], row["Perplexity"], row["Efficiency"]) == pytest.approx((10.0, 2.0, 1.5))
    assert row["Total"] == pytest.approx(1.5 + 1.0 + 4.0 + 10.0 + 2.0 + 1.5)
    assert (row["Commit"], row["Threads"], row["Target"], row["Reused"]) == ("0123456", "1", "n=2", "-")


def test_a_reused_evaluation_has_no_task_time_and_names_its_source():
    row = cost_row(_run("angular", {"prune": 1.0, "score": 0.0},
                        reused_evaluation={"from": "remove__x.json", "method": "remove"}))
    assert row["Tasks"] is None and row["Perplexity"] is None and row["Reused"] == "remove"
    assert row["Scoring"] is None  # scored nothing of its own


def test_rows_go_dense_first_then_by_target():
    dense = _run("dense", {"load": 6.0, "eval": 60.0}, target={})
    runs = [_run("remove", {"eval": 60.0}, target={"layers": 4, "num_remove": 4}), dense,
            _run("remove", {"eval": 60.0})]
    ((title, df, notes),) = cost_tables(runs)
    assert list(df["Method"]) == ["dense", "remove", "remove"] and list(df["Target"]) == ["-", "n=2", "n=4"]
    assert df["Total"].iloc[0] == pytest.approx(1.1) and "minutes" in title and notes
    assert cost_tables([{**r, "timings": {}} for r in runs]) == []


def test_a_run_writes_costs_that_equal_its_records(tiny_opt_dir, tmp_path):
    data = shared_data_or_skip()
    out = tmp_path / "runs"
    assert main(["--model", str(tiny_opt_dir), "--data-dir", str(data), "--tasks", "piqa", "--limit", "4",
                 "--layers", "1", "--calib-samples", "4", "--calib-seq-len", "32", "--output-dir", str(out),
                 "--no-progress", "--methods", "remove"]) == 0
    folder = out / tiny_opt_dir.name
    rows = {r["Method"]: r for r in csv.DictReader((folder / "costs.csv").open())}
    for path in folder.glob("*.json"):
        rec = json.loads(path.read_text())
        if "timings" not in rec:
            continue
        label = "Dense" if rec["method"] == "dense" else rec["method"]
        row = rows.get(label) or rows[rec["method"]]
        assert float(row["Tasks"]) == pytest.approx(rec["timings"]["eval"] / 60, abs=1e-4)
    assert (folder / "costs.md").stat().st_mode & 0o777 == 0o644
    (folder / "costs.md").unlink()
    assert main(["report", str(folder)]) == 0 and (folder / "costs.md").exists()

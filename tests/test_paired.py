"""--paired METHOD: the Per. difference of two runs on the same items, with a paired bootstrap
interval and the discordant items (harness/results/paired.py)."""
import csv

import numpy as np
import pytest
from conftest import no_model_loading, one_error_line, shared_data_or_skip

from harness.cli import main
from harness.results.paired import compare


def _items(*columns):
    """An items x (dense, run, reference) 0/1 matrix from three flag lists."""
    return np.array(columns, dtype=float).T


def test_identical_runs_differ_by_zero_with_a_zero_interval():
    rng = np.random.default_rng(1)
    flags = rng.integers(0, 2, size=(2, 300))
    mats = [_items(flags[0], flags[1], flags[1]), _items(flags[1], flags[0], flags[0])]
    c = compare(mats, resamples=500)
    assert c["diff"] == 0.0 and c["low"] == 0.0 and c["high"] == 0.0
    assert c["run_only"] == 0 and c["ref_only"] == 0 and c["items"] == 600


def test_observed_per_is_the_tables_per():
    # task 1: dense 3/4, run 2/4, ref 1/4; task 2: dense 2/2, run 1/2, ref 2/2
    mats = [_items([1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 0, 0]), _items([1, 1], [1, 0], [1, 1])]
    c = compare(mats, resamples=200)
    dense_ave = (0.75 + 1.0) / 2
    assert c["per"] == pytest.approx(100 * (0.5 + 0.5) / 2 / dense_ave)
    assert c["ref_per"] == pytest.approx(100 * (0.25 + 1.0) / 2 / dense_ave)
    assert c["diff"] == pytest.approx(c["per"] - c["ref_per"])
    assert (c["run_only"], c["ref_only"]) == (1, 1)  # task 1 item 0 for the run; task 2 item 1 for the reference
    assert c["low"] <= c["diff"] <= c["high"]


def test_interval_separates_a_real_gap_from_noise():
    rng = np.random.default_rng(2)
    n = 2000
    dense = np.ones(n)
    ref = (rng.random(n) < 0.5).astype(float)
    better = np.maximum(ref, (rng.random(n) < 0.2).astype(float))  # right wherever ref is, and on 10% more
    c = compare([_items(dense, better, ref)], resamples=2000)
    assert c["ref_only"] == 0 and c["run_only"] > 0
    assert c["low"] > 0, c  # a real gap: the interval stays above 0
    few = slice(0, 40)
    flips = (rng.random(40) < 0.5).astype(float)  # a coin flip against ref on 40 items
    c = compare([_items(dense[few], flips, ref[few])], resamples=2000)
    assert c["low"] < 0 < c["high"], c


def test_paired_report_matches_the_table(tiny_opt_dir, tmp_path, capsys):
    data = shared_data_or_skip()
    out = tmp_path / "runs"
    argv = ["--model", str(tiny_opt_dir), "--data-dir", str(data), "--tasks", "piqa,arc_easy", "--limit", "12",
            "--layers", "1", "--calib-samples", "4", "--calib-seq-len", "32", "--output-dir", str(out),
            "--no-progress", "--methods", "remove,shortgpt", "-o", "remove.start=0", "--paired", "remove"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "paired against remove" in text
    folder = out / tiny_opt_dir.name
    table = {r["Method"]: r for r in csv.DictReader((folder / "table.csv").open())}
    (row,) = list(csv.DictReader((folder / "paired_remove.csv").open()))
    assert row["Method"] == "shortgpt" and row["items"] == "24"
    assert float(row["Per."]) == pytest.approx(float(table["shortgpt"]["Per."]), abs=1e-6)
    assert float(row["Per. remove"]) == pytest.approx(float(table["remove(start=0)"]["Per."]), abs=1e-6)
    assert float(row["95% low"]) <= float(row["Δ Per."]) <= float(row["95% high"])

    for ext in ("md", "csv", "tex"):
        (folder / f"paired_remove.{ext}").unlink()
    assert main(["report", str(folder)]) == 0  # the same from the stored runs: --paired is a stored table setting
    (again,) = list(csv.DictReader((folder / "paired_remove.csv").open()))
    assert again == row
    capsys.readouterr()
    rc = main(["report", str(folder), "--paired", "laco"])
    one_error_line(rc, capsys, ("--paired laco", "no run of 'laco'", "remove, shortgpt"))


def test_paired_method_not_in_the_run_fails_before_loading(tiny_opt_dir, tmp_path, capsys, monkeypatch):
    no_model_loading(monkeypatch)
    out = tmp_path / "runs"
    rc = main(["--model", str(tiny_opt_dir), "--methods", "remove,shortgpt", "--layers", "1", "--tasks", "piqa",
               "--limit", "4", "--output-dir", str(out), "--no-progress", "--paired", "streamline"])
    one_error_line(rc, capsys, ("--paired streamline", "not one of this run's methods"), out=out)


def _record(method, metrics, path=None):
    rec = {"method": method, "model": {"name": "m"}, "eval": {}, "target": {"layers": 1, "num_remove": 1},
           "seed": 0, "metrics": metrics, "status": "ok"}
    if path:
        rec["_path"] = str(path)
    return rec


def test_runs_without_item_flags_are_named_not_compared(tmp_path):
    from harness.results.paired import paired_tables

    acc = {"piqa": {"acc": 0.5}}
    runs = [_record("dense", acc), _record("remove", acc), _record("shortgpt", acc, tmp_path / "shortgpt.json")]
    ((_title, df, notes),) = paired_tables(runs, "remove")
    assert df.empty and any("shortgpt: not compared" in n and "side file" in n for n in notes), notes
    gen = {"gsm8k": {"exact_match": 0.1}}
    runs = [_record("dense", gen), _record("remove", gen), _record("shortgpt", gen)]
    ((_title, df, notes),) = paired_tables(runs, "remove")
    assert df.empty and any("exact_match, which has no per-item flags" in n for n in notes), notes

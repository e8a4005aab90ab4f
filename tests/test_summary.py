"""--report over several models: a models x methods summary per protocol, then the per-model tables;
runs of different protocols are never merged and their tables' titles say which protocol they use."""
import csv

import pytest
from test_papers import DENSE, OURS, _metrics, _record

from harness.cli import main
from harness.io import write_json_atomic

WORSE = {t: v - 0.1 for t, v in OURS.items()}


def _put(folder, rec, name):
    write_json_atomic(folder / f"{name}.json", rec)


def _runs(model, limit=None, tag=""):
    out = [_record("dense", model=model, metrics=_metrics(DENSE), created="1" + tag),
           _record("remove", model=model, ratio=0.2, num_remove=4, metrics=_metrics(WORSE), created="2" + tag),
           _record("streamline", model=model, ratio=0.2, num_remove=4, metrics=_metrics(OURS), created="3" + tag)]
    for rec in out:
        rec["eval"]["limit"] = limit
        if rec["target"]:
            rec["target"]["layers"] = 4
    return out


def test_report_over_models_prints_a_summary_per_protocol(tmp_path, capsys):
    for model in ("facebook/opt-1.3b", "meta-llama/Llama-2-7b-hf"):
        for rec in _runs(model):
            _put(tmp_path / model.split("/")[1], rec, f"{rec['method']}__full")
    for rec in _runs("facebook/opt-1.3b", limit=50, tag="b"):  # the same model at another protocol
        _put(tmp_path / "opt-1.3b-limit", rec, f"{rec['method']}__l50")
    assert main(["--report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    full = "Summary: Per. by model and method [all items, 0-shot, float32; 6 tasks]"
    limited = "Summary: Per. by model and method [--limit 50, 0-shot, float32; 6 tasks]"
    assert full in out and limited in out and out.index(limited) < out.index("Model: opt-1.3b") and "Model: Summary" not in out
    per = {m: 100 * sum(v.values()) / sum(DENSE.values()) for m, v in (("streamline", OURS), ("remove", WORSE))}
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert len(rows) == 3  # two models at the full protocol, one at --limit 50: never one row for both
    by_model = {}
    for r in rows:
        by_model.setdefault(r["Model"], []).append(r)
    assert sorted(by_model) == ["Llama-2-7b-hf", "opt-1.3b"] and len(by_model["opt-1.3b"]) == 2
    for r in rows:
        assert r["Target"] == "n=4"
        assert float(r["streamline"]) == pytest.approx(per["streamline"], abs=1e-3)
        assert float(r["remove"]) == pytest.approx(per["remove"], abs=1e-3)
        assert float(r["Dense Ave."]) == pytest.approx(100 * sum(DENSE.values()) / len(DENSE), abs=1e-3)
    # the per-model tables of one model at two protocols have different titles
    assert "Model: opt-1.3b [all items, 0-shot, float32]" in out and "Model: opt-1.3b [--limit 50, 0-shot, float32]" in out


def test_one_model_gets_no_summary(tmp_path, capsys):
    for rec in _runs("facebook/opt-1.3b"):
        _put(tmp_path / "opt-1.3b", rec, rec["method"])
    assert main(["--report", str(tmp_path)]) == 0
    assert "Summary:" not in capsys.readouterr().out and not (tmp_path / "summary.csv").exists()


def test_seed_list_runs_each_seed_and_shows_mean_and_std(tmp_path, capsys):
    import json
    import statistics

    out = tmp_path / "runs"
    argv = ["--model", "ref-opt-12l", "--methods", "streamline,remove", "--layers", "1", "--limit", "3",
            "--calib-samples", "8", "--seed", "0,1", "-o", "streamline.epochs=1", "-o", "streamline.train_samples=4",
            "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    records = [json.loads(p.read_text()) for p in (out / "ref-opt-12l").glob("*.json")]
    assert sorted((r["method"], r["seed"]) for r in records) == [("dense", 0), ("remove", 0), ("remove", 1),
                                                                ("streamline", 0), ("streamline", 1)]
    assert text.count("dense: evaluating") == 1  # the dense run does not depend on the seed
    assert {r["calibration"]["seed"] for r in records if r["method"] == "streamline"} == {0, 1}
    rows = {r["Method"]: r for r in csv.DictReader((out / "ref-opt-12l" / "table.csv").open())}
    label = next(m for m in rows if m.startswith("streamline"))
    assert label.endswith("(2 seeds)")
    dense = next(r for r in records if r["method"] == "dense")
    tasks = list(dense["metrics"])

    def ave(rec):
        return statistics.fmean(100 * rec["metrics"][t]["acc"] for t in tasks)

    sl = [ave(r) for r in records if r["method"] == "streamline"]
    assert float(rows[label]["Ave."]) == pytest.approx(statistics.fmean(sl), abs=1e-3)
    assert float(rows[label]["Ave. \u00b1"]) == pytest.approx(statistics.stdev(sl), abs=1e-3)
    assert "mean \u00b1 the standard deviation over its seeds" in text
    assert any(line.startswith(label) and "\u00b1" in line for line in text.splitlines())
    # the accuracy plot: one point per method and target, the seeds' mean with their std as the error bar
    from harness.results.plots import accuracy_series

    (series,) = accuracy_series(records)
    (point,) = series["lines"][label.removesuffix(" (2 seeds)")]
    assert point[1] == pytest.approx(statistics.fmean(sl)) and point[4]["ave"] == pytest.approx(statistics.stdev(sl))
    assert series["max_seeds"] == 2


def test_subcommands_are_the_flags(tmp_path, capsys):
    from conftest import one_error_line

    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert main(["--list-methods"]) == 0 and capsys.readouterr().out == listed and "shortgpt" in listed
    for rec in _runs("facebook/opt-1.3b"):
        _put(tmp_path / "opt-1.3b", rec, rec["method"])
    assert main(["report", str(tmp_path)]) == 0
    by_sub = capsys.readouterr().out
    assert main(["--report", str(tmp_path)]) == 0 and capsys.readouterr().out == by_sub
    one_error_line(main(["report", "--html"]), capsys, ["`report` needs a folder"])
    one_error_line(main(["check"]), capsys, ["`check` needs a golden file"])

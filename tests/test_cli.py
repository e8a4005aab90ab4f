"""The command line end to end on a tiny OPT and the real task files, plugins,
the report table and calibration sampling.

``harness.cli.main`` runs in-process; runs use ``--limit`` and a 4 x 32-token calibration set so
the whole file stays around a minute on one thread.
"""
import csv
import json
import uuid
from pathlib import Path

import pytest
import torch
from conftest import CharTokenizer, shared_data_or_skip

from harness.cli import main
from harness.errors import UsageError
from harness.signals.calibration import CalibrationConfig, load_calibration

TASKS = ["piqa", "arc_easy", "boolq"]
LIMIT = 4


def _small(model_dir, data_dir, out_dir, *, tasks=TASKS, limit=LIMIT, layers="1"):
    """Arguments shared by every run here (tiny model, small limits)."""
    return ["--model", str(model_dir), "--data-dir", str(data_dir), "--tasks", ",".join(tasks),
            "--limit", str(limit), "--layers", layers, "--calib-samples", "4", "--calib-seq-len", "32",
            "--output-dir", str(out_dir), "--no-progress"]


def _jsons(directory) -> list[Path]:
    return sorted(Path(directory).rglob("*.json")) if Path(directory).exists() else []


def _layer_params(model_dir) -> tuple[int, int]:
    """(dense parameter count, parameters of one decoder layer) of the saved tiny model."""
    from transformers import AutoModelForCausalLM

    from harness import count_params, get_adapter

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return count_params(model), count_params(get_adapter(model).layers[0])


# --- end to end ----------------------------------------------------------------------------

def test_end_to_end_results_tables_resume_and_report(tiny_opt_dir, tmp_path, capsys, monkeypatch):
    data = shared_data_or_skip()
    out = tmp_path / "runs"
    argv = ["--methods", "streamline,shortgpt,remove", "-o", "streamline.epochs=1", "-o", "streamline.train_samples=4",
            *_small(tiny_opt_dir, data, out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "Traceback" not in captured.err

    # one result JSON per method plus the dense run
    files = _jsons(out)
    by_method = {}
    for f in files:
        rec = json.loads(f.read_text())
        if rec.get("schema") is not None:
            by_method.setdefault(rec["method"], []).append(rec)
    assert sorted(by_method) == ["dense", "remove", "shortgpt", "streamline"]
    assert all(len(v) == 1 for v in by_method.values()), {k: len(v) for k, v in by_method.items()}

    dense_params, layer_params = _layer_params(tiny_opt_dir)
    for method, (rec,) in by_method.items():
        for key in ("method_config", "model", "eval", "seed", "metrics", "timings", "params", "environment",
                    "manifest"):
            assert key in rec, (method, key)
        assert rec["seed"] == 0
        versions = rec["environment"]["versions"]
        assert versions["torch"] == torch.__version__ and versions["lm_eval"] and versions["transformers"]
        assert sorted(rec["metrics"]) == sorted(TASKS)
        for task, row in rec["metrics"].items():
            assert 0.0 <= row["acc"] <= 1.0, (method, task)
            assert "acc_stderr" in row and row["acc_stderr"] is not None and row["acc_stderr"] >= 0
            assert row["n"] == LIMIT
        assert rec["eval"]["limit"] == LIMIT and rec["eval"]["tasks"] == TASKS
        reused = rec.get("reused_evaluation")
        if reused:  # the same network as an earlier run (shortgpt and remove can pick the same layer here)
            assert rec["metrics"] == by_method[reused["method"]][0]["metrics"]
        else:
            assert rec["timings"]["eval"] > 0
        p = rec["params"]
        assert p["dense"] == dense_params
        assert p["ratio"] == pytest.approx((p["dense"] - p["pruned"]) / p["dense"])
    assert by_method["dense"][0]["params"]["ratio"] == 0.0
    for method in ("shortgpt", "remove"):
        rec = by_method[method][0]
        assert len(rec["manifest"]["removed_layers"]) == 1
        assert rec["params"]["dense"] - rec["params"]["pruned"] == layer_params
        assert rec["params"]["pruned_layers"] == 5
        assert rec["timings"]["prune"] > 0
    sl = by_method["streamline"][0]
    assert sl["method_config"]["epochs"] == 1 and sl["label"] == "streamline(epochs=1, train_samples=4)"
    added = sl["manifest"]["replacement"]["params"]
    assert added > 0 and sl["params"]["added"] == added
    assert sl["params"]["dense"] - sl["params"]["pruned"] == layer_params - added
    assert len(sl["manifest"]["training"]["epoch_loss"]) == 1

    # the printed table and the written ones
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("Method"))
    for col in ("Ratio", "PIQA", "ARC-e", "BoolQ", "Ave.", "Per."):
        assert col in header
    for label in ("Dense", "streamline(epochs=1, train_samples=4)", "shortgpt", "remove"):
        assert any(line.startswith(label + " ") for line in lines), label
    model_out = out / tiny_opt_dir.name
    for ext in ("md", "csv", "tex"):
        assert (model_out / f"table.{ext}").is_file(), ext
        assert f"table.{ext}" in text
    rows = list(csv.DictReader((model_out / "table.csv").open()))
    assert [r["Method"] for r in rows] == ["Dense", "streamline(epochs=1, train_samples=4)", "shortgpt", "remove"]
    dense_ave = float(rows[0]["Ave."])
    assert dense_ave == pytest.approx(100 * sum(by_method["dense"][0]["metrics"][t]["acc"] for t in TASKS) / 3,
                                      abs=1e-3)
    assert float(rows[0]["Per."]) == pytest.approx(100.0)
    for r in rows[1:]:
        rec = by_method[r["Method"].split("(")[0]][0]
        assert float(r["Ratio"]) == pytest.approx(100 * rec["params"]["ratio"], abs=1e-3)
        if dense_ave:
            assert float(r["Per."]) == pytest.approx(100 * float(r["Ave."]) / dense_ave, abs=1e-2)
    assert "| Dense" in (model_out / "table.md").read_text()
    assert "\\toprule" in (model_out / "table.tex").read_text()

    # an identical second invocation re-runs nothing
    before = {f: f.read_text() for f in files}
    assert main(argv) == 0
    again = capsys.readouterr().out
    skipped = [line for line in again.splitlines() if "skipping" in line]
    assert sorted(line.split(":")[0] for line in skipped) == ["dense", "remove", "shortgpt", "streamline"]
    assert "pruning" not in again and "evaluating" not in again
    assert {f: f.read_text() for f in _jsons(out) if f in before} == before

    # --report re-renders from the JSON files without running anything
    import harness.runner

    def _no_runs(*_a, **_k):
        raise AssertionError("--report must not run the benchmark")

    monkeypatch.setattr(harness.runner, "run_benchmark", _no_runs)
    written = {ext: (model_out / f"table.{ext}").read_bytes() for ext in ("md", "csv", "tex")}
    for ext in written:
        (model_out / f"table.{ext}").unlink()
    assert main(["--report", str(model_out)]) == 0
    report_out = capsys.readouterr().out
    assert f"table settings from {model_out / 'table_settings.yaml'}" in report_out
    # the run's tables, byte for byte (its method order and table settings are stored beside them)
    assert {ext: (model_out / f"table.{ext}").read_bytes() for ext in written} == written
    def table_lines(out):  # the printed table's header and rows (not the progress lines)
        return [line for line in out.splitlines() if line.startswith(("Method ", "Dense ", "streamline(", "shortgpt ",
                                                                      "remove "))]

    assert len(table_lines(text)) == 5 and table_lines(report_out) == table_lines(text)


def test_a_sweep_run_piece_by_piece_keeps_whole_tables_in_its_folder(tiny_opt_dir, tmp_path, capsys):
    """A run into a folder that holds other runs of the same evaluation writes tables (and the stored
    method order) over all of them, as `report DIR` does; a stored run in the same slot (label, target,
    seed) is replaced by the new one; another evaluation's runs stay out."""
    data = shared_data_or_skip()
    out = tmp_path / "runs"
    model_out = out / tiny_opt_dir.name

    def run(*extra):
        assert main([*_small(tiny_opt_dir, data, out), *extra]) == 0
        return capsys.readouterr().out

    def rows():
        return [r["Method"] for r in csv.DictReader((model_out / "table.csv").open())]

    run("--methods", "remove,shortgpt")
    assert rows() == ["Dense", "remove", "shortgpt"]
    text = run("--methods", "streamline", "-o", "streamline.epochs=1", "-o", "streamline.train_samples=4")
    sl = "streamline(epochs=1, train_samples=4)"
    assert rows() == ["Dense", "remove", "shortgpt", sl]  # the stored order first, the new method after it
    assert "the tables also show 2 run(s) stored earlier" in text and "remove, shortgpt" in text
    assert any(line.startswith("shortgpt ") for line in text.splitlines())  # printed as written
    assert "methods: remove,shortgpt,streamline" in (model_out / "table_settings.yaml").read_text()
    # the same slot with other calibration (a new run key): the new run replaces the stored one in the tables
    again = run("--methods", "remove", "--calib-samples", "8")
    assert "remove: pruning" in again or "remove: removed layers" in again
    assert rows() == ["Dense", "remove", "shortgpt", sl]
    removes = [f for f in _jsons(model_out) if f.name.startswith("remove__")]
    assert len(removes) == 2
    # `report DIR` shows the newest run of a slot as well, and names the one it leaves out
    table = (model_out / "table.csv").read_bytes()
    assert main(["report", str(model_out)]) == 0
    note = [line for line in capsys.readouterr().out.splitlines() if "is left out of the tables" in line]
    assert len(note) == 1 and (model_out / "table.csv").read_bytes() == table
    # another evaluation (another --limit) in the same folder: its own tables only
    assert main([*_small(tiny_opt_dir, data, out, limit=3), "--methods", "remove"]) == 0
    assert "stored earlier" not in capsys.readouterr().out
    assert rows() == ["Dense", "remove"]


# --- bad input: one "error:" line, exit code 2, nothing written ----------------------------------

def _expect_usage_error(argv, out_dir, capsys, *needles):
    rc = main(argv)
    captured = capsys.readouterr()
    err_lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2, (rc, captured.err[-2000:])
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert len(err_lines) == 1 and err_lines[0].startswith("error: "), captured.err
    for needle in needles:
        assert needle in err_lines[0], (needle, err_lines[0])
    assert _jsons(out_dir) == [], "no result may be written for bad input"
    return err_lines[0]


# The table of bad inputs (flags, lists, files, lengths, plugins) lives in tests/test_bad_inputs.py.


# --- plugins ---------------------------------------------------------------------------------

PLUGIN = '''
"""A method defined outside methods/: drops the last n layers (minus an offset)."""
from dataclasses import dataclass

from harness import MethodConfig, MethodContext, PruneResult, UsageError, register_method, remove_layers


@dataclass
class DropLastConfig(MethodConfig):
    offset: int = 0


@register_method("{name}", DropLastConfig, "test plugin: drop the last n layers")
def drop_last(ctx: MethodContext, cfg: DropLastConfig) -> PruneResult:
    n = ctx.num_remove
    end = ctx.num_layers - cfg.offset
    if not n <= end <= ctx.num_layers:
        raise UsageError(f"{name}.offset={{cfg.offset}} does not fit")
    drop = list(range(end - n, end))
    remove_layers(ctx.adapter, drop)
    return PruneResult(model=ctx.model, removed_layers=drop, scores={{"rule": "last", "offset": cfg.offset}})
'''


def _plugin(tmp_path) -> tuple[str, Path]:
    name = f"droplast_{uuid.uuid4().hex[:8]}"  # unique: the registry lives as long as the process
    path = tmp_path / "plugins" / "drop_last.py"
    path.parent.mkdir()
    path.write_text(PLUGIN.format(name=name))
    return name, path


def test_plugin_method_from_a_file_outside_methods(tiny_opt_dir, tmp_path, capsys):
    data = shared_data_or_skip()
    name, path = _plugin(tmp_path)
    assert main(["--list-methods"]) == 0
    assert name not in capsys.readouterr().out
    assert main(["--plugins", str(path), "--list-methods"]) == 0
    listed = capsys.readouterr().out
    assert any(line.split()[0] == name and "test plugin: drop the last n layers" in line
               for line in listed.splitlines() if line.strip())
    assert any(line.split()[0] == "streamline" for line in listed.splitlines() if line.strip())

    out = tmp_path / "runs"
    argv = ["--plugins", str(path), "--methods", name, "-o", f"{name}.offset=1",
            *_small(tiny_opt_dir, data, out, tasks=["piqa"], limit=2, layers="2")]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert any(line.startswith(f"{name}(offset=1) ") for line in text.splitlines())
    recs = [json.loads(f.read_text()) for f in _jsons(out) if f.name.startswith(name)]
    assert len(recs) == 1
    rec = recs[0]
    assert rec["method"] == name and rec["method_config"] == {"offset": 1}
    assert rec["manifest"]["removed_layers"] == [3, 4]
    assert rec["manifest"]["scores"] == {"rule": "last", "offset": 1}
    dense_params, layer_params = _layer_params(tiny_opt_dir)
    assert rec["params"]["pruned"] == dense_params - 2 * layer_params
    assert rec["params"]["pruned_layers"] == 4
    assert rec["metrics"]["piqa"]["n"] == 2

    # its options are validated like a built-in method's
    _expect_usage_error(["--plugins", str(path), "--methods", name, "-o", f"{name}.bogus=1",
                         *_small(tiny_opt_dir, data, tmp_path / "bad", tasks=["piqa"], limit=2)],
                        tmp_path / "bad", capsys, "bogus")


# --- the report table ------------------------------------------------------------------------

def _record(method, label, ratio, accs, created="2026-01-01T00:00:00"):
    return {"schema": 1, "method": method, "label": label,
            "model": {"name": "m", "dtype": "float32"}, "eval": {"tasks": list(accs), "limit": None},
            "environment": {"created": created}, "params": {"ratio": ratio},
            "metrics": {t: {"acc": a, "acc_norm": None if a is None else a + 0.1} for t, a in accs.items()}}


def test_report_per_is_ratio_of_averages_and_ratio_column():
    from harness.results import report

    runs = [
        _record("shortgpt", "shortgpt", 0.25, {"piqa": 0.60, "boolq": 0.50}),
        _record("dense", "Dense", 0.0, {"piqa": 0.80, "boolq": 0.60}),
        _record("remove", "remove", 0.125, {"piqa": 0.70, "boolq": None}),
    ]
    ((title, df, notes),) = report.build_tables(runs, "acc", method_order=["shortgpt", "remove"])
    assert title == "m"
    assert list(df["Method"]) == ["Dense", "shortgpt", "remove"]
    rows = {r["Method"]: r for r in df.to_dict("records")}
    assert rows["Dense"]["Ave."] == pytest.approx(70.0)
    assert rows["Dense"]["Per."] == pytest.approx(100.0)
    assert rows["shortgpt"]["Ave."] == pytest.approx(55.0)
    assert rows["shortgpt"]["Per."] == pytest.approx(55.0 / 70.0 * 100)
    assert rows["shortgpt"]["Ratio"] == pytest.approx(25.0)
    assert rows["remove"]["Ratio"] == pytest.approx(12.5)
    assert rows["shortgpt"]["PIQA"] == pytest.approx(60.0) and rows["shortgpt"]["BoolQ"] == pytest.approx(50.0)
    assert rows["remove"]["Ave."] is None or rows["remove"]["Ave."] != rows["remove"]["Ave."]  # missing -> no Ave.
    assert any("Per. = Ave. / dense Ave." in n for n in notes)

    # acc_norm where asked, per task
    ((_t, df2, notes2),) = report.build_tables(runs, "acc,piqa=acc_norm")
    rows2 = {r["Method"]: r for r in df2.to_dict("records")}
    assert rows2["Dense"]["PIQA"] == pytest.approx(90.0) and rows2["Dense"]["BoolQ"] == pytest.approx(60.0)
    assert rows2["shortgpt"]["Per."] == pytest.approx((70.0 + 50.0) / (90.0 + 60.0) * 100)
    assert "PIQA=acc_norm" in notes2[0]

    text = report.render_text(report.build_tables(runs, "acc", method_order=["shortgpt", "remove"]))
    assert "78.6" in text and "25.0" in text and "100.0" in text  # one decimal everywhere, 25.0 not 25

    # runs evaluated differently (another limit) are not compared in one table
    other = _record("dense", "Dense", 0.0, {"piqa": 0.5, "boolq": 0.5})
    other["eval"]["limit"] = 10
    assert len(report.build_tables(runs + [other], "acc")) == 2
    with pytest.raises(UsageError):  # a metric no task reports (checked before a run and by --report)
        report.check_metric_spec("f1", report.run_column_metrics(runs))


# --- calibration -----------------------------------------------------------------------------


def _calib_file(tmp_path) -> Path:
    g = torch.Generator().manual_seed(123)
    words = ["".join(chr(97 + int(i)) for i in torch.randint(0, 26, (int(k),), generator=g))
             for k in torch.randint(2, 9, (800,), generator=g)]
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(words))
    return path


def test_calibration_seed_decides_the_blocks(tmp_path):
    src = str(_calib_file(tmp_path))
    tok = CharTokenizer(bos_token_id=2)
    cfg = CalibrationConfig(source=src, num_samples=6, seq_len=17, seed=0)
    a = load_calibration(cfg, tok)
    b = load_calibration(CalibrationConfig(source=src, num_samples=6, seq_len=17, seed=0), tok)
    c = load_calibration(CalibrationConfig(source=src, num_samples=6, seq_len=17, seed=1), tok)
    assert a.input_ids.shape == (6, 17) and a.attention_mask.shape == (6, 17)
    assert bool((a.input_ids[:, 0] == tok.bos_token_id).all())
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert a.description["text_sha256"] == c.description["text_sha256"]
    assert a.description["seed"] == 0 and c.description["seed"] == 1
    # a training draw (seed offset) differs from the scoring draw
    t = load_calibration(cfg, tok, seed_offset=1)
    assert not torch.equal(a.input_ids, t.input_ids)
    # every block is a contiguous slice of the tokenised text
    ids = tok(Path(src).read_text())["input_ids"]
    stream = ",".join(map(str, ids))
    for row in a.input_ids[:, 1:].tolist():
        assert ",".join(map(str, row)) in stream


@pytest.mark.parametrize("content", ["", "\n \n\t\n"])
def test_empty_calibration_source_is_a_usage_error(tmp_path, content):
    empty = tmp_path / "empty.txt"
    empty.write_text(content)
    with pytest.raises(UsageError, match="empty"):
        load_calibration(CalibrationConfig(source=str(empty), num_samples=2, seq_len=8), CharTokenizer(bos_token_id=2))
    jsonl = tmp_path / "empty.jsonl"
    jsonl.write_text("")
    with pytest.raises(UsageError, match="empty"):
        load_calibration(CalibrationConfig(source=str(jsonl), num_samples=2, seq_len=8), CharTokenizer(bos_token_id=2))


@pytest.mark.parametrize("content, needle", [("{", "is not valid YAML"), ("- a", "is not a YAML mapping"), ('{"table_preset": 3}', "'table_preset' must be str"),
                                             ('{"label": ["a=b", 1]}', "'label' must be list of strings"),
                                             ('{"stderr": "yes"}', "'stderr' must be bool")])
def test_a_damaged_table_settings_file_is_one_error_line(tmp_path, capsys, content, needle):
    from conftest import one_error_line

    (tmp_path / "table_settings.yaml").write_text(content)
    one_error_line(main(["--report", str(tmp_path)]), capsys, [str(tmp_path / "table_settings.yaml"), needle])

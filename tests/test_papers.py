"""Paper tables: ``--report DIR --paper FILE`` prints the paper's rows beside ours with the deltas,
the paper files load and validate, and every configs/*.yaml runs offline on a reference model.

The comparison tests write result records with the real record helpers (``new_record``,
``model_info``, ``write_json_atomic``) under the model name of a paper row (facebook/opt-1.3b):
the numbers in them are chosen by the test, so the expected deltas are known exactly. A real run
of OPT-1.3B is hours on this machine; the config smoke tests below run the real pipeline end to
end on the reference model instead (no paper rows for it).
"""
import math
import re
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, shared_data_or_skip

from harness.cli import main
from harness.errors import UsageError
from harness.io import write_json_atomic
from harness.results.paper import DAGGER, DELTA, MISMATCH, load_paper, match_rows, paper_metric
from harness.results.record import model_info, new_record

PAPER_DIR = REPO / "results" / "paper"
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
TABLE3 = PAPER_DIR / "streamline_table3.yaml"
TABLE3_TASKS = ["piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge", "openbookqa"]


def _record(method, *, model="facebook/opt-1.3b", ratio=0.0, num_remove=0, metrics, label=None, created="1",
            num_layers=None):
    if num_layers is None:  # the real depth: OPT-1.3B 24 layers, Llama-2-7B 32
        num_layers = 32 if "llama-2-7b" in model.lower() else 24
    return new_record(
        method=method, label=label or ("Dense" if method == "dense" else method), method_config={},
        model=model_info(name=model, cls="OPTForCausalLM", model_type="opt", num_layers=num_layers, hidden_size=2048,
                         params=1_300_000_000, dtype="float32", device="cpu"),
        eval={"tasks": sorted(metrics), "limit": None, "num_fewshot": 0},
        target=None if method == "dense" else {"ratio": ratio, "layers": None, "num_remove": num_remove},
        params={"ratio": ratio}, metrics=metrics, seed=0, manifest={}, timings={},
        environment={"created": created})


def _metrics(values: dict) -> dict:
    """{task: fraction} -> lm-eval style rows (acc and acc_norm; acc_norm = acc + 0.01)."""
    return {t: {"acc": v, "acc_norm": v + 0.01, "n": 100} for t, v in values.items()}


def _write(folder: Path, records) -> None:
    for i, rec in enumerate(records):
        write_json_atomic(folder / "opt-1.3b" / f"{rec['method']}__{i}.json", rec)


def _table_lines(text: str, title_part: str) -> list[str]:
    """Title, header, rule and the table's rows (the notes under it start with 'Paper:')."""
    start = text.index(title_part)
    lines = text[start:].splitlines()
    return lines[:next(i for i, line in enumerate(lines) if line.startswith("Paper: "))]


def _cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


DENSE = {"piqa": 0.70, "winogrande": 0.60, "hellaswag": 0.50, "arc_easy": 0.55, "arc_challenge": 0.30,
         "openbookqa": 0.25}
OURS = {"piqa": 0.65, "winogrande": 0.57, "hellaswag": 0.40, "arc_easy": 0.52, "arc_challenge": 0.25,
        "openbookqa": 0.20}


def test_report_with_paper_prints_paper_rows_and_deltas(tmp_path, capsys):
    # dense + streamline at a measured 25.6% (the paper's 25.8% block), plus shortgpt (not in Table 3)
    _write(tmp_path, [
        _record("dense", metrics=_metrics(DENSE)),
        _record("streamline", ratio=0.256, num_remove=7, metrics=_metrics(OURS), label="streamline"),
        _record("shortgpt", ratio=0.27, num_remove=7, metrics=_metrics(OURS)),
    ])
    metric = "acc_norm,winogrande=acc,openbookqa=acc"
    assert main(["--report", str(tmp_path), "--paper", str(TABLE3), "--table-metric", metric,
                 "--label", "streamline=Ours"]) == 0
    out = capsys.readouterr().out
    lines = _table_lines(out, "opt-1.3b vs LLM-Streamline v1, Table 3")
    header = _cells(lines[1])
    assert header[:3] == ["Method", "Source", "Ratio"]
    cols = ["PIQA", "WinoGrande", "HellaSwag", "ARC-easy", "ARC-challenge", "OpenBookQA"]
    assert header[3:9] == [c + DAGGER for c in cols]  # every Table 3 column: protocol_differs
    rows = [_cells(line) for line in lines[3:]]
    by = {(r[0], r[1]): r for r in rows}

    paper = {r.label + f"{r.ratio}": r for r in load_paper(str(TABLE3)).rows if "opt-1.3b" in r.model}
    paper_dense, paper_ours = paper["Dense0.0"], paper["Ours0.258"]
    norm = {"piqa", "hellaswag", "arc_easy", "arc_challenge"}  # acc_norm columns = acc + 0.01

    def ours(values, task):
        return 100 * (values[task] + (0.01 if task in norm else 0.0))

    # our rows, the paper's rows (as typed) and the deltas, per column
    for task, col in zip(TABLE3_TASKS, cols):
        i = 3 + cols.index(col)
        assert float(by[("Dense", "ours")][i]) == pytest.approx(ours(DENSE, task), abs=0.05)
        assert float(by[("Dense", "paper")][i]) == paper_dense.values[col]
        assert float(by[(f"{DELTA} vs Dense", DELTA)][i]) == pytest.approx(
            ours(DENSE, task) - paper_dense.values[col], abs=0.051)
        assert float(by[("Ours", "paper")][i]) == paper_ours.values[col]
        assert float(by[(f"{DELTA} vs Ours", DELTA)][i]) == pytest.approx(
            ours(OURS, task) - paper_ours.values[col], abs=0.051)
    # e.g. PIQA: ours 66.0 (acc_norm 0.66) vs the paper's 66.4 -> -0.4
    assert by[(f"{DELTA} vs Ours", DELTA)][3] == "-0.4"
    # Ratio delta: 25.6 - 25.8; Ave./Per. of the paper row as printed (all columns compared)
    assert by[(f"{DELTA} vs Ours", DELTA)][2] == "-0.2"
    ave, per = header.index("Ave."), header.index("Per.")
    assert float(by[("Ours", "paper")][ave]) == paper_ours.avg == 42.3
    assert float(by[("Ours", "paper")][per]) == paper_ours.retained == 87.8
    our_avg = sum(ours(OURS, t) for t in TABLE3_TASKS) / 6
    our_per = 100 * our_avg / (sum(ours(DENSE, t) for t in TABLE3_TASKS) / 6)
    assert float(by[(f"{DELTA} vs Ours", DELTA)][ave]) == pytest.approx(our_avg - 42.3, abs=0.051)
    assert float(by[(f"{DELTA} vs Ours", DELTA)][per]) == pytest.approx(our_per - 87.8, abs=0.051)
    # SliceGPT (method: null) of the same block: a paper-only row without a delta; other blocks are not shown
    assert ("SliceGPT (not in the harness)", "paper") in by
    assert float(by[("SliceGPT (not in the harness)", "paper")][2]) == 25.8
    assert sum(1 for r in rows if r[0].startswith("SliceGPT")) == 1
    assert not any(r[0] == f"{DELTA} vs SliceGPT" for r in rows)
    # shortgpt has no Table 3 row: ours only
    assert ("shortgpt", "ours") in by and not any("vs ShortGPT" in r[0] for r in rows)
    # the dagger and the other blocks are explained under the table
    assert f"{DAGGER} the paper measured this column with a different protocol" in out
    assert "more paper row(s) for opt-1.3b at other targets" in out and "Ours 18.1%" in out
    assert (tmp_path / "vs_paper.md").is_file() and (tmp_path / "vs_paper.csv").is_file()


def test_paper_comparison_uses_the_papers_metric_and_marks_an_explicit_other(tmp_path, capsys):
    """Without --table-metric each column is compared in the paper file's metric (Table 3: acc_norm
    for PIQA/HellaSwag/ARC, acc for the rest); an explicit other metric is kept but marked."""
    _write(tmp_path, [_record("dense", metrics=_metrics(DENSE)),
                      _record("streamline", ratio=0.256, num_remove=7, metrics=_metrics(OURS))])
    paper = load_paper(str(TABLE3))
    metric = {c.task: paper_metric(c, "facebook/opt-1.3b") for c in paper.columns.values() if c.task}
    assert {metric[t] for t in ("piqa", "hellaswag", "arc_easy")} == {"acc_norm"} and metric["winogrande"] == "acc"
    cols = ["PIQA", "WinoGrande", "HellaSwag", "ARC-easy", "ARC-challenge", "OpenBookQA"]

    def dense_row(argv):
        assert main(["--report", str(tmp_path), "--paper", str(TABLE3), *argv]) == 0
        out = capsys.readouterr().out
        lines = _table_lines(out, "opt-1.3b vs LLM-Streamline v1, Table 3")
        header = _cells(lines[1])
        dense = next(_cells(line) for line in lines[3:] if _cells(line)[:2] == ["Dense", "ours"])
        return out, header, dense

    out, header, dense = dense_row([])
    assert header[3:9] == [c + DAGGER for c in cols] and MISMATCH not in out
    for task, col in zip(TABLE3_TASKS, cols):
        bump = 0.01 if metric[task] == "acc_norm" else 0.0
        assert float(dense[3 + cols.index(col)]) == pytest.approx(100 * (DENSE[task] + bump), abs=0.05)

    out, header, dense = dense_row(["--table-metric", "acc"])
    assert header[3:9] == [c + DAGGER + (MISMATCH if metric[t] != "acc" else "") for t, c in zip(TABLE3_TASKS, cols)]
    assert float(dense[3]) == pytest.approx(100 * DENSE["piqa"], abs=0.05)  # acc, as asked
    assert f"{MISMATCH} not the paper's metric" in out and "PIQA (ours acc, paper acc_norm)" in out


def test_paper_rows_match_by_nearest_ratio_or_exact_layers():
    rows = load_paper(str(TABLE3)).rows
    run = _record("streamline", ratio=0.19, num_remove=5, metrics={})
    assert [(r.label, r.ratio) for r in match_rows(run, rows)] == [("Ours", 0.181)]
    run = _record("streamline", ratio=0.30, num_remove=8, metrics={})  # between blocks: no row within 2 points
    assert match_rows(run, rows) == []
    run = _record("streamline", model="/models/OPT-2.7B", ratio=0.35, num_remove=11, metrics={}, num_layers=32)
    assert [(r.label, r.ratio) for r in match_rows(run, rows)] == [("Ours", 0.346)]  # name as the table shows it
    # the same parameter ratio reached by removing most of the layers (embeddings dominate): not compared
    run = _record("streamline", model="/models/OPT-2.7B", ratio=0.35, num_remove=20, metrics={}, num_layers=32)
    assert match_rows(run, rows) == []
    # Table 1 prints two shortgpt rows at 27.1% (cited and reproduced): both match
    t1 = load_paper(str(PAPER_DIR / "streamline_table1.yaml")).rows
    run = _record("shortgpt", model="meta-llama/Llama-2-7b-hf", ratio=0.27, num_remove=9, metrics={})
    assert sorted(r.label for r in match_rows(run, t1)) == ["ShortGPT", "ShortGPT*"]
    # Table 4 rows differ only in train_samples: the run's method_config picks one
    t4 = load_paper(str(PAPER_DIR / "streamline_table4.yaml")).rows
    run = _record("streamline", model="meta-llama/Llama-2-7b-hf", ratio=0.26, num_remove=9, metrics={})
    run["method_config"] = {"train_samples": 10000, "epochs": 5}
    assert [r.label for r in match_rows(run, t4)] == ["10000 samples"]


def test_columns_without_lmeval_task_are_listed_and_averages_cover_compared_columns(tmp_path, capsys):
    t1 = {"hellaswag": 0.55, "piqa": 0.75, "boolq": 0.70}
    _write(tmp_path, [
        _record("dense", model="meta-llama/Llama-2-7b-hf", metrics=_metrics(t1)),
        _record("shortgpt", model="meta-llama/Llama-2-7b-hf", ratio=0.27, num_remove=9,
                metrics=_metrics({k: v - 0.1 for k, v in t1.items()})),
    ])
    assert main(["--report", str(tmp_path), "--paper", "results/paper/streamline_table1.yaml",
                 "--table-metric", "acc,hellaswag=acc_norm"]) == 0
    out = capsys.readouterr().out
    assert "Not compared: CMNLI (no lm-eval task)" in out and "WSC (wsc not in this run)" in out
    assert "Ave./Per. over the 3 compared columns only" in out
    lines = _table_lines(out, "Llama-2-7b-hf vs LLM-Streamline v1, Table 1")
    header = _cells(lines[1])
    rows = {(r[0], r[1]): r for r in map(_cells, lines[3:])}
    ave = header.index("Ave.")
    # the paper's Ave. recomputed over HeSw, PIQA, BoolQ: dense (71.3 + 78.1 + 70.8) / 3
    assert float(rows[("Dense", "paper")][ave]) == pytest.approx((71.3 + 78.1 + 70.8) / 3, abs=0.05)
    # both ShortGPT rows with their deltas, and the 27% rows of unimplemented/un-run methods as paper-only
    assert ("ShortGPT", "paper") in rows and ("ShortGPT*", "paper") in rows
    assert (f"{DELTA} vs ShortGPT", DELTA) in rows and (f"{DELTA} vs ShortGPT*", DELTA) in rows
    assert ("LLMPruner (not in the harness)", "paper") in rows and ("LaCo", "paper") in rows
    # PIQA delta vs ShortGPT*: ours 65.0 (acc) - 66.9
    piqa = header.index("PIQA" + DAGGER)
    assert rows[(f"{DELTA} vs ShortGPT*", DELTA)][piqa] == "-1.9"


def test_model_without_paper_rows_says_so(tmp_path, capsys):
    rec = _record("dense", model="/x/ref-opt-12l", metrics=_metrics(DENSE))
    write_json_atomic(tmp_path / "ref" / "dense.json", rec)
    assert main(["--report", str(tmp_path), "--paper", str(TABLE3)]) == 0
    out = capsys.readouterr().out
    assert "No row of LLM-Streamline v1, Table 3" in out and "is for model ref-opt-12l" in out
    assert "opt-1.3b, opt-2.7b" in out


def test_claims_only_paper_prints_claims_beside_ours(tmp_path, capsys):
    _write(tmp_path, [_record("dense", metrics=_metrics(DENSE)),
                      _record("shortgpt", ratio=0.25, num_remove=6, metrics=_metrics(OURS))])
    assert main(["--report", str(tmp_path), "--paper", "results/paper/shortgpt_main.yaml"]) == 0
    out = capsys.readouterr().out
    assert "maintain 95% of model performance" in out and "retained 95" in out
    per = 100 * sum(OURS.values()) / sum(DENSE.values())
    assert f"ours: shortgpt on opt-1.3b, ratio 25.0%, Per. {per:.1f} over 6 tasks" in out


@pytest.mark.parametrize("path", sorted(PAPER_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_paper_file_loads(path):
    table = load_paper(str(path))
    for row in table.rows:
        assert all(v is None or math.isfinite(v) for v in row.values.values())


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("rows"), "rows: missing or not a list"),
    (lambda d: d.update(colums={}), "unknown key(s) colums"),
    (lambda d: d["rows"][1].update(ratio=18.1), "rows[1] (SliceGPT): ratio must be a fraction in [0, 1), got 18.1"),
    (lambda d: d["rows"][0]["values"].update(PIQ=1.0), "values names column 'PIQ'"),
    (lambda d: d["rows"][0]["values"].update(PIQA="72.4"), "values.PIQA must be a finite number"),
    (lambda d: d["rows"][0].pop("method"), "method is missing"),
    (lambda d: d["rows"][0].pop("ratio"), "give ratio"),
    (lambda d: d["columns"]["PIQA"].update(protocol_differs="yes"), "protocol_differs must be true or false"),
])
def test_bad_paper_file_is_one_usage_error(tmp_path, edit, message):
    data = yaml.safe_load(TABLE3.read_text())
    edit(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(UsageError) as exc:
        load_paper(str(bad))
    assert message in str(exc.value) and str(bad) in str(exc.value)


def test_missing_or_invalid_paper_file_exits_2_before_anything_runs(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    assert main(["--report", str(tmp_path / "r"), "--paper", str(tmp_path / "nope.yaml")]) == 2
    assert "--paper file" in capsys.readouterr().err
    (tmp_path / "x.yaml").write_text("rows: [\n")
    assert main(["--report", str(tmp_path / "r"), "--paper", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: paper file") and "Traceback" not in err
    # a config's paper: key fails the same way, before the model is loaded or anything is written
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: ref-opt-12l\nmethods: [remove]\npaper: {tmp_path / 'x.yaml'}\n")
    assert main(["--config", str(cfg), "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("error: paper file")
    assert not (tmp_path / "out").exists()


# --- every config runs offline on a reference model (issue 13: `--model ref-opt-12l --limit 20`) ---------

SMOKE_LIMIT = 2  # items per task: enough to run every stage (prune, train, evaluate, tables, paper comparison)
SHRINK = {"train_samples": 16, "epochs": 1, "post_train_steps": 2, "steps": 2}  # training options made tiny
# The whole set takes ~2.5 min here (2 shared cores), so the default run keeps one config per paper
# (LLM-Streamline Tables 1 and 3, ShortGPT, LaCo; ~45 s) and the others are marked slow: the Table 5/6
# configs (seven variants, each trained and post-trained) and the second model of each paper.
FAST_CONFIGS = {"streamline_table3_opt-1.3b.yaml", "streamline_table1_llama-2-7b.yaml",
                "shortgpt_main_llama-2-7b.yaml", "laco_main_llama-2-7b.yaml"}


def _smoke_args(config: Path, data: Path) -> list[str]:
    """The config's own arguments made small: -o overrides for every training length it sets, and
    --tasks when it lists tasks that only the Hub has (wsc, commonsense_qa, race, cmmlu are not
    under shared/data; an offline run must leave them out)."""
    spec = yaml.safe_load(config.read_text())
    args = ["--config", str(config), "--model", "ref-opt-12l", "--limit", str(SMOKE_LIMIT), "--data-dir", str(data)]
    for target, opts in (spec.get("method_opt") or {}).items():
        for key, small in SHRINK.items():
            if isinstance(opts, dict) and key in opts:
                args += ["-o", f"{target}.{key}={small}"]
    tasks = spec.get("tasks")
    if tasks:
        local = [t for t in tasks if (data / t).is_dir() and t != "mmlu"]  # mmlu: 57 subtasks, see below
        assert local, f"{config.name}: no task of the config is under {data}"
        if local != tasks:
            args += ["--tasks", ",".join(local)]
    return args


MMLU_ONLY_SKIP = ("the MMLU-only companion of real_gemma-3-270m.yaml (same methods and targets, smoke-tested "
                  "there; the 5-shot mmlu path is the shortgpt_main-mmlu case)")


@pytest.mark.parametrize("config, mmlu", [(c, False) if c.name in FAST_CONFIGS else
                                          pytest.param(c, False, marks=pytest.mark.skip(reason=MMLU_ONLY_SKIP))
                                          if c.name.endswith("_mmlu.yaml") else
                                          pytest.param(c, False, marks=pytest.mark.slow) for c in CONFIGS]
                         + [pytest.param(REPO / "configs" / "shortgpt_main_llama-2-7b.yaml", True,
                                         marks=pytest.mark.slow, id="shortgpt_main_llama-2-7b.yaml-mmlu")],
                         ids=lambda c: c.name if isinstance(c, Path) else None)
def test_config_runs_offline_on_reference_model(config, mmlu, tmp_path, capsys):
    """mmlu (the Table 1 / ShortGPT / LaCo configs' 5-shot group of 57 subtasks) adds ~40 s, so one
    slow case runs it (with hellaswag, which the config's table_metric names)."""
    data = shared_data_or_skip()
    start = time.perf_counter()
    argv = _smoke_args(config, data) + ["--output-dir", str(tmp_path), "--no-progress"]
    if mmlu:
        argv += ["--tasks", "hellaswag,mmlu"]
    assert main(argv) == 0, argv
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    out = captured.out
    spec = yaml.safe_load(config.read_text())
    labels = spec.get("labels") or {}
    for method in spec["methods"]:  # every method has a row: the config's label, else name(options)
        assert re.search(rf"^{re.escape(labels.get(method, method))}(\(|\s|$)", out, re.MULTILINE), (method, out)
    if spec.get("paper"):  # the comparison ran; the reference model has no paper rows
        table = load_paper(spec["paper"])
        assert (f"No row of {table.title}" in out) if table.rows else ("Claims of" in out)
    print(f"{config.name}: {time.perf_counter() - start:.1f}s")

"""Evaluation at the papers' protocol (issue 10): the CLI's numbers equal raw lm-eval's.

Each equality test runs ``run_benchmarks.py`` in-process on the smallest reference model
(ref-opt-12l) with ``--limit 2`` and compares the JSON value and the printed table cell with
``lm_eval.simple_evaluate`` on the same in-memory model, task, limit and shots, where the raw
side builds its tasks with lm-eval's public API only (a TaskManager over lm-eval's own task
folder plus a folder of override YAMLs that change nothing but the data location).
"""
import csv
import json
from pathlib import Path

import pytest
import yaml
from conftest import arc_include_task, no_model_loading, one_error_line, shared_data_or_skip

from harness import reference as R
from harness.cli import main

MODEL = R.NAMES["small"]


def _model_dir() -> Path:
    d = R.MODELS_DIR / MODEL
    if not (d / "model.safetensors").is_file():
        pytest.skip(f"reference model {MODEL} not trained; run python -m harness.reference.train")
    return d


def _tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _raw(model, tok, tasks, folders, num_fewshot, limit=2):
    """Raw lm-eval: a TaskManager over ``folders`` (later ones override), simple_evaluate."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_defaults=False, include_path=[str(f) for f in folders])
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8, device="cpu")
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                                   log_samples=False)


def _load(model_dir, drop_layers=()):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers = model.model.decoder.layers
    keep = [layer for i, layer in enumerate(layers) if i not in set(drop_layers)]
    for i, layer in enumerate(keep):  # attention's cache index follows the new positions
        layer.self_attn.layer_idx = i
    model.model.decoder.layers = torch.nn.ModuleList(keep)
    model.config.num_hidden_layers = len(keep)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _records(out: Path) -> dict:
    recs = {}
    for f in sorted((out / MODEL).glob("*.json")):
        rec = json.loads(f.read_text())
        recs[rec["method"]] = rec
    return recs


def _table(out: Path) -> list[dict]:
    return list(csv.DictReader((out / MODEL / "table.csv").open()))


def _override(folder: Path, stock: Path, task: str, files: dict, **splits) -> None:
    spec = {"include": str(stock), "task": task, "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}}, **splits}
    (folder / f"{task}.yaml").write_text(yaml.safe_dump(spec))


def test_mmlu_5shot_equals_raw_lm_eval(tmp_path, capsys):
    """The issue's command: one MMLU column = lm-eval's own mmlu group score (dense and pruned)."""
    data = shared_data_or_skip()
    model_dir = _model_dir()
    out = tmp_path / "runs"
    argv = ["--model", MODEL, "--methods", "shortgpt", "--layers", "3", "--tasks", "mmlu", "--num-fewshot", "5",
            "--data-dir", str(data), "--limit", "2", "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("Method"))
    assert header.split()[:3] == ["Method", "Ratio", "MMLU"]  # one column for the whole group
    recs = _records(out)
    assert set(recs) == {"dense", "shortgpt"}
    dense, pruned = recs["dense"], recs["shortgpt"]
    assert list(dense["metrics"]) == ["mmlu"] and dense["eval"]["num_fewshot"] == 5
    subtasks = dense["eval_details"]["subtasks"]
    assert sum(1 for name in subtasks if name.startswith("mmlu_") and name not in
               ("mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities")) == 57
    assert all(row["n"] == 2 for name, row in subtasks.items() if name == "mmlu_anatomy")

    # raw lm-eval: its mmlu folder, each subject pointed at the same local files (SOURCES.md recipe)
    over = tmp_path / "over"
    over.mkdir()
    stock_dir = _tasks_dir() / "mmlu" / "default"
    for stock in sorted(stock_dir.glob("mmlu_*.yaml")):
        subject = stock.stem[len("mmlu_"):]
        test = next((data / "mmlu" / "test").glob(subject + ".jsonl*"))
        _override(over, stock, stock.stem, {"test": test, "dev": data / "mmlu" / "dev" / f"{subject}.jsonl"})
    removed = pruned["manifest"]["removed_layers"]
    assert len(removed) == 3
    table = {row["Method"]: row for row in _table(out)}
    for rec, drop in ((dense, ()), (pruned, removed)):
        model, tok = _load(model_dir, drop)
        raw = _raw(model, tok, ["mmlu"], [stock_dir, over], num_fewshot=5)
        want = raw["groups"]["mmlu"]["acc,none"]
        assert rec["metrics"]["mmlu"]["acc"] == want
        assert rec["metrics"]["mmlu"]["n"] == raw["groups"]["mmlu"]["sample_len"] == 114
        assert rec["metrics"]["mmlu"]["acc_stderr"] == pytest.approx(raw["groups"]["mmlu"]["acc_stderr,none"])
        row = table[rec["label"]]
        assert float(row["MMLU"]) == pytest.approx(100 * want, abs=1e-4)
        assert f"{100 * want:.1f}" in printed
    # lm-eval's own results file beside each run, readable as lm-eval output
    for rec in (dense, pruned):
        files = list(_path_of(out, rec).with_suffix(".lm_eval").glob("results_*.json"))
        assert len(files) == 1
        lm = json.loads(files[0].read_text())
        for key in ("results", "groups", "configs", "versions", "n-shot", "config"):
            assert key in lm, key
        assert lm["groups"]["mmlu"]["acc,none"] == rec["metrics"]["mmlu"]["acc"]
        assert lm["n-shot"]["mmlu_anatomy"] == 5 and lm["config"]["model_name_or_path"] == MODEL
        assert "/" not in lm["config"]["model_name_or_path"]


def _path_of(out: Path, rec: dict) -> Path:
    for f in (out / MODEL).glob(f"{rec['method']}__*.json"):
        return f
    raise AssertionError(rec["method"])


def test_arc_easy_5shot_and_include_path_task_equal_raw_lm_eval(tmp_path, capsys):
    """Per-task shots (arc_easy 5, the rest 0) and a task from --include-path, in one run."""
    data = shared_data_or_skip()
    model_dir = _model_dir()
    inc = arc_include_task(tmp_path / "my_tasks", data)
    out = tmp_path / "runs"
    argv = ["--model", MODEL, "--methods", "remove", "--layers", "3", "--tasks", "arc_easy,my_arc",
            "--num-fewshot", "arc_easy=5,default=0", "--include-path", str(inc), "--data-dir", str(data),
            "--limit", "2", "--output-dir", str(out), "--no-progress", "--log-samples", "--stderr",
            "--label", "remove=Remove (n=3)"]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    printed = capsys.readouterr().out
    recs = _records(out)
    dense = recs["dense"]
    assert list(dense["metrics"]) == ["arc_easy", "my_arc"]
    assert dense["eval_details"]["n_shot"] == {"arc_easy": 5, "my_arc": 0}
    assert "Remove (n=3)" in printed and "±" in printed

    over = tmp_path / "over"
    over.mkdir()
    _override(over, _tasks_dir() / "arc" / "arc_easy.yaml", "arc_easy", {"test": data / "arc_easy" / "test.jsonl"},
              training_split=None, validation_split=None)
    model, tok = _load(model_dir)
    raw_arc = _raw(model, tok, ["arc_easy"], [_tasks_dir() / "arc", over], num_fewshot=5)["results"]["arc_easy"]
    raw_mine = _raw(model, tok, ["my_arc"], [inc], num_fewshot=None)["results"]["my_arc"]
    assert dense["metrics"]["arc_easy"]["acc"] == raw_arc["acc,none"]
    assert dense["metrics"]["arc_easy"]["acc_norm"] == raw_arc["acc_norm,none"]
    assert dense["metrics"]["my_arc"]["acc"] == raw_mine["acc,none"]
    row = _table(out)[0]
    assert row["Method"] == "Dense" and float(row["ARC-e"]) == pytest.approx(100 * raw_arc["acc,none"], abs=1e-4)
    assert float(row["my_arc"]) == pytest.approx(100 * raw_mine["acc,none"], abs=1e-4)
    # --log-samples: lm-eval's per-sample JSONL per task beside the run
    folder = _path_of(out, dense).with_suffix(".lm_eval")
    for task in ("arc_easy", "my_arc"):
        (f,) = folder.glob(f"samples_{task}_*.jsonl")
        lines = [json.loads(x) for x in f.read_text().splitlines()]
        assert [x["doc_id"] for x in lines] == [0, 1] and "resps" in lines[0]


# --- bad input: exit 2, one error line, no result file, no model loaded ------------------------

BAD = {
    "unknown task, close match": (["--tasks", "arc_eazy"], ["unknown task 'arc_eazy'", "arc_easy"]),
    "group and its member": (["--tasks", "mmlu,mmlu_anatomy"], ["mmlu_anatomy", "both"]),
    "table metric names no task of the run": (["--table-metric", "acc,arc_eas=acc_norm"],
                                              ["arc_eas", "did you mean arc_easy"]),
    "table metric the task does not report": (["--table-metric", "arc_easy=f1"], ["arc_easy", "f1"]),
    "table metric reported by no task": (["--table-metric", "mcc"], ["mcc"]),
    "unknown table preset": (["--table-preset", "sparsegpt"], ["sparsegpt"]),
    "batch size 0": (["--eval-batch-size", "0"], ["--eval-batch-size"]),
    "negative batch size": (["--eval-batch-size=-4"], ["--eval-batch-size"]),
    "auto:0": (["--eval-batch-size", "auto:0"], ["auto:0"]),
    "batch size word": (["--eval-batch-size", "big"], ["big"]),
    "negative shots": (["--num-fewshot=-1"], ["--num-fewshot"]),
    "shots not a number": (["--num-fewshot", "arc_easy=five"], ["five"]),
    "shots for no lm-eval task": (["--num-fewshot", "arc_eazy=5"], ["arc_eazy"]),
    "include path missing": (["--include-path", "/nonexistent/tasks"], ["/nonexistent/tasks"]),
    "model args: pretrained": (["--model-args", "pretrained=other"], ["pretrained", "--model"]),
    "model args: no value": (["--model-args", "revision"], ["revision"]),
    "label without text": (["--label", "remove"], ["--label"]),
}


def _expect_error(argv, out, capsys, needles, monkeypatch):
    no_model_loading(monkeypatch)
    one_error_line(main(argv), capsys, needles, out)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_protocol_input(case, tmp_path, capsys, monkeypatch):
    data = shared_data_or_skip()
    _model_dir()
    out = tmp_path / "runs"
    extra, needles = BAD[case]
    argv = ["--model", MODEL, "--methods", "remove", "--layers", "3", "--data-dir", str(data), "--limit", "2",
            "--output-dir", str(out), "--no-progress"]
    if "--tasks" not in extra:
        argv += ["--tasks", "arc_easy"]
    _expect_error(argv + extra, out, capsys, needles, monkeypatch)


def _mmlu_copy(tmp_path, data) -> Path:
    """A data dir whose MMLU files link to the real ones (one of them to be broken by the test)."""
    root = tmp_path / "data"
    for split in ("test", "dev"):
        (root / "mmlu" / split).mkdir(parents=True)
        for f in (data / "mmlu" / split).iterdir():
            (root / "mmlu" / split / f.name).symlink_to(f)
    return root


@pytest.mark.parametrize("problem", ["missing", "empty", "truncated", "wrong fields"])
def test_broken_mmlu_subject_file_found_before_evaluation(problem, tmp_path, capsys, monkeypatch):
    data = shared_data_or_skip()
    _model_dir()
    root = _mmlu_copy(tmp_path, data)
    f = root / "mmlu" / "dev" / "virology.jsonl"
    real = f.resolve().read_text().splitlines(keepends=True)
    f.unlink()
    if problem == "empty":
        f.write_text("")
    elif problem == "truncated":
        f.write_text("".join(real[:3]) + real[3][: len(real[3]) // 2])
    elif problem == "wrong fields":
        f.write_text("".join(json.dumps({"text": "x", "label": 0}) + "\n" for _ in real))
    out = tmp_path / "runs"
    argv = ["--model", MODEL, "--methods", "remove", "--layers", "3", "--tasks", "mmlu", "--num-fewshot", "5",
            "--data-dir", str(root), "--limit", "2", "--output-dir", str(out), "--no-progress"]
    needle = {"missing": "virology.jsonl", "empty": "empty", "truncated": "truncated", "wrong fields": "lacks"}
    _expect_error(argv, out, capsys, ["mmlu_virology", needle[problem]], monkeypatch)


# --- tables: metrics, presets, retained, stderr, labels, names (no model) ----------------------

def _rec(method, label, ratio, metrics, *, model="/abs/path/to/ref-opt-12l", details=None):
    return {"schema": 1, "method": method, "label": label, "model": {"name": model, "dtype": "float32"},
            "eval": {"tasks": list(metrics), "limit": None}, "params": {"ratio": ratio},
            "metrics": metrics, "environment": {"created": "2026"}, "eval_details": details}


def _runs():
    hib = {"wikitext": {"word_perplexity": False}}
    dense = _rec("dense", "Dense", 0.0, {
        "arc_easy": {"acc": 0.5, "acc_stderr": 0.05, "acc_norm": 0.4, "n": 100},
        "boolq": {"acc": 0.8, "acc_stderr": 0.04, "n": 100},
        "wikitext": {"word_perplexity": 20.0, "n": 10}}, details={"higher_is_better": hib})
    pruned = _rec("shortgpt", "shortgpt", 0.25, {
        "arc_easy": {"acc": 0.4, "acc_stderr": 0.05, "acc_norm": 0.3, "n": 100},
        "boolq": {"acc": 0.6, "acc_stderr": 0.05, "n": 100},
        "wikitext": {"word_perplexity": 40.0, "n": 10}}, details={"higher_is_better": hib})
    return [dense, pruned]


def test_tables_any_metric_presets_retained_stderr_labels():
    from harness.errors import UsageError
    from harness.results import report

    runs = _runs()
    (title, df, notes), = report.build_tables(runs, None, preset="llm-pruner", labels={"shortgpt": "ShortGPT"},
                                              stderr=True)
    assert title == "ref-opt-12l"  # the model's name, never its path
    rows = {r["Method"]: r for r in df.to_dict("records")}
    assert rows["Dense"]["ARC-e"] == pytest.approx(40.0)  # llm-pruner: arc_easy acc_norm
    assert rows["ShortGPT"]["BoolQ"] == pytest.approx(60.0) and rows["ShortGPT"]["BoolQ ±"] == pytest.approx(5.0)
    assert rows["Dense"]["wikitext \u2193"] == pytest.approx(20.0)  # perplexity as reported, not x100
    assert rows["ShortGPT"]["Ave."] == pytest.approx(45.0)  # perplexity not averaged with accuracies
    assert rows["ShortGPT"]["Per."] == pytest.approx(100 * 45.0 / 60.0)
    assert "ARC-e=acc_norm" in notes[0] and "llm-pruner" in notes[0]
    text = report.render_text([(title, df, notes)])
    assert "60.0 \u00b1 5.0" in text and "ShortGPT" in text  # BoolQ acc ± its stderr

    (_t, ret, _n), = report.retained_tables([(title, df, notes)])
    r = {x["Method"]: x for x in ret.to_dict("records")}
    assert r["ShortGPT"]["ARC-e"] == pytest.approx(75.0) and r["ShortGPT"]["BoolQ"] == pytest.approx(75.0)
    assert r["ShortGPT"]["wikitext \u2193"] == pytest.approx(50.0)  # lower is better: dense / score
    assert "BoolQ \u00b1" not in ret.columns

    # --table-metric: any metric a task reports; a typo'd task or a metric it lacks is an error
    cols = report.run_column_metrics(runs)
    report.check_metric_spec("acc,arc_easy=acc_norm,wikitext=word_perplexity", cols)
    for bad, needle in (("acc,arc_eas=acc_norm", "arc_easy"), ("boolq=acc_norm", "boolq"), ("f1", "f1")):
        with pytest.raises(UsageError, match=needle):
            report.check_metric_spec(bad, cols)
    with pytest.raises(UsageError, match="sparsegpt"):
        report.parse_metric_spec("acc", "sparsegpt")


def test_config_file_per_task_shots_and_labels(tmp_path):
    from harness.cli import build_parser
    from harness.config_file import parse_args_with_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("tasks: [mmlu, piqa]\nnum_fewshot: {mmlu: 5, default: 0}\n"
                   "labels: {shortgpt: ShortGPT, dense: Dense model}\ntable_metric: acc\n")
    args = parse_args_with_config(build_parser(), ["--config", str(cfg), "--label", "shortgpt=Ours"])
    assert args.num_fewshot == "mmlu=5,default=0"
    assert args.label == ["shortgpt=ShortGPT", "dense=Dense model", "shortgpt=Ours"]  # the command line wins

    from harness.evaluation.eval_config import fewshot_for, parse_num_fewshot

    spec = parse_num_fewshot(args.num_fewshot)
    assert spec == {"mmlu": 5, "default": 0}
    assert fewshot_for("mmlu_anatomy", ("mmlu", "mmlu_stem"), spec) == 5  # a group's key reaches its subtasks
    assert fewshot_for("piqa", (), spec) == 0 and fewshot_for("piqa", (), {"mmlu": 5}) is None


def test_include_path_is_part_of_the_run_key(tmp_path):
    from harness.evaluation.eval_config import EvalConfig

    (tmp_path / "t.yaml").write_text("task: t\n")
    a = EvalConfig(tasks=["t"], include_path=str(tmp_path)).to_dict()
    (tmp_path / "t.yaml").write_text("task: t\nnum_fewshot: 1\n")
    b = EvalConfig(tasks=["t"], include_path=str(tmp_path)).to_dict()
    assert a["include_hash"] != b["include_hash"]  # an edited task YAML is a new run, not a cached one


def test_hub_task_offline_is_one_error_before_the_model(tmp_path, capsys, monkeypatch):
    """Without --data-dir the datasets come from the Hub; offline, that is found before any model loads."""
    _model_dir()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "runs"
    argv = ["--model", MODEL, "--methods", "remove", "--layers", "3", "--tasks", "arc_easy", "--limit", "2",
            "--output-dir", str(out), "--no-progress"]
    _expect_error(argv, out, capsys, ["could not load task 'arc_easy'", "--data-dir"], monkeypatch)


def test_model_args_and_auto_batch_size_are_used_and_recorded(tmp_path, capsys):
    """--model-args reaches from_pretrained (attention implementation) and the record; --eval-batch-size
    auto is lm-eval's own detection, its choice recorded."""
    _model_dir()
    out = tmp_path / "runs"
    argv = ["--model", MODEL, "--methods", "remove", "--layers", "3", "--limit", "2", "--output-dir", str(out),
            "--no-progress", "--model-args", "attn_implementation=eager,revision=main", "--eval-batch-size", "auto"]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    dense = _records(out)["dense"]
    assert dense["eval"]["model_args"] == {"attn_implementation": "eager", "revision": "main"}
    assert dense["eval"]["batch_size"] == "auto" and dense["eval_details"]["batch_sizes"]
    assert max(dense["eval_details"]["batch_sizes"]) <= 16  # auto on CPU is capped (lm-eval alone picked 64 here)
    lm = json.loads(next(_path_of(out, dense).with_suffix(".lm_eval").glob("results_*.json")).read_text())
    assert lm["config"]["model_args"] == "pretrained=ref-opt-12l,dtype=float32,attn_implementation=eager,revision=main"
    from harness.model.loading import load_model

    model, _tok = load_model(str(_model_dir()), model_args=dense["eval"]["model_args"])
    assert model.config._attn_implementation == "eager"


def test_auto_batch_cap_on_cpu_follows_the_stated_rule():
    """A quarter of the memory over the full logits of one 2048-token sequence, within 1..16."""
    from types import SimpleNamespace

    from harness.evaluation.lmeval import auto_cpu_batch_cap

    def model(vocab):
        return SimpleNamespace(config=SimpleNamespace(vocab_size=vocab))

    gib = 1 << 30
    assert auto_cpu_batch_cap(model(262144), 24 * gib) == 3  # Gemma 3: 2 GiB of logits per sequence
    assert auto_cpu_batch_cap(model(50272), 24 * gib) == 15  # OPT
    assert auto_cpu_batch_cap(model(128), 24 * gib) == 16  # the reference models: the ceiling
    assert auto_cpu_batch_cap(model(262144), 4 * gib) == 1  # never zero

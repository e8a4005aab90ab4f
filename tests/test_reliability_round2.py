"""Reliability, round two (part): non-finite option values, reserved and path-like method names."""
import pytest
from conftest import REPO, SHARED_DATA, no_model_loading, one_error_line, shared_data_or_skip

from harness import MethodConfig, register_method
from harness.errors import UsageError
from harness.plugins.pipeline import resolve_method

SUITE = REPO / "reference" / "suite"
REF = REPO / "reference" / "models" / "ref-opt-12l"


def _run_args(model, out, *extra):
    """A fast run on the reference suite with a few short calibration blocks."""
    return ["--model", str(model), "--suite", str(SUITE), "--calib-data", str(SUITE.parent / "calibration.txt"),
            "--calib-seq-len", "24", "--calib-samples", "4", "--output-dir", str(out), "--no-progress", *extra]


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity"])
@pytest.mark.parametrize("key", ["lr", "weight_decay", "activation_cache_gb", "post_train_lr", "hidden_mult"])
def test_float_options_refuse_non_finite_values_at_parse_time(key, value):
    with pytest.raises(UsageError, match="finite number"):
        resolve_method("streamline", {"streamline": {key: value}})


@pytest.mark.parametrize("name", ["dense", "../evil", "a/b", "a\\b", " x", "x y", "c:d"])
def test_reserved_and_path_like_method_names_cannot_be_registered(name):
    with pytest.raises(ValueError):
        register_method(name, MethodConfig)(lambda ctx, cfg: None)


@pytest.mark.parametrize("tasks", [
    {"../../escaped": {"file": "copy.jsonl"}},
    {"/abs": {"file": "copy.jsonl"}},
    {"ok": {"file": "../copy.jsonl"}},
    {"ok": {"file": "/etc/passwd"}},
    {"ok": "copy.jsonl"},
])
def test_suite_names_and_files_never_become_paths(tasks, tmp_path):
    import json

    from harness.evaluation.local_data import suite_tasks

    (tmp_path / "copy.jsonl").write_text('{"query": "a", "choices": ["b", "c"], "label": 0}\n')
    (tmp_path / "suite.json").write_text(json.dumps({"tasks": tasks}))
    with pytest.raises(UsageError, match="suite"):
        suite_tasks(str(tmp_path))
    assert not (tmp_path.parent / "escaped.yaml").exists()


def test_temp_folders_of_killed_runs_are_removed_by_the_next(tmp_path):
    """A run killed with SIGKILL cannot clean up; its folders carry its pid and the next run removes
    them once that process is gone (folders of live processes and other names are left alone)."""
    import os
    import subprocess
    import sys

    from harness.io import clean_stale_temp_dirs

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f"sb_tasks_{dead_pid}_abc"
    live = tmp_path / f"sb_actcache_{child.pid}_abc"
    mine = tmp_path / f"sb_check_{os.getpid()}_abc"
    other = tmp_path / "sb_tasks_notapid"
    for p in (stale, live, mine, other):
        p.mkdir()
        (p / "x.yaml").write_text("x")
    try:
        assert clean_stale_temp_dirs(str(tmp_path)) == [stale]
        assert not stale.exists() and live.exists() and mine.exists() and other.exists()
    finally:
        child.kill()
        child.wait()
    assert clean_stale_temp_dirs(str(tmp_path)) == [live]


def test_the_run_key_follows_the_methods_code_and_the_files_its_options_name(tmp_path):
    """An edited plugin file, or an edited file an option names, gives another run key."""
    from harness.plugins.registry import load_plugin_file

    plugin = tmp_path / "my_method.py"
    plugin.write_text(
        "from dataclasses import dataclass\n"
        "from harness import MethodConfig, option, register_method\n\n"
        "@dataclass\nclass Cfg(MethodConfig):\n    text: str = option('none', 'a file')\n\n"
        "@register_method('keyed-plugin', Cfg)\ndef run(ctx, cfg):\n    return None\n")
    load_plugin_file(str(plugin))
    try:
        _check_keys(plugin, tmp_path)
    finally:  # the registry is process-wide: other tests run every registered method
        from harness.plugins.registry import METHODS

        METHODS._specs.pop("keyed-plugin", None)


def _check_keys(plugin, tmp_path):
    from harness.plugins.pipeline import code_identity

    text = tmp_path / "words.txt"
    text.write_text("one")
    spec, cfg = resolve_method("keyed-plugin", {"keyed-plugin": {"text": str(text)}})
    first = code_identity(spec, cfg)
    assert first["code"]["keyed-plugin"] and first["option_files"] == {str(text): first["option_files"][str(text)]}
    plugin.write_text(plugin.read_text() + "# edited\n")
    assert code_identity(spec, cfg)["code"] != first["code"]
    text.write_text("two")
    assert code_identity(spec, cfg)["option_files"] != first["option_files"]
    builtin = code_identity(*resolve_method("remove+lora", {}))
    assert set(builtin["code"]) == {"remove", "lora"} and all(builtin["code"].values())


def _broken_copy(tmp_path, edit):
    """A copy of the reference model folder, changed by ``edit(folder)``."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(REF, folder)
    edit(folder)
    return folder


def _set_config(key, value):
    def edit(folder):
        import json

        cfg = json.loads((folder / "config.json").read_text())
        cfg[key] = value
        (folder / "config.json").write_text(json.dumps(cfg))
    return edit


def _drop_tensor(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors.pop(next(k for k in tensors if "layers.3.fc1.weight" in k))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _extra_tokens(folder):
    """Padding by an added token past the embedding rows (lm-eval pads with it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    tok.pad_token = "<extra_b>"
    tok.save_pretrained(str(folder))


@pytest.mark.parametrize("edit,needles", [
    (_set_config("num_hidden_layers", 14), ["do not match its config.json", "missing tensor(s)", "layers.12."]),
    (_set_config("num_hidden_layers", 10), ["do not match its config.json", "unexpected tensor(s)", "layers.10."]),
    (_drop_tensor, ["missing tensor(s)", "layers.3.fc1.weight"]),
    (_set_config("ffn_dim", 96), ["model", "fc1"]),
    (_extra_tokens, ["token ids up to 283 (pad token)", "only 282 rows"]),
], ids=["more-layers-in-config", "fewer-layers-in-config", "missing-tensor", "mis-shaped", "tokenizer-too-big"])
def test_model_folders_whose_weights_disagree_with_their_config_are_refused(tmp_path, capsys, edit, needles):
    """One error line and exit 2, nothing written: transformers alone would add random layers,
    drop tensors or initialise a missing one at random."""
    from harness.cli import main

    folder = _broken_copy(tmp_path, edit)
    out = tmp_path / "runs"
    rc = main(_run_args(folder, out, "--methods", "remove", "--layers", "1", "--limit", "2"))
    one_error_line(rc, capsys, needles, out)


@pytest.mark.parametrize("row,needle", [
    ({"query": "q", "choices": [" a", " b", " c", " d"], "label": 7}, "'label' is 7, outside 0..3"),
    ({"query": "q", "choices": [" a", " b"], "label": -1}, "'label' is -1, outside 0..1"),
    ({"query": "q", "choices": [" a", " b"], "label": "0"}, "'label' must be a whole number"),
    ({"query": "q", "choices": [" a", " b"], "label": 1.5}, "'label' must be a whole number"),
    ({"query": "q", "choices": [" a", " b"], "label": True}, "'label' must be a whole number"),
    ({"query": "q", "choices": [], "label": 0}, "'choices' must be a list of at least 2 strings"),
    ({"query": "q", "choices": " a b", "label": 0}, "'choices' must be a list of at least 2 strings"),
    ({"query": 3, "choices": [" a", " b"], "label": 0}, "'query' must be a string"),
    ({"query": "q", "label": 0}, "lacks field(s) choices"),
])
def test_every_suite_row_is_checked_before_the_model_loads(tmp_path, capsys, monkeypatch, row, needle):
    """A bad row at the end of a 300-row file (not only the first three) is one error line naming
    the file and line; lm-eval alone would score it as wrong."""
    import json
    import shutil

    from harness.cli import main

    suite = tmp_path / "suite"
    shutil.copytree(SUITE, suite)
    rows = (suite / "copy.jsonl").read_text().splitlines()
    (suite / "copy.jsonl").write_text("\n".join(rows + [json.dumps(row)]) + "\n")
    no_model_loading(monkeypatch)
    out = tmp_path / "runs"
    rc = main(["--model", str(REF), "--methods", "remove", "--layers", "1", "--suite", str(suite),
               "--output-dir", str(out), "--no-progress"])
    one_error_line(rc, capsys, [f"line {len(rows) + 1}", needle], out)


@pytest.mark.parametrize("task,row,needle", [
    ("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": 2}, "'label' is 2, outside 0..1"),
    ("hellaswag", {"activity_label": "x", "ctx_a": "a", "ctx_b": "b", "endings": ["1", "2", "3", "4"],
                   "label": "4"}, "'label' is 4, outside 0..3"),
    ("winogrande", {"sentence": "a _ b", "option1": "x", "option2": "y", "answer": 1}, "'answer' must be"),
    ("arc_easy", {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"},
     "'answerKey' 'E' is not one of the choice labels"),
    ("boolq", {"question": "q", "passage": "p", "label": 1.5}, "'label' must be a whole number"),
])
def test_every_local_task_row_is_checked(tmp_path, task, row, needle):
    """The local layout of shared/data, with one bad row appended to a task's evaluated file."""
    import json

    from harness.evaluation.eval_config import EvalConfig
    from harness.evaluation.task_checks import check_task_files

    data = shared_data_or_skip()
    root = tmp_path / "data"
    src = {"piqa": "piqa/validation.jsonl", "hellaswag": "hellaswag/validation.jsonl.gz",
           "winogrande": "winogrande/validation.jsonl", "arc_easy": "arc_easy/test.jsonl",
           "boolq": "boolq/validation.jsonl"}[task]
    (root / src).parent.mkdir(parents=True)
    if src.endswith(".gz"):
        import gzip

        text = gzip.open(data / src, "rt").read()
        target = root / src[:-3]
    else:
        text, target = (data / src).read_text(), root / src
    target.write_text(text.rstrip("\n") + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UsageError, match="line") as info:
        check_task_files(EvalConfig(tasks=[task], data_dir=str(root)))
    assert needle in str(info.value), str(info.value)
    assert check_task_files(EvalConfig(tasks=[task], data_dir=str(data)))  # the real files pass


def test_inputs_that_would_silently_change_what_runs_are_refused(tmp_path):
    """A key given twice in a config file (PyYAML keeps the last), a task given twice in
    --num-fewshot, a config file that is not UTF-8, remove.layers disagreeing with the target."""
    from harness.cli import build_parser
    from harness.config_file import load_config_file
    from harness.evaluation.eval_config import parse_num_fewshot

    dup = tmp_path / "dup.yaml"
    dup.write_text("model: m\nlayers: 2\nmethods: [remove]\nlayers: 4\n")
    with pytest.raises(UsageError, match="line 4: key 'layers' is given twice"):
        load_config_file(str(dup), build_parser())
    nested = tmp_path / "nested.yaml"
    nested.write_text("model: m\nmethod_opt:\n  streamline: {lr: 1, lr: 2}\n")
    with pytest.raises(UsageError, match="key 'lr' is given twice"):
        load_config_file(str(nested), build_parser())
    merged = tmp_path / "merged.yaml"  # YAML merge keys stay allowed, an override of a merged key too
    merged.write_text("base: &b {lr: 1, epochs: 2}\nmodel: m\nmethod_opt:\n  streamline: {<<: *b, lr: 3}\n")
    with pytest.raises(UsageError, match="unknown key 'base'"):  # parsed fine; 'base' is no flag
        load_config_file(str(merged), build_parser())
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"model: \xff\xfe\n")
    with pytest.raises(UsageError, match="is not UTF-8 text"):
        load_config_file(str(binary), build_parser())
    with pytest.raises(UsageError, match="gives 'copy' twice"):
        parse_num_fewshot("copy=1,copy=0")
    assert parse_num_fewshot("copy=1,copy=1") == {"copy": 1}
    with pytest.raises(UsageError, match="remove.layers lists 2 layer.* removes 1; pass --layers 2"):
        resolve_method("remove", {"remove": {"layers": "1/2"}})[1].validate(12, 1)


def test_labels_for_methods_not_run_are_a_note(tmp_path, capsys):
    from harness.cli import main

    rc = main(_run_args(REF, tmp_path / "runs", "--methods", "remove", "--layers", "1", "--limit", "2",
                        "--label", "shortgpt=ShortGPT", "--label", "remove=Removal"))
    out = capsys.readouterr().out
    assert rc == 0 and "note: --label given for methods not being run: shortgpt" in out
    assert "Removal" in out


def test_report_reads_records_strictly_and_counts_copies_once(tmp_path, capsys):
    """NaN/Infinity in the JSON, a metric that is a string, a metrics list: named and left out with a
    warning, never rendered; a copied record counts once."""
    import json
    import shutil

    from harness.results.record import new_record
    from harness.results.store import load_runs

    def rec(method, acc):
        return new_record(method=method, label=method, method_config={}, model={"name": "m"}, eval={"limit": 2},
                          seed=0, target=None if method == "dense" else {"layers": 1, "ratio": None, "num_remove": 1},
                          manifest={}, params={"dense": 10, "pruned": 9, "ratio": 0.1}, metrics={"copy": {"acc": acc}},
                          environment={})

    root = tmp_path / "runs" / "m"
    root.mkdir(parents=True)
    for name, data in [("dense__a.json", rec("dense", 0.5)), ("remove__b.json", rec("remove", 0.4))]:
        (root / name).write_text(json.dumps(data))
    (root / "copy").mkdir()
    shutil.copy(root / "remove__b.json", root / "copy" / "remove__b.json")
    (root / "nan__c.json").write_text(json.dumps(rec("shortgpt", 0.3)).replace("0.3", "NaN"))
    (root / "str__d.json").write_text(json.dumps(rec("angular", "inf")))
    bad = rec("laco", 0.2)
    bad["metrics"] = [0.2]
    (root / "list__e.json").write_text(json.dumps(bad))
    (root / "results_x.json").write_text(json.dumps({"results": {}}))  # lm-eval's file: not a record, quiet
    runs = load_runs(str(tmp_path / "runs"))
    err = capsys.readouterr().err
    assert sorted(r["method"] for r in runs) == ["dense", "remove"]
    assert "nan__c.json does not parse as strict JSON" in err
    assert "str__d.json is damaged: metrics.copy.acc is str, not a number" in err
    assert "list__e.json is damaged: 'metrics' must be an object" in err
    assert "is a copy of" in err and "counted once" in err
    assert "results_x.json" not in err


@pytest.mark.parametrize("flags,needle", [
    (["--output-dir", ""], "--output-dir is empty"),
    (["--write-golden", "."], "is a folder; pass a file path"),
    (["--write-golden", "no/such/dir/g.json"], "does not exist; create it first"),
])
def test_empty_output_dir_and_golden_folder_are_refused_before_the_run(tmp_path, capsys, monkeypatch, flags, needle):
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    no_model_loading(monkeypatch)
    argv = ["--model", str(REF), "--methods", "remove", "--layers", "1", "--suite", str(SUITE), "--no-progress", *flags]
    if "--output-dir" not in flags:
        argv += ["--output-dir", str(tmp_path / "runs")]
    one_error_line(main(argv), capsys, [needle], tmp_path)


def test_results_do_not_depend_on_the_eval_batch_size_so_it_is_not_keyed(tmp_path, capsys):
    """Batch sizes 1 and 5 (odd: uneven padding) give identical metrics (and stability to 1e-5 relative) for the dense
    model and two methods; so a re-run with another batch size serves the stored runs."""
    import json

    from harness.cli import main

    def base(out):
        return _run_args(REF, out, "--methods", "remove,shortgpt", "--layers", "3", "--limit", "12")

    def records(out):
        recs = {}
        for f in out.rglob("*__*.json"):
            r = json.loads(f.read_text())
            recs[r["method"]] = (r["metrics"], (r.get("stability") or {}).get("tasks"), r["eval"]["batch_size"])
        return recs

    runs = {}
    for bs in (1, 5):
        out = tmp_path / f"bs{bs}"
        assert main([*base(out), "--eval-batch-size", str(bs)]) == 0
        runs[bs] = records(out)
    capsys.readouterr()
    assert set(runs[1]) == {"dense", "remove", "shortgpt"}
    for method in runs[1]:
        assert runs[1][method][0] == runs[5][method][0], method  # every metric identical
        stab1, stab5 = runs[1][method][1] or {}, runs[5][method][1] or {}
        assert stab1.keys() == stab5.keys()
        for task in stab1:  # weights from summed log-likelihoods: equal to float rounding (padding changes sums)
            for key in stab1[task]:
                assert stab1[task][key] == pytest.approx(stab5[task][key], rel=1e-5), (method, task, key)
        assert (runs[1][method][2], runs[5][method][2]) == (1, 5)  # recorded, not keyed
    assert main([*base(tmp_path / "bs1"), "--eval-batch-size", "5"]) == 0
    assert capsys.readouterr().out.count("result exists") == 3


@pytest.mark.parametrize("desc,needle", [
    ({"class": "os.system", "kwargs": {"command": "touch PWNED"}}, "not one the harness builds"),
    ({"class": "subprocess.Popen", "kwargs": {"args": ["touch", "PWNED"]}}, "not one the harness builds"),
    ({"class": ["MLPReplacement"]}, "not one the harness builds"),
    ({"class": "harness.model.replacement.MLPReplacement", "kwargs": {"hidden_size": 4, "intermediate_size": 8, "evil": 1}},
     "not plain values of its parameters"),
    ({"class": "harness.model.replacement.MLPReplacement", "kwargs": {"hidden_size": {"__class__": "x"}, "intermediate_size": 8}},
     "not plain values of its parameters"),
])
def test_a_saved_manifest_cannot_name_code_to_run(tmp_path, monkeypatch, desc, needle):
    """Replacement modules come from the harness's allow-list (plus what plugins register), built only
    with plain keyword arguments of their own constructor: nothing a manifest names is executed."""
    from harness.model.replacement import build_from_description

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=needle):
        build_from_description(desc)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("code", ["ENOSPC", "EACCES"])
def test_a_full_disk_or_a_read_only_folder_is_one_error_line(tmp_path, capsys, monkeypatch, code):
    """--report writing its tables (and any result write) when the disk is full or the folder is not
    writable: one error line naming the file, exit 2, no temp file left."""
    import errno
    import json
    import os

    from harness.cli import main
    from harness.results.record import new_record

    root = tmp_path / "runs" / "m"
    root.mkdir(parents=True)
    for method, acc in (("dense", 0.5), ("remove", 0.4)):
        rec = new_record(method=method, label=method, method_config={}, model={"name": "m"}, eval={"limit": 2},
                         seed=0, target=None if method == "dense" else {"layers": 1, "ratio": None, "num_remove": 1},
                         manifest={}, params={"dense": 10, "pruned": 9, "ratio": 0.1},
                         metrics={"copy": {"acc": acc}}, environment={})
        (root / f"{method}__x.json").write_text(json.dumps(rec))

    def full(_fd):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(os, "fsync", full)
    line = one_error_line(main(["--report", str(tmp_path / "runs")]), capsys,
                          ["table.md", os.strerror(getattr(errno, code))])
    assert line.startswith("error: cannot write"), line
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_suite_without_tasks_is_refused(tmp_path):
    import json

    from harness.evaluation.local_data import suite_tasks

    (tmp_path / "suite.json").write_text(json.dumps({"tasks": {}}))
    with pytest.raises(UsageError, match="lists no tasks"):
        suite_tasks(str(tmp_path))


def test_more_few_shot_examples_than_the_data_holds_is_one_error_line(tmp_path):
    """lm-eval would raise 'Sample larger than population' from deep inside its sampler mid-run."""
    from harness.evaluation.eval_config import EvalConfig
    from harness.evaluation.task_checks import check_task_files

    assert check_task_files(EvalConfig(suite=str(SUITE), num_fewshot=299))
    with pytest.raises(UsageError, match="--num-fewshot 300 for task 'copy'.* holds only 299 examples"):
        check_task_files(EvalConfig(suite=str(SUITE), num_fewshot=300))
    if SHARED_DATA.is_dir():
        with pytest.raises(UsageError, match="'mmlu_abstract_algebra', but its dev split holds only 5"):
            check_task_files(EvalConfig(tasks=["mmlu"], data_dir=str(SHARED_DATA), num_fewshot={"mmlu": 6}))


def test_a_path_longer_than_the_filesystem_allows_is_one_error_line(tmp_path, capsys):
    from harness.cli import main

    rc = main(["--model", str(REF), "--methods", "remove", "--layers", "1", "--suite", str(SUITE),
               "--output-dir", str(tmp_path / ("x" * 300)), "--no-progress"])
    one_error_line(rc, capsys, ["File name too long", "use a shorter path"])


def test_efficiency_on_a_busy_cpu_is_timed_with_one_thread(monkeypatch, capsys):
    """Multi-threaded timings stall under load (README, reliability); the thread count is recorded."""
    import os

    import torch
    from conftest import tiny_model

    from harness.evaluation import efficiency

    model = tiny_model("opt", layers=2)
    cfg = efficiency.EfficiencyConfig(batch_size=1, seq_len=8, decode_batch_size=1, decode_prompt_len=4,
                                      new_tokens=2, warmup=0, repeats=1)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(efficiency, "_BUSY_WARNED", False)
        monkeypatch.setattr(os, "getloadavg", lambda: (float(os.cpu_count() or 1) + 3, 0.0, 0.0))
        busy = efficiency.measure(model, cfg)
        assert busy["settings"]["torch_threads"] == 1 and torch.get_num_threads() == 2
        assert "the machine is busy" in capsys.readouterr().err
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        assert efficiency.measure(model, cfg)["settings"]["torch_threads"] == 2
    finally:
        torch.set_num_threads(previous)

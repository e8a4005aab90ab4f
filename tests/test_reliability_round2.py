"""Reliability, round two (part): non-finite option values, reserved and path-like method names."""
from pathlib import Path

import pytest

from harness import MethodConfig, register_method
from harness.errors import UsageError
from harness.plugins.pipeline import resolve_method


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

    from harness.evaluation.lmeval import suite_tasks

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
    from harness.plugins.pipeline import code_identity
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

    src = Path(__file__).resolve().parents[1] / "reference" / "models" / "ref-opt-12l"
    folder = tmp_path / "model"
    shutil.copytree(src, folder)
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
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    tok.save_pretrained(str(folder))


@pytest.mark.parametrize("edit,needles", [
    (_set_config("num_hidden_layers", 14), ["do not match its config.json", "missing tensor(s)", "layers.12."]),
    (_set_config("num_hidden_layers", 10), ["do not match its config.json", "unexpected tensor(s)", "layers.10."]),
    (_drop_tensor, ["missing tensor(s)", "layers.3.fc1.weight"]),
    (_set_config("ffn_dim", 96), ["model", "fc1"]),
    (_extra_tokens, ["token ids up to 283", "only 282 rows"]),
], ids=["more-layers-in-config", "fewer-layers-in-config", "missing-tensor", "mis-shaped", "tokenizer-too-big"])
def test_model_folders_whose_weights_disagree_with_their_config_are_refused(tmp_path, capsys, edit, needles):
    """One error line and exit 2, nothing written: transformers alone would add random layers,
    drop tensors or initialise a missing one at random."""
    from harness.cli import main

    folder = _broken_copy(tmp_path, edit)
    out = tmp_path / "runs"
    suite = Path(__file__).resolve().parents[1] / "reference" / "suite"
    rc = main(["--model", str(folder), "--methods", "remove", "--layers", "1", "--limit", "2", "--output-dir",
               str(out), "--no-progress", "--suite", str(suite), "--calib-data", str(suite.parent / "calibration.txt"),
               "--calib-seq-len", "24", "--calib-samples", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    assert not list(out.rglob("*.json")) if out.exists() else True

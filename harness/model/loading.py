"""Load a causal LM and its tokenizer from a Hub id or a local folder."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from harness.errors import UsageError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
DEVICES = ("cpu", "cuda", "auto")


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"unknown --dtype '{name}'; choose one of: float32, float16, bfloat16")
    return DTYPES[name]


def resolve_device(name: str) -> str:
    if name not in DEVICES and not name.startswith("cuda:"):
        raise UsageError(f"unknown --device '{name}'; choose one of: cpu, cuda, cuda:N, auto")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but no CUDA device is available here; use --device cpu")
    return name


def looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is taken as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


_SOURCES: dict = {}  # (name, model_args) -> (folder, from_pretrained keywords, GGUF origin or None)


def _resolved(name: str, model_args: dict | None) -> tuple:
    from harness.model import gguf

    key = (name, repr(sorted((model_args or {}).items())))  # all of them: the cached keywords are returned
    if key not in _SOURCES:
        _SOURCES[key] = gguf.materialize(name, model_args) or (name, model_args, None)
    return _SOURCES[key]


def resolve_source(name: str, model_args: dict | None = None) -> tuple[str, dict | None]:
    """Where ``name`` is loaded from, and the ``from_pretrained`` keywords that go with it: a GGUF
    model (a ``.gguf`` file, a folder with ``gguf_file=``, or a packaged short name such as
    ``gemma-3-270m``) is converted once to a safetensors folder (harness.model.gguf); anything else
    is itself."""
    path, rest, _info = _resolved(name, model_args)
    return path, rest


def source_info(name: str, model_args: dict | None = None) -> dict | None:
    """The GGUF origin of a resolved model (file name, sha256, package), else None."""
    return _resolved(name, model_args)[2]


def check_model_source(name: str, model_args: dict | None = None) -> None:
    """Fail early for a local path that does not exist (a Hub id is checked when loaded); a GGUF
    model is converted here, so a missing package or file fails before anything else."""
    if source_info(name, model_args) is None and looks_like_path(name) and not Path(name).expanduser().exists():
        raise UsageError(f"model path '{name}' does not exist; pass a local model folder or a Hub id")


# --model-args keys that also apply to the config and tokenizer (the rest go to the model only)
HUB_ARGS = ("revision", "trust_remote_code", "subfolder", "cache_dir", "token", "local_files_only")


def _hub_args(model_args: dict | None) -> dict:
    return {k: v for k, v in (model_args or {}).items() if k in HUB_ARGS}


def load_config(name: str, model_args: dict | None = None):
    from transformers import AutoConfig

    check_model_source(name, model_args)
    name, model_args = resolve_source(name, model_args)
    saved = Path(os.path.expanduser(name)) / "config.json"
    if saved.is_file() and "streamline_base_model_type" in saved.read_text(errors="replace"):
        raise UsageError(f"'{name}' is a saved pruned model with replacement networks (harness.save_pruned); "
                         "load it with harness.load_pruned, or in transformers/lm-eval with trust_remote_code=True")
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(name), **_hub_args(model_args))
    except Exception as exc:  # noqa: BLE001 - any loader failure is a usage problem here
        raise UsageError(
            f"could not load a model config from '{name}' ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "pass an existing local folder, or a Hub id with network access"
        ) from exc


def check_weights_match(name: str, info: dict, allow_prefix: str | None = None) -> None:
    """Refuse a folder whose weights and config disagree (transformers would fill missing tensors
    at random and drop unexpected ones without a word): missing, unexpected or mis-shaped tensors,
    e.g. a config with more or fewer layers than the weights. ``allow_prefix``: unexpected tensors
    under it belong to the caller (saved replacement networks)."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(kind) or [])
        if kind == "unexpected_keys" and allow_prefix:
            keys = [k for k in keys if not k.startswith(allow_prefix)]
        if keys:
            problems.append(f"{len(keys)} {kind.split('_')[0]} tensor(s) (e.g. {', '.join(keys[:3])})")
    if problems:
        raise UsageError(f"the weights in '{name}' do not match its config.json: {'; '.join(problems)}; the config "
                         "must describe the saved tensors (same layer count and sizes): re-save the model or fix "
                         "config.json")


def check_tokenizer_fits(name: str, tokenizer, model) -> None:
    """A tokenizer whose ids reach past the embedding matrix would index out of range mid-evaluation:
    its base vocabulary and the special tokens evaluation uses (BOS, EOS, padding) must fit. (Extra
    special tokens a tokenizer class adds on loading and text never produces are left alone.)"""
    rows = model.get_input_embeddings().num_embeddings
    used = {"base vocabulary": int(getattr(tokenizer, "vocab_size", 0) or 0) - 1}
    for what in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(getattr(tokenizer, what, None), int):
            used[what.replace("_token_id", " token")] = getattr(tokenizer, what)
    over = {k: v for k, v in used.items() if v >= rows}
    if over:
        what, top = max(over.items(), key=lambda kv: kv[1])
        raise UsageError(f"the tokenizer of '{name}' has token ids up to {top} ({what}), but the model's embedding "
                         f"has only {rows} rows; use the tokenizer the model was trained with")


def load_model(name: str, dtype: str = "float32", device: str = "cpu", config=None, model_args: dict | None = None,
               allow_unexpected_prefix: str | None = None):
    """Return ``(model, tokenizer)`` in eval mode.

    ``device='auto'`` uses accelerate's ``device_map='auto'`` so models larger than one device
    are spread over the available devices (and CPU). ``config``: use this config instead of the
    folder's (``load_pruned`` passes the base architecture's for a remote-code folder).
    ``model_args``: more ``from_pretrained`` keywords (--model-args: revision, trust_remote_code,
    attn_implementation, ...).
    """
    from transformers import AutoModelForCausalLM

    from harness.model.adapters import check_supported_config

    torch_dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    tokenizer_name, tokenizer_args = name, model_args
    extra = {} if config is None else {"config": config}
    if config is None:
        config = load_config(name, model_args)
    name, model_args = resolve_source(name, model_args)
    kwargs = {"dtype": torch_dtype, **(model_args or {}), **extra}
    check_supported_config(config)
    path = os.path.expanduser(name)
    if device == "auto":
        kwargs["device_map"] = "auto"
        from harness.model.placement import auto_max_memory

        share = auto_max_memory()  # data-parallel launch: this process's GPUs only
        if share:
            kwargs["max_memory"] = share
    try:
        # mis-shaped tensors are reported (then refused below, naming them), not raised as "see the report above"
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True,
                                                           **{"ignore_mismatched_sizes": True, **kwargs})
    except Exception as exc:  # noqa: BLE001
        raise UsageError(
            f"could not load model weights from '{name}' ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from exc
    check_weights_match(name, info, allow_unexpected_prefix)
    if device != "auto":
        model.to(device)
    model.eval()
    tokenizer = load_tokenizer(tokenizer_name, config=kwargs.get("config"), model_args=tokenizer_args)
    check_tokenizer_fits(name, tokenizer, model)
    return model, tokenizer


def load_tokenizer(name: str, config=None, model_args: dict | None = None):
    from transformers import AutoTokenizer

    name, model_args = resolve_source(name, model_args)
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(name), **({"config": config} if config else {}),
                                            **_hub_args(model_args))
    except Exception as exc:  # noqa: BLE001
        raise UsageError(
            f"could not load a tokenizer from '{name}' ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "save the tokenizer into the model folder"
        ) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_device(model) -> torch.device:
    return next(model.parameters()).device

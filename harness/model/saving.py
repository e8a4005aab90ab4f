"""Save pruned models and load them back.

Every saved folder holds the pruned checkpoint, its tokenizer and ``pruning_manifest.json``
(method, options, removed layers, replacements); ``harness.load_pruned(dir)`` loads any of them.

- Removal-type results are ordinary checkpoints: ``AutoModelForCausalLM.from_pretrained(dir)``.
- Decoder-layer replacements (``ReplacementLayer``) are ordinary layers of the checkpoint. A layer
  applied n times (parameter sharing) is stored as n identical layers, so stock loading gives
  exactly the pruned model; ``load_pruned`` ties the copies back into one shared layer (the
  manifest's ``replacement_layers`` says where each application sits and whose copy it is).
- Replacement MLPs (``MLPReplacement``, ``MultiMLPReplacement``: the streamline variants) are
  stored in the checkpoint as ``streamline_replacements.<k>.*`` next to the pruned layers, and the
  folder carries ``modeling_streamline.py`` (self-contained remote code, registered in
  ``config.json``'s ``auto_map``) that re-inserts them, so
  ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` and
  ``lm_eval --model hf --model_args pretrained=dir,trust_remote_code=True`` load exactly the
  pruned model. The config's ``model_type`` is ``streamline_<base>``, which transformers does
  not know: loading without ``trust_remote_code=True`` raises instead of silently returning
  the model without its MLPs.
- Any other replacement module (a plugin's own class) is stored in ``replacements.safetensors``
  (only ``load_pruned`` can rebuild it); the config gets the same unknown ``model_type`` without
  ``auto_map``, so stock loading fails rather than returning a different model.

Folders written before this layout (base ``model_type``, ``replacements.safetensors``, shared
layers stored once) still load with ``load_pruned``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from harness.errors import UsageError
from harness.io import apply_umask, write_json_atomic, write_text_atomic
from harness.model.adapters import get_adapter
from harness.model.replacement import build_from_description, describe
from harness.model.surgery import (
    remove_layers,
    restore_layer_replacements,
    restore_replacements,
    strip_layer_replacements,
    strip_replacements,
)

MANIFEST = "pruning_manifest.json"
REPLACEMENTS = "replacements.safetensors"  # replacement modules the remote code cannot rebuild
REMOTE_FILE = "modeling_streamline.py"
REMOTE_PREFIX = "streamline_replacements"  # checkpoint key prefix of the MLPs (remote-code layout)
MODEL_TYPE_PREFIX = "streamline_"
# replacement classes the saved remote code defines (same names, parameters and arithmetic)
REMOTE_CLASSES = {"harness.model.replacement.MLPReplacement": "MLPReplacement",
                  "harness.model.replacement.MultiMLPReplacement": "MultiMLPReplacement"}


def _module_path(model, target) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError("the decoder layer list is not a submodule of the model")


def _remote_config(config_path: Path, base_model_type: str, layers_path: str, entries: list[dict],
                   with_code: bool) -> None:
    cfg = json.loads(config_path.read_text())
    cfg["model_type"] = MODEL_TYPE_PREFIX + base_model_type
    cfg["streamline_base_model_type"] = base_model_type
    cfg["streamline_layers_path"] = layers_path
    if with_code:
        cfg["architectures"] = ["StreamlineForCausalLM"]
        cfg["auto_map"] = {"AutoConfig": "modeling_streamline.StreamlineConfig",
                           "AutoModelForCausalLM": "modeling_streamline.StreamlineForCausalLM"}
        cfg["streamline_replacements"] = [{"index": e["index"], "where": e["where"],
                                           "class": REMOTE_CLASSES[e["class"]], "kwargs": e["kwargs"]}
                                          for e in entries]
    write_json_atomic(config_path, cfg)


def _remote_code_possible(model) -> bool:
    """The remote code imports the model's and its config's classes from ``transformers``, and
    saves with transformers' current key layout (``save_original_format=False``)."""
    import inspect

    import transformers

    return all(getattr(transformers, type(obj).__name__, None) is type(obj) for obj in (model, model.config)) \
        and "save_original_format" in inspect.signature(model.save_pretrained).parameters


def remote_code_text(model) -> str:
    """``modeling_streamline.py`` with its base-architecture lines naming ``model``'s classes."""
    base_cls, cfg_cls = type(model).__name__, type(model.config).__name__
    if not _remote_code_possible(model):
        raise ValueError(f"cannot write remote code for {base_cls} ({cfg_cls})")
    src = (Path(__file__).with_name(REMOTE_FILE)).read_text()
    lines = [line for line in src.splitlines() if line.endswith("# STREAMLINE-BASE")]
    if len(lines) != 2:
        raise ValueError(f"{REMOTE_FILE}: expected two '# STREAMLINE-BASE' lines")
    src = src.replace(lines[0], f"from transformers import {cfg_cls} as BaseConfig, "
                                 f"{base_cls} as BaseForCausalLM  # STREAMLINE-BASE")
    return src.replace(lines[1], f"BASE_MODEL_TYPE = {model.config.model_type!r}  # STREAMLINE-BASE")


def save_pruned(model, tokenizer, out_dir, manifest: dict) -> Path:
    from safetensors.torch import save_file
    from torch import nn

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter = get_adapter(model)
    base_model_type = model.config.model_type
    found = strip_replacements(adapter)
    original_layers = list(adapter.layers)  # put back after saving
    layer_plan = strip_layer_replacements(adapter, keep_shared=True)  # exact for stock tools
    entries = [{"index": item["index"], "where": item["where"], **describe(item["module"])} for item in found]
    remote = bool(found) and all(e["class"] in REMOTE_CLASSES for e in entries) and _remote_code_possible(model)
    attached = False
    try:
        layers_path = _module_path(model, adapter.layers)
        if remote:  # saved inside the checkpoint, where the remote code's modules expect them
            model.add_module(REMOTE_PREFIX, nn.ModuleList(item["module"] for item in found))
            attached = True
        # with remote code: transformers' own (current) key layout, not the "original" one it converts to
        # on save. The remote class gets no conversion on load (custom code), and the conversion would
        # also rename the MLPs' keys (e.g. Mixtral's mlp -> block_sparse_moe)
        model.save_pretrained(out, **({"save_original_format": False} if remote else {}))
        if attached:
            delattr(model, REMOTE_PREFIX)
            attached = False
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        if found and not remote:
            tensors = {f"{k}.{name}": t.detach().cpu().contiguous()
                       for k, item in enumerate(found) for name, t in item["module"].state_dict().items()}
            save_file(tensors, str(out / REPLACEMENTS))
        if found:
            _remote_config(out / "config.json", base_model_type, layers_path, entries, with_code=remote)
        if remote:
            write_text_atomic(out / REMOTE_FILE, remote_code_text(model))
        load_with = ("AutoModelForCausalLM(trust_remote_code=True)" if remote
                     else "harness.load_pruned" if found else "AutoModelForCausalLM")
        write_json_atomic(out / MANIFEST, {**manifest, "saved_replacements": entries,
                                           "replacements_in": ("checkpoint" if remote else REPLACEMENTS) if found
                                           else None,
                                           "replacement_layers": layer_plan,
                                           "shared_layers_saved_as": "copies",
                                           "load_with": load_with})
        apply_umask(out)  # transformers writes the weights 0600; colleagues must be able to read them
    finally:
        if attached:
            delattr(model, REMOTE_PREFIX)
        if layer_plan:
            adapter.set_layers(original_layers)
        restore_replacements(adapter, found)
    return out


def _checkpoint_tensors(folder: Path, prefix: str) -> dict:
    """Tensors whose key starts with ``prefix`` from the folder's safetensors files (shards too)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name == REPLACEMENTS:
            continue
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                if key.startswith(prefix):
                    out[key[len(prefix):]] = fh.get_tensor(key)
    return out


def _base_config(folder: Path):
    """The base architecture's config of a folder whose config names ``streamline_<base>``."""
    from transformers import AutoConfig

    cfg = json.loads((folder / "config.json").read_text())
    base = cfg.pop("streamline_base_model_type")
    for key in ("streamline_layers_path", "streamline_replacements", "auto_map", "model_type",
                "architectures", "transformers_version"):
        cfg.pop(key, None)
    return AutoConfig.for_model(base, **cfg)


class _HideOwnKeysReport(logging.Filter):
    """Drops transformers' load report when the only keys it lists are the replacement MLPs'
    (the base class does not know them; ``load_pruned`` loads them itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "LOAD REPORT" not in msg:
            return True
        rows = [line for line in msg.splitlines() if "|" in line and any(
            word in line for word in ("UNEXPECTED", "MISSING", "MISMATCH"))]
        return not rows or not all(line.strip().startswith(REMOTE_PREFIX + ".") for line in rows)


def load_pruned(path, dtype: str = "float32", device: str = "cpu"):
    """Load a directory written by ``save_pruned``; returns ``(model, tokenizer, manifest)``."""
    from harness.model.loading import load_model

    p = Path(path)
    if not (p / MANIFEST).is_file():
        raise UsageError(f"'{path}' has no {MANIFEST}; it was not written by --save-models")
    manifest = json.loads((p / MANIFEST).read_text())
    config_data = json.loads((p / "config.json").read_text()) if (p / "config.json").is_file() else {}
    config = _base_config(p) if "streamline_base_model_type" in config_data else None
    report_logger = logging.getLogger("transformers.modeling_utils")
    hide = _HideOwnKeysReport()
    report_logger.addFilter(hide)
    try:
        model, tok = load_model(str(p), dtype=dtype, device=device, config=config,
                                allow_unexpected_prefix=REMOTE_PREFIX + ".")
    finally:
        report_logger.removeFilter(hide)
    adapter = get_adapter(model)
    plan = manifest.get("replacement_layers") or []
    if plan and manifest.get("shared_layers_saved_as") == "copies":  # drop the copies, then tie
        remove_layers(adapter, [e["index"] for e in plan if e["shared_from"] is not None])
    restore_layer_replacements(adapter, plan)
    entries = manifest.get("saved_replacements", [])
    if entries:
        if manifest.get("replacements_in") == "checkpoint":
            tensors = _checkpoint_tensors(p, REMOTE_PREFIX + ".")
        else:
            from safetensors.torch import load_file

            tensors = load_file(str(p / REPLACEMENTS))
        found = []
        ref = next(model.parameters())
        for k, e in enumerate(entries):
            module = build_from_description(e)
            state = {name[len(f"{k}."):]: t for name, t in tensors.items() if name.startswith(f"{k}.")}
            module.load_state_dict(state)
            module.to(device=ref.device, dtype=ref.dtype)
            found.append({"index": e["index"], "where": e["where"], "module": module})
        restore_replacements(adapter, found)
    model.eval()
    return model, tok, manifest

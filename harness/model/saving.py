"""Save pruned models and load them back.

Removal-type results are ordinary checkpoints: ``AutoModelForCausalLM.from_pretrained(dir)``.
A model with a replacement network is saved as the plain pruned checkpoint (real layers only)
plus ``replacements.safetensors`` and their description in ``pruning_manifest.json``; load it
with ``harness.load_pruned(dir)``, which re-inserts the networks where they were. A decoder-layer
replacement (``ReplacementLayer``) is an ordinary layer of the checkpoint; the manifest's
``replacement_layers`` says where it sits and, with parameter sharing, where it is applied
again (shared applications are not stored twice).
"""
from __future__ import annotations

import json
from pathlib import Path

from harness.errors import UsageError
from harness.io import write_json_atomic
from harness.model.adapters import get_adapter
from harness.model.replacement import build_from_description, describe
from harness.model.surgery import (
    restore_layer_replacements,
    restore_replacements,
    strip_layer_replacements,
    strip_replacements,
)

MANIFEST = "pruning_manifest.json"
REPLACEMENTS = "replacements.safetensors"


def save_pruned(model, tokenizer, out_dir, manifest: dict) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter = get_adapter(model)
    found = strip_replacements(adapter)
    layer_plan = strip_layer_replacements(adapter)
    try:
        model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        entries, tensors = [], {}
        for k, item in enumerate(found):
            entries.append({"index": item["index"], "where": item["where"], **describe(item["module"])})
            for name, t in item["module"].state_dict().items():
                tensors[f"{k}.{name}"] = t.detach().cpu().contiguous()
        if entries:
            save_file(tensors, str(out / REPLACEMENTS))
        shared = any(e["shared_from"] is not None for e in layer_plan)
        write_json_atomic(out / MANIFEST, {**manifest, "saved_replacements": entries,
                                           "replacement_layers": layer_plan,
                                           "load_with": "harness.load_pruned" if entries or shared
                                           else "AutoModelForCausalLM"})
    finally:
        restore_layer_replacements(adapter, layer_plan)
        restore_replacements(adapter, found)
    return out


def load_pruned(path, dtype: str = "float32", device: str = "cpu"):
    """Load a directory written by ``save_pruned``; returns ``(model, tokenizer, manifest)``."""
    from safetensors.torch import load_file

    from harness.model.loading import load_model
    from harness.model.surgery import restore_replacements as _restore

    p = Path(path)
    if not (p / MANIFEST).is_file():
        raise UsageError(f"'{path}' has no {MANIFEST}; it was not written by --save-models")
    manifest = json.loads((p / MANIFEST).read_text())
    model, tok = load_model(str(p), dtype=dtype, device=device)
    restore_layer_replacements(get_adapter(model), manifest.get("replacement_layers"))
    entries = manifest.get("saved_replacements", [])
    if entries:
        tensors = load_file(str(p / REPLACEMENTS))
        found = []
        for k, e in enumerate(entries):
            module = build_from_description(e)
            state = {name[len(f"{k}."):]: t for name, t in tensors.items() if name.startswith(f"{k}.")}
            module.load_state_dict(state)
            ref = next(model.parameters())
            module.to(device=ref.device, dtype=ref.dtype)
            found.append({"index": e["index"], "where": e["where"], "module": module})
        _restore(get_adapter(model), found)
    model.eval()
    return model, tok, manifest

"""Model adapters: where each architecture keeps its decoder layers, norms and config.

``get_adapter(model)`` picks the adapter from ``config.model_type`` (an exact key in
``ADAPTERS``, never a substring of the checkpoint name). A decoder-only causal LM whose type
is not in the table is served by the structural fallback (``structural.py``: the decoder list
and final norm found in the module tree); only when that fails is the architecture
unsupported. ``check_supported_config`` (run on the config, before weights load) accepts
exactly the types that can get this far: table entries, and other decoder-only causal LMs.

Adding a family: subclass ``ModelAdapter`` (or the closest family) in ``families.py``, set
``model_types`` and the attribute names that differ, and add it to ``FAMILY_ADAPTERS``.
"""
from __future__ import annotations

from torch import nn

from harness.errors import UsageError
from harness.model.adapters.base import (
    ModelAdapter,
    ReplacedBlock,
    ReplacementLayer,
    first_tensor,
    is_norm,
    unwrap_layer,
)
from harness.model.adapters.families import (
    FAMILY_ADAPTERS,
    Gemma2Adapter,
    Gemma3TextAdapter,
    GemmaAdapter,
    GPTNeoXAdapter,
    LlamaAdapter,
    MixtralAdapter,
    OPTAdapter,
    Phi3Adapter,
    PhiAdapter,
    Qwen3Adapter,
)
from harness.model.adapters.structural import StructuralAdapter, Structure, find_structure

ADAPTERS: dict[str, type[ModelAdapter]] = {mt: cls for cls in FAMILY_ADAPTERS for mt in cls.model_types}


def supported_model_types() -> list[str]:
    """Model types with a dedicated adapter (others may still be served by structure)."""
    return sorted(ADAPTERS)


def _supported_hint() -> str:
    return (f"supported model types: {', '.join(supported_model_types())}, and other decoder-only causal LMs "
            "whose decoder layers and final norm can be found by structure (add an adapter in "
            "harness/model/adapters/families.py)")


def _not_decoder_only(config) -> str | None:
    """Why ``config`` is not a decoder-only causal LM the fallback could serve (None if it is)."""
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model, not a decoder-only causal LM"
    if getattr(config, "sub_configs", None):
        return "a composite (e.g. multimodal) model; pass its text-only causal LM"
    try:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM._model_mapping[type(config)]
    except Exception:  # noqa: BLE001 - not in the causal-LM mapping (or the mapping is unavailable)
        return "not a causal language model transformers can load with AutoModelForCausalLM"
    return None


def check_supported_config(config) -> None:
    """Before loading weights: a table type, or a decoder-only causal LM (structure checked later)."""
    model_type = getattr(config, "model_type", None)
    if model_type in ADAPTERS:
        return
    reason = _not_decoder_only(config)
    if reason is not None:
        raise UsageError(f"unsupported architecture '{model_type}': {reason}; {_supported_hint()}")


def get_adapter(model: nn.Module) -> ModelAdapter:
    model_type = getattr(model.config, "model_type", None)
    cls = ADAPTERS.get(model_type)
    if cls is not None:
        return cls(model)
    check_supported_config(model.config)
    structure = find_structure(model)
    if structure is None:
        raise UsageError(f"unsupported architecture '{model_type}': no decoder layer list (an nn.ModuleList of "
                         f"num_hidden_layers attention blocks) with a final norm found in {type(model).__name__}; "
                         f"{_supported_hint()}")
    return StructuralAdapter(model, structure)


__all__ = [
    "ADAPTERS", "FAMILY_ADAPTERS", "GPTNeoXAdapter", "Gemma2Adapter", "Gemma3TextAdapter", "GemmaAdapter",
    "LlamaAdapter", "MixtralAdapter", "ModelAdapter", "OPTAdapter", "Phi3Adapter", "PhiAdapter",
    "Qwen3Adapter", "ReplacedBlock", "ReplacementLayer", "StructuralAdapter", "Structure", "check_supported_config",
    "find_structure", "first_tensor", "get_adapter", "is_norm", "supported_model_types", "unwrap_layer",
]

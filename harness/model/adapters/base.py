"""Model adapters: where each architecture keeps its decoder layers, norms and config.

One small interface (``ModelAdapter``) hides the architecture quirks, in the spirit of
SliceGPT's adapters. The adapter is chosen from ``config.model_type`` (an exact key, never a
substring of the checkpoint name). Llama, Mistral and Qwen2 share one layout.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from harness.errors import UsageError


class ModelAdapter:
    """Uniform access to one causal LM's decoder stack.

    ``model`` is the ``*ForCausalLM`` module. Subclasses implement the ``_backbone`` path
    and the attribute names; everything else (renumbering, per-layer config lists, building
    a fresh layer) is shared.
    """

    model_types: tuple[str, ...] = ()
    layers_attr = "layers"
    attention_attr = "self_attn"
    # leaf names of a decoder layer's attention and MLP projections (LoRA's default targets)
    projections: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    # --- where things live -------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:  # the module holding ``layers``
        raise NotImplementedError

    @property
    def embeddings(self) -> list[nn.Module]:
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module | None:
        raise NotImplementedError

    @property
    def config(self):
        return self.model.config

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.backbone, self.layers_attr)

    def set_layers(self, layers: list[nn.Module]) -> None:
        """Install a new list of decoder layers and make config and layer indices agree."""
        setattr(self.backbone, self.layers_attr, nn.ModuleList(layers))
        self.config.num_hidden_layers = len(layers)
        self.renumber()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def layer_class(self) -> type:
        return type(unwrap_layer(self.layers[0]))

    def new_layer(self, layer_idx: int) -> nn.Module:
        """A freshly initialised decoder layer of the model's own type, on its device/dtype."""
        ref = next(self.layers[0].parameters())
        layer = self.layer_class(self.config, layer_idx)
        return layer.to(device=ref.device, dtype=ref.dtype)

    def attention_of(self, layer: nn.Module) -> nn.Module | None:
        return getattr(unwrap_layer(layer), self.attention_attr, None)

    def renumber(self) -> None:
        """Give attention modules consecutive ``layer_idx`` values (KV-cache slots)."""
        for i, layer in enumerate(self.layers):
            if isinstance(layer, ReplacementLayer):  # a shared layer takes its slot at call time
                layer.slot = i
            inner = unwrap_layer(layer)
            if hasattr(inner, "layer_idx"):
                inner.layer_idx = i
            attn = self.attention_of(layer)
            if attn is not None and hasattr(attn, "layer_idx"):
                attn.layer_idx = i

    def keep_layer_config(self, kept: list[int], original_count: int) -> None:
        """Slice per-layer config lists (e.g. ``layer_types``) to the kept layers."""
        for key, value in list(vars(self.config).items()):
            if isinstance(value, (list, tuple)) and len(value) == original_count and key.startswith("layer_"):
                setattr(self.config, key, type(value)(value[i] for i in kept))


class OPTAdapter(ModelAdapter):
    model_types = ("opt",)
    projections = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

    @property
    def backbone(self):
        return self.model.model.decoder

    @property
    def embeddings(self):
        dec = self.backbone
        mods = [dec.embed_tokens, dec.embed_positions]
        if getattr(dec, "project_in", None) is not None:
            mods.append(dec.project_in)
        return mods

    @property
    def final_norm(self):
        return getattr(self.backbone, "final_layer_norm", None)


class LlamaAdapter(ModelAdapter):
    """Llama, Mistral, Qwen2: ``model.model.layers``, ``model.model.norm``."""

    model_types = ("llama", "mistral", "qwen2")
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    @property
    def backbone(self):
        return self.model.model

    @property
    def embeddings(self):
        return [self.backbone.embed_tokens]

    @property
    def final_norm(self):
        return self.backbone.norm


class GPTNeoXAdapter(ModelAdapter):
    model_types = ("gpt_neox",)
    attention_attr = "attention"
    projections = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")

    @property
    def backbone(self):
        return self.model.gpt_neox

    @property
    def embeddings(self):
        return [self.backbone.embed_in]

    @property
    def final_norm(self):
        return self.backbone.final_layer_norm


ADAPTERS: dict[str, type[ModelAdapter]] = {}
for _cls in (OPTAdapter, LlamaAdapter, GPTNeoXAdapter):
    for _mt in _cls.model_types:
        ADAPTERS[_mt] = _cls


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def check_supported_config(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UsageError(
            f"unsupported architecture '{model_type}'; supported model types: "
            f"{', '.join(supported_model_types())} (add an adapter in harness/adapters.py)"
        )


def get_adapter(model: nn.Module) -> ModelAdapter:
    check_supported_config(model.config)
    return ADAPTERS[model.config.model_type](model)


# --- replacement wrapper -------------------------------------------------------------------

class ReplacedBlock(nn.Module):
    """A real decoder layer with a replacement network applied before (or after) it.

    The pruned window's replacement network carries no attention and needs no KV-cache slot,
    so it rides along with a neighbouring real layer: the layer list keeps only real layers,
    ``config.num_hidden_layers`` and every ``layer_idx`` stay consistent, and generation with
    a cache works. ``where='pre'`` computes ``layer(f(x))``; ``'post'`` computes ``f(layer(x))``.
    """

    def __init__(self, layer: nn.Module, replacement: nn.Module, where: str = "pre"):
        super().__init__()
        if where not in ("pre", "post"):
            raise ValueError("where must be 'pre' or 'post'")
        self.layer = layer
        self.replacement = replacement
        self.where = where

    def forward(self, hidden_states, *args, **kwargs):
        if self.where == "pre":
            return self.layer(self.replacement(hidden_states), *args, **kwargs)
        out = self.layer(hidden_states, *args, **kwargs)
        if isinstance(out, tuple):
            return (self.replacement(out[0]),) + tuple(out[1:])
        return self.replacement(out)

    @property
    def attention_type(self):  # some architectures read this attribute off each layer
        return getattr(self.layer, "attention_type", None)


class ReplacementLayer(nn.Module):
    """A decoder layer trained to stand in for a pruned window (LLM-Streamline's layer variants).

    Unlike an MLP it needs the attention mask, position embeddings and a KV-cache slot, so it
    sits in the layer list like any decoder layer and receives the model's own arguments. The
    wrapper only marks it as a replacement (LoRA leaves it alone; saving records where it is).
    Parameter sharing (one layer applied n times) uses n consecutive entries: the first owns the
    layer, the others (``shared=True``) hold a reference that is *not* a registered submodule,
    so the parameters exist (and are counted, saved, trained) once, while each application
    gets its own ``layer_idx`` (cache slot), set right before the call.
    """

    def __init__(self, layer: nn.Module, shared: bool = False):
        super().__init__()
        self.shared = bool(shared)
        if self.shared:
            self.__dict__["_shared_layer"] = layer  # a reference, not a submodule
        else:
            self.layer = layer
        self.slot: int | None = None

    @property
    def inner(self) -> nn.Module:
        return self.__dict__["_shared_layer"] if self.shared else self.layer

    def forward(self, hidden_states, *args, **kwargs):
        inner = self.inner
        if self.slot is not None:
            for module in inner.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = self.slot
        return inner(hidden_states, *args, **kwargs)

    @property
    def attention_type(self):
        return getattr(self.inner, "attention_type", None)

    def extra_repr(self) -> str:
        return f"shared={self.shared}, slot={self.slot}" + (f", layer={type(self.inner).__name__}" if self.shared else "")


def unwrap_layer(layer: nn.Module) -> nn.Module:
    while isinstance(layer, (ReplacedBlock, ReplacementLayer)):
        layer = layer.layer if isinstance(layer, ReplacedBlock) else layer.inner
    return layer


def first_tensor(output) -> torch.Tensor:
    """Decoder layers return a tensor (transformers 5) or a tuple whose first item is one."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the hidden states in a decoder layer output of type {type(output)}")


LayerFactory = Callable[[int], nn.Module]

"""The adapter interface: where a causal LM keeps its decoder layers, norms and per-layer config.

One small interface (``ModelAdapter``) hides the architecture quirks, in the spirit of
SliceGPT's adapters. Everything the rest of the harness needs to know about a model's
structure is asked here: the decoder list, the embeddings (and the scale some families apply
inside them), the final norm, the per-layer config lists, a layer's norms, weights and
projections, building a fresh layer and renumbering ``layer_idx``. The concrete adapters are
in ``families.py`` (chosen by ``config.model_type``) and ``structural.py`` (the fallback for
decoder-only models the table does not know).
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod

import torch
from torch import nn

from harness.finite import first_tensor  # noqa: F401 - re-exported: decoder-layer outputs -> hidden states


def is_norm(module: nn.Module) -> bool:
    """A normalisation module, recognised by structure: torch's norms or a class named ``*Norm``
    (``LlamaRMSNorm``, ``GemmaRMSNorm``, ``OlmoLayerNorm``, ...)."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or type(module).__name__.endswith("Norm")


def _get(module: nn.Module, dotted: str) -> nn.Module | None:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def after_head(config, z: torch.Tensor) -> torch.Tensor:
    """What a ``*ForCausalLM`` does to its LM head's output ``z`` before the softmax and loss:
    Cohere's ``logit_scale`` (multiply), Granite's ``logits_scaling`` (divide), then Gemma 2/3's
    ``final_logit_softcapping`` (``cap * tanh(z / cap)``)."""
    model_type = str(getattr(config, "model_type", ""))
    scale = getattr(config, "logit_scale", None) if "cohere" in model_type else None
    div = getattr(config, "logits_scaling", None) if "granite" in model_type else None
    cap = getattr(config, "final_logit_softcapping", None)
    if scale:
        z = z * scale
    if div:
        z = z / div
    return torch.tanh(z / cap) * cap if cap else z


class ModelAdapter(ABC):
    """Uniform access to one causal LM's decoder stack (``model`` is the ``*ForCausalLM`` module).

    A subclass names where things live (``backbone``, the attribute names below); everything
    else is shared. Class attributes:

    - ``layers_attr``: the backbone's ``nn.ModuleList`` of decoder layers.
    - ``embedding_attrs`` / ``final_norm_attr``: the backbone's input embeddings and final norm.
    - ``attention_attr``: a decoder layer's attention module (holds ``layer_idx``).
    - ``norm_names``: a decoder layer's norms, as dotted paths (entries a checkpoint does not
      have, e.g. Phi's optional ``q_layernorm``, are skipped); ``None`` = found by structure.
    - ``projections``: leaf names of a layer's ``nn.Linear`` projections (LoRA's default targets).
    - ``per_layer_config_prefixes``: config keys holding one value per layer (``layer_types``).
    - ``norm_offset``: the norms compute ``x_hat * (norm_offset + weight)`` (Gemma: 1).
    """

    model_types: tuple[str, ...] = ()
    layers_attr = "layers"
    attention_attr: str | None = "self_attn"
    embedding_attrs: tuple[str, ...] = ("embed_tokens",)
    final_norm_attr = "norm"
    norm_names: tuple[str, ...] | None = None
    projections: tuple[str, ...] = ()
    per_layer_config_prefixes: tuple[str, ...] = ("layer_",)
    norm_offset: float = 0.0
    experts_attr: str | None = None  # a sparse-MoE layer's experts module (dotted path), e.g. "mlp.experts"
    expert_parameters: tuple[str, ...] = ()  # its stacked (E, out, in) parameters, e.g. ("gate_up_proj", "down_proj")

    def __init__(self, model: nn.Module):
        self.model = model

    # --- where things live -------------------------------------------------------------
    @property
    @abstractmethod
    def backbone(self) -> nn.Module:
        """The module holding the decoder layer list (``model.model`` for Llama)."""

    @property
    def embeddings(self) -> list[nn.Module]:
        """The input embedding modules (token embedding first), in the backbone's order."""
        return [m for m in (getattr(self.backbone, a, None) for a in self.embedding_attrs) if m is not None]

    @property
    def embedding_scale(self) -> float:
        """The factor the token-embedding module applies itself: X_0 = scale * E[ids].

        1 for most families; Gemma 1-3 multiply by sqrt(hidden_size) inside the embedding module
        (so hooks on layer 0 already see scaled states, while a tied LM head uses the unscaled E).
        """
        return float(getattr(self.embeddings[0], "scalar_embed_scale", 1.0)) if self.embeddings else 1.0

    @property
    def final_norm(self) -> nn.Module | None:
        return getattr(self.backbone, self.final_norm_attr, None)

    @property
    def lm_head(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from X_L (the last decoder layer's output): final norm, LM head, and what the
        family does to the head's output (``after_head``)."""
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        return after_head(self.config, self.lm_head(hidden))

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

    # --- building and numbering layers -------------------------------------------------
    def new_layer(self, layer_idx: int, init: bool = False) -> nn.Module:
        """A new decoder layer of the model's own type for position ``layer_idx``, on its
        device/dtype. ``init=True`` applies the model's own initialisation (``_init_weights``,
        e.g. normal(0, 0.02) and Gemma's zero-centred norms) instead of torch's defaults."""
        ref = next(self.layers[0].parameters())
        layer = self._construct_layer(layer_idx).to(device=ref.device, dtype=ref.dtype)
        if init:
            init_fn = getattr(self.model, "_init_weights", None)
            if callable(init_fn):
                with torch.no_grad():
                    for module in layer.modules():
                        init_fn(module)
        return layer

    def _construct_layer(self, layer_idx: int) -> nn.Module:
        cls = self.layer_class
        try:
            return cls(self.config, layer_idx)
        except TypeError:  # a constructor with another signature: copy a layer (re-initialised by init=True)
            layer = copy.deepcopy(unwrap_layer(self.layers[0]))
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = layer_idx
            return layer

    def attention_of(self, layer: nn.Module) -> nn.Module | None:
        if self.attention_attr is None:
            return None
        return _get(unwrap_layer(layer), self.attention_attr)

    def renumber(self) -> None:
        """Give every layer's modules consecutive ``layer_idx`` values (KV-cache slots)."""
        for i, layer in enumerate(self.layers):
            if isinstance(layer, ReplacementLayer):  # a shared layer takes its slot at call time
                layer.slot = i
            for module in unwrap_layer(layer).modules():  # the layer's own and its attention's, at any depth
                if hasattr(module, "layer_idx"):
                    module.layer_idx = i

    # --- per-layer config lists --------------------------------------------------------
    def is_per_layer_config(self, key: str, value, count: int) -> bool:
        """The one rule for config entries that hold a value per decoder layer (``layer_types``):
        a list/tuple of length ``count`` under a key starting with ``per_layer_config_prefixes``."""
        return (isinstance(value, (list, tuple)) and len(value) == count
                and key.startswith(self.per_layer_config_prefixes))

    def per_layer_config(self, count: int | None = None) -> dict:
        """``{key: list}`` of the config's per-layer lists for a model of ``count`` layers (default: now)."""
        count = self.num_layers if count is None else count
        return {k: v for k, v in vars(self.config).items() if self.is_per_layer_config(k, v, count)}

    def remap_layer_config(self, source: list[int], count: int) -> None:
        """Rebuild each per-layer list of a ``count``-layer config as ``[value[j] for j in source]``
        (``source``: for each new layer, the old layer whose values it takes)."""
        for key, value in self.per_layer_config(count).items():
            setattr(self.config, key, type(value)(value[j] for j in source))

    def keep_layer_config(self, kept: list[int], original_count: int) -> None:
        """Slice per-layer config lists (e.g. ``layer_types``) to the kept layers."""
        self.remap_layer_config(list(kept), original_count)

    @property
    def attention_types(self) -> list[str] | None:
        """Per-layer attention types (``config.layer_types``: 'full_attention', 'sliding_attention'), or None."""
        types = getattr(self.config, "layer_types", None)
        return list(types) if types is not None else None

    @property
    def sliding_window(self) -> int | None:
        return getattr(self.config, "sliding_window", None)

    # --- a layer's norms, weights and projections --------------------------------------
    def layer_norms(self, layer: nn.Module) -> dict[str, nn.Module]:
        """``{dotted name in the layer: norm module}`` (the layer unwrapped from any replacement wrapper)."""
        inner = unwrap_layer(layer)
        if self.norm_names is None:
            found = {}
            for name, module in inner.named_modules():
                if name and is_norm(module) and not any(name.startswith(n + ".") for n in found):
                    found[name] = module
            return found
        return {n: m for n, m in ((n, _get(inner, n)) for n in self.norm_names) if m is not None}

    def layer_weights(self, layer: nn.Module) -> dict[str, nn.Parameter]:
        """Every parameter of the layer outside its norms: attention, MLP, router and every
        expert (MoE experts are stacked tensors, one slice per expert), biases included.
        Names are relative to the unwrapped layer. LaCo merges exactly these."""
        inner = unwrap_layer(layer)
        norms = list(self.layer_norms(inner))
        return {name: p for name, p in inner.named_parameters()
                if not any(name == n or name.startswith(n + ".") for n in norms)}

    def layer_projections(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """``{name: weight matrix}`` of each linear map in the layer (norms excluded).

        A 2-D ``*.weight`` is named by its module (``self_attn.q_proj``); a stacked expert
        tensor ``(E, out, in)`` gives one entry per expert (``mlp.experts.3.down_proj``).
        Families with fused projections split them into views (``_split_fused``), so q/k/v and
        gate/up have their own entries everywhere. Values are views of the parameters.
        """
        out: dict[str, torch.Tensor] = {}
        for name, p in self.layer_weights(layer).items():
            module, _, leaf = name.rpartition(".")
            if p.dim() == 2 and leaf == "weight":
                out.update(self._split_fused(module, p))
            elif p.dim() == 3:  # experts stacked on the first dimension
                for e in range(p.shape[0]):
                    out.update(self._split_fused(f"{module}.{e}.{leaf}" if module else f"{e}.{leaf}", p[e]))
        return out

    def expert_parameter_paths(self) -> list[str]:
        """Dotted paths (relative to a layer) of the stacked expert tensors, e.g.
        ``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``; empty for dense MLPs.
        PEFT's ``LoraConfig(target_parameters=...)`` takes these to adapt every expert."""
        return [f"{self.experts_attr}.{p}" for p in self.expert_parameters] if self.experts_attr else []

    def _split_fused(self, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: weight}

    def norm_scale(self, norm: nn.Module) -> torch.Tensor | None:
        """The multiplicative scale a norm applies: ``weight + norm_offset`` (None without a weight)."""
        w = getattr(norm, "weight", None)
        return None if w is None else w + self.norm_offset

    def describe(self) -> dict:
        """What the adapter found (for error messages and manifests)."""
        return {"adapter": type(self).__name__, "model_type": getattr(self.config, "model_type", None),
                "num_layers": self.num_layers, "layer_class": self.layer_class.__name__,
                "final_norm": type(self.final_norm).__name__ if self.final_norm is not None else None}


# --- replacement wrappers ------------------------------------------------------------------

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



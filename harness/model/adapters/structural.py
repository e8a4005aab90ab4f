"""The structural fallback: an adapter for a decoder-only model the family table does not know.

It looks at the module tree, not at names:
- the decoder layers: an ``nn.ModuleList`` of ``config.num_hidden_layers`` modules of one class,
  each with an attention-like submodule (one holding ``layer_idx``, or a class named
  ``*Attention``); the largest such list (by parameters) wins;
- the backbone: that list's parent module;
- the final norm: a norm (``base.is_norm``) that is a direct child of the backbone (the last
  one registered), else a direct child of the model itself;
- the embeddings: the ``nn.Embedding`` children of the backbone.
Norms, weights and projections of a layer then come from structure too (``norm_names = None``).
``find_structure`` returns None when any of this is missing; ``get_adapter`` then raises the
unsupported-architecture error.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from harness.model.adapters.base import ModelAdapter, is_norm, unwrap_layer


@dataclass
class Structure:
    backbone_path: str  # "" = the model itself
    layers_attr: str
    final_norm_attr: str
    final_norm_on_model: bool  # the final norm is a child of the model, not of the backbone
    embedding_attrs: tuple[str, ...]
    attention_attr: str | None
    projections: tuple[str, ...]


def _attention_child(layer: nn.Module) -> str | None:
    for name, child in layer.named_children():
        if hasattr(child, "layer_idx") or "attention" in type(child).__name__.lower():
            return name
    return None


def _has_attention(layer: nn.Module) -> bool:
    return any(hasattr(m, "layer_idx") or "attention" in type(m).__name__.lower() for m in layer.modules())


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_structure(model: nn.Module) -> Structure | None:
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    best, best_size = None, -1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or not name:
            continue
        if count is not None and len(module) != count:
            continue
        inner = [unwrap_layer(m) for m in module]  # a list with replacement wrappers is still the decoder list
        if len({type(m) for m in inner}) != 1 or not _has_attention(inner[0]) or _param_count(inner[0]) == 0:
            continue
        size = _param_count(module)
        if size > best_size:
            best, best_size = name, size
    if best is None:
        return None
    backbone_path, _, layers_attr = best.rpartition(".")
    backbone = model.get_submodule(backbone_path) if backbone_path else model
    layers = getattr(backbone, layers_attr)

    final, on_model = None, False
    for child_name, child in backbone.named_children():
        if child_name != layers_attr and is_norm(child):
            final = child_name  # the last norm registered on the backbone
    if final is None and backbone is not model:
        for child_name, child in model.named_children():
            if is_norm(child):
                final, on_model = child_name, True
    if final is None:
        return None
    embeddings = tuple(n for n, c in backbone.named_children() if isinstance(c, nn.Embedding))
    first = unwrap_layer(layers[0])
    linear_leaves = sorted({n.rsplit(".", 1)[-1] for n, m in first.named_modules() if isinstance(m, nn.Linear)})
    return Structure(backbone_path, layers_attr, final, on_model, embeddings, _attention_child(first),
                     tuple(linear_leaves))


class StructuralAdapter(ModelAdapter):
    """An adapter built from a ``Structure`` found in the module tree (see the module docstring)."""

    norm_names = None  # found by structure

    def __init__(self, model: nn.Module, structure: Structure):
        super().__init__(model)
        self.structure = structure
        self.layers_attr = structure.layers_attr
        self.final_norm_attr = structure.final_norm_attr
        self.embedding_attrs = structure.embedding_attrs
        self.attention_attr = structure.attention_attr
        self.projections = structure.projections
        self.model_types = (getattr(model.config, "model_type", None),)

    @property
    def backbone(self) -> nn.Module:
        path = self.structure.backbone_path
        return self.model.get_submodule(path) if path else self.model

    @property
    def final_norm(self) -> nn.Module | None:
        owner = self.model if self.structure.final_norm_on_model else self.backbone
        return getattr(owner, self.final_norm_attr, None)

    def describe(self) -> dict:
        s = self.structure
        return {**super().describe(), "found_by": "structure",
                "layers": f"{s.backbone_path + '.' if s.backbone_path else ''}{s.layers_attr}",
                "final_norm_attr": s.final_norm_attr}

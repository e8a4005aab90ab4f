"""Layer surgery: remove decoder layers, insert replacement networks, count parameters."""
from __future__ import annotations

from torch import nn

from .adapters import ModelAdapter, ReplacedBlock, unwrap_layer
from .errors import UsageError


def count_params(module: nn.Module) -> int:
    """Unique parameters (tied embeddings are counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def remove_layers(adapter: ModelAdapter, indices) -> list[int]:
    """Delete the decoder layers at ``indices`` (positions in the current list).

    Renumbers every remaining attention module's ``layer_idx``, sets
    ``config.num_hidden_layers`` and slices per-layer config lists. Returns the kept positions.
    """
    n = adapter.num_layers
    drop = sorted(set(int(i) for i in indices))
    if not drop:
        return list(range(n))
    if drop[0] < 0 or drop[-1] >= n:
        raise UsageError(f"layer indices {drop} out of range for a model with {n} layers")
    if len(drop) >= n:
        raise UsageError(f"cannot remove {len(drop)} layers from a model with {n} layers; keep at least one")
    kept = [i for i in range(n) if i not in drop]
    old = list(adapter.layers)
    adapter.keep_layer_config(kept, n)
    adapter.set_layers([old[i] for i in kept])
    return kept


def snapshot_layers(adapter: ModelAdapter) -> dict:
    """What ``remove_layers`` changes (layer list, per-layer config lists), for ``restore_layers``.

    Holds references to the layer modules, not copies: trying a removal and rolling it back
    costs no memory for the layers themselves.
    """
    n = adapter.num_layers
    per_layer = {k: v for k, v in vars(adapter.config).items()
                 if isinstance(v, (list, tuple)) and len(v) == n and k.startswith("layer_")}
    return {"layers": list(adapter.layers), "config": per_layer}


def restore_layers(adapter: ModelAdapter, snapshot: dict) -> None:
    """Undo layer removals made since ``snapshot_layers`` (weights are not touched)."""
    for key, value in snapshot["config"].items():
        setattr(adapter.config, key, value)
    adapter.set_layers(snapshot["layers"])


def insert_replacement(adapter: ModelAdapter, position: int, replacement: nn.Module) -> str:
    """Attach ``replacement`` so it runs where the removed window was.

    ``position`` is the index (in the pruned layer list) of the first layer after the window.
    The replacement wraps that layer (applied before it), or the last layer (applied after it)
    when the window was at the end. Returns 'pre' or 'post'.
    """
    layers = list(adapter.layers)
    ref = next(layers[0].parameters())
    replacement.to(device=ref.device, dtype=ref.dtype)
    if position < len(layers):
        layers[position] = ReplacedBlock(layers[position], replacement, "pre")
        where = "pre"
    else:
        layers[-1] = ReplacedBlock(layers[-1], replacement, "post")
        where = "post"
    adapter.set_layers(layers)
    return where


def strip_replacements(adapter: ModelAdapter) -> list[dict]:
    """Unwrap every ReplacedBlock; return where each replacement sat (for saving)."""
    found = []
    layers = []
    for i, layer in enumerate(adapter.layers):
        if isinstance(layer, ReplacedBlock):
            found.append({"index": i, "where": layer.where, "module": layer.replacement})
        layers.append(unwrap_layer(layer))
    adapter.set_layers(layers)
    return found


def restore_replacements(adapter: ModelAdapter, found: list[dict]) -> None:
    layers = list(adapter.layers)
    for item in found:
        layers[item["index"]] = ReplacedBlock(layers[item["index"]], item["module"], item["where"])
    adapter.set_layers(layers)

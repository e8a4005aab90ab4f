"""Layer surgery: remove decoder layers, insert replacement networks, count parameters."""
from __future__ import annotations

import copy

from torch import nn

from harness.errors import UsageError
from harness.model.adapters import ModelAdapter, ReplacedBlock, ReplacementLayer


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
    return {"layers": list(adapter.layers), "config": adapter.per_layer_config()}


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
        while isinstance(layer, ReplacedBlock):  # only these: a ReplacementLayer is a layer of its own
            layer = layer.layer
        layers.append(layer)
    adapter.set_layers(layers)
    return found


def restore_replacements(adapter: ModelAdapter, found: list[dict]) -> None:
    layers = list(adapter.layers)
    for item in found:
        layers[item["index"]] = ReplacedBlock(layers[item["index"]], item["module"], item["where"])
    adapter.set_layers(layers)


# --- decoder-layer replacements (a trained layer in the window's place, optionally shared) ---

def insert_layer_replacement(adapter: ModelAdapter, start: int, n: int, layer: nn.Module, repeat: int = 1) -> list[int]:
    """Put ``layer`` where the window ``start..start+n-1`` (current positions) was.

    ``repeat`` = 1: one entry; > 1: the same layer applied ``repeat`` times (parameter sharing),
    as one owning ``ReplacementLayer`` and ``repeat - 1`` shared ones, each with its own
    KV-cache slot. Per-layer config lists give the new entries the window's first value.
    Returns the new entries' positions.
    """
    count = adapter.num_layers
    if n < 1 or repeat < 1 or not 0 <= start <= count - n:
        raise UsageError(f"a replacement for layers {start}..{start + n - 1} (x{repeat}) does not fit {count} layers")
    ref = next(adapter.layers[0].parameters())
    layer.to(device=ref.device, dtype=ref.dtype)
    old = list(adapter.layers)
    adapter.remap_layer_config(list(range(start)) + [start] * repeat + list(range(start + n, count)), count)
    entries = [ReplacementLayer(layer)] + [ReplacementLayer(layer, shared=True) for _ in range(repeat - 1)]
    adapter.set_layers(old[:start] + entries + old[start + n:])
    return list(range(start, start + repeat))


def strip_layer_replacements(adapter: ModelAdapter, keep_shared: bool = False) -> list[dict]:
    """Turn every ``ReplacementLayer`` back into a plain decoder layer. A shared entry is dropped
    (its layer is stored once, in its owner) or, with ``keep_shared``, becomes a copy of its
    owner's layer (a checkpoint stock tools load exactly). Returns where each entry sat
    (``{"index", "shared_from"}``, indices in the full list) for ``restore_layer_replacements``."""
    layers = list(adapter.layers)
    count = len(layers)
    plan, kept, plain = [], [], []
    owner_of: dict[int, int] = {}
    for i, layer in enumerate(layers):
        if isinstance(layer, ReplacementLayer):
            if layer.shared:
                if id(layer.inner) not in owner_of:
                    raise ValueError(f"shared replacement layer at {i} has no owning entry before it")
                plan.append({"index": i, "shared_from": owner_of[id(layer.inner)]})
                if not keep_shared:
                    continue
                layer = copy.deepcopy(layer.inner)
            else:
                owner_of[id(layer.inner)] = i
                plan.append({"index": i, "shared_from": None})
                layer = layer.inner
        kept.append(i)
        plain.append(layer)
    if plan:
        adapter.keep_layer_config(kept, count)
        adapter.set_layers(plain)
    return plan


def restore_layer_replacements(adapter: ModelAdapter, plan: list[dict] | None) -> None:
    """Re-create the ``ReplacementLayer`` entries described by ``strip_layer_replacements``."""
    if not plan:
        return
    plain = list(adapter.layers)
    by_index = {e["index"]: e for e in plan}
    count = len(plain) + sum(1 for e in plan if e["shared_from"] is not None)
    layers, pos, source = [], 0, []  # source[i]: position in ``plain`` that entry i takes config values from
    for i in range(count):
        e = by_index.get(i)
        if e is not None and e["shared_from"] is not None:
            owner = layers[e["shared_from"]]
            layers.append(ReplacementLayer(owner.inner, shared=True))
            source.append(source[e["shared_from"]])
            continue
        layer = plain[pos]
        layers.append(ReplacementLayer(layer) if e is not None else layer)
        source.append(pos)
        pos += 1
    if pos != len(plain):
        raise ValueError(f"replacement layer plan does not match a model with {len(plain)} layers")
    adapter.remap_layer_config(source, len(plain))
    adapter.set_layers(layers)

"""Pruned models share the dense model's weights.

A method never works on a copy of the dense model. It gets a *shell* (``shell_of``): a new
model object whose every module is a new ``nn.Module`` object (its own attributes, hooks,
``training`` flag, submodule dict and ``layer_idx``) holding the *same* parameter and buffer
tensors as the dense model, plus its own copy of the config. So a method may restructure its
model freely - remove layers, wrap them (``ReplacedBlock``), let PEFT swap a projection for a
LoRA layer, renumber ``layer_idx`` - and none of it reaches the dense model or another method's
model; the shell costs a few kilobytes, not a model.

What a shell may not do is change a shared tensor's values. A method that changes weights
copies the modules it changes first, explicitly: ``own_layer(adapter, i)`` (``ctx.own_layer(i)``)
replaces layer ``i`` of the shell by a deep copy with its own tensors and returns it
(LaCo's merge base, LoRA's adapted layers); a decoder-layer replacement initialised from a
pruned layer is ``copy_module(layer)``. Everything a method creates (an MLP replacement, an
optimizer) is its own anyway.

``WeightGuard`` catches a method that forgets: it records every dense parameter's in-place
version counter and ``check()`` raises if one moved (an optimizer step, ``copy_``, ``add_`` on
a parameter or a ``.detach()`` of it). Writes through ``.data`` bypass version counters; the
test in tests/test_sharing.py hashes the whole dense state dict around a sweep of every
registered method for those.

Modules dispatched by accelerate (``--device auto``: ``device_map='auto'``) carry their hook
as a ``functools.partial`` bound to the module in ``forward``; the shell rebinds such
attributes (bound methods and partials whose first argument is the module) to its own module,
so a shell runs its own structure on the same devices - no reload per method.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import types

import torch
from torch import nn

OWNED_ATTR = "_sb_owned"  # set on modules a shell owns (copied tensors); never on shared ones


def shell_of(model: nn.Module) -> nn.Module:
    """A new model over the same tensors: own module objects and config, shared weights."""
    memo: dict[int, object] = {}
    config = getattr(model, "config", None)
    if config is not None:
        memo[id(config)] = copy.deepcopy(config)
    return _clone_structure(model, memo)


def _clone_structure(module: nn.Module, memo: dict) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    new = object.__new__(type(module))
    memo[id(module)] = new
    state = dict(module.__dict__)
    state["_parameters"] = dict(module._parameters)  # the same Parameter objects
    state["_buffers"] = dict(module._buffers)
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    state["_modules"] = {name: None if child is None else _clone_structure(child, memo)
                         for name, child in module._modules.items()}
    for key, value in list(state.items()):
        if key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            continue
        if isinstance(value, dict) and key.startswith("_") and "hook" in key:
            state[key] = type(value)(value)  # hooks registered on the shell stay on the shell
        elif isinstance(value, nn.Module):  # a plain reference (e.g. a shared replacement layer)
            state[key] = _clone_structure(value, memo)
        elif id(value) in memo:  # the config
            state[key] = memo[id(value)]
        else:
            state[key] = _rebind(value, module, new)
    new.__dict__ = state
    return new


def _rebind(value, old: nn.Module, new: nn.Module):
    """Bound methods and partials (accelerate's hooked ``forward``) of ``old`` -> of ``new``."""
    if isinstance(value, types.MethodType) and value.__self__ is old:
        return types.MethodType(value.__func__, new)
    if isinstance(value, functools.partial) and value.args and value.args[0] is old:
        bound = functools.partial(value.func, new, *value.args[1:], **(value.keywords or {}))
        for key, item in vars(value).items():  # update_wrapper's attributes; __wrapped__ is old.forward
            setattr(bound, key, _rebind(item, old, new))
        return bound
    return value


def copy_module(module: nn.Module, config=None) -> nn.Module:
    """A deep copy with its own tensors (same devices and dtypes); ``config`` is referenced, not
    copied. The copy is marked owned."""
    memo: dict[int, object] = {}
    if config is not None:
        memo[id(config)] = config
    for m in module.modules():  # accelerate's hook objects are shared, not copied (offload maps)
        hook = getattr(m, "_hf_hook", None)
        if hook is not None:
            memo[id(hook)] = hook
    out = copy.deepcopy(module, memo)
    for m in out.modules():
        setattr(m, OWNED_ATTR, True)
    return out


def is_owned(module: nn.Module) -> bool:
    return bool(getattr(module, OWNED_ATTR, False))


def own_layer(adapter, index: int) -> nn.Module:
    """Give the model's decoder layer ``index`` (current position) its own tensors and return it.

    Call it before changing a layer's weights in place. The shared layer is replaced in the
    layer list by a deep copy (already-owned layers are returned as they are), so the change
    stays in this model. ``restore_layers`` with a snapshot taken before puts the shared layer
    back (the copy is dropped: a rejected tentative merge costs one layer for a moment).
    """
    layers = list(adapter.layers)
    if not -len(layers) <= index < len(layers):
        raise IndexError(f"layer {index} out of range for a model with {len(layers)} layers")
    layer = layers[index]
    if is_owned(layer):
        return layer
    owned = copy_module(layer, adapter.config)
    layers[index] = owned
    adapter.set_layers(layers)
    return owned


def own_all_layers(adapter, skip=()) -> list[int]:
    """``own_layer`` for every decoder layer (LoRA merges into all of them); returns the indices
    copied. Decoder-layer replacements (``ReplacementLayer``: the method's own, possibly applied
    several times) and layers of the types in ``skip`` are left alone."""
    from harness.model.adapters import ReplacementLayer

    copied = []
    skip = (ReplacementLayer,) + tuple(skip)
    for i, layer in enumerate(list(adapter.layers)):
        if is_owned(layer) or isinstance(layer, skip):
            continue
        own_layer(adapter, i)
        copied.append(i)
    return copied


def shared_tensor_ids(dense: nn.Module) -> set[int]:
    """Storage addresses of the dense model's tensors (to tell a shell's own tensors apart; a view
    into a dense storage at an offset counts as the dense model's)."""
    return {t.untyped_storage().data_ptr() for t in list(dense.parameters()) + list(dense.buffers())}


def own_tensors(shell: nn.Module, dense: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The shell's parameters and buffers that are not the dense model's (copied or new)."""
    shared = shared_tensor_ids(dense)
    out = []
    for name, t in list(shell.named_parameters(remove_duplicate=True)) + list(shell.named_buffers()):
        if t.untyped_storage().data_ptr() not in shared:
            out.append((name, t))
    return out


class WeightGuard:
    """Detects in-place changes to the dense model's parameters (their version counters)."""

    def __init__(self, dense: nn.Module):
        self.params = [(name, p, p._version) for name, p in dense.named_parameters()]

    def changed(self) -> list[str]:
        return [name for name, p, v in self.params if p._version != v]

    def check(self, who: str) -> None:
        bad = self.changed()
        if bad:
            raise RuntimeError(
                f"{who} changed {len(bad)} weight(s) of the dense model in place (first: {bad[0]}); a method "
                "must copy a layer before changing its weights (ctx.own_layer(i), harness.copy_module)")


_SIMPLE = (bool, int, float, str, type(None))


def _tensors(model: nn.Module):
    """Every parameter and buffer (non-persistent ones included, e.g. rotary frequencies), by name."""
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _module_state(module: nn.Module) -> list:
    """A module's class, its plain attributes (layer_idx, scaling, is_sliding, ...) and its hooks:
    what changes its forward without being a tensor."""
    attrs = sorted((k, v) for k, v in vars(module).items() if not k.startswith("_") and (
        isinstance(v, _SIMPLE) or isinstance(v, (tuple, list)) and all(isinstance(x, _SIMPLE) for x in v)))
    hooks = [getattr(fn, "__qualname__", type(fn).__name__) for d in (module._forward_pre_hooks, module._forward_hooks)
             for fn in d.values()]
    return [type(module).__module__ + "." + type(module).__qualname__, attrs, hooks]


def fingerprint(shell: nn.Module, dense: nn.Module) -> str | None:
    """What a pruned model computes, as a SHA-256: its module tree (classes, plain attributes, hooks)
    and config, and per parameter and buffer either the dense tensor it shares (by name, offset,
    shape and stride: those are the dense model's bytes) or its own bytes. Two shells of one dense
    model with equal fingerprints are the same network, so their evaluations are equal (the runner
    reuses one for the other). None where a tensor is not in memory (meta, offloaded)."""
    import json

    def where_key(t):
        return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype

    where = {}
    for name, t in _tensors(dense):
        if t.device.type == "meta":
            return None
        where.setdefault(where_key(t), name)
    h = hashlib.sha256()
    config = getattr(shell, "config", None)
    tree = [[name, _module_state(m)] for name, m in shell.named_modules(remove_duplicate=False)]
    # the whole config, not its diff against the class defaults (those are process state); where it
    # was loaded from is the evaluation key's business
    settings = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"} if config is not None else None
    h.update(json.dumps([tree, settings], sort_keys=True, default=str).encode())
    for name, t in _tensors(shell):
        if t.device.type == "meta":
            return None
        h.update(f"\n{name} {t.dtype} {tuple(t.shape)} ".encode())
        src = where.get(where_key(t))
        if src is not None:
            h.update(f"= dense {src}".encode())
        else:
            t = t.detach().cpu().contiguous()
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_hash(model: nn.Module) -> str:
    """SHA-256 over every state-dict tensor (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()

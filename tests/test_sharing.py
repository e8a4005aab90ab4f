"""Pruned models share the dense weights (harness.model.sharing): no method can change the dense model."""
import dataclasses
import functools

import pytest
import torch
from conftest import CharTokenizer, tiny_model

from harness import get_adapter
from harness.model.sharing import (
    WeightGuard,
    copy_module,
    own_layer,
    shell_of,
    state_hash,
)
from harness.model.surgery import remove_layers, restore_layers, snapshot_layers
from harness.plugins.context import MethodContext
from harness.plugins.pipeline import resolve_method
from harness.plugins.registry import available_methods
from harness.signals.calibration import CalibrationConfig, CalibrationData


def _ids(seed=0, samples=8, seq=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (samples, seq), generator=g)
    return ids, torch.ones_like(ids)


def _logits(model, ids, mask, use_cache=False):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=use_cache).logits


def test_shell_shares_tensors_not_structure():
    dense = tiny_model("llama", layers=6)
    ids, mask = _ids()
    before = _logits(dense, ids, mask)
    shell = shell_of(dense)
    da, sa = get_adapter(dense), get_adapter(shell)
    assert shell is not dense and shell.config is not dense.config
    assert all(a is not b for a, b in zip(da.layers, sa.layers))
    dense_ptrs = {p.data_ptr() for p in dense.parameters()}
    assert {p.data_ptr() for p in shell.parameters()} == dense_ptrs  # no tensor copied
    # submodules hold the shell's config, not the dense one
    assert all(getattr(m, "config", shell.config) is shell.config for m in shell.modules())
    torch.testing.assert_close(_logits(shell, ids, mask), before, rtol=0, atol=0)

    remove_layers(sa, [1, 2])
    assert da.num_layers == 6 and dense.config.num_hidden_layers == 6 and shell.config.num_hidden_layers == 4
    assert [da.attention_of(layer).layer_idx for layer in da.layers] == list(range(6))  # renumbering stays in the shell
    assert [sa.attention_of(layer).layer_idx for layer in sa.layers] == list(range(4))
    # the dense model is untouched, with a KV cache too (duplicate layer_idx would break it)
    torch.testing.assert_close(_logits(dense, ids, mask, use_cache=True), before, rtol=0, atol=0)
    shell.train()
    assert not dense.training and not any(m.training for m in dense.modules())


def test_own_layer_copies_one_layer_and_restore_drops_it():
    dense = tiny_model("opt", layers=5)
    h = state_hash(dense)
    shell = shell_of(dense)
    sa = get_adapter(shell)
    guard = WeightGuard(dense)
    snap = snapshot_layers(sa)
    owned = own_layer(sa, 2)
    assert own_layer(sa, 2) is owned  # owned once
    shared = {p.data_ptr() for p in dense.parameters()}
    assert not {p.data_ptr() for p in owned.parameters()} & shared
    with torch.no_grad():
        for p in owned.parameters():
            p.add_(1.0)
    guard.check("test")
    assert state_hash(dense) == h
    restore_layers(sa, snap)
    assert sa.layers[2] is snap["layers"][2]
    # an in-place change to a shared tensor is caught
    with torch.no_grad():
        next(sa.layers[0].parameters()).mul_(2.0)
    with pytest.raises(RuntimeError, match="changed 1 weight"):
        guard.check("method 'x'")


def test_copy_module_references_the_config():
    dense = tiny_model("llama", layers=3)
    layer = get_adapter(dense).layers[1]
    copy = copy_module(layer, dense.config)
    assert copy.self_attn.config is dense.config
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(copy.parameters(), layer.parameters()))


def test_shell_rebinds_accelerate_hooks():
    """``--device auto`` models carry accelerate hooks bound to each module: a shell runs its own modules."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Count(ModelHook):
        def __init__(self):
            self.calls = []

        def pre_forward(self, module, *args, **kwargs):
            self.calls.append(module)
            return args, kwargs

    dense = tiny_model("llama", layers=4)
    hook = Count()
    add_hook_to_module(dense, hook)
    for layer in get_adapter(dense).layers:
        add_hook_to_module(layer, hook)
    ids, mask = _ids()
    before = _logits(dense, ids, mask)
    shell = shell_of(dense)
    assert isinstance(shell.forward, functools.partial) and shell.forward.args[0] is shell
    remove_layers(get_adapter(shell), [0])
    hook.calls.clear()
    after = _logits(shell, ids, mask)
    assert hook.calls[0] is shell and len(hook.calls) == 1 + 3  # the shell and its three layers ran
    assert not torch.equal(after, before)
    torch.testing.assert_close(_logits(dense, ids, mask), before, rtol=0, atol=0)



SMALL = {"train_samples": "8", "epochs": "1", "batch_size": "4", "post_train_steps": "1",
         "post_train_batch_size": "4"}


def _options(name):
    """Small training settings for every component of ``name`` that has them."""
    spec, cfg = resolve_method(name, {})
    parts = name.split("+")
    out = {}
    configs = [cfg] if len(parts) == 1 else [c for _n, c in cfg.items()]
    for part, c in zip(parts, configs):
        fields = {f.name for f in dataclasses.fields(c)}
        opts = {k: v for k, v in SMALL.items() if k in fields}
        if part == "lora":
            opts = {"steps": "1", "batch_size": "4"}
        if opts:
            out[part] = opts
    return out


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_sweep_of_every_method_leaves_the_dense_model_unchanged(family):
    names = list(available_methods())
    names += [f"{names[0]}+lora", "streamline+lora"]
    dense = tiny_model(family, layers=6)
    h = state_hash(dense)
    ids, mask = _ids()
    before = _logits(dense, ids, mask)
    cal = CalibrationData(ids, mask, CalibrationConfig(source="x.txt", seq_len=16, batch_size=4), {})
    stats_cache = {}
    for name in names:
        spec, cfg = resolve_method(name, _options(name))
        shell = shell_of(dense)
        ctx = MethodContext(model=shell, adapter=get_adapter(shell), tokenizer=CharTokenizer(), calibration=cal, num_remove=2,
                            progress=False, stats_cache=stats_cache, dense_stats_key="dense")
        ctx.training_data = lambda n, seq_len=None, seed_offset=1, **kw: CalibrationData(
            *_ids(seed_offset, samples=n), cal.config, {})
        guard = WeightGuard(dense)
        torch.manual_seed(0)
        result = spec.fn(ctx, cfg)
        guard.check(name)
        assert state_hash(dense) == h, f"{name} changed the dense model"
        assert get_adapter(dense).num_layers == 6, name
        _logits(result.model, ids, mask)
    torch.testing.assert_close(_logits(dense, ids, mask, use_cache=True), before, rtol=0, atol=0)

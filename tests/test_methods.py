"""Each method end to end on a tiny model; targets; saving and loading pruned models."""
import copy

import pytest
import torch
from conftest import make_context, run_method, tiny_model
from transformers import AutoModelForCausalLM

from harness import get_adapter, load_pruned, save_pruned
from harness.errors import UsageError
from harness.model.adapters import ReplacedBlock
from harness.model.surgery import count_params
from harness.model.target import Target, resolve_num_remove


def test_shortgpt_removes_lowest_bi_layers():
    model = tiny_model("llama", layers=6)
    ctx = make_context(model, 2)
    bi = ctx.layer_stats().block_influence()
    res = run_method("shortgpt", ctx)
    expect = sorted(sorted(range(6), key=lambda i: bi[i])[:2])
    assert res.removed_layers == expect
    assert res.scores["block_influence"] == bi
    assert get_adapter(res.model).num_layers == 4


def test_remove_takes_the_argmax_window():
    model = tiny_model("opt", layers=6)
    ctx = make_context(model, 3)
    scores = ctx.layer_stats().window_cos[3]
    res = run_method("remove", ctx)
    start = max(range(len(scores)), key=lambda i: scores[i])
    assert res.removed_layers == [start, start + 1, start + 2]
    assert res.replacement is None


def test_streamline_trains_mlp_and_puts_it_in_the_window(tmp_path, monkeypatch):
    model = tiny_model("opt", layers=6)
    dense = copy.deepcopy(model)
    ctx = make_context(model, 2)
    # training data is a separate draw from the calibration source; serve it from random ids here
    monkeypatch.setattr(ctx, "training_data",
                        lambda n, seq_len=None, seed_offset=1: make_context(dense, 2, samples=n).calibration)
    res = run_method("streamline", ctx, epochs=8, lr=3e-3, batch_size=4)
    s = res.scores["start"]
    assert res.removed_layers == [s, s + 1]
    losses = res.extra["training"]["epoch_loss"]
    assert losses[-1] < losses[0] * 0.9, losses
    a = get_adapter(res.model)
    assert a.num_layers == 4
    assert sum(isinstance(l, ReplacedBlock) for l in a.layers) == 1
    mlp_params = res.replacement["params"]
    assert mlp_params == 2 * 32 * 64 + 64 + 32  # h = 2d
    assert count_params(res.model) == count_params(dense) - 2 * count_params(get_adapter(dense).layers[0]) + mlp_params

def test_streamline_residual_mlp_beats_plain_removal(monkeypatch):
    """With x + MLP(x) the fit starts at plain removal and can only improve on it."""
    model = tiny_model("opt", layers=6)
    dense = copy.deepcopy(model)
    ctx = make_context(model, 2)
    monkeypatch.setattr(ctx, "training_data",
                        lambda n, seq_len=None, seed_offset=1: make_context(dense, 2, samples=32).calibration)
    res = run_method("streamline", ctx, epochs=10, lr=3e-3, batch_size=4, residual=True)
    ids = torch.randint(3, 128, (4, 16))
    with torch.no_grad():
        dense_out = dense(ids, output_hidden_states=True).hidden_states[-1]
        ours = res.model(ids, output_hidden_states=True).hidden_states[-1]
        removed = copy.deepcopy(dense)
        from harness import remove_layers
        remove_layers(get_adapter(removed), res.removed_layers)
        plain = removed(ids, output_hidden_states=True).hidden_states[-1]
    assert res.replacement["kwargs"]["residual"] is True
    assert (ours - dense_out).pow(2).mean() < (plain - dense_out).pow(2).mean()


def test_saved_models_load_back_with_identical_logits(tmp_path, monkeypatch):
    ids = torch.randint(3, 128, (2, 10))
    # removal: a plain checkpoint
    model = tiny_model("llama", layers=5)
    res = run_method("remove", make_context(model, 2))
    save_pruned(res.model, None, tmp_path / "rm", res.manifest())
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "rm")
    assert back.config.num_hidden_layers == 3
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, res.model(ids).logits, atol=1e-6)
    # replacement: the harness loader re-inserts the MLP (stock loading: tests/test_saved_models.py)
    model = tiny_model("opt", layers=5)
    ctx = make_context(model, 2)
    monkeypatch.setattr(ctx, "training_data", lambda n, seq_len=None, seed_offset=1: ctx.calibration)
    res = run_method("streamline", ctx, epochs=1)
    save_pruned(res.model, None, tmp_path / "sl", res.manifest())
    back, _tok, manifest = load_pruned(str(tmp_path / "sl"))
    assert manifest["load_with"] == "AutoModelForCausalLM(trust_remote_code=True)"
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, res.model(ids).logits, atol=1e-6)
    # saving left the in-memory model intact
    assert sum(isinstance(l, ReplacedBlock) for l in get_adapter(res.model).layers) == 1


def test_ratio_resolves_to_nearest_layer_count():
    model = tiny_model("opt", layers=8, vocab_size=16)
    a = get_adapter(model)
    total, per = count_params(model), count_params(a.layers[0])
    n = resolve_num_remove(Target(ratio=0.25), model, a)
    assert n == round(0.25 * total / per)
    assert resolve_num_remove(Target(layers=3), model, a) == 3
    with pytest.raises(UsageError, match="does not fit"):
        resolve_num_remove(Target(layers=8), model, a)
    with pytest.raises(UsageError, match="out of range"):
        resolve_num_remove(Target(ratio=1.2), model, a)


def test_streamline_window_that_does_not_fit():
    model = tiny_model("opt", layers=4)
    with pytest.raises(UsageError, match="does not fit"):
        run_method("streamline", make_context(model, 2), start=3)

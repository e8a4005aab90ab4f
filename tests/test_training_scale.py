"""Training at scale (harness.fitting.scale): the activation cache and gradient checkpointing
change memory and time, never the trained weights."""
import copy

import pytest
import torch
from conftest import tiny_model

from harness import get_adapter
from harness.fitting.fit import fit_layer_to_boundaries, fit_to_boundaries
from harness.fitting.scale import ActivationCache, use_checkpointing
from harness.fitting.training import train_lm
from harness.model.replacement import MLPReplacement
from harness.model.sharing import shell_of
from harness.plugins.context import MethodContext
from harness.signals.calibration import CalibrationConfig, CalibrationData


def _data(samples=12, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (samples, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, seq - 5:] = 0  # some right padding
    return CalibrationData(ids, mask, CalibrationConfig(source="x.txt", seq_len=seq, batch_size=4), {})


def _ctx(model):
    return MethodContext(model=model, adapter=get_adapter(model), tokenizer=None, calibration=_data(),
                         num_remove=2, progress=False)


class _Counter:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, *_):
        self.calls += 1


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_mlp_fit_with_cache_replays_the_first_epoch(mode):
    model = tiny_model("opt", layers=4)
    data = _data()
    runs = {}
    for cache in ("none", mode):
        torch.manual_seed(1)
        mlp = MLPReplacement(32, 64)
        counter = _Counter(get_adapter(model).layers[0])
        log = fit_to_boundaries(_ctx(model), mlp, data, 1, 3, epochs=3, lr=1e-3, batch_size=4,
                                activation_cache=cache, activation_cache_gb=1.0)
        counter.handle.remove()
        runs[cache] = (mlp.state_dict(), log, counter.calls)
    (w0, log0, calls0), (w1, log1, calls1) = runs["none"], runs[mode]
    assert calls0 == 3 * 3 and calls1 == 3  # 3 batches: every epoch vs the first only
    assert log1["activation_cache"]["used"] and not log0["activation_cache"]["used"]
    assert log1["epoch_loss"] == log0["epoch_loss"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_cache_over_its_limit_streams():
    model = tiny_model("opt", layers=4)
    counter = _Counter(get_adapter(model).layers[0])
    log = fit_to_boundaries(_ctx(model), MLPReplacement(32, 64), _data(), 1, 3, epochs=2, lr=1e-3, batch_size=4,
                            activation_cache="ram", activation_cache_gb=1e-6)
    assert counter.calls == 6 and not log["activation_cache"]["used"]
    assert "activation_cache_gb" in log["activation_cache"]["reason"]
    cache = ActivationCache("ram", 1e-6, batches=4)  # size learnt from the first batch
    cache.add((torch.zeros(100, 100),))
    assert not cache.enabled and not cache.ready


def test_layer_fit_same_weights_with_checkpointing_and_cache():
    model = tiny_model("llama", layers=4)
    layer0 = copy.deepcopy(get_adapter(model).layers[1])
    out = []
    for checkpoint, cache in ((False, "none"), (True, "ram")):
        layer = copy.deepcopy(layer0)
        log = fit_layer_to_boundaries(_ctx(model), layer, _data(), 1, 3, repeat=2, epochs=2, lr=1e-3, batch_size=4,
                                      grad_checkpointing=checkpoint, activation_cache=cache)
        out.append((layer.state_dict(), log))
    (a, la), (b, lb) = out
    assert lb["grad_checkpointing"] and lb["activation_cache"]["used"]
    assert lb["epoch_loss"] == pytest.approx(la["epoch_loss"], rel=1e-6)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)


def test_lm_training_with_checkpointing_matches_and_leaves_the_dense_model_alone():
    dense = tiny_model("opt", layers=4)
    data = _data()
    logs, weights = [], []
    for checkpoint in (False, True):
        shell = shell_of(dense)
        params = list(get_adapter(shell).layers[-1].parameters())
        saved = [p.detach().clone() for p in params]
        torch.manual_seed(0)  # dropout's global generator
        log = train_lm(shell, params, data, steps=3, lr=1e-3, batch_size=4, seed=0, progress=False,
                       train_mode=True, grad_checkpointing=checkpoint)  # dropout on: the recompute keeps its masks
        weights.append([p.detach().clone() for p in params])
        with torch.no_grad():  # put the shared tensors back for the next run (this test trains them directly)
            for p, s in zip(params, saved):
                p.copy_(s)
        logs.append(log)
        assert "forward" not in get_adapter(shell).layers[0].__dict__  # the wrapper is gone afterwards
    assert logs[1]["grad_checkpointing"] and not logs[0]["grad_checkpointing"]
    assert logs[1]["loss_curve"] == pytest.approx(logs[0]["loss_curve"], rel=1e-6)
    for a, b in zip(*weights):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_checkpointing_option():
    model = tiny_model("opt", layers=2)
    assert not use_checkpointing("auto", model)
    assert use_checkpointing("on", model) and not use_checkpointing("off", model)

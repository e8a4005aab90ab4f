"""Scores against hand computations on small tensors, and the capture contract."""
import math

import pytest
import torch
from conftest import tiny_model

from harness.model.adapters import get_adapter
from harness.signals.activations import StatsAccumulator, collect_layer_stats
from harness.signals.calibration import CalibrationConfig, CalibrationData


def _feed(acc, states, mask):
    acc.begin_batch(mask)
    for j, x in enumerate(states):
        acc(j, x)


def test_window_cosine_bi_and_angular_by_hand():
    # 2 sequences, 3 positions, d=2; sequence 1 has a pad at position 2 that must be ignored.
    x0 = torch.tensor([[[1., 0.], [0., 1.], [1., 1.]],
                       [[1., 0.], [1., 0.], [9., 9.]]])
    x1 = torch.tensor([[[1., 0.], [1., 1.], [1., 1.]],
                       [[0., 1.], [1., 0.], [-9., 9.]]])
    x2 = torch.tensor([[[0., 1.], [0., 1.], [-1., 1.]],
                       [[0., 1.], [0., 1.], [5., -5.]]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    acc = StatsAccumulator(num_layers=2, lags=[1, 2])
    _feed(acc, [x0, x1, x2], mask)
    s = acc.result()
    r = 1 / math.sqrt(2)
    # cos(X0, X1) on the 5 real tokens: 1, r, 1, 0, 1
    assert s.window_cos[1][0] == pytest.approx((1 + r + 1 + 0 + 1) / 5)
    # cos(X1, X2): 0, r, 0, 1, 0
    assert s.window_cos[1][1] == pytest.approx((0 + r + 0 + 1 + 0) / 5)
    # cos(X0, X2): 0, 1, 0, 0, 0
    assert s.window_cos[2][0] == pytest.approx(1 / 5)
    assert s.block_influence() == pytest.approx([1 - (3 + r) / 5, 1 - (1 + r) / 5])
    # angular distance on each sequence's last real token: seq0 pos2, seq1 pos1
    # lag 1, boundary 0: cos(X0,X1) = 1 (seq0), 1 (seq1) -> 0
    assert s.angular[1][0] == pytest.approx(0.0, abs=1e-6)
    # lag 2: seq0 cos([1,1],[-1,1]) = 0 -> 1/2 ; seq1 cos([1,0],[0,1]) = 0 -> 1/2
    assert s.angular[2][0] == pytest.approx(0.5)
    assert s.tokens == 5 and s.sequences == 2
    assert s.best_window(1) == 0


def test_streaming_sums_do_not_depend_on_batching():
    torch.manual_seed(0)
    states = [torch.randn(6, 5, 4) for _ in range(4)]
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[2, 3:] = 0
    whole = StatsAccumulator(3, [1, 2])
    _feed(whole, states, mask)
    parts = StatsAccumulator(3, [1, 2])
    for sl in (slice(0, 2), slice(2, 3), slice(3, 6)):
        _feed(parts, [s[sl] for s in states], mask[sl])
    a, b = whole.result(), parts.result()
    for n in (1, 2):
        assert a.window_cos[n] == pytest.approx(b.window_cos[n])
        assert a.angular[n] == pytest.approx(b.angular[n])


def _calib(ids, mask, bs):
    return CalibrationData(ids, mask, CalibrationConfig(batch_size=bs), {})


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_captured_last_state_is_before_final_norm(family):
    model = tiny_model(family, layers=4)
    adapter = get_adapter(model)
    seen = {}
    norm_in = []
    h = adapter.final_norm.register_forward_pre_hook(lambda m, a: norm_in.append(a[0].detach()))
    from harness.signals.activations import boundary_hooks, run_forward

    ids = torch.randint(0, 128, (2, 7))
    with boundary_hooks(adapter, lambda j, x: seen.__setitem__(j, x.detach())):
        run_forward(model, ids, torch.ones_like(ids))
    h.remove()
    assert sorted(seen) == list(range(5))
    assert torch.allclose(seen[4], norm_in[0])
    # and it is not the normed state
    assert not torch.allclose(seen[4], adapter.final_norm(seen[4]))


def test_padding_never_enters_a_score():
    """Right-padded batch == the same sequences scored one by one without padding."""
    model = tiny_model("llama", layers=4)
    adapter = get_adapter(model)
    torch.manual_seed(1)
    a, b = torch.randint(3, 128, (1, 9)), torch.randint(3, 128, (1, 5))
    padded = torch.cat([a, torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], 1)])
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    batched = collect_layer_stats(model, adapter, _calib(padded, mask, 2), lags=(1, 2), progress=False)
    single = collect_layer_stats(
        model, adapter,
        CalibrationData(torch.cat([a]), torch.ones(1, 9, dtype=torch.long), CalibrationConfig(batch_size=1), {}),
        lags=(1, 2), progress=False)
    # combine the unpadded runs by hand: token-weighted mean
    other = collect_layer_stats(model, adapter, _calib(b, torch.ones(1, 5, dtype=torch.long), 1), lags=(1, 2),
                                progress=False)
    for n in (1, 2):
        expect = [(9 * x + 5 * y) / 14 for x, y in zip(single.window_cos[n], other.window_cos[n])]
        assert batched.window_cos[n] == pytest.approx(expect, abs=1e-5)
        expect_ang = [(x + y) / 2 for x, y in zip(single.angular[n], other.angular[n])]
        assert batched.angular[n] == pytest.approx(expect_ang, abs=1e-4)

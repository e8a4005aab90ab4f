"""streamline-iclr (the ICLR 2025 release): n+1 consecutive layers -> one decoder layer
initialised from the first of them, net n removed."""
import copy
import json

import pytest
import torch
from conftest import (
    make_context,
    run_method,
    shared_data_or_skip,
    tiny_model,
    tiny_tokenizer,
)
from transformers import AutoModelForCausalLM

from harness import (
    ReplacementLayer,
    UsageError,
    count_params,
    get_adapter,
    load_pruned,
    remove_layers,
    save_pruned,
)
from harness.cli import main


def _boundaries(model, ids):
    """X_0..X_L of ``model`` on ``ids`` (X_L before the final norm, from a hook on the last layer)."""
    adapter = get_adapter(model)
    last = {}
    handle = adapter.layers[-1].register_forward_hook(lambda _m, _a, out: last.update(x=out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    return list(hs[:-1]) + [last["x"]]


def test_removes_net_n_layers_at_the_argmax_window_of_n_plus_1_layers():
    L, n = 6, 2
    model = tiny_model("llama", layers=L)
    dense = copy.deepcopy(model)
    ctx = make_context(model, n)
    xs = _boundaries(dense, ctx.calibration.input_ids)
    cos = [torch.nn.functional.cosine_similarity(xs[i], xs[i + n + 1], dim=-1) for i in range(L - n)]
    ours = [float(c.mean()) for c in cos]  # mean over every token (all real)
    released = [float((0.5 + 0.5 * c).mean(dim=1).mean()) for c in cos]  # per-block mean of 0.5+0.5cos, then blocks
    best = max(range(L - n), key=lambda i: (ours[i], -i))
    assert best == max(range(L - n), key=lambda i: (released[i], -i))  # same ranking on unpadded equal blocks

    res = run_method("streamline-iclr", ctx, epochs=1)
    assert res.scores["window_cos"] == pytest.approx(ours, abs=1e-5)
    assert res.scores["start"] == best and res.scores["window_layers"] == n + 1
    assert res.removed_layers == list(range(best, best + n + 1))
    adapter = get_adapter(res.model)
    assert adapter.num_layers == L - n and res.model.config.num_hidden_layers == L - n
    assert isinstance(adapter.layers[best], ReplacementLayer)
    per_layer = count_params(get_adapter(dense).layers[0])
    assert count_params(res.model) == count_params(dense) - n * per_layer  # n+1 out, one in
    assert res.replacement["replaces_layers"] == res.removed_layers and res.replacement["init_from_layer"] == best
    assert res.extra["streamline"]["net_removed"] == n


def test_new_layer_starts_as_a_copy_of_the_first_window_layer():
    """OPT on purpose: the released MSE path leaves an OPT replacement randomly initialised."""
    model = tiny_model("opt", layers=6)
    dense = copy.deepcopy(model)
    res = run_method("streamline-iclr", make_context(model, 2), epochs=0, start=1)
    assert res.removed_layers == [1, 2, 3]
    new = get_adapter(res.model).layers[1].inner
    old = get_adapter(dense).layers[1]
    for (k, a), (_, b) in zip(new.state_dict().items(), old.state_dict().items()):
        assert torch.equal(a, b), k
    # untrained, the model is the dense one without layers 2, 3
    removed = copy.deepcopy(dense)
    remove_layers(get_adapter(removed), [2, 3])
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        assert torch.allclose(res.model(ids).logits, removed(ids).logits, atol=1e-5)


def test_mse_training_lowers_the_fit_loss_and_lm_loss_trains_only_the_new_layer():
    n, start = 2, 1
    model = tiny_model("opt", layers=6, seed=1)
    dense = copy.deepcopy(model)
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(7))  # held out
    target = _boundaries(dense, ids)[start + n + 1]

    def fit_loss(pruned):
        return float((_boundaries(pruned, ids)[start + 1] - target).pow(2).mean())

    untrained = run_method("streamline-iclr", make_context(copy.deepcopy(dense), n, samples=16), epochs=0, start=start)
    trained = run_method("streamline-iclr", make_context(copy.deepcopy(dense), n, samples=16), epochs=4, lr=3e-3,
                         batch_size=4, start=start)
    log = trained.extra["training"]
    assert log["loss"] == "mse" and len(log["epoch_loss"]) == 4
    assert log["epoch_loss"][-1] < log["epoch_loss"][0]
    assert fit_loss(trained.model) < 0.8 * fit_loss(untrained.model)

    lm = run_method("streamline-iclr", make_context(model, n, samples=8), loss="lm", epochs=1, lr=3e-3,
                    batch_size=4, start=start)
    assert lm.extra["training"]["steps"] == 2
    kept = get_adapter(lm.model).layers
    assert all(torch.equal(a, b) for a, b in zip(kept[0].state_dict().values(), get_adapter(dense).layers[0].state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in
                   zip(kept[start].inner.state_dict().values(), get_adapter(dense).layers[start].state_dict().values()))


def test_window_must_fit_and_options_are_checked():
    model = tiny_model("opt", layers=4)
    res = run_method("streamline-iclr", make_context(model, 3), epochs=0)  # n = L-1: all 4 layers -> 1
    assert res.removed_layers == [0, 1, 2, 3] and get_adapter(res.model).num_layers == 1
    for opts, match in [({"start": 2}, r"window of n\+1 = 3 layers .*use 0\.\.1"), ({"loss": "kl"}, "unknown")]:
        with pytest.raises(UsageError, match=match):
            run_method("streamline-iclr", make_context(tiny_model("opt", layers=4), 2), **opts)
    with pytest.raises(UsageError, match="does not fit a model with 4 layers"):
        run_method("streamline-iclr", make_context(tiny_model("opt", layers=4), 4))


def test_saved_model_loads_back_with_identical_logits(tmp_path):
    model = tiny_model("llama", layers=5)
    res = run_method("streamline-iclr", make_context(model, 2), epochs=1, lr=3e-3)
    out = save_pruned(res.model, tiny_tokenizer(), tmp_path / "iclr", res.manifest())
    back, _tok, manifest = load_pruned(str(out))
    stock = AutoModelForCausalLM.from_pretrained(out)  # a decoder-layer replacement is an ordinary checkpoint
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        want = res.model(ids).logits
        assert torch.equal(back(ids).logits, want)
        assert torch.allclose(stock(ids).logits, want, atol=1e-6)
    assert manifest["removed_layers"] == res.removed_layers and get_adapter(back).num_layers == 3


def test_cli_run_on_tiny_opt(tiny_opt_dir, tmp_path, capsys):
    data = shared_data_or_skip()
    out = tmp_path / "runs"
    argv = ["--model", str(tiny_opt_dir), "--methods", "streamline-iclr", "-o", "streamline-iclr.train_samples=4",
            "--layers", "2", "--tasks", "piqa", "--limit", "2", "--calib-samples", "4", "--calib-seq-len", "32",
            "--data-dir", str(data), "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    (path,) = [p for p in out.rglob("*.json") if "streamline-iclr" in p.name]
    rec = json.loads(path.read_text())
    start = rec["manifest"]["scores"]["start"]
    assert rec["manifest"]["removed_layers"] == [start, start + 1, start + 2]
    assert rec["params"]["pruned_layers"] == 4
    dense = AutoModelForCausalLM.from_pretrained(tiny_opt_dir)
    per_layer = count_params(get_adapter(dense).layers[0])
    assert rec["params"]["ratio"] == pytest.approx(2 * per_layer / count_params(dense))  # net n = 2 layers
    assert rec["manifest"]["training"]["epochs"] == 1 and rec["method_config"]["lr"] == 2e-4
    assert rec["metrics"]["piqa"]["n"] == 2

"""--ratio's basis and its refusals, Streamline's identity start with its held-out check, the top
boundary of the layer statistics, and the paper matcher's layer-count check."""
import copy

import pytest
import torch
from conftest import make_context, run_method, tiny_model

from harness import MLPReplacement, get_adapter
from harness.errors import UsageError
from harness.model.target import Target, resolve_num_remove
from harness.results import paper
from harness.signals.activations import collect_layer_stats


def _embedding_heavy(layers=8):
    """A tiny Llama whose embeddings and untied head are most of its parameters (like Gemma 3 270M)."""
    return tiny_model("llama", vocab_size=4000, layers=layers, hidden=32)


def test_a_params_ratio_that_removes_most_layers_is_refused_with_the_count():
    model = _embedding_heavy()
    with pytest.raises(UsageError) as err:
        resolve_num_remove(Target(ratio=0.15), model, get_adapter(model))
    msg = str(err.value)
    assert "of 8 decoder layers" in msg and "--ratio-basis layers" in msg and "--layers N" in msg


def test_layers_basis_counts_decoder_layers():
    model = _embedding_heavy()
    a = get_adapter(model)
    assert resolve_num_remove(Target(ratio=0.25, basis="layers"), model, a) == 2
    assert resolve_num_remove(Target(ratio=0.3, basis="layers"), model, a) == 2  # 2.4
    assert resolve_num_remove(Target(ratio=0.32, basis="layers"), model, a) == 3  # 2.56
    with pytest.raises(UsageError, match="more than half"):
        resolve_num_remove(Target(ratio=0.6, basis="layers"), model, a)
    with pytest.raises(UsageError, match="--ratio-basis"):
        Target(ratio=0.25, basis="flops").validate()


def test_embedding_share_warns_and_explicit_layers_above_half_warn(capsys):
    model = _embedding_heavy(layers=40)  # 40 layers: a small ratio stays under half
    a = get_adapter(model)
    n = resolve_num_remove(Target(ratio=0.02), model, a)
    err = capsys.readouterr().err
    assert f"resolves to {n} of 40 decoder layers" in err and "embeddings" in err
    assert resolve_num_remove(Target(layers=25), model, a) == 25
    assert "more than half" in capsys.readouterr().err


def test_target_record_says_what_the_ratio_counts():
    assert Target(ratio=0.25).to_dict() == {"ratio": 0.25, "layers": None, "basis": "params"}
    assert Target(layers=3).to_dict() == {"ratio": None, "layers": 3}


def test_identity_mlp_is_exactly_the_identity_and_refuses_what_cannot_be():
    x = torch.randn(5, 7, 16) * 300  # Gemma-size residual norms
    for repeat in (1, 3):
        m = MLPReplacement(16, 40, init="identity", repeat=repeat)
        assert torch.equal(m(x), x)
    with pytest.raises(ValueError, match="h=24 < 2d=32"):
        MLPReplacement(16, 24, init="identity")
    with pytest.raises(ValueError, match="relu"):
        MLPReplacement(16, 32, activation="gelu", init="identity")


def test_untrained_identity_streamline_is_plain_removal():
    """epochs=0: the replacement is the identity, so the pruned model's logits equal removal's."""
    model = tiny_model("llama", layers=6)
    ids = torch.randint(3, 128, (2, 12))
    res_s = run_method("streamline", make_context(copy.deepcopy(model), 2), epochs=0)
    res_r = run_method("remove", make_context(copy.deepcopy(model), 2))
    assert res_s.removed_layers == res_r.removed_layers
    with torch.no_grad():
        assert torch.allclose(res_s.model(ids).logits, res_r.model(ids).logits, atol=1e-5)
    held = res_s.extra["training"]["heldout"]
    assert held["mse"] == pytest.approx(held["identity_mse"], rel=1e-6)
    assert res_s.extra["training"]["init"].startswith("identity")


def test_heldout_mse_is_recorded_and_a_worse_fit_warns(capsys):
    model = tiny_model("opt", layers=6)
    res = run_method("streamline", make_context(model, 2), epochs=0, init="random")
    held = res.extra["training"]["heldout"]
    assert held["blocks"] == 16 and held["tokens"] > 0
    assert held["judged_by"] in ("cosine", "normed") and held["better_than_removal"] is False
    assert held["cosine"] > held["identity_cosine"] and held["mse"] > held["identity_mse"]
    assert "above plain removal's" in capsys.readouterr().err
    for loss, start in (("cosine", None), ("mse", None), ("normed", 4), ("normed", 1)):
        trained = run_method("streamline", make_context(tiny_model("opt", layers=6), 2), epochs=3, fit_loss=loss,
                             start=start)
        training = trained.extra["training"]
        held = training["heldout"]
        key = "cosine" if loss == "normed" and start != 4 else loss  # normed: after the final norm at the top only
        assert held["judged_by"] == key and held[key] <= held["identity_" + key]
        assert training["fit_loss_reader"] == ("LayerNorm" if (loss, start) == ("normed", 4) else None)


def test_identity_init_options_are_checked_before_running():
    model = tiny_model("opt", layers=6)
    for bad in ({"activation": "gelu"}, {"hidden_mult": 1.5}, {"init": "zeros"}, {"heldout_samples": -1},
                {"fit_loss": "l1"}, {"recipe": "fast"}):
        with pytest.raises(UsageError):
            run_method("streamline", make_context(model, 2), epochs=0, **bad)
    res = run_method("streamline", make_context(model, 2), epochs=0, activation="gelu", init="random")
    assert res.extra["training"]["init"] == "random"


def test_post_norm_top_boundary_matches_hidden_states_last_and_changes_only_the_top():
    model = tiny_model("llama", layers=4)
    with torch.no_grad():  # give the final norm a non-trivial weight, so it changes directions
        get_adapter(model).final_norm.weight.copy_(torch.linspace(0.2, 3.0, 32))
    ctx = make_context(model, 1, samples=4)
    adapter = get_adapter(model)
    pre = collect_layer_stats(model, adapter, ctx.calibration, lags=(1, 2), progress=False)
    post = collect_layer_stats(model, adapter, ctx.calibration, lags=(1, 2), progress=False, top_boundary="post-norm")
    assert pre.window_cos[1][:-1] == post.window_cos[1][:-1] and pre.window_cos[2][:-1] == post.window_cos[2][:-1]
    assert abs(pre.window_cos[1][-1] - post.window_cos[1][-1]) > 1e-4
    with torch.no_grad():  # transformers' hidden_states[-1] is the final-normed state in Llama
        hs = model(input_ids=ctx.calibration.input_ids, output_hidden_states=True).hidden_states
    cos = torch.nn.functional.cosine_similarity(hs[-2].double(), hs[-1].double(), dim=-1).mean().item()
    assert post.window_cos[1][-1] == pytest.approx(cos, abs=1e-5)


def test_paper_rows_need_a_similar_layer_count():
    row = paper.PaperRow(index=0, model="facebook/opt-1.3b", method="streamline", label="Ours", ratio=0.258, layers=None,
                         values={}, avg=None, retained=None)
    run = {"method": "streamline", "model": {"name": "opt-1.3b", "num_layers": 24},
           "target": {"num_remove": 7}, "params": {"ratio": 0.26}}
    assert paper.match_rows(run, [row]) == [row]
    deep = {**run, "target": {"num_remove": 23}}  # the same parameter ratio, 23 of 24 layers
    assert paper.match_rows(deep, [row]) == []


def test_the_table_marks_a_fit_worse_than_removal():
    from harness.results import report

    def rec(method, acc, heldout=None):
        return {"schema": 1, "method": method, "label": method, "model": {"name": "m", "dtype": "float32"},
                "eval": {"tasks": ["piqa"], "limit": None}, "environment": {"created": "2026-01-01"},
                "params": {"ratio": 0.2}, "metrics": {"piqa": {"acc": acc}},
                "manifest": {"training": {"heldout": heldout}} if heldout else {}}

    runs = [rec("dense", 0.8),
            rec("streamline", 0.5, {"mse": 2.0, "identity_mse": 1.0, "better_than_removal": False}),
            rec("streamline-mlp-shared", 0.7, {"mse": 0.5, "identity_mse": 1.0, "better_than_removal": True})]
    ((_title, df, notes),) = report.build_tables(runs, "acc")
    assert list(df["Method"]) == ["dense", "streamline [fit>removal]", "streamline-mlp-shared"]
    assert any("held-out mse loss 2 is above plain removal's 1" in n for n in notes)


def test_cosine_fit_loss_is_scale_free_and_zero_at_the_target():
    from harness.fitting.fit import boundary_loss

    y = torch.randn(6, 16, dtype=torch.float64) * torch.tensor([3e4] + [1.0] * 15, dtype=torch.float64)  # Gemma-like
    assert boundary_loss(y, y, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    p = y + torch.randn(6, 16, dtype=torch.float64) * 100
    assert boundary_loss(p * 1000, y * 1000, "cosine").item() == pytest.approx(boundary_loss(p, y, "cosine").item(),
                                                                                rel=1e-4)
    assert boundary_loss(2 * y, y, "cosine").item() == pytest.approx(torch.log(torch.tensor(2.0)).item() ** 2, rel=1e-4)


def test_normed_fit_loss_compares_what_the_final_norm_hands_the_head():
    """Scale-free (the norm removes scale), weighted by the norm's weight, and the cosine loss without one."""
    from harness.fitting.fit import boundary_loss

    norm = torch.nn.LayerNorm(16, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.01, 300, 16, dtype=torch.float64))
    y = torch.randn(6, 16, dtype=torch.float64) * torch.tensor([3e4] + [1.0] * 15, dtype=torch.float64)
    p = y + torch.randn(6, 16, dtype=torch.float64) * 10
    assert boundary_loss(y, y, "normed", norm).item() == pytest.approx(0.0, abs=1e-9)
    assert boundary_loss(7 * p, y, "normed", norm).item() == pytest.approx(boundary_loss(p, y, "normed", norm).item(),
                                                                        rel=1e-6)
    expected = (1 - torch.nn.functional.cosine_similarity(norm(p), norm(y), dim=-1)).mean().item()
    assert boundary_loss(p, y, "normed", norm).item() == pytest.approx(expected, rel=1e-9)
    assert boundary_loss(p, y, "normed").item() == boundary_loss(p, y, "cosine").item()


def test_paper_recipe_is_one_option_away():
    from harness.plugins.pipeline import resolve_method

    _spec, cpu = resolve_method("streamline", {})
    assert (cpu.init, cpu.fit_loss, cpu.train_samples) == ("identity", "normed", 256)
    _spec, paper = resolve_method("streamline", {"streamline": {"recipe": "paper"}})
    assert (paper.init, paper.fit_loss, paper.train_samples) == ("random", "mse", 3000)
    _spec, mixed = resolve_method("streamline", {"streamline": {"recipe": "paper", "train_samples": "20000"}})
    assert mixed.train_samples == 20000 and mixed.init == "random"

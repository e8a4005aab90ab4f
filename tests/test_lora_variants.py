"""The +lora post-step, LLM-Streamline's replacement variants (paper Tables 5/6), post-training,
method pipelines (METHOD+STEP) with their options, and --config files.

Tiny random models are built in-process; training data are random token blocks. One test runs
the command line end to end on the real task files (skipped without ../shared/data).
"""
import copy
from pathlib import Path

import pytest
import torch
from conftest import make_context, run_method, shared_data_or_skip, tiny_model
from transformers import AutoModelForCausalLM

from harness import ReplacedBlock, count_params, get_adapter, load_pruned, save_pruned
from harness.errors import UsageError
from harness.model.adapters import ReplacementLayer
from harness.plugins.pipeline import check_option_targets, resolve_method

D = 32  # tiny models: hidden 32, OPT ffn 4*32, 6 layers
MLP_PARAMS = 2 * D * (2 * D) + 2 * D + D  # default replacement MLP, h = 2d: 4192
OPT_LAYER_LORA_PER_RANK = 4 * (D + D) + (D + 4 * D) + (4 * D + D)  # q,k,v,out + fc1 + fc2: 576


def _run(name, model, n, **options):
    """Run METHOD or METHOD+STEP on ``model``; options as {component: {key: value}}. Returns (result, cfg)."""
    opts = options if "+" in name else options.get(name, {})
    return run_method(name, make_context(model, n), return_config=True, **opts)


def _incremental_matches_full(model, ids, split=6):
    """Logits of one full forward == prefix forward + cached continuation."""
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :split], use_cache=True)
        rest = model(ids[:, split:], past_key_values=first.past_key_values, use_cache=True).logits
    return torch.allclose(torch.cat([first.logits, rest], dim=1), full, atol=1e-5)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- LoRA: rank matching, what gets adapters, merge ----------------------------------------

def test_lora_rank_matches_a_parameter_budget_hand_computed():
    from methods.lora import choose_rank

    # remove 2 of 6 OPT layers -> 4 layers x 576 parameters per rank
    per_rank = 4 * OPT_LAYER_LORA_PER_RANK
    assert per_rank == 2304
    assert choose_rank(per_rank, 10_000) == 4  # 9216 (r=5: 11520 is farther)
    assert choose_rank(per_rank, 100) == 1  # never below 1
    assert choose_rank(per_rank, 3 * 2304 + 1152) == 3  # a tie goes to the smaller rank

    res, _ = _run("remove+lora", tiny_model("opt", layers=6), 2, lora={"match_params": 10_000, "steps": 1})
    info = res.extra["lora"]
    assert (info["r"], info["params_per_rank"], info["trainable_params"]) == (4, 2304, 9216)
    assert info["match_target"] == 10_000 and info["match_error"] == pytest.approx(-784 / 10_000)
    # match_params=mlp: the default streamline MLP (4192) -> r=2 (4608), not r=1 (2304)
    res, _ = _run("streamline-none+lora", tiny_model("opt", layers=6), 2, lora={"match_params": "mlp", "steps": 1})
    assert (res.extra["lora"]["match_target"], res.extra["lora"]["r"]) == (MLP_PARAMS, 2)


def test_lora_skips_replacements_trains_and_merges_into_a_plain_model(tmp_path):
    model = tiny_model("opt", layers=6)
    plain, _ = _run("streamline", copy.deepcopy(model), 2, streamline={"epochs": 1})
    res, cfg = _run("streamline+lora", model, 2, streamline={"epochs": 1},
                    lora={"r": 3, "steps": 12, "lr": 1e-2, "samples": 8, "dropout": 0.0})
    info = res.extra["lora"]
    # 4 remaining layers get adapters; the MLP's two Linear layers (up, down) do not
    assert info["targets"] == 4 * 6 and info["trainable_params"] == 3 * 4 * OPT_LAYER_LORA_PER_RANK
    assert info["training"]["loss_last"] < info["training"]["loss_first"]
    m = res.model
    assert type(m).__name__ == "OPTForCausalLM"
    assert not any("lora" in name for name, _ in m.named_modules())
    (block,) = [l for l in get_adapter(m).layers if isinstance(l, ReplacedBlock)]
    (block0,) = [l for l in get_adapter(plain.model).layers if isinstance(l, ReplacedBlock)]
    assert _same(_state(block.replacement), _state(block0.replacement))  # the MLP survived untouched
    a, b = get_adapter(m).layers[0], get_adapter(plain.model).layers[0]
    assert not torch.equal(a.self_attn.q_proj.weight, b.self_attn.q_proj.weight)  # LoRA was merged in
    assert torch.equal(a.self_attn_layer_norm.weight, b.self_attn_layer_norm.weight)  # only projections
    assert count_params(m) == count_params(plain.model)  # merged: no parameters added
    assert cfg.label("streamline+lora") == "streamline(epochs=1, train_samples=8)+lora(r=3, dropout=0.0, lr=0.01, steps=12, samples=8)"
    assert all(p.requires_grad for p in m.parameters())  # training restored the flags
    # a plain HF model again: save_pretrained works; the MLP comes back with load_pruned
    save_pruned(m, None, tmp_path / "sl", res.manifest())
    back, _tok, manifest = load_pruned(str(tmp_path / "sl"))
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, m(ids).logits, atol=1e-6)
    assert manifest["lora"]["r"] == 3


def test_lora_on_shortgpt_is_a_plain_checkpoint(tmp_path):
    res, _ = _run("shortgpt+lora", tiny_model("llama", layers=6), 2, lora={"steps": 2})
    info = res.extra["lora"]
    per_rank = 4 * (4 * D + 2 * (D + 16) + 3 * (D + 2 * D))  # q,o 32x32; k,v 32->16 (2 kv heads); gate/up/down
    assert info["params_per_rank"] == per_rank and info["trainable_params"] == 8 * per_rank
    res.model.save_pretrained(tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, res.model(ids).logits, atol=1e-6)


def test_lora_target_modules_and_bad_options():
    res, _ = _run("remove+lora", tiny_model("opt", layers=6), 2,
                  lora={"target_modules": "q_proj/v_proj", "r": 2, "steps": 1})
    assert res.extra["lora"]["trainable_params"] == 2 * 4 * 2 * (D + D)
    model = tiny_model("opt", layers=6)
    with pytest.raises(UsageError, match="nosuch is not a linear projection of the remaining layers; available: "
                                         "fc1/fc2/k_proj/out_proj/q_proj/v_proj"):
        _run("streamline+lora", model, 2, lora={"target_modules": "nosuch", "steps": 1})
    assert get_adapter(model).num_layers == 6  # caught before streamline pruned (and trained) anything
    with pytest.raises(UsageError, match="match_params=lots"):
        _run("remove+lora", tiny_model("opt", layers=6), 2, lora={"match_params": "lots"})
    with pytest.raises(UsageError, match="r >= 1"):
        _run("remove+lora", tiny_model("opt", layers=6), 2, lora={"r": 0})


# --- pipelines: names, options, errors ------------------------------------------------------

def test_pipeline_names_and_option_addressing():
    opts = {"lora": {"r": "4"}, "remove+lora": {"lora.r": "6", "remove.start": "1"}}
    _, cfg = resolve_method("remove+lora", opts)
    assert (cfg["lora"].r, cfg["remove"].start) == (6, 1)  # the pipeline's own options win
    _, cfg = resolve_method("shortgpt+lora", opts)
    assert cfg["lora"].r == 4

    record = cfg.to_dict()
    assert list(record) == ["shortgpt", "lora"] and record["lora"]["r"] == 4
    spec, plain = resolve_method("remove", {"remove": {"start": "2"}})  # a plain method is unchanged
    assert spec.name == "remove" and plain.start == 2 and plain.to_dict() == {"start": 2, "layers": []}
    check_option_targets({"lora": {}, "shortgpt": {}, "remove+lora": {}}, ["shortgpt+lora", "remove+lora"])

    for name, options, message in [
        ("shortgpt+nosuch", {}, "unknown post-step 'nosuch' in 'shortgpt\\+nosuch'; available post-steps: lora"),
        ("nosuch+lora", {}, "unknown method 'nosuch'"),
        ("lora", {}, "'lora' is a post-step, not a method; append it to a method, e.g. remove\\+lora"),
        ("shortgpt+remove", {}, "unknown post-step 'remove'.*only the first part"),
        ("shortgpt+", {}, "empty part"),
        ("shortgpt+lora", {"shortgpt+lora": {"r": "8"}}, "write shortgpt\\+lora.COMPONENT.KEY=VALUE"),
        ("shortgpt+lora", {"lora": {"rank": "8"}}, "post-step 'lora' has no option 'rank'"),
        ("streamline-layer", {"streamline-layer": {"hidden_size": "8"}}, "has no option 'hidden_size'"),
    ]:
        with pytest.raises(UsageError, match=message):
            resolve_method(name, options)
    # a known method that is not being run (a shared config run with fewer --methods): a note, dropped
    notes, options = [], {"streamline": {"epochs": "1"}, "remove": {"start": "1"}}
    check_option_targets(options, ["remove+lora"], echo=notes.append)
    assert notes == ["note: ignoring the options given for methods not being run: streamline"]
    assert options == {"remove": {"start": "1"}}
    with pytest.raises(UsageError, match="options given for unknown methods: streamlin "):
        check_option_targets({"streamlin": {"epochs": "1"}}, ["remove+lora"])  # a typo stays an error


# --- streamline variants ----------------------------------------------------------------------

def _best_window(model, n):
    return make_context(model, n).layer_stats().best_window(n)


VARIANTS = ["streamline", "streamline-mlp-shared", "streamline-multi-mlp", "streamline-layer",
            "streamline-layer-shared", "streamline-none"]


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("family,start", [("opt", 2), ("qwen2", None)])
def test_variant_prunes_the_window_works_with_cache_and_round_trips(name, family, start, tmp_path):
    n = 3
    dense = tiny_model(family, layers=6)
    layer_params = count_params(get_adapter(dense).layers[0])
    opts = {} if start is None else {"start": start}
    if name != "streamline-none":
        opts["epochs"] = 1
    res, _ = _run(name, copy.deepcopy(dense), n, **{name: opts})
    s = _best_window(dense, n) if start is None else start
    assert res.removed_layers == [s, s + 1, s + 2]
    assert res.scores["start"] == s
    model = res.model
    kinds = [type(l).__name__ for l in get_adapter(model).layers]
    added = {"streamline": MLP_PARAMS, "streamline-mlp-shared": MLP_PARAMS, "streamline-multi-mlp": n * MLP_PARAMS,
             "streamline-layer": layer_params, "streamline-layer-shared": layer_params, "streamline-none": 0}[name]
    assert count_params(model) == count_params(dense) - n * layer_params + added
    assert (res.replacement or {}).get("params", 0) == added
    if name.startswith("streamline-layer"):
        repeat = n if name.endswith("shared") else 1
        assert kinds.count("ReplacementLayer") == repeat
        assert [i for i, k in enumerate(kinds) if k == "ReplacementLayer"] == list(range(s, s + repeat))
        assert model.config.num_hidden_layers == 6 - n + repeat
    else:
        assert "ReplacementLayer" not in kinds and model.config.num_hidden_layers == 6 - n
        assert kinds.count("ReplacedBlock") == (0 if name == "streamline-none" else 1)
    ids = torch.randint(3, 128, (2, 12))
    assert _incremental_matches_full(model, ids)
    save_pruned(model, None, tmp_path / "m", res.manifest())
    back, _tok, manifest = load_pruned(str(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    assert [type(l).__name__ for l in get_adapter(back).layers] == kinds
    assert _incremental_matches_full(back, ids)
    assert count_params(back) == count_params(model)
    # MLPs come with remote code (tests/test_saved_models.py); layers are ordinary checkpoints
    # (a shared layer stored as copies, tied again by load_pruned)
    needs_code = name in ("streamline", "streamline-mlp-shared", "streamline-multi-mlp")
    assert manifest["load_with"] == ("AutoModelForCausalLM(trust_remote_code=True)" if needs_code
                                     else "AutoModelForCausalLM")


def test_shared_mlp_is_one_mlp_applied_n_times():
    res, _ = _run("streamline-mlp-shared", tiny_model("opt", layers=6), 3,
                  **{"streamline-mlp-shared": {"epochs": 2, "start": 1}})
    (block,) = [l for l in get_adapter(res.model).layers if isinstance(l, ReplacedBlock)]
    mlp = block.replacement
    assert mlp.repeat == 3 and count_params(mlp) == MLP_PARAMS
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        once = lambda h: mlp.down(mlp.act(mlp.up(h)))  # noqa: E731
        assert torch.allclose(mlp(x), once(once(once(x))))


def test_shared_layer_has_one_set_of_parameters_and_a_cache_slot_per_application():
    res, _ = _run("streamline-layer-shared", tiny_model("opt", layers=6), 3,
                  **{"streamline-layer-shared": {"epochs": 1, "start": 1}})
    model = res.model
    entries = [l for l in get_adapter(model).layers if isinstance(l, ReplacementLayer)]
    assert len(entries) == 3 and [e.shared for e in entries] == [False, True, True]
    assert entries[1].inner is entries[0].inner and entries[2].inner is entries[0].inner
    assert list(entries[1].parameters()) == [] and len(list(entries[0].parameters())) > 0
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names)) and not any(".layers.2." in n or ".layers.3." in n for n in names)
    assert [e.slot for e in entries] == [1, 2, 3]
    # without its own slot per application, cached decoding would be wrong: check the check
    ids = torch.randint(3, 128, (2, 12))
    assert _incremental_matches_full(model, ids)
    for e in entries:
        e.slot = 1
    try:
        shared_slot_ok = _incremental_matches_full(model, ids)
    except RuntimeError:  # the slot's cache holds 3x the keys: shapes no longer fit
        shared_slot_ok = False
    assert not shared_slot_ok


def test_multi_mlp_has_one_mlp_per_removed_layer_each_fit_to_its_own_layer():
    res, _ = _run("streamline-multi-mlp", tiny_model("opt", layers=6), 3,
                  **{"streamline-multi-mlp": {"epochs": 4, "lr": 3e-3, "start": 2}})
    (block,) = [l for l in get_adapter(res.model).layers if isinstance(l, ReplacedBlock)]
    mlps = block.replacement.mlps
    assert len(mlps) == 3 and all(count_params(m) == MLP_PARAMS for m in mlps)
    assert len({id(m.up.weight) for m in mlps}) == 3
    logs = res.extra["training"]["per_mlp"]
    assert len(logs) == 3 and all(g["epoch_loss"][-1] < g["epoch_loss"][0] for g in logs)


def test_layer_variant_starts_from_the_first_pruned_layer_and_fits_with_the_causal_mask():
    dense = tiny_model("llama", layers=6)
    # epochs 0: the replacement is exactly (a copy of) the first pruned layer
    res, _ = _run("streamline-layer", copy.deepcopy(dense), 2, **{"streamline-layer": {"epochs": 0, "start": 2}})
    (entry,) = [l for l in get_adapter(res.model).layers if isinstance(l, ReplacementLayer)]
    first_pruned = get_adapter(dense).layers[2]
    assert entry.inner is not first_pruned and _same(_state(entry.inner), _state(first_pruned))
    assert res.replacement["init_from_layer"] == 2
    # a one-layer window fit from that copy starts at zero loss: the layer gets the model's own
    # causal mask and position embeddings (without them its output would differ from X_{i+1})
    res, _ = _run("streamline-layer", copy.deepcopy(dense), 1,
                  **{"streamline-layer": {"epochs": 1, "lr": 1e-9, "batch_size": 8, "start": 2}})
    assert res.extra["training"]["epoch_loss"][0] < 1e-10
    # a real fit moves away from the initial weights and lowers the loss
    res, _ = _run("streamline-layer", copy.deepcopy(dense), 3,
                  **{"streamline-layer": {"epochs": 4, "lr": 1e-3, "start": 2}})
    (entry,) = [l for l in get_adapter(res.model).layers if isinstance(l, ReplacementLayer)]
    assert not _same(_state(entry.inner), _state(first_pruned))
    losses = res.extra["training"]["epoch_loss"]
    assert losses[-1] < losses[0]
    # init=random: a fresh layer
    res, _ = _run("streamline-layer", copy.deepcopy(dense), 2,
                  **{"streamline-layer": {"epochs": 0, "start": 2, "init": "random"}})
    (entry,) = [l for l in get_adapter(res.model).layers if isinstance(l, ReplacementLayer)]
    assert not torch.equal(entry.inner.self_attn.q_proj.weight, first_pruned.self_attn.q_proj.weight)
    assert res.replacement["init"] == "random" and res.replacement["init_from_layer"] is None


@pytest.mark.parametrize("name", ["streamline", "streamline-layer-shared"])
def test_lm_loss_and_post_training_train_only_the_replacement(name):
    dense = tiny_model("opt", layers=6)
    base = {"epochs": 1, "start": 1}
    before, _ = _run(name, copy.deepcopy(dense), 2, **{name: base})
    after, _ = _run(name, copy.deepcopy(dense), 2, **{name: {**base, "post_train_steps": 4, "post_train_lr": 1e-2}})
    post = after.extra["post_training"]
    assert post["steps"] == 4 and post["trained"] == "replacement only" and post["samples"] == 4 * 8
    assert post["trainable_params"] == after.replacement["params"]
    sa, sb = after.model.state_dict(), before.model.state_dict()
    assert sa.keys() == sb.keys()
    changed = {k for k in sa if not torch.equal(sa[k], sb[k])}
    marker = ".replacement." if name == "streamline" else ".layers.1."  # where the replacement lives
    assert changed and all(marker in k for k in changed), sorted(changed)
    # loss=lm: fit the replacement with the LM loss instead of MSE, the rest frozen
    lm, _ = _run(name, copy.deepcopy(dense), 2, **{name: {**base, "loss": "lm", "lr": 1e-2}})
    assert lm.extra["training"]["loss"] == "lm" and lm.extra["training"]["steps"] == 1
    sl = lm.model.state_dict()
    changed = {k for k in sl if not torch.equal(sl[k], sb[k])}
    assert changed and all(marker in k for k in changed), sorted(changed)


def test_variant_option_errors():
    for name, options, message in [
        ("streamline", {"loss": "kl"}, "streamline.loss=kl is unknown; use mse or lm"),
        ("streamline-layer", {"init": "mean"}, "streamline-layer.init=mean is unknown"),
        ("streamline-mlp-shared", {"post_train_steps": -1}, "streamline-mlp-shared needs post_train_steps >= 0"),
        ("streamline-none", {"start": 5}, "streamline-none.start=5: a window of 2 layers starting there does not fit"),
    ]:
        with pytest.raises(UsageError, match=message):
            _run(name, tiny_model("opt", layers=6), 2, **{name: options})


# --- command line and config files --------------------------------------------------------------

def test_config_file_values_are_defaults_the_command_line_wins(tmp_path):
    from harness.cli import build_parser
    from harness.config_file import parse_args_with_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: some/model\nlayers: 3\nmethods: [remove, shortgpt+lora]\nno-progress: true\n"
                   "method_opt:\n  lora: {r: 4, target_modules: [q_proj, v_proj]}\n")
    args = parse_args_with_config(build_parser(), ["--config", str(cfg), "-o", "lora.r=6"])
    assert (args.model, args.layers, args.ratio, args.methods, args.no_progress) == \
        ("some/model", [3], None, "remove,shortgpt+lora", True)  # targets are lists (sweeps)
    assert args.method_opt == ["lora.r=4", "lora.target_modules=q_proj/v_proj", "lora.r=6"]
    args = parse_args_with_config(build_parser(), ["--config", str(cfg), "--ratio", "0.2", "--model", "x"])
    assert (args.model, args.ratio, args.layers) == ("x", [0.2], None)
    for text, message in [("nosuch: 1\n", "unknown key 'nosuch'"), ("layers: many\n", "--layers expects an integer"),
                          ("ppl: 3\n", "'ppl' is a switch"), ("- a\n", "must be a mapping"),
                          ("ratio: 0.2\nlayers: 2\n", "either ratio or layers")]:
        cfg.write_text(text)
        with pytest.raises(UsageError, match=message):
            parse_args_with_config(build_parser(), ["--config", str(cfg)])
    with pytest.raises(UsageError, match="does not exist"):
        parse_args_with_config(build_parser(), ["--config", str(tmp_path / "none.yaml")])


def test_table5_6_config_names_every_row_and_its_options_are_valid():
    from harness.cli import _method_options, _split, build_parser
    from harness.config_file import parse_args_with_config

    path = Path(__file__).resolve().parent.parent / "configs" / "table5_6.yaml"
    args = parse_args_with_config(build_parser(), ["--config", str(path)])
    methods = _split(args.methods)
    assert set(methods) == {"streamline", "streamline-mlp-shared", "streamline-layer", "streamline-layer-shared",
                            "streamline-none", "streamline-none+lora", "streamline-multi-mlp"}
    opts = _method_options(args.method_opt)
    check_option_targets(opts, methods)
    configs = {m: resolve_method(m, opts)[1] for m in methods}
    for m in methods:
        if m not in ("streamline-none", "streamline-none+lora"):
            assert configs[m].post_train_steps > 0 and configs[m].train_samples == 3000
    lora = configs["streamline-none+lora"]["lora"]
    assert lora.match_params == "mlp" and lora.steps == configs["streamline"].post_train_steps


def test_cli_runs_lora_pipelines_end_to_end(tiny_opt_dir, tmp_path, capsys):
    data = shared_data_or_skip()
    from harness.cli import main
    from harness.results.store import load_runs

    out = tmp_path / "runs"
    argv = ["--model", str(tiny_opt_dir), "--data-dir", str(data), "--tasks", "piqa", "--limit", "4",
            "--layers", "2", "--calib-samples", "4", "--calib-seq-len", "32", "--output-dir", str(out),
            "--no-progress", "--methods", "shortgpt+lora,streamline+lora,streamline-layer-shared",
            "-o", "lora.steps=2", "-o", "lora.batch_size=2", "-o", "streamline+lora.lora.match_params=mlp",
            "-o", "streamline.epochs=1", "-o", "streamline-layer-shared.epochs=1", "-o", "streamline.train_samples=8",
            "-o", "streamline-layer-shared.train_samples=8", "--save-models"]
    assert main(argv) == 0
    recs = {r["method"]: r for r in load_runs(str(out))}
    assert set(recs) == {"dense", "shortgpt+lora", "streamline+lora", "streamline-layer-shared"}
    sg, sl = recs["shortgpt+lora"], recs["streamline+lora"]
    assert sg["label"] == "shortgpt+lora(steps=2, batch_size=2)"
    assert set(sg["method_config"]) == {"shortgpt", "lora"} and sg["method_config"]["lora"]["steps"] == 2
    assert sl["method_config"]["lora"]["match_params"] == "mlp"
    assert sl["manifest"]["lora"]["match_target"] == MLP_PARAMS and sl["manifest"]["lora"]["r"] >= 1
    assert sg["manifest"]["lora"]["training"]["steps"] == 2 and sg["params"]["added"] == 0
    assert sl["params"]["added"] == MLP_PARAMS and "post_step.lora" in sl["timings"]
    for rec in (sg, sl, recs["streamline-layer-shared"]):
        assert rec["metrics"] and Path(rec["saved_model"]).is_dir()
        back, _tok, manifest = load_pruned(rec["saved_model"])
        assert manifest["method"] == rec["method"]
    assert "streamline+lora" in capsys.readouterr().out

"""The generated world, its suite files, the world tokenizer and the checked-in reference models."""
import json

import pytest

from harness import reference as R
from harness.reference import world as W
from harness.reference.scoring import evaluate_suite, load_suite
from harness.reference.tokenizer import build_tokenizer


def test_world_is_deterministic_and_seeded():
    a, b, c = W.World(), W.World(), W.World(seed=W.DEFAULT_SEED + 1)
    assert [i.as_json() for i in a.items()["sum"]] == [i.as_json() for i in b.items()["sum"]]
    assert a.corpus_text(50_000) == b.corpus_text(50_000)
    assert a.corpus_text(50_000) != c.corpus_text(50_000)
    assert a.people != c.people


def test_heldout_items_never_in_training_text():
    world = W.World()
    corpus = world.corpus_text(300_000)
    W.check_no_leak(world.items(), corpus)
    # a held-out pattern unit never appears, in any phrase length
    unit = world.items()["pattern"][0].key.split(":")[1]
    assert f"repeat : {unit} " not in corpus
    # a planted leak is caught
    item = world.items()["sum"][0]
    with pytest.raises(AssertionError):
        W.check_no_leak(world.items(), corpus + item.gold_text)


def test_suite_items_are_well_formed():
    for task, items in W.World().items().items():
        assert len(items) == W.DEFAULT_ITEMS, task
        for it in items:
            assert len(it.choices) == 4 and len(set(it.choices)) == 4
            assert all(c.startswith(" ") for c in it.choices)
            assert 0 <= it.label < 4


def test_checked_in_suite_matches_generator():
    if not (R.SUITE_DIR / "suite.json").is_file():
        pytest.skip("reference/suite not generated; run python -m harness.reference.train")
    world = W.World()
    meta = json.loads((R.SUITE_DIR / "suite.json").read_text())
    for task, items in world.items().items():
        expected = "".join(json.dumps(it.as_json(), ensure_ascii=True) + "\n" for it in items)
        assert (R.SUITE_DIR / meta["tasks"][task]["file"]).read_text() == expected, task
    assert R.CALIBRATION_PATH.read_text() == world.calibration_text()


def test_training_rows_score_only_what_the_context_determines():
    from harness.reference.tokenizer import word_ids
    from harness.reference.train import doc_batches

    world = W.World()
    ids = word_ids(world.vocabulary())
    x, y = doc_batches(world, steps=2, batch=8, seq_len=24, ids=ids)
    for row_x, row_y in zip(x.view(-1, 24), y.view(-1, 24)):
        scored = (row_y != -100).nonzero().flatten()
        assert len(scored) >= 2 and row_x[scored[-1]] == 2  # answer words + closing </s>
        assert (row_x[scored] == row_y[scored]).all() and row_x[0] != 1  # starts at position 0


def test_world_tokenizer_splits_query_and_choice_cleanly():
    world = W.World()
    tok = build_tokenizer(world.vocabulary(), 256)
    for items in world.items().values():
        for it in items[:50]:
            q = tok(it.query, add_special_tokens=False)["input_ids"]
            for ch in it.choices:
                whole = tok(it.query + ch, add_special_tokens=False)["input_ids"]
                assert whole[:len(q)] == q and len(whole) == len(q) + 1
            assert tok.unk_token_id not in q


def _trained(size):
    d = R.MODELS_DIR / R.NAMES[size]
    if not (d / "model.safetensors").is_file():
        pytest.skip(f"reference model {d.name} not trained; run python -m harness.reference.train --sizes {size}")
    return d


def test_reference_models_fit_the_size_budget():
    dirs = [R.MODELS_DIR / n for n in R.NAMES.values() if (R.MODELS_DIR / n / "model.safetensors").is_file()]
    if not dirs:
        pytest.skip("no reference model trained yet")
    total = sum(f.stat().st_size for d in dirs for f in d.iterdir())
    assert total <= 25 * 2 ** 20, f"reference models take {total / 2 ** 20:.1f} MiB > 25 MiB"


def test_smallest_reference_model_meets_quality_bars():
    from harness.reference.quality import BARS, measure

    q = measure(_trained("small"), calib_samples=32)
    assert q["dense_avg"] >= BARS["dense_acc_min"], q["dense"]
    assert q["regime"]["meets_bar"], q["regime"]["removal"]
    assert q["remove_avg"] < q["dense_avg"], (q["dense_avg"], q["remove_avg"])  # removal is not free
    assert q["profile_spread"] >= BARS["profile_spread_min"], q["per_layer_cos"]


def test_lm_eval_path_agrees_with_reference_scoring():
    """run_benchmarks.py's lm-eval numbers on the suite equal the direct computation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.evaluation.eval_config import EvalConfig
    from harness.evaluation.lmeval import run_lm_eval

    d = _trained("small")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d)
    limit = 25
    got = run_lm_eval(model, tok, EvalConfig(suite=str(R.SUITE_DIR), limit=limit, batch_size=16))["metrics"]
    _, tasks = load_suite(R.SUITE_DIR)
    want = evaluate_suite(model, tok, {t: items[:limit] for t, items in tasks.items()})
    for task in tasks:
        assert got[task]["acc"] == pytest.approx(want[task]["acc"]), task
        assert got[task]["acc_norm"] == pytest.approx(want[task]["acc_norm"]), task


def _tiny_size(T, **kw):
    base = dict(layers=2, batch=8, warmup=2, eval_every=2, heldout_docs=16, patience=4, min_steps=4,
                min_cooldown=3, max_steps=10, min_progress=1.0)
    return T.Size("_test", **{**base, **kw})


def test_training_is_deterministic_and_resumes_exactly(tmp_path, monkeypatch):
    """Same command, same machine -> same weights; a run interrupted after a checkpoint and resumed
    ends with the weights, data hash and held-out curve of an uninterrupted one."""
    import torch
    from safetensors.torch import load_file

    from harness.reference import train as T

    monkeypatch.setitem(T.SIZES, "_test", _tiny_size(T))
    monkeypatch.setattr(T, "CHECKPOINT_EVERY", 2)
    world = W.World()
    tasks = {t: items[:5] for t, items in load_suite(R.SUITE_DIR)[1].items()}
    a = T.train("_test", world, tasks, tmp_path / "a", log=lambda m: None, probe_every=0)
    b = T.train("_test", world, tasks, tmp_path / "b", log=lambda m: None, probe_every=0)
    ck = tmp_path / "ck.pt"
    assert T.train("_test", world, tasks, tmp_path / "c", log=lambda m: None, probe_every=0,
                   checkpoint=ck, stop_after=5) is None
    assert ck.is_file() and not (tmp_path / "c" / "model.safetensors").exists()
    c = T.train("_test", world, tasks, tmp_path / "c", log=lambda m: None, probe_every=0, checkpoint=ck)
    wa, wb, wc = (load_file(tmp_path / r / "model.safetensors") for r in "abc")
    for w in (wb, wc):
        assert w.keys() == wa.keys() and all(torch.equal(wa[k], w[k]) for k in wa)
    assert a["train_data_sha256"] == b["train_data_sha256"] == c["train_data_sha256"]
    assert a["heldout_curve"] == c["heldout_curve"] and a["loss_curve"] == c["loss_curve"]
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["stop_reason"] == "cap" and m["converged"] is False and m["steps"] == 13  # cap 10 + cooldown 3
    assert "held-out" in m["stopping_rule"] and [h["step"] for h in m["heldout_curve"]] == list(range(2, 14, 2))
    assert "dense_suite_accuracy" in m


def test_checkpoint_of_other_settings_is_refused(tmp_path, monkeypatch):
    from harness.reference import train as T

    monkeypatch.setitem(T.SIZES, "_test", _tiny_size(T))
    world = W.World()
    tasks = {t: items[:2] for t, items in load_suite(R.SUITE_DIR)[1].items()}
    ck = tmp_path / "ck.pt"
    T.train("_test", world, tasks, tmp_path / "a", log=lambda m: None, probe_every=0, checkpoint=ck, stop_after=2)
    monkeypatch.setitem(T.SIZES, "_test", _tiny_size(T, lr=1e-3))
    with pytest.raises(SystemExit, match="other settings"):
        T.train("_test", world, tasks, tmp_path / "a", log=lambda m: None, probe_every=0, checkpoint=ck)
    # a stopping-rule setting may change while the constant phase runs (the trajectory is the same)
    monkeypatch.setitem(T.SIZES, "_test", _tiny_size(T, patience=6))
    assert T.train("_test", world, tasks, tmp_path / "a", log=lambda m: None, probe_every=0, checkpoint=ck)


def test_stop_rule_plateau_cap_and_cooldown():
    from harness.reference.train import Size, StopRule

    z = Size("_r", layers=2, warmup=10, patience=300, min_steps=500, min_progress=0.5,
             min_rel_improvement=0.01, cooldown_frac=0.2, min_cooldown=50, max_steps=5000)
    r = StopRule(z)
    assert r.lr(0) == pytest.approx(z.lr / 10) and r.lr(400) == z.lr
    # steady progress: never stops
    for i, step in enumerate(range(100, 1100, 100)):
        r.update(step, 2.0 * 0.9 ** i)
    assert r.cooldown_start is None and not r.done(1000)
    # less than 1% better for 300 steps: the plateau ends the constant phase
    best = r.best
    for step in (1100, 1200, 1300):
        r.update(step, best * 0.995)
    assert r.reason == "plateau" and r.cooldown_start == 1300 and r.cooldown_len == 260
    assert r.lr(1300) == z.lr and r.lr(1430) == pytest.approx(z.lr / 2) and r.lr(1560) == 0
    assert not r.done(1559) and r.done(1560)
    r.update(1400, 0.0)  # nothing changes once cooling down
    assert r.best == best and r.cooldown_start == 1300
    # the initial unigram plateau never ends the constant phase: not before min_steps, and not
    # before the loss fell below min_progress x its first measurement
    r = StopRule(z)
    for step in range(100, 2100, 100):
        r.update(step, 2.5)
    assert r.cooldown_start is None
    r.update(2100, 1.2)
    for step in (2200, 2300):
        r.update(step, 1.2)
    assert r.cooldown_start is None
    r.update(2400, 1.2)
    assert r.reason == "plateau" and r.cooldown_start == 2400
    r = StopRule(z)
    r.update(100, 2.5)
    for step in range(150, 500, 50):
        r.update(step, 1.0)
    assert r.cooldown_start is None  # patience ran out at 450, but min_steps is 500
    r.update(600, 1.0)
    assert r.reason == "plateau"
    # the cap ends it as not converged; state round-trips (what a checkpoint stores)
    r = StopRule(z)
    for i, step in enumerate(range(100, 5100, 100)):
        r.update(step, 3.0 * 0.98 ** i)
    assert r.reason == "cap" and r.cooldown_len == 1000
    assert StopRule(z, r.state()).state() == r.state()


def test_default_model_rule(tmp_path, monkeypatch):
    """The bare command's model: the deepest converged model whose removal at 25% keeps 60-90%."""
    def ship(name, layers, converged, retained):
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text("{}")
        (d / "manifest.json").write_text(json.dumps({"size": {"layers": layers}, "converged": converged,
                                                     "quality": {"regime": {"retained_at_25": retained}}}))

    monkeypatch.setattr(R, "MODELS_DIR", tmp_path)
    monkeypatch.setattr(R, "NAMES", {"a": "m8", "b": "m12", "c": "m16", "d": "m24"})
    ship("m8", 8, True, 75.0)
    ship("m12", 12, True, 88.3)
    ship("m16", 16, True, 40.0)  # collapses under removal
    ship("m24", 24, True, 93.1)  # removal nearly free: outside the pretrained band
    assert R.default_model() == "m12"
    ship("m16", 16, False, 70.0)  # not converged
    assert R.default_model() == "m12"
    ship("m16", 16, True, 70.0)
    assert R.default_model() == "m16"



def test_shipped_manifests_hold_convergence_evidence_and_regime():
    """Every checked-in model stopped by the held-out rule (not the cap) and carries its regime table."""
    from harness.reference.quality import REGIME_FRACTIONS

    names = R.shipped()
    if not names:
        pytest.skip("no reference model trained yet")
    for name in names:
        m = json.loads((R.MODELS_DIR / name / "manifest.json").read_text())
        assert m["converged"] is True and m["stop_reason"] == "plateau", name
        assert "held-out" in m["stopping_rule"] and len(m["heldout_curve"]) >= 10, name
        assert m["steps"] == m["cooldown"][1] and m["heldout_curve"][-1]["step"] <= m["steps"], name
        regime = m["quality"]["regime"]
        assert [r["fraction"] for r in regime["removal"]] == list(REGIME_FRACTIONS), name
        assert len(m["quality"]["per_layer_cos"]) == m["size"]["layers"], name


def test_bare_command_model_meets_the_regime_bar():
    if not R.shipped():
        pytest.skip("no reference model trained yet")
    name = R.default_model()
    m = json.loads((R.MODELS_DIR / name / "manifest.json").read_text())
    retained = m["quality"]["regime"]["retained_at_25"]
    assert 100 * R.REGIME_BAR <= retained <= 100 * R.REGIME_MAX, (name, m["quality"]["regime"])

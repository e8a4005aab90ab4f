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
    assert q["remove_drop"] >= BARS["remove_drop_min"], (q["dense_avg"], q["remove_avg"])
    assert q["profile_spread"] >= BARS["profile_spread_min"], q["per_layer_cos"]


def test_lm_eval_path_agrees_with_reference_scoring():
    """run_benchmarks.py's lm-eval numbers on the suite equal the direct computation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.evaluation.lmeval import EvalConfig, run_lm_eval

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


def test_training_is_deterministic(tmp_path):
    """Same command, same machine -> same weights (a 2-layer, 4-step run of the real recipe)."""
    import torch
    from safetensors.torch import load_file

    from harness.reference import train as T

    T.SIZES["_test"] = T.Size("_test", layers=2, steps=4, batch=8, warmup=2)
    try:
        world = W.World()
        tasks = {t: items[:5] for t, items in load_suite(R.SUITE_DIR)[1].items()}
        for run in ("a", "b"):
            T.train("_test", world, tasks, tmp_path / run, log=lambda m: None, eval_every=0)
    finally:
        del T.SIZES["_test"]
    a, b = (load_file(tmp_path / r / "model.safetensors") for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["steps"] == 4 and m["train_data_sha256"] and "dense_suite_accuracy" in m

"""LaCo (RDSC merge, threshold search), angular distance, and stability (per-item, vs dense)."""
import copy
import gzip
import json
import math
import re

import pandas as pd
import pytest
import torch
from conftest import (
    SHARED_DATA,
    make_context,
    opt_tokenizer,
    run_method,
    shared_data_or_skip,
    tiny_model,
)

LACO_CTX = dict(samples=6, seq=12, batch_size=3)  # small LaCo searches

from harness import get_adapter
from harness.errors import UsageError
from harness.evaluation.stability import (
    annotate_token_counts,
    compact_samples,
    compare,
    continuation_token_counts,
    effective_items,
    has_token_counts,
    stability,
)
from harness.results.report import build_tables
from harness.signals.activations import StatsAccumulator
from methods.laco import rdsc_merge, released_code_merge

# --- LaCo --------------------------------------------------------------------------------------

def test_rdsc_merge_and_released_code_merge_on_hand_made_tensors():
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    f1 = torch.tensor([[2.0, 2.0], [2.0, 2.0]])
    f2 = torch.tensor([[0.0, 1.0], [5.0, -1.0]])
    # theta_l + (f1 - theta_l) + (f2 - theta_l) = f1 + f2 - theta_l, by hand:
    assert torch.equal(rdsc_merge(base, [f1, f2]), torch.tensor([[1.0, 1.0], [4.0, -3.0]]))
    assert torch.equal(rdsc_merge(base, []), base)
    # the released notebook's in-place loop telescopes to the last merged tensor
    assert torch.equal(released_code_merge(base, [f1, f2]), f2)
    # low-precision weights: accumulated in float32, returned in the weights' dtype
    out = rdsc_merge(base.bfloat16(), [f1.bfloat16(), f2.bfloat16()])
    assert out.dtype == torch.bfloat16 and torch.equal(out.float(), torch.tensor([[1.0, 1.0], [4.0, -3.0]]))
    assert torch.equal(base, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # inputs untouched


def test_merge_params_are_attention_and_mlp_without_norms():
    a = get_adapter(tiny_model("opt", layers=2))
    names = set(a.layer_weights(a.layers[0]))
    assert {"self_attn.q_proj.weight", "self_attn.q_proj.bias", "fc1.weight", "fc2.bias"} <= names
    assert not any("norm" in n for n in names)
    a = get_adapter(tiny_model("llama", layers=2))
    names = set(a.layer_weights(a.layers[0]))
    assert names == {f"self_attn.{p}_proj.weight" for p in "qkvo"} | {f"mlp.{p}_proj.weight" for p in
                                                                       ("gate", "up", "down")}


@pytest.mark.parametrize("name", ["laco", "laco-code"])
def test_laco_merge_lands_in_the_base_layer(name):
    model = tiny_model("opt", layers=6)
    dense = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in get_adapter(model).layers]
    # defaults on 6 layers: H = 5, C = 3 -> first candidate merges layers 3, 4 into 2; T = -1 accepts it
    res = run_method(name, make_context(model, 2, **LACO_CTX), threshold=-1.0)
    assert res.removed_layers == [3, 4]
    assert res.extra["laco"]["merges"][0]["layer"] == 2 and res.extra["laco"]["merges"][0]["merged"] == [3, 4]
    a = get_adapter(res.model)
    assert a.num_layers == 4 and res.model.config.num_hidden_layers == 4
    merged = a.layers[2].state_dict()
    for key, value in merged.items():
        if "layer_norm" in key:
            assert torch.equal(value, dense[2][key]), key  # norms untouched
        elif name == "laco":
            expect = dense[2][key] + (dense[3][key] - dense[2][key]) + (dense[4][key] - dense[2][key])
            assert torch.allclose(value, expect, atol=1e-6), key
        else:
            assert torch.allclose(value, dense[4][key], atol=1e-6), key  # a copy of the last merged layer
    assert torch.equal(a.layers[3].state_dict()["fc1.weight"], dense[5]["fc1.weight"])  # layer 5 shifted down
    with torch.no_grad():
        res.model(torch.randint(3, 128, (1, 8)))  # still runs


def test_laco_reaches_the_target_copying_only_the_layers_it_merges_into(monkeypatch):
    model = tiny_model("opt", layers=8)
    layers_before = list(get_adapter(model).layers)
    ptrs = {id(l): l.fc1.weight.data_ptr() for l in layers_before}
    calls = []
    real_deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda *a, **k: calls.append(type(a[0]).__name__) or real_deepcopy(*a, **k))
    # T = 0.99 rejects candidates (exercising roll-back) and forces relaxed passes
    res = run_method("laco", make_context(model, 3, **LACO_CTX), threshold=0.99, merge_layers=3, relax_step=0.1)
    # never a model copy: at most one copy of one decoder layer per candidate (the merge base it owns)
    assert not {"OPTForCausalLM", "OPTModel", "OPTDecoder", "ModuleList"} & set(calls)
    assert 0 < calls.count("OPTDecoderLayer") <= len(res.scores["candidates"])
    a = get_adapter(res.model)
    assert res.model is model and a.num_layers == 5 and len(res.removed_layers) == 3
    bases = {c["layer"] for c in res.scores["candidates"] if "layer" in c}
    kept = [l for l in a.layers if any(l is b for b in layers_before)]  # untouched: same modules, same storage
    assert len(kept) >= a.num_layers - max(1, len(bases)) and all(ptrs[id(l)] == l.fc1.weight.data_ptr() for l in kept)
    scores = res.scores
    assert scores["passes"][0]["threshold"] == 0.99
    assert any(not c["accepted"] for c in scores["candidates"])
    assert scores["threshold_final"] < 0.99 and len(scores["passes"]) > 1  # relaxation is recorded
    accepted = [c for c in scores["candidates"] if c["accepted"]]
    assert all(c["similarity"] > c["threshold"] for c in accepted)
    assert sorted(x for c in accepted for x in c["merged"]) == res.removed_layers
    assert res.extra["laco"]["requested"] == res.extra["laco"]["removed"] == 3


def test_laco_rejected_candidates_roll_back_exactly():
    model = tiny_model("llama", layers=6)
    dense = copy.deepcopy(model.state_dict())
    ctx = make_context(model, 2, **LACO_CTX)
    # nothing exceeds T = 1, and fallback=error refuses to relax: every candidate is rolled back
    with pytest.raises(UsageError, match=r"removed only 0 of 2 layers.*laco.threshold"):
        run_method("laco", ctx, threshold=1.0, fallback="error")
    assert ctx.adapter.num_layers == 6 and model.config.num_hidden_layers == 6
    assert [l.self_attn.layer_idx for l in ctx.adapter.layers] == list(range(6))
    state = model.state_dict()
    assert state.keys() == dense.keys() and all(torch.equal(state[k], dense[k]) for k in dense)


def test_laco_explicit_sentences_and_current_reference():
    model = tiny_model("llama", layers=6)
    res = run_method("laco", make_context(model, 2, **LACO_CTX),
                     sentences="A short sentence./Another, a bit longer sentence.", reference="current", threshold=-1.0)
    assert res.extra["laco"]["sentences"] == {"source": "sentences", "count": 2,
                                              "tokens": len("A short sentence.") + len("Another, a bit longer sentence.")}
    assert len(res.removed_layers) == 2 and get_adapter(res.model).num_layers == 4


@pytest.mark.parametrize("opts, message", [
    ({"merge_layers": 1}, r"laco.merge_layers=1 is too small"),
    ({"threshold": 1.5}, r"laco.threshold=1.5 is not a cosine"),
    ({"reference": "original"}, r"laco.reference='original' is unknown"),
    ({"fallback": "skip"}, r"laco.fallback='skip' is unknown"),
    ({"interval": 0}, r"laco.interval=0 must be >= 1"),
    ({"lowest_layer": 3}, r"cannot remove 2 layers within the merge range \[3, 5\)"),
    ({"sentences_file": "/nonexistent/s.txt"}, r"laco.sentences_file '/nonexistent/s.txt' does not exist"),
])
def test_laco_bad_options_are_usage_errors(opts, message):
    model = tiny_model("opt", layers=6)
    with pytest.raises(UsageError, match=message):
        run_method("laco", make_context(model, 2, **LACO_CTX), **opts)


# --- angular vs Block Influence ------------------------------------------------------------------

def _rotate(v, plane, angle):
    i, j = plane
    out = v.clone()
    out[i] = math.cos(angle) * v[i] - math.sin(angle) * v[j]
    out[j] = math.sin(angle) * v[i] + math.cos(angle) * v[j]
    return out


def test_block_influence_and_angular_pick_different_layers_on_hand_made_states():
    # 6 layers, one sequence of 9 tokens. Layer i turns the 8 leading tokens by a[i] (in the e2-e3
    # plane) and the last token by b[i] (in the e0-e1 plane).
    a = [0.5, 0.05, 0.6, 0.6, 0.05, 0.5]
    b = [0.3, 0.9, 0.05, 0.05, 0.9, 0.3]
    lead, last = torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0, 0.0])
    states = []
    for j in range(7):
        states.append(torch.stack([lead] * 8 + [last])[None])
        if j < 6:
            lead, last = _rotate(lead, (2, 3), a[j]), _rotate(last, (0, 1), b[j])
    acc = StatsAccumulator(6, [1, 2])
    acc.begin_batch(torch.ones(1, 9, dtype=torch.long))
    for j, x in enumerate(states):
        acc(j, x)
    stats = acc.result()
    # BI_i = 1 - (8 cos a_i + cos b_i) / 9: lowest at layers 1 and 4 (the leading tokens barely move)
    # angular lag 2 on the last token: (b_i + b_{i+1}) / pi, lowest for the window starting at 2
    for i in range(5):
        assert stats.angular[2][i] == pytest.approx((b[i] + b[i + 1]) / math.pi, abs=1e-6)

    def ctx():
        model = tiny_model("opt", layers=6, vocab_size=16)
        c = make_context(model, 2, **LACO_CTX)
        c.stats_cache[(c.dense_stats_key, (1, 2))] = stats  # the shared scoring pass, precomputed
        return c

    assert run_method("shortgpt", ctx()).removed_layers == [1, 4]
    res = run_method("angular", ctx())
    assert res.removed_layers == [2, 3]
    assert res.scores["start"] == 2 and get_adapter(res.model).num_layers == 4


def test_angular_forced_start_out_of_range_is_a_usage_error():
    with pytest.raises(UsageError, match=r"angular.start=5: a window of 2 layers starting there does not fit"):
        run_method("angular", make_context(tiny_model("opt", layers=6), 2, **LACO_CTX), start=5)


# --- stability -----------------------------------------------------------------------------------

def test_stability_on_a_hand_made_example():
    # population std of two choices = |x - y| / 2 -> spreads 0, ln 2, ln 3 -> weights 1/6, 2/6, 3/6
    scores = [[-1.0, -1.0], [-1.0, -1.0 - 2 * math.log(2)], [-1.0, -1.0 - 2 * math.log(3)]]
    dense_right = [True, False, True]
    pruned_right = [True, True, True]  # agrees on items 0 and 2
    assert stability(scores, dense_right, pruned_right) == pytest.approx(1 / 6 + 3 / 6)
    # the released script's bug: the first #agreements (2) weights, whichever items agreed
    assert stability(scores, dense_right, pruned_right, variant="released_prefix_sum") == pytest.approx(1 / 6 + 2 / 6)
    assert stability(scores, dense_right, dense_right) == pytest.approx(1.0)
    assert stability(scores, dense_right, [not r for r in dense_right]) == 0.0
    # huge spreads do not overflow
    assert stability([[0.0, 2000.0], [0.0, 0.0]], [True, True], [True, False]) == pytest.approx(1.0)


def _lm_eval_rows(lls, accs, doc_ids):
    return [{"doc_id": d, "filtered_resps": [(v, False) for v in ll], "acc": a, "acc_norm": a, "target": 0}
            for ll, a, d in zip(lls, accs, doc_ids)]


def test_stability_from_lm_eval_samples_matches_items_by_doc_id():
    scores = [[-1.0, -1.0], [-1.0, -1.0 - 2 * math.log(2)], [-1.0, -1.0 - 2 * math.log(3)]]
    dense = compact_samples({"piqa": _lm_eval_rows(scores, [1.0, 0.0, 1.0], [0, 1, 2])})
    # the pruned run lists items in another order (its scores do not matter: weights are the dense model's)
    pruned = compact_samples({"piqa": _lm_eval_rows([[0.0, 5.0]] * 3, [1.0, 1.0, 1.0], [2, 0, 1])})
    assert dense["tasks"]["piqa"]["ll"][1] == scores[1]
    block = compare(dense, pruned)
    assert block["tasks"]["piqa"]["n"] == 3
    assert block["tasks"]["piqa"]["acc"] == pytest.approx(4 / 6)
    assert block["mean"]["acc"] == pytest.approx(4 / 6)
    # weights 1/6, 2/6, 3/6 -> 1 / (1 + 4 + 9) * 36 items' worth
    assert block["tasks"]["piqa"]["n_eff"] == pytest.approx(36 / 14)
    assert block["scores"] == "sum"
    assert compare(dense, compact_samples({"arc_easy": _lm_eval_rows(scores, [1.0] * 3, [0, 1, 2])})) is None


def test_effective_items_and_per_token_mean_scores():
    assert effective_items([0.25] * 4) == pytest.approx(4.0)
    assert effective_items([1.0, 0.0, 0.0]) == pytest.approx(1.0)
    # summed log-likelihoods: item 0's long choices spread widely and take all the weight;
    # per token (item 0: 40 and 20 tokens, item 1: 1 token each) the spreads are 0.25 and 0.5
    lls = [[-40.0, -10.0], [-1.0, -2.0]]
    rows = [{"doc_id": i, "filtered_resps": [(v, False) for v in ll], "acc": 1.0, "acc_norm": 1.0,
             "continuation_tokens": nt} for i, (ll, nt) in enumerate(zip(lls, [[40, 20], [1, 1]]))]
    dense = compact_samples({"piqa": rows})
    assert dense["tasks"]["piqa"]["ntok"] == [[40, 20], [1, 1]]
    pruned = compact_samples({"piqa": [{**r, "acc": float(i)} for i, r in enumerate(rows)]})  # item 0 flips
    summed = compare(dense, pruned)["tasks"]["piqa"]
    w1 = 1 / (1 + math.exp(15.0 - 0.5))  # softmax(15, 0.5)[1]
    assert summed["acc"] == pytest.approx(w1) and summed["n_eff"] == pytest.approx(1 / (w1 ** 2 + (1 - w1) ** 2))
    mean = compare(dense, pruned, scores="mean")
    w1 = 1 / (1 + math.exp(0.25 - 0.5))
    assert mean["scores"] == "mean" and mean["tasks"]["piqa"]["acc"] == pytest.approx(w1)
    assert mean["tasks"]["piqa"]["n_eff"] > summed["n_eff"]
    # side files without token counts: mean cannot be computed, and says so
    old = compact_samples({"piqa": [{k: v for k, v in r.items() if k != "continuation_tokens"} for r in rows]})
    assert not has_token_counts(old) and has_token_counts(dense)
    assert compare(old, pruned, scores="mean") is None
    with pytest.raises(UsageError, match="stability scores 'median'"):
        compare(dense, pruned, scores="median")


def test_continuation_token_counts_are_lm_evals_own():
    """Counts come from lm-eval's own pair encoding (trailing context spaces move to the continuation)."""
    from lm_eval.models.huggingface import HFLM

    tok = opt_tokenizer()
    lm = HFLM(pretrained=tiny_model("opt", vocab_size=len(tok), layers=1), tokenizer=tok, batch_size=1)
    pairs = [("Question: why? Answer:", " because it is"), ("Goal: ", "cut bread"), ("", "hello there")]
    counts = continuation_token_counts(lm, pairs)
    assert counts[:2] == [len(lm._encode_pair(c, x)[1]) for c, x in pairs[:2]]
    assert counts[0] == len(tok(" because it is", add_special_tokens=False).input_ids)
    assert counts[2] == len(tok("hello there", add_special_tokens=False).input_ids)
    rows = {"t": [{"doc_id": 0, "arguments": pairs[:2]}, {"doc_id": 1, "arguments": [("q", {"until": []})]}]}
    annotate_token_counts(lm, rows)
    assert rows["t"][0]["continuation_tokens"] == counts[:2] and "continuation_tokens" not in rows["t"][1]


def _run_record(method, metrics, stability_tasks=None):
    return {"method": method, "label": method, "model": {"name": "m", "dtype": "float32"}, "eval": {"limit": None},
            "environment": {"created": "2025"}, "params": {"ratio": 0.0}, "metrics": metrics,
            "stability": {"tasks": stability_tasks} if stability_tasks else None}


def test_report_shows_stability_on_each_tasks_table_metric():
    metrics = {"piqa": {"acc": 0.6, "acc_norm": 0.7}, "winogrande": {"acc": 0.5}}
    runs = [_run_record("dense", metrics),
            _run_record("laco", metrics, {"piqa": {"acc": 0.5, "acc_norm": 0.9, "n": 4, "n_eff": 1.5},
                                          "winogrande": {"acc": 0.75, "acc_norm": None, "n": 4, "n_eff": 2.5}})]
    (_title, hidden, notes), = build_tables(runs, "acc_norm")
    assert pd.isna(hidden["Stab."].tolist()[1]) and hidden["n_eff"].tolist()[1] == pytest.approx(2.0)
    assert any("Stab. is shown where n_eff >= 30" in n for n in notes)  # 2 effective items: not shown by default
    (_title, df, notes), = build_tables(runs, "acc_norm", all_stability=True)
    # piqa on acc_norm (0.9), winogrande has no acc_norm -> acc (0.75), as the score columns do
    assert df["Stab."].tolist()[1] == pytest.approx(100 * (0.9 + 0.75) / 2)
    assert pd.isna(df["Stab."].tolist()[0])  # the dense row: "-"
    assert list(df.columns).index("n_eff") == list(df.columns).index("Stab.") + 1
    assert df["n_eff"].tolist()[1] == pytest.approx(2.0) and pd.isna(df["n_eff"].tolist()[0])
    (note,) = [n for n in notes if n.startswith("Stab. = stability")]
    assert "summed log-likelihoods" in note and "n_eff = effective number of items" in note
    assert "out of 4 items per task" in note
    (_title, df, _notes), = build_tables([_run_record("dense", metrics), _run_record("x", metrics)], "acc")
    assert "Stab." not in df.columns  # only when present


def test_group_column_pools_effective_items():
    from harness.results.report import stability_items_cell

    # two subtasks of 2 items, equal weights within each (n_eff 2): pooled item-weighted, 4 equal items
    run = {"eval_details": {"groups": {"mmlu": ["a", "b"]}},
           "stability": {"tasks": {"a": {"acc": 1.0, "n": 2, "n_eff": 2.0}, "b": {"acc": 0.5, "n": 2, "n_eff": 2.0}}}}
    assert stability_items_cell(run, ["mmlu"]) == pytest.approx(4.0)
    # all of a's weight on one item, b 6 items equal: weights 2/8 on one item, 1/8 on six -> 1/(1/16 + 6/64)
    run["stability"]["tasks"] = {"a": {"acc": 1.0, "n": 2, "n_eff": 1.0}, "b": {"acc": 1.0, "n": 6, "n_eff": 6.0}}
    assert stability_items_cell(run, ["mmlu"]) == pytest.approx(1 / (1 / 16 + 6 / 64))


# --- end to end ----------------------------------------------------------------------------------

def _independent_stability(dense, pruned):
    """Recompute stability from two side files, straight from the definition."""
    idx = {d: i for i, d in enumerate(pruned["doc_id"])}
    spreads, agree = [], []
    for i, d in enumerate(dense["doc_id"]):
        t = torch.tensor(dense["ll"][i], dtype=torch.float64)
        spreads.append(float(t.std(unbiased=False)))
        agree.append((dense["acc"][i] > 0.5) == (pruned["acc"][idx[d]] > 0.5))
    w = torch.softmax(torch.tensor(spreads, dtype=torch.float64), 0)
    return float(sum(wi for wi, a in zip(w, agree) if a)), w


def test_cli_laco_and_angular_report_stability(tiny_opt_dir, tmp_path, capsys):
    shared_data_or_skip()
    from harness.cli import main

    out = tmp_path / "runs"
    argv = ["--model", str(tiny_opt_dir), "--methods", "laco,angular", "--layers", "2", "--data-dir", str(SHARED_DATA),
            "--tasks", "piqa,arc_easy", "--limit", "4", "--calib-samples", "4", "--calib-seq-len", "32",
            "--output-dir", str(out), "--no-progress", "--all-stability"]  # 4 items: under the default n_eff floor
    assert main(argv) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("Method"))
    assert header.split()[-2:] == ["Stab.", "n_eff"]
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.split()[:1] in (["laco"], ["angular"])}
    assert set(rows) == {"laco", "angular"}
    runs = {}
    for path in (out / tiny_opt_dir.name).glob("*.json"):
        rec = json.loads(path.read_text())
        side = path.with_name(path.stem + ".samples.json.gz")
        with gzip.open(side, "rt") as fh:
            runs[rec["method"]] = (rec, json.load(fh))
    assert set(runs) == {"dense", "laco", "angular"}
    dense_rec, dense_side = runs["dense"]
    assert dense_rec.get("stability") is None
    for task in ("piqa", "arc_easy"):  # the side file is the evaluation, item by item
        acc = dense_side["tasks"][task]["acc"]
        assert len(acc) == 4 and sum(acc) / 4 == pytest.approx(dense_rec["metrics"][task]["acc"])
    for method in ("laco", "angular"):
        rec, side = runs[method]
        assert rec["params"]["pruned_layers"] == 4 and len(rec["manifest"]["removed_layers"]) == 2
        per_task, n_eff = [], []
        for task in ("piqa", "arc_easy"):
            expect, weights = _independent_stability(dense_side["tasks"][task], side["tasks"][task])
            assert rec["stability"]["tasks"][task]["acc"] == pytest.approx(expect)
            assert rec["stability"]["tasks"][task]["n"] == 4
            assert rec["stability"]["tasks"][task]["n_eff"] == pytest.approx(1 / float((weights ** 2).sum()))
            per_task.append(100 * expect)
            n_eff.append(rec["stability"]["tasks"][task]["n_eff"])
        assert rec["stability"]["scores"] == "sum"
        assert float(rows[method][-2]) == pytest.approx(sum(per_task) / 2, abs=0.051)
        assert float(rows[method][-1]) == pytest.approx(sum(n_eff) / 2, abs=0.051)
    assert runs["laco"][0]["manifest"]["laco"]["removed"] == 2
    # a second run finds every result (and the dense side file) and re-renders the same column
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert len(re.findall(r"result exists, skipping", again)) == 3
    assert next(line for line in again.splitlines() if line.startswith("Method")).split()[-2:] == ["Stab.", "n_eff"]
    # --stability-scores mean: the stored runs' stability is recomputed from the side files (no re-run)
    assert main(argv + ["--stability-scores", "mean"]) == 0
    assert len(re.findall(r"result exists, skipping", capsys.readouterr().out)) == 3
    stored = [json.loads(path.read_text()) for path in (out / tiny_opt_dir.name).glob("*.json")]
    for method in ("laco", "angular"):
        (rec,) = [r for r in stored if r["method"] == method]
        assert rec["stability"]["scores"] == "mean"
        side = runs[method][1]
        for task in ("piqa", "arc_easy"):
            d = dense_side["tasks"][task]
            per_token = {**d, "ll": [[v / c for v, c in zip(ll, nt)] for ll, nt in zip(d["ll"], d["ntok"])]}
            expect, _w = _independent_stability(per_token, side["tasks"][task])
            assert rec["stability"]["tasks"][task]["acc"] == pytest.approx(expect)

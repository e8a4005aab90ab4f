"""``laco-code`` replays the released LaCo notebook's search loop step for step.

The reference below is a plain re-statement of the loop in yangyifei729/LaCo,
laco_llama-13b.ipynb (commit 84835877f918dc972df1a1375e09209551e02f3d; notes in
/work/notes/laco_released.md), written independently of methods/laco.py: it works on deep
copies of the model with plain torch, tokenises every sentence on its own (no padding) and
compares HF's ``hidden_states[-1]`` (after the final norm) of each candidate with the dense
model's. ``laco-code`` must make the same merges, in the same order, and end with the same
layers and weights; ``laco`` (the paper's Algorithm 1, window kept below H) removes fewer
layers at the same threshold.
"""
import copy
import functools
import re
import typing

import pytest
import torch
from conftest import CharTokenizer, tiny_model

from harness import CalibrationData, MethodContext, UsageError, get_adapter
from methods.laco import LaCoCodeConfig, LaCoConfig, laco, laco_code

SENTENCES = ["A short sentence.", "Another, a bit longer sentence.", "Layer collapse merges rear layers.", "Tiny.",
             "The fifth one is here, with more words in it."]
DEPTH, C, H, LOWEST = 12, 3, 11, 0  # H = the last layer's index, C = the scaled default for 12 layers



# --- the released loop, re-stated plainly ----------------------------------------------------

def _decoder_layers(model):
    return model.model.decoder.layers if model.config.model_type == "opt" else model.model.layers


def _final_hidden(model, ids_list):
    """Per sentence, run on its own: the last entry of ``hidden_states`` (after the final norm)."""
    with torch.no_grad():
        return [model(input_ids=ids[None], output_hidden_states=True, use_cache=False).hidden_states[-1][0]
                for ids in ids_list]


def _mean_flat_cosine(ref, cur):
    sims = [torch.cosine_similarity(a.flatten()[None], b.flatten()[None]).item() for a, b in zip(ref, cur)]
    return sum(sims) / len(sims)


def released_loop(dense, threshold, interval, merge_layers=C, highest=H, lowest=LOWEST):
    """Returns (final model, steps); a step is (position, original base, original merged, sim, accepted)."""
    ids_list = [torch.tensor(CharTokenizer(pad_token_id=1)(s)["input_ids"]) for s in SENTENCES]
    ref = _final_hidden(dense, ids_list)
    current = copy.deepcopy(dense)
    names = list(range(len(_decoder_layers(dense))))  # original index of each current position
    steps = []
    lay = highest - merge_layers
    while lay >= lowest:
        cur_layers = _decoder_layers(current)
        m = min(merge_layers - 1, len(cur_layers) - lay - 1)  # runs to the end of the current model
        candidate = copy.deepcopy(current)
        cand_layers = _decoder_layers(candidate)
        base = dict(cand_layers[lay].named_parameters())
        with torch.no_grad():
            for d in range(lay + 1, lay + 1 + m):  # in place on the candidate's base: telescopes
                for pname, p in cur_layers[d].named_parameters():
                    if "norm" not in pname:
                        base[pname].add_(p - base[pname])
        for d in range(lay + m, lay, -1):
            del cand_layers[d]
        sim = _mean_flat_cosine(ref, _final_hidden(candidate, ids_list))
        ok = sim > threshold
        steps.append((lay, names[lay], names[lay + 1: lay + 1 + m], sim, ok))
        if ok:
            current = candidate
            del names[lay + 1: lay + 1 + m]
            lay -= interval
            if lay >= len(_decoder_layers(current)):
                lay = len(_decoder_layers(current)) - 1 - merge_layers
        else:
            lay -= 1
    return current, steps


@functools.cache
def _replay(family, threshold, interval):
    dense = tiny_model(family, layers=DEPTH)
    final, steps = released_loop(dense, threshold, interval)
    return final, steps


# --- the harness side ----------------------------------------------------------------------

def _ctx(model, n):
    ids = torch.randint(3, 103, (4, 12), generator=torch.Generator().manual_seed(0))
    config_cls = typing.get_type_hints(CalibrationData)["config"]
    cal = CalibrationData(ids, torch.ones_like(ids), config_cls(source="x.txt", seq_len=12, batch_size=4),
                          {"seed": 0})
    return MethodContext(model=model, adapter=get_adapter(model), tokenizer=CharTokenizer(pad_token_id=1), calibration=cal, num_remove=n,
                         progress=False)


def _options(threshold, interval, **kw):
    return dict(threshold=threshold, interval=interval, merge_layers=C, highest_layer=H, lowest_layer=LOWEST,
                sentences=list(SENTENCES), fallback="error", **kw)


CASES = [
    ("opt", 0.4935, 1),  # the threshold: every step accepted until the bottom, window reaches layer 11
    ("opt", 0.79, 1),  # a rejection followed by an acceptance (lay -= 1, then a wider window)
    ("llama", 0.6, 2),  # interval 2, Llama (no biases, RMSNorm)
]


@pytest.mark.parametrize("family,threshold,interval", CASES)
def test_laco_code_makes_the_released_loops_merges_in_order(family, threshold, interval):
    final, steps = _replay(family, threshold, interval)
    # the setup is not borderline: no similarity within 1e-4 of T (float32 vs float64 cosines)
    assert min(abs(s[3] - threshold) for s in steps) > 1e-4
    accepted = [s for s in steps if s[4]]
    n = sum(len(s[2]) for s in accepted)
    assert n == DEPTH - len(_decoder_layers(final)) and n > 0

    model = tiny_model(family, layers=DEPTH)
    res = laco_code(_ctx(model, n), LaCoCodeConfig(**_options(threshold, interval)))

    cands = res.scores["candidates"]
    # step for step: the same candidates (position, base, merged layers, verdict) in the same order;
    # laco-code stops once n layers are gone, so whatever the notebook still tries is rejected
    got = [(c["position"], c["layer"], c["merged"], c["accepted"]) for c in cands]
    want = [(s[0], s[1], s[2], s[4]) for s in steps]
    assert got == want[: len(got)]
    assert not any(s[4] for s in steps[len(got):])
    assert all(c["pass"] == 0 for c in cands)
    for c, s in zip(cands, steps):
        assert c["similarity"] == pytest.approx(s[3], abs=1e-5)

    merges = res.extra["laco"]["merges"]
    assert [(m["position"], m["layer"], m["merged"]) for m in merges] == [(s[0], s[1], s[2]) for s in accepted]
    assert res.removed_layers == sorted(x for s in accepted for x in s[2])
    assert res.extra["laco"]["removed"] == res.extra["laco"]["requested"] == n

    # the same final model: same depth, same weights layer by layer
    got_layers, want_layers = get_adapter(res.model).layers, _decoder_layers(final)
    assert len(got_layers) == len(want_layers) == DEPTH - n
    assert res.model.config.num_hidden_layers == DEPTH - n
    for a, b in zip(got_layers, want_layers):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_released_loop_removes_more_than_laco_at_the_same_threshold():
    threshold, interval = CASES[0][1:]
    _, steps = _replay("opt", threshold, interval)
    n = sum(len(s[2]) for s in steps if s[4])
    # the released window is not kept below H: it took in the original last layer (index H)
    assert any(H in s[2] for s in steps if s[4])
    # laco (paper Algorithm 1) with the same sentences, similarity (after the final norm) and T
    with pytest.raises(UsageError, match=r"removed only \d+ of \d+ layers") as err:
        laco(_ctx(tiny_model("opt", layers=DEPTH), n), LaCoConfig(**_options(threshold, interval, final_norm=True)))
    got = int(re.search(r"removed only (\d+) of (\d+)", str(err.value)).group(1))
    assert got < n, (got, n)
    assert (n, got) == (8, 4)  # this model and threshold: the notebook removes 8 layers, Algorithm 1 stops at 4

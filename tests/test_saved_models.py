"""Saved pruned models load exactly in stock tools (README "Saved models").

A model with replacement MLPs is saved with self-contained remote code: stock
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` and lm-eval's own CLI load
exactly the pruned model; without ``trust_remote_code`` loading fails. A shared decoder layer is
stored as copies (an ordinary checkpoint). The model is the checked-in reference model
ref-opt-12l (2.5 MB, real tokenizer), pruned by the real methods on random blocks.
"""
import ast
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import UsageError
import torch
from conftest import REPO, make_context, run_method, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness import (
    ReplacedBlock,
    count_params,
    describe,
    get_adapter,
    load_pruned,
    save_pruned,
)
from harness.model.adapters import ReplacementLayer
from harness.model.loading import load_model
from harness.model.saving import REMOTE_FILE

REF = REPO / "reference" / "models" / "ref-opt-12l"
SUITE = REPO / "reference" / "suite"
N = 3  # layers removed
MLP_VARIANTS = ["streamline", "streamline-mlp-shared", "streamline-multi-mlp"]


@pytest.fixture(scope="module")
def ref():
    return load_model(str(REF))


def _pruned(ref, name, **opts):
    model, _tok = ref
    ctx = make_context(copy.deepcopy(model), N)
    if name in MLP_VARIANTS:  # the paper's fit: after one epoch the MLP is far from the identity (plain removal)
        opts = {"recipe": "paper", "train_samples": 8, **opts}
    return run_method(name, ctx, epochs=1, start=4, **opts)


def _ids():
    return torch.randint(4, 282, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", MLP_VARIANTS)
def test_stock_from_pretrained_with_remote_code_gives_the_pruned_model_exactly(ref, name, tmp_path):
    res = _pruned(ref, name)
    model = res.model
    out = save_pruned(model, ref[1], tmp_path / name, res.manifest())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "streamline_opt" and cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_")
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse((out / REMOTE_FILE).read_text()))
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert imported == {"__future__", "torch", "transformers"}  # self-contained: no harness import
    ids = _ids()
    back = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(back).__name__ == "StreamlineForCausalLM" and isinstance(back, type(model))
    assert back.config.num_hidden_layers == 12 - N
    with torch.no_grad():
        expect = model(ids).logits
        assert torch.equal(back(ids).logits, expect)
        # the same model with a KV cache: prefix, then one token at a time
        first = back(ids[:, :6], use_cache=True)
        rest = back(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True).logits
        assert torch.allclose(torch.cat([first.logits, rest], 1), expect, atol=1e-5)
        # the MLP matters: the same checkpoint without it is a different model
        base = copy.deepcopy(model)
        a = get_adapter(base)
        a.set_layers([layer.layer if isinstance(layer, ReplacedBlock) else layer for layer in a.layers])
        assert (base(ids).logits - expect).abs().max() > 1e-2
    assert count_params(back) == count_params(model)
    # the harness's loader reads the same folder into its own structure
    again, tok, manifest = load_pruned(out)
    assert manifest["load_with"] == "AutoModelForCausalLM(trust_remote_code=True)"
    assert sum(isinstance(layer, ReplacedBlock) for layer in get_adapter(again).layers) == 1
    with torch.no_grad():
        assert torch.equal(again(ids).logits, expect)
    assert tok("a b").input_ids == ref[1]("a b").input_ids
    # the in-memory model is unchanged by saving
    assert sum(isinstance(layer, ReplacedBlock) for layer in get_adapter(model).layers) == 1
    assert not hasattr(model, "streamline_replacements")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox", "gemma2", "phi3", "mixtral", "gptj"])
def test_remote_code_for_other_families(family, tmp_path):
    """The remote code subclasses each architecture's own *ForCausalLM (Mixtral: experts stored in
    transformers' current layout); gptj is not in the adapter table (structural fallback)."""
    dense = tiny_model(family, layers=4)
    res = run_method("streamline-multi-mlp", make_context(dense, 2), epochs=1)
    out = save_pruned(res.model, tiny_tokenizer(), tmp_path / family, res.manifest())
    back = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert isinstance(back, type(res.model)) and back.config.model_type == f"streamline_{dense.config.model_type}"
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, res.model(ids).logits)


def test_stock_loading_without_trust_remote_code_fails(ref, tmp_path, capsys):
    res = _pruned(ref, "streamline")
    out = save_pruned(res.model, ref[1], tmp_path / "sl", res.manifest())
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    # the tokenizer loads with the flag too (it is a stock tokenizer; the flag only lets the config load)
    assert AutoTokenizer.from_pretrained(out, trust_remote_code=True)("a b").input_ids == ref[1]("a b").input_ids
    # the benchmark's --model does not take it for a dense model either: one error line, exit 2
    from harness.cli import main

    assert main(["--model", str(out), "--methods", "shortgpt", "--layers", "2", "--output-dir",
                 str(tmp_path / "runs")]) == 2
    assert "saved pruned model with replacement networks" in capsys.readouterr().err


def test_shared_layer_is_an_ordinary_checkpoint_and_load_pruned_ties_it_again(ref, tmp_path):
    res = _pruned(ref, "streamline-layer-shared")
    model = res.model
    out = save_pruned(model, ref[1], tmp_path / "sls", res.manifest())
    assert json.loads((out / "config.json").read_text())["model_type"] == "opt"
    assert not (out / REMOTE_FILE).exists()
    ids = _ids()
    stock = AutoModelForCausalLM.from_pretrained(out)  # no remote code: the layer stored N times
    assert stock.config.num_hidden_layers == 12 and count_params(stock) > count_params(model)
    back, _tok, manifest = load_pruned(out)
    assert manifest["load_with"] == "AutoModelForCausalLM"
    kinds = [(type(layer).__name__, getattr(layer, "shared", None)) for layer in get_adapter(back).layers]
    assert kinds == [(type(layer).__name__, getattr(layer, "shared", None)) for layer in get_adapter(model).layers]
    assert sum(isinstance(layer, ReplacementLayer) for layer in get_adapter(back).layers) == N
    assert count_params(back) == count_params(model)
    with torch.no_grad():
        expect = model(ids).logits
        assert torch.equal(stock(ids).logits, expect)
        assert torch.equal(back(ids).logits, expect)


def _suite_task(tmp_path) -> tuple[Path, str]:
    """One reference-suite task as an lm-eval YAML (the harness's own task spec)."""
    from harness.evaluation.eval_config import EvalConfig
    from harness.evaluation.local_data import _task_yaml_specs

    suite = tmp_path / "suite"
    suite.mkdir()
    info = json.loads((SUITE / "suite.json").read_text())
    info["tasks"] = {"copy": info["tasks"]["copy"]}
    (suite / "copy.jsonl").write_bytes((SUITE / info["tasks"]["copy"]["file"]).read_bytes())
    info["tasks"]["copy"]["file"] = "copy.jsonl"  # a suite names files inside its own folder
    (suite / "suite.json").write_text(json.dumps(info))
    yamls = tmp_path / "tasks"
    yamls.mkdir()
    (spec,) = _task_yaml_specs(EvalConfig(suite=str(suite)), str(yamls))
    return suite, Path(spec).stem


def test_lm_eval_cli_on_a_saved_streamline_model_gives_the_harness_numbers(ref, tmp_path):
    from harness.evaluation.eval_config import EvalConfig
    from harness.evaluation.lmeval import run_lm_eval
    from harness.evaluation.stability import compact_samples

    res = _pruned(ref, "streamline")
    out = save_pruned(res.model, ref[1], tmp_path / "sl", res.manifest())
    suite, task = _suite_task(tmp_path)
    results = tmp_path / "lm_eval_out"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={out},trust_remote_code=True,dtype=float32", "--tasks", task,
           "--include_path", str(tmp_path / "tasks"), "--limit", "4", "--batch_size", "4", "--device", "cpu",
           "--output_path", str(results), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # lm-eval's CLI indexes all its task files on start-up: let it do so while the harness evaluates
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        ours = run_lm_eval(res.model, ref[1], EvalConfig(suite=str(suite), limit=4, batch_size=4), log_samples=True)
        _stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    (result_file,) = results.rglob("results_*.json")
    theirs = json.loads(result_file.read_text())["results"][task]
    assert theirs["acc,none"] == ours["metrics"][task]["acc"]
    assert theirs["acc_norm,none"] == ours["metrics"][task]["acc_norm"]
    # item by item: the same log-likelihood of every choice
    (sample_file,) = results.rglob(f"samples_{task}_*.jsonl")
    rows = [json.loads(line) for line in sample_file.read_text().splitlines()]
    cli = {r["doc_id"]: [float(x[0]) for x in r["filtered_resps"]] for r in rows}
    mine = compact_samples(ours["samples"])["tasks"][task]
    assert len(cli) == 4 and {d: cli[d] for d in mine["doc_id"]} == dict(zip(mine["doc_id"], mine["ll"]))


class TanhBridge(torch.nn.Module):
    """A replacement the saved remote code does not define (as a plugin might insert)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.init_kwargs = {"hidden_size": hidden_size}
        self.proj = torch.nn.Linear(hidden_size, hidden_size)

    def forward(self, x):
        return torch.tanh(self.proj(x))


def test_other_replacement_modules_need_load_pruned_and_stock_loading_fails(tmp_path):
    from harness import insert_replacement, remove_layers

    model = tiny_model("opt", layers=4)
    a = get_adapter(model)
    remove_layers(a, [1, 2])
    insert_replacement(a, 1, TanhBridge(32))
    out = save_pruned(model, tiny_tokenizer(), tmp_path / "m", {"method": "plugin"})
    assert (out / "replacements.safetensors").is_file() and not (out / REMOTE_FILE).exists()
    with pytest.raises(ValueError, match="streamline_opt"):
        AutoModelForCausalLM.from_pretrained(out)  # a model type transformers does not know
    with pytest.raises(UsageError, match="register_replacement"):  # not allowed until the plugin registers it
        load_pruned(out)
    from harness import register_replacement

    register_replacement(TanhBridge)
    back, _tok, manifest = load_pruned(out)
    assert manifest["load_with"] == "harness.load_pruned"
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_folders_in_the_earlier_layout_still_load(tmp_path):
    """Before remote code: base model_type, the MLP in replacements.safetensors, a shared layer once."""
    from safetensors.torch import save_file

    from harness.model.surgery import strip_layer_replacements, strip_replacements

    ids = torch.randint(3, 128, (2, 9))
    for name in ("streamline", "streamline-layer-shared"):
        res = run_method(name, make_context(tiny_model("opt", layers=5), 2), epochs=1)
        model, out = res.model, tmp_path / name
        with torch.no_grad():
            expect = model(ids).logits
        params = count_params(model)
        a = get_adapter(model)
        found, plan = strip_replacements(a), strip_layer_replacements(a)  # what save_pruned used to do
        model.save_pretrained(out)
        tiny_tokenizer().save_pretrained(out)
        entries = [{"index": f["index"], "where": f["where"], **describe(f["module"])} for f in found]
        if found:
            save_file({f"{k}.{n}": t.contiguous() for k, f in enumerate(found) for n, t in f["module"].state_dict().items()},
                      str(out / "replacements.safetensors"))
        (out / "pruning_manifest.json").write_text(json.dumps({**res.manifest(), "saved_replacements": entries,
                                                               "replacement_layers": plan,
                                                               "load_with": "harness.load_pruned"}))
        back, _tok, _manifest = load_pruned(out)
        with torch.no_grad():
            assert torch.equal(back(ids).logits, expect)
        assert count_params(back) == params


@pytest.mark.parametrize("entry", [
    {"class": "subprocess.Popen", "kwargs": {"args": ["touch", "PWNED"]}},
    {"class": "builtins.eval", "kwargs": {}},
    {"class": "harness.model.replacement.MLPReplacement", "kwargs": {"hidden_size": 32, "intermediate_size": 64,
                                                                     "activation": {"__import__": "os"}}},
    {"class": "harness.model.replacement.MLPReplacement", "kwargs": {"hidden_size": 32, "intermediate_size": 64,
                                                                     "evil": 1}},
])
def test_a_manifest_cannot_name_code_to_run(entry, tmp_path, monkeypatch):
    """pruning_manifest.json is data: a class outside the harness's allow-list, or arguments its
    constructor does not take, are refused with one error before anything is built."""
    monkeypatch.chdir(tmp_path)
    res = run_method("streamline", make_context(tiny_model("opt", layers=4), 2), epochs=1)
    out = save_pruned(res.model, tiny_tokenizer(), tmp_path / "m", res.manifest())
    manifest = json.loads((out / "pruning_manifest.json").read_text())
    manifest["saved_replacements"][0].update(entry)
    (out / "pruning_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError):
        load_pruned(out)
    assert not (tmp_path / "PWNED").exists()

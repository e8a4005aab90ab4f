"""A pruned network's fingerprint (harness.model.sharing.fingerprint), and the runner reusing the
evaluation of a network an earlier run already evaluated: the reused numbers must be the ones a
fresh evaluation gives."""
import gzip
import json

import pytest
import torch
from conftest import shared_data_or_skip, tiny_model

from harness import get_adapter
from harness.cli import main
from harness.model.sharing import fingerprint, own_layer, shell_of
from harness.model.surgery import remove_layers


def _removed(dense, indices):
    shell = shell_of(dense)
    remove_layers(get_adapter(shell), indices)
    return shell


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_fingerprint_tells_networks_apart(family):
    dense = tiny_model(family, layers=5)
    a, b = _removed(dense, [1, 2]), _removed(dense, [1, 2])
    assert fingerprint(a, dense) == fingerprint(b, dense)  # two shells, the same network
    assert fingerprint(_removed(dense, [2, 3]), dense) != fingerprint(a, dense)  # another window
    assert fingerprint(_removed(dense, [1]), dense) != fingerprint(a, dense)
    assert fingerprint(shell_of(dense), dense) != fingerprint(a, dense)
    # a layer of its own with changed weights
    c = _removed(dense, [1, 2])
    owned = own_layer(get_adapter(c), 0)
    assert fingerprint(c, dense) != fingerprint(a, dense)  # own bytes are hashed, not "= dense"
    d = _removed(dense, [1, 2])
    with torch.no_grad():
        next(own_layer(get_adapter(d), 0).parameters()).add_(1e-3)
    assert fingerprint(d, dense) != fingerprint(c, dense)
    with torch.no_grad():
        next(owned.parameters()).add_(1e-3)
    assert fingerprint(d, dense) == fingerprint(c, dense)  # equal own bytes: equal networks
    # an attribute that changes the forward without being a tensor, and a hook
    e = _removed(dense, [1, 2])
    attn = next(m for m in get_adapter(e).layers[0].modules() if hasattr(m, "scaling"))
    attn.scaling = attn.scaling * 2
    assert fingerprint(e, dense) != fingerprint(a, dense)
    f = _removed(dense, [1, 2])
    get_adapter(f).layers[0].register_forward_hook(lambda _m, _i, out: out)
    assert fingerprint(f, dense) != fingerprint(a, dense)


def _records(folder):
    out = {}
    for path in folder.rglob("*.json"):
        rec = json.loads(path.read_text())
        if rec.get("schema") is not None:
            out[rec["method"]] = (path, rec)
    return out


def _samples(path):
    with gzip.open(path.with_name(path.stem + ".samples.json.gz"), "rt") as f:
        return json.load(f)


def test_an_identical_network_reuses_the_evaluation_and_equals_a_fresh_one(tiny_opt_dir, tmp_path, capsys):
    data = shared_data_or_skip()
    argv = ["--model", str(tiny_opt_dir), "--data-dir", str(data), "--tasks", "piqa,arc_easy", "--limit", "8",
            "--layers", "2", "--calib-samples", "4", "--calib-seq-len", "32", "--no-progress", "--ppl",
            "--ppl-max-windows", "2", "--methods", "remove,streamline-none,shortgpt,laco"]
    reused_dir, fresh_dir = tmp_path / "reused", tmp_path / "fresh"
    assert main([*argv, "--output-dir", str(reused_dir)]) == 0
    text = capsys.readouterr().out
    assert main([*argv, "--output-dir", str(fresh_dir), "--force"]) == 0
    capsys.readouterr()
    reused, fresh = _records(reused_dir), _records(fresh_dir)

    # streamline-none is remove by definition: the same network, evaluated once
    path, rec = reused["streamline-none"]
    assert rec["fingerprint"] == reused["remove"][1]["fingerprint"]
    assert rec["reused_evaluation"]["from"] == reused["remove"][0].name
    assert rec["reused_evaluation"]["method"] == "remove"
    assert "its evaluation reused" in text and "eval" not in rec["timings"]
    assert reused["remove"][1]["reused_evaluation"] is None
    # laco changes weights: another network, evaluated
    assert reused["laco"][1]["reused_evaluation"] is None
    assert reused["laco"][1]["fingerprint"]["model"] != rec["fingerprint"]["model"]
    # --force evaluated every run, and the fresh numbers are the reused ones, item for item
    assert all(r["reused_evaluation"] is None for _p, r in fresh.values())
    for method in ("remove", "streamline-none", "shortgpt", "laco"):
        r, f = reused[method][1], fresh[method][1]
        assert r["fingerprint"] == f["fingerprint"], method
        assert r["metrics"] == f["metrics"], method
        assert r["perplexity"]["ppl"] == f["perplexity"]["ppl"], method
        assert _samples(reused[method][0]) == _samples(fresh[method][0]), method
        assert r["stability"] == f["stability"], method
    # the reused run has lm-eval's results file of its own, naming its method
    (results,) = list(path.with_name(path.stem + ".lm_eval").glob("results_*.json"))
    assert json.loads(results.read_text())["config"]["pruning"]["method"] == "streamline-none"
    # and a reused run is shown like any other
    table = (reused_dir / tiny_opt_dir.name / "table.md").read_text()
    assert "streamline-none" in table
    assert "streamline-none: the same network as remove's run" in table

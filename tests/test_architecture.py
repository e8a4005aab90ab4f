"""The layout's rules, checked: methods use only the public plugin API, each stage imports only
from the stages before it, every option has help, and the README documents the result record."""
import ast
import dataclasses
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HARNESS = REPO / "harness"

# pipeline order: a module may import from its own stage and the ones before it
STAGES = ["base", "model", "signals", "fitting", "plugins", "evaluation", "results", "runner", "cli"]
BASE_MODULES = {"errors", "defaults", "io", "finite", "progress"}
TOP_MODULES = {"runner": "runner", "config_file": "cli", "cli": "cli", "api": "cli", "reference": "runner",
               "validation": "runner"}


def _imports(path: Path) -> list[str]:
    """Absolute names of every ``harness``/``methods`` module the file imports (relative ones resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:  # ``from harness import defaults`` imports the submodule harness.defaults
                sub = f"{base}.{a.name}"
                is_module = (REPO / sub.replace(".", "/")).with_suffix(".py").is_file() or \
                    (REPO / sub.replace(".", "/")).is_dir()
                out.append(sub if is_module else base)
    return [m for m in out if m.split(".")[0] in ("harness", "methods")]


def _stage(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "harness" or len(parts) < 2:
        return None
    name = parts[1]
    if name in BASE_MODULES:
        return "base"
    if name in STAGES:
        return name
    return TOP_MODULES.get(name)


def test_methods_import_only_the_public_harness_package():
    bad = []
    for path in sorted((REPO / "methods").glob("*.py")):
        for module in _imports(path):
            if module != "harness":
                bad.append(f"{path.name}: {module}")
    assert not bad, "methods/ may import only `from harness import ...` (add what you need to harness.__all__): " \
                    + ", ".join(bad)


def test_the_public_api_is_what_methods_use():
    """Every name a built-in method imports from ``harness`` is exported (a plugin written like them
    works), and every exported name resolves to a distinct object."""
    import harness

    used = set()
    for path in sorted((REPO / "methods").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "harness":
                used |= {a.name for a in node.names}
    assert used, "no method imports from harness"
    assert not used - set(harness.__all__), f"methods import names harness does not export: {used - set(harness.__all__)}"
    assert len(set(harness.__all__)) == len(harness.__all__)
    assert not [n for n in harness.__all__ if getattr(harness, n, None) is None]


def test_no_import_cycle():
    """No two harness modules import each other, directly or through others (imports inside
    functions count: they hide a cycle, they do not remove it)."""
    import graphlib

    graph = {}
    for path in sorted(HARNESS.rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        graph[module] = {m for m in _imports(path) if m.startswith("harness.") and m != module}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


MAX_FUNCTION_LINES = 60


def test_no_function_over_60_lines():
    """Every function in harness/ and methods/ fits on a screen (signature, docstring and body)."""
    long = []
    for path in sorted([*HARNESS.rglob("*.py"), *(REPO / "methods").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 60 lines: " + "; ".join(long)


def test_the_registry_names_each_config():
    """One config class serves several methods; each registration's errors name its own option."""
    from harness.errors import UsageError
    from harness.plugins.pipeline import resolve_method

    for name in ("streamline", "streamline-mlp-shared", "streamline-layer-shared", "laco-code", "remove"):
        _spec, cfg = resolve_method(name, {})
        assert cfg.method_name == name
    with pytest.raises(UsageError, match=r"^streamline-multi-mlp\.fit_loss=kl is unknown"):
        resolve_method("streamline-multi-mlp", {"streamline-multi-mlp": {"fit_loss": "kl"}})


def test_run_options_are_one_frozen_configuration():
    """The CLI builds the run's options once; nothing downstream writes into them (a sweep's
    per-target sessions carry their own target, the inputs' identity lives in the session)."""
    from harness.model.target import Target
    from harness.runner import RunOptions

    opts = RunOptions(model="m", methods=["remove"], targets=[Target(layers=2), Target(layers=4)])
    assert opts.sweep() == [Target(layers=2), Target(layers=4)] and isinstance(opts.targets, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.seed = 1
    assert "identity" not in {f.name for f in dataclasses.fields(RunOptions)}


def test_each_stage_imports_only_earlier_stages():
    order = {s: i for i, s in enumerate(STAGES)}
    bad = []
    for path in sorted(HARNESS.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        own = _stage(".".join(rel.parts))
        if own is None or rel.parts[1] == "__init__":
            continue
        for module in _imports(path):
            if module == "harness":
                bad.append(f"{'/'.join(rel.parts)} imports the package root (import the submodule instead)")
                continue
            stage = _stage(module)
            if stage is not None and order[stage] > order[own]:
                bad.append(f"{'/'.join(rel.parts)} ({own}) imports {module} ({stage})")
    assert not bad, "\n".join(bad)


def test_every_option_has_help():
    from harness.plugins.registry import available_methods, available_post_steps

    missing = []
    for name, spec in {**available_methods(), **available_post_steps()}.items():
        for f in dataclasses.fields(spec.config_cls):
            if not f.metadata.get("help"):
                missing.append(f"{name}.{f.name}")
    assert not missing, "options without help (use harness.option(default, 'help')): " + ", ".join(missing)


def test_option_errors_show_the_option_help():
    from harness import UsageError
    from harness.plugins.pipeline import resolve_method

    with pytest.raises(UsageError, match=r"streamline\.epochs expects int, got 'many' \(epochs: passes over"):
        resolve_method("streamline", {"streamline": {"epochs": "many"}})


def test_readme_result_key_table_matches_the_record():
    from harness.results.record import RECORD_KEYS

    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Result files", 1)[1].split("\n## ", 1)[0]
    documented = set()
    for line in section.splitlines():
        m = re.match(r"\|\s*((?:`[^`]+`(?:,\s*)?)+)\s*\|", line)
        if m:
            documented.update(re.findall(r"`([^`]+)`", m.group(1)))
    assert documented == set(RECORD_KEYS), (
        f"README 'Result files' table and harness/results/record.py disagree: only in README "
        f"{sorted(documented - set(RECORD_KEYS))}, only in RunRecord {sorted(set(RECORD_KEYS) - documented)}")


def test_new_record_has_every_key_in_order():
    from harness.results.record import RECORD_KEYS, new_record

    rec = new_record(method="dense", label="Dense")
    assert tuple(rec) == RECORD_KEYS
    with pytest.raises(KeyError):
        new_record(method="x", not_a_key=1)


def test_error_keeps_its_cause_for_verbose(capsys):
    """A loader error is one line; with --verbose the underlying exception follows it."""
    from harness.cli import main

    argv = ["--model", "no-such-org/no-such-model", "--methods", "remove", "--tasks", "piqa",
            "--output-dir", "unused"]
    assert main(argv) == 2
    quiet = capsys.readouterr().err.strip().splitlines()
    assert len(quiet) == 1 and quiet[0].startswith("error: ") and "no-such-org/no-such-model" in quiet[0]
    assert main(argv + ["--verbose"]) == 2
    loud = capsys.readouterr().err
    assert loud.startswith(quiet[0]) and "Traceback" in loud and len(loud.splitlines()) > 3


def test_verbose_from_a_config_file_shows_the_cause(tmp_path, capsys):
    from harness.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: no-such-org/no-such-model\nmethods: [remove]\ntasks: [piqa]\nverbose: true\n")
    assert main(["--config", str(cfg), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" in err

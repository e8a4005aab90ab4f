"""A run parses --num-fewshot once (EvalConfig) and resolves its tasks once (task_resolution.resolution),
however many stages read them: the CLI's metric check, validation, the data checks, loading for each
model and the task YAMLs written beside the results."""
import ast

from conftest import REPO, shared_data_or_skip

from harness.cli import main


def _calls(name: str) -> list[str]:
    """Every call of ``name`` in harness/ (as ``file:function``)."""
    out = []
    for path in sorted((REPO / "harness").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call):
                    f = node.func
                    called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                    if called == name:
                        out.append(f"{path.relative_to(REPO / 'harness')}:{fn.name}")
    return sorted(set(out))


def test_only_the_config_parses_shots_and_only_the_memo_resolves():
    """The counts below see every call: no other module calls either function."""
    assert _calls("parse_num_fewshot") == ["evaluation/eval_config.py:__post_init__"]
    assert _calls("resolve_tasks") == ["evaluation/task_resolution.py:resolution"]


def test_a_run_parses_fewshot_once_and_resolves_tasks_once(tiny_opt_dir, tmp_path, capsys, monkeypatch):
    data = shared_data_or_skip()
    from harness.evaluation import eval_config, task_resolution

    counts = {"parse_num_fewshot": 0, "resolve_tasks": 0}

    def counted(module, name):
        original = getattr(module, name)

        def call(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, call)

    counted(eval_config, "parse_num_fewshot")
    counted(task_resolution, "resolve_tasks")
    argv = ["--model", str(tiny_opt_dir), "--methods", "remove", "--layers", "1", "--tasks", "piqa,arc_easy",
            "--num-fewshot", "arc_easy=1,default=0", "--data-dir", str(data), "--limit", "2",
            "--calib-samples", "4", "--calib-seq-len", "32", "--output-dir", str(tmp_path / "runs"), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    out = capsys.readouterr().out
    assert "ARC-e 1" in out and "lm-eval task YAML(s)" in out  # the shots reached lm-eval; the YAMLs were written
    assert counts == {"parse_num_fewshot": 1, "resolve_tasks": 1}  # dense and pruned model evaluated, one of each

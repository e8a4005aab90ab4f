"""What harness/evaluation/lmeval_private.py relies on in lm-eval's private task-index API (an lm-eval
upgrade that changes any of it fails here first, naming the function), and that no other module
reaches into lm-eval's private parts."""
import re
from importlib import metadata

import yaml
from conftest import REPO

from harness.evaluation import lmeval_private as private
from harness.evaluation.task_resolution import lm_eval_tasks_dir


def test_pinned_lm_eval_version():
    pinned = re.search(r'"lm_eval==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert metadata.version("lm_eval") == pinned


def test_index_manager_entry_and_load(tmp_path):
    index = private.build_index([lm_eval_tasks_dir() / "piqa"])
    Kind = private.kinds()
    assert index["piqa"].kind == Kind.TASK and index["piqa"].yaml_path.name.endswith(".yaml")
    cfg = private.entry_cfg(index["piqa"])
    assert cfg["task"] == "piqa" and cfg["output_type"] == "multiple_choice"
    # a task entry of our own, loaded through a manager over exactly this index
    data = tmp_path / "d.jsonl"
    data.write_text('{"q": "a", "choices": ["x", "y"], "label": 0}\n')
    spec = {"task": "mine", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "output_type": "multiple_choice", "test_split": "test", "doc_to_text": "{{q}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc"}]}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(spec))
    tm = private.manager_over({"mine": private.new_task_entry("mine", path, [])})
    assert tm.all_tasks == ["mine"]
    (task,) = [t for t in [private.load_spec(tm, "mine")]]
    task = task if not isinstance(task, list) else task[0]
    assert task.config.task == "mine" and len(list(task.test_docs())) == 1


def test_no_other_module_touches_lm_eval_private_parts():
    bad = []
    for path in sorted((REPO / "harness").rglob("*.py")):
        if path.name == "lmeval_private.py":
            continue
        text = path.read_text(encoding="utf-8")
        for pattern in (r"lm_eval\.tasks\._(?!_)\w+", r"\btm\._\w+", r"\._load_spec\b", r"_yaml_loader"):
            bad += [f"{path.relative_to(REPO)}: {m}" for m in re.findall(pattern, text)]
    assert not bad, bad

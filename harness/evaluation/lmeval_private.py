"""Every use of lm-eval's private task-index API, in one place (lm-eval 0.4.13, pinned in
pyproject.toml; tests/test_lmeval_private.py pins the behaviour relied on).

Why private at all: resolving a run's task names through the public ``TaskManager()`` indexes lm-eval's
whole task tree (~10 s, every run and every test). The harness indexes only the folders it needs
(``build_index``), builds a manager over that index without re-indexing (``manager_over``), reads a
task's YAML without evaluating its ``!function`` tags (``entry_cfg``), and loads one spec through
the manager (``load_spec``), which is what ``TaskManager.load`` does for a list of specs.
"""
from __future__ import annotations

from pathlib import Path


def kinds():
    """lm-eval's entry kinds (``Kind.TASK``, ``Kind.GROUP``, ``Kind.TAG``)."""
    from lm_eval.tasks._index import Kind

    return Kind


def new_task_entry(name: str, yaml_path: Path, tags) -> object:
    """An index entry for a task defined by the YAML at ``yaml_path``."""
    from lm_eval.tasks._index import Entry, Kind

    return Entry(name=name, kind=Kind.TASK, yaml_path=yaml_path, tags=set(tags))


def build_index(paths: list[Path]) -> dict:
    """{name: entry} of the task/group/tag YAMLs under ``paths``."""
    from lm_eval.tasks._index import TaskIndex

    return TaskIndex.build(paths)


def manager_over(index: dict):
    """A TaskManager whose registry is exactly ``index`` (no default tree, no re-indexing)."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_defaults=False)
    tm._index = index
    tm._all_tasks = sorted(index)
    return tm


def entry_cfg(entry) -> dict:
    """An entry's config dict (its YAML read with includes, ``!function`` tags left unresolved)."""
    if entry.cfg is not None:
        return entry.cfg
    if entry.yaml_path:
        from lm_eval.tasks._yaml_loader import load_yaml

        return load_yaml(entry.yaml_path, resolve_func=False, recursive=True)
    return {}


def load_spec(tm, spec: str):
    """The Task/Group object(s) for one name or YAML path, through ``tm``."""
    return tm._load_spec(spec)

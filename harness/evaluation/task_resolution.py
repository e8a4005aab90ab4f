"""Task resolution: what a run's task names mean, found before any model is loaded or any data read.

Any task, tag or group lm-eval's ``TaskManager`` resolves (plus ``--include-path`` folders); an unknown
name is one error line with lm-eval's close matches. Resolution indexes only the folders of lm-eval's
task tree that define the names asked for when it can (``KNOWN_TASK_DIRS``; the common paper tasks and
MMLU), and lm-eval's whole task tree (about 15k entries, ~10 s) once per process otherwise. A run
resolves its tasks once (``resolution``: memoised on its ``EvalConfig``).

Columns: a task is one column; a group with an aggregate metric (``mmlu``) is one column holding
lm-eval's own group score (MMLU: weighted by subject size), its subtasks' metrics kept in the
result; a tag (``ai2_arc``) stands for its tasks, one column each (lm-eval's meaning of a tag).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UsageError
from harness.evaluation import lmeval_private as private
from harness.evaluation.eval_config import EvalConfig

# lm-eval task folders that define these names (all their tasks, groups and tags): resolving only
# such names indexes these folders instead of lm-eval's whole task tree.
KNOWN_TASK_DIRS = {
    "piqa": "piqa", "hellaswag": "hellaswag", "winogrande": "winogrande", "boolq": "super_glue/boolq",
    "arc_easy": "arc", "arc_challenge": "arc", "ai2_arc": "arc", "openbookqa": "openbookqa", "mmlu": "mmlu/default",
}


def _known_dir(name: str) -> str | None:
    if name in KNOWN_TASK_DIRS:
        return KNOWN_TASK_DIRS[name]
    if name.startswith("mmlu_") and not name.startswith(("mmlu_flan", "mmlu_continuation", "mmlu_generative",
                                                          "mmlu_pro", "mmlu_redux", "mmlu_prox")):
        return "mmlu/default"
    return None


# --- task indexes --------------------------------------------------------------------------------

_FULL_INDEX: dict | None = None
_DIR_INDEXES: dict = {}
_TASK_MANAGER = None


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def full_index() -> dict:
    """lm-eval's whole task tree (built once per process: ~10 s)."""
    global _FULL_INDEX
    if _FULL_INDEX is None:
        _FULL_INDEX = task_manager().task_index
    return _FULL_INDEX


def task_manager():
    """lm-eval's default TaskManager over its whole task tree, built once per process."""
    global _TASK_MANAGER
    if _TASK_MANAGER is None:
        from lm_eval.tasks import TaskManager

        _TASK_MANAGER = TaskManager()
    return _TASK_MANAGER


_TEXT = None


def _yaml_text() -> tuple[str, list[str]]:
    """Every YAML file of lm-eval's task tree as one text, and the task/group/tag names written in
    it (read, not parsed: < 1 s). Every name lm-eval can resolve is written in some file, so a name
    absent from this text is unknown without building the whole index."""
    global _TEXT
    if _TEXT is None:
        import os
        import re

        parts = []
        for dirpath, _dirs, files in os.walk(lm_eval_tasks_dir()):
            for f in files:
                if f.endswith((".yaml", ".yml")) or (f.startswith("_") and "." not in f):
                    try:
                        parts.append(Path(dirpath, f).read_text(encoding="utf-8", errors="replace"))
                    except OSError:
                        continue
        blob = "\n".join(parts)
        pattern = re.compile(r'^\s*-?\s*["\']?(?:task|group|tag)["\']?\s*:\s*["\']?([A-Za-z0-9_.\-]+)', re.M)
        _TEXT = (blob, sorted(set(pattern.findall(blob))))
    return _TEXT


def _certainly_unknown(name: str) -> bool:
    import re

    blob, _names = _yaml_text()
    return re.search(r"(?<![A-Za-z0-9_.\-])" + re.escape(name) + r"(?![A-Za-z0-9_.\-])", blob) is None


def _dir_index(rel: str) -> dict:
    if rel not in _DIR_INDEXES:
        _DIR_INDEXES[rel] = private.build_index([lm_eval_tasks_dir() / rel])
    return _DIR_INDEXES[rel]


def _members(entry) -> list[str]:
    """Direct members of a group or tag (names; an inline member's name as lm-eval builds it)."""
    Kind = private.kinds()

    if entry.kind == Kind.TAG:
        return sorted(entry.tags)
    out = []
    for item in private.entry_cfg(entry).get("task") or []:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            out.append(item.get("group") or item.get("task"))
    return out


class _Missing(Exception):
    pass


def _walk(index: dict, name: str, path: tuple = (), inline_ok: bool = False) -> list[tuple[str, tuple]]:
    """Leaf tasks under ``name`` with their ancestor names; raises _Missing for an unknown name.
    With ``inline_ok``, a group member defined inline (not in the index) is the leaf lm-eval
    builds for it, ``group::member``."""
    Kind = private.kinds()

    entry = index.get(name)
    if entry is None:
        raise _Missing(name)
    if entry.kind in (Kind.GROUP, Kind.TAG):
        out = []
        for child in _members(entry):
            if child is None or child not in index:
                if inline_ok and entry.kind == Kind.GROUP and child:
                    out.append((f"{name}::{child}", path + (name,)))
                    continue
                raise _Missing(child or name)
            out.extend(_walk(index, child, path + (name,), inline_ok))
        return out
    return [(name, path)]


def _is_scored_group(entry) -> bool:
    Kind = private.kinds()

    return entry.kind == Kind.GROUP and bool(private.entry_cfg(entry).get("aggregate_metric_list"))


@dataclass
class Resolution:
    """What a task list means: its table columns and every leaf task behind them."""
    index: dict  # name -> lm-eval Entry (local data overrides applied by ``load``)
    specs: list[str]  # the names to load, as given
    columns: list[str]  # table columns (tasks and scored groups), in order
    kinds: dict  # column -> "task" | "group"
    leaves: dict  # column -> [leaf task names]
    ancestors: dict  # leaf -> (its groups/tags, outermost first)
    user_tasks: set  # leaves defined in --include-path


def _index_for(names: list[str], include: str | None) -> tuple[dict, bool]:
    """The smallest index that resolves ``names`` (and every member of their groups)."""
    inc = private.build_index([Path(include)]) if include else {}
    dirs = []
    for n in names:
        if n in inc:
            continue
        d = _known_dir(n)
        if d is None:
            dirs = None
            break
        if d not in dirs:
            dirs.append(d)
    if dirs is not None:
        index = {}
        for d in dirs:
            index.update(_dir_index(d))
        index.update(inc)
        try:
            for n in names:
                _walk(index, n)
            return index, False
        except _Missing:
            pass
    for n in names:  # a name no task file mentions: unknown, without indexing ~15k files
        if n not in inc and _certainly_unknown(n):
            _unknown(n, _yaml_text()[1] + list(inc), include)
    index = dict(full_index())
    index.update(inc)  # as lm-eval's include_path: later folders override the built-in tasks
    return index, True


def _unknown(name: str, known: list[str], include: str | None):
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else \
        "; see `lm_eval ls tasks` (lm-eval's list of tasks, groups and tags) for the names"
    where = f" or in --include-path {include}" if include else ""
    raise UsageError(f"unknown task '{name}': not an lm-eval task, group or tag{where}{hint}")


def resolve_tasks(cfg: EvalConfig) -> Resolution:
    """Names -> columns and leaf tasks; an unknown name is one error line with lm-eval's close matches."""
    names = list(cfg.tasks)
    include = cfg.include_path
    if include and not Path(include).is_dir():
        raise UsageError(f"--include-path '{include}' is not a directory; pass a folder of lm-eval task YAML files")
    index, full = _index_for(names, include)
    for n in names:
        if n not in index:
            _unknown(n, list(index), include)
    user = set(private.build_index([Path(include)])) if include else set()
    columns, kinds, leaves, ancestors = [], {}, {}, {}

    def add(name: str, entry):
        Kind = private.kinds()

        if entry.kind == Kind.TAG or (entry.kind == Kind.GROUP and not _is_scored_group(entry)):
            for child in _members(entry):
                if child in index:
                    add(child, index[child])
                elif full and child:  # an inline member of an unscored group: its own column
                    leaf = f"{name}::{child}"
                    columns.append(leaf)
                    kinds[leaf], leaves[leaf], ancestors[leaf] = "task", [leaf], (name,)
                else:
                    raise _Missing(child or name)
            return
        if name in kinds:
            return
        columns.append(name)
        kinds[name] = "group" if entry.kind == Kind.GROUP else "task"
        leaves[name] = []
        for leaf, path in _walk(index, name, inline_ok=full):
            leaves[name].append(leaf)
            ancestors[leaf] = path

    try:
        for n in names:
            add(n, index[n])
    except _Missing as exc:
        raise UsageError(f"task '{exc}' (a member of a requested group) is not defined; check --include-path") from None
    seen: dict = {}
    for col in columns:
        for leaf in leaves[col]:
            if leaf in seen and seen[leaf] != col:
                raise UsageError(f"task '{leaf}' is in both '{seen[leaf]}' and '{col}'; lm-eval scores each task "
                                 "once: ask for the group or its member, not both")
            seen[leaf] = col
    user_tasks = {leaf for leaf in seen if leaf in user}
    return Resolution(index, names, columns, kinds, leaves, ancestors, user_tasks)


def resolution(cfg: EvalConfig) -> Resolution:
    """The run's resolution: ``resolve_tasks`` once per configuration (again only if its tasks or
    --include-path change), carried through validation, the data checks, loading and the task YAMLs."""
    key = (tuple(cfg.tasks), cfg.include_path)
    memo = cfg._resolution
    if memo is None or memo[0] != key:
        memo = cfg._resolution = (key, resolve_tasks(cfg))
    return memo[1]


def check_fewshot_keys(cfg: EvalConfig, res: Resolution) -> None:
    """Per-task --num-fewshot keys: names in this run (a column, group, tag or task) or 'default';
    a key for an lm-eval task that is not in this run is ignored (config files name every task
    of a paper's table), any other key is an error."""
    if not isinstance(cfg.num_fewshot, dict):
        return
    in_run = set(res.specs) | set(res.columns) | set(res.ancestors)
    for path in res.ancestors.values():
        in_run.update(path)
    for key in cfg.num_fewshot:
        if key == "default" or key in in_run:
            continue
        if key in res.index or not _certainly_unknown(key):  # an lm-eval name (not built: it is not run)
            continue
        close = difflib.get_close_matches(key, sorted(in_run | {"default"}), n=3, cutoff=0.6)
        raise UsageError(f"--num-fewshot names '{key}', which is no lm-eval task"
                         + (f"; did you mean {', '.join(close)}?" if close else "; use a task of this run or default"))

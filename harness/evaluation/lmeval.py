"""Evaluation through lm-eval on the in-memory model: any task, tag or group lm-eval's
``TaskManager`` resolves (plus ``--include-path`` folders), few-shot, local data files.

Task names are resolved before any model is loaded (``validate_tasks``), and every local file
the run reads is checked before any evaluation (``check_task_files``). Resolution indexes only
the folders of lm-eval's task tree that define the names asked for when it can (``KNOWN_TASK_DIRS``;
the common paper tasks and MMLU), and lm-eval's whole task tree (about 15k entries, ~10 s) once per
process otherwise.

Columns: a task is one column; a group with an aggregate metric (``mmlu``) is one column holding
lm-eval's own group score (MMLU: weighted by subject size), its subtasks' metrics kept in the
result; a tag (``ai2_arc``) stands for its tasks, one column each (lm-eval's meaning of a tag).

``--data-dir`` (layout of ``../shared/data``): the stock task configs are loaded unchanged
(prompts, metrics, few-shot sampler) and only the dataset location and the splits that exist
locally change: ``<folder>/<split>.jsonl[.gz]`` per dataset (``LOCAL_DATASETS``), and for MMLU
``mmlu/<split>/<subject>.jsonl[.gz]`` (test evaluated, dev for the few shots).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness import defaults
from harness.errors import UsageError
from harness.evaluation.distributed import broadcast_object
from harness.evaluation import lmeval_private as private
from harness.evaluation.fastlm import IMPLS
from harness.model.loading import model_device

# the built-in local layouts, by task name (kept for callers that list them)
LOCAL_TASK_FILES = {
    "piqa": ("validation", "piqa/validation.jsonl"),
    "hellaswag": ("validation", "hellaswag/validation.jsonl.gz"),
    "winogrande": ("validation", "winogrande/validation.jsonl"),
    "boolq": ("validation", "boolq/validation.jsonl"),
    "arc_easy": ("test", "arc_easy/test.jsonl"),
    "arc_challenge": ("test", "arc_challenge/test.jsonl"),
    "openbookqa": ("test", "openbookqa/test.jsonl"),
}
DEFAULT_TASKS = list(LOCAL_TASK_FILES)
WIKITEXT_LOCAL = "wikitext2/wikitext-2-raw-v1/test.jsonl"

# (dataset_path, dataset_name) of lm-eval's stock configs -> (folder under --data-dir, fields the
# records must have). Files: <folder>/<split>.jsonl or .jsonl.gz for each split a task names.
LOCAL_DATASETS = {
    ("baber/piqa", None): ("piqa", ("goal", "sol1", "sol2", "label")),
    ("Rowan/hellaswag", None): ("hellaswag", ("activity_label", "ctx_a", "ctx_b", "endings", "label")),
    ("allenai/winogrande", "winogrande_xl"): ("winogrande", ("sentence", "option1", "option2", "answer")),
    ("aps/super_glue", "boolq"): ("boolq", ("question", "passage", "label")),
    ("allenai/ai2_arc", "ARC-Easy"): ("arc_easy", ("question", "choices", "answerKey")),
    ("allenai/ai2_arc", "ARC-Challenge"): ("arc_challenge", ("question", "choices", "answerKey")),
    ("allenai/openbookqa", "main"): ("openbookqa", ("question_stem", "choices", "answerKey")),
}
# MMLU (cais/mmlu, one dataset_name per subject): mmlu/<split>/<subject>.jsonl[.gz]
MMLU_DATASETS = ("cais/mmlu",)
MMLU_FIELDS = ("question", "subject", "choices", "answer")
# loaders whose files the task config names itself (a user's YAML): nothing to relocate
LOCAL_LOADERS = ("json", "csv", "parquet", "text", "arrow")
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")

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


def parse_num_fewshot(value) -> int | dict | None:
    """``5`` | ``mmlu=5,default=0`` (or a mapping from a config file) -> int, {name: int} or None."""
    if value is None or isinstance(value, bool):
        if isinstance(value, bool):
            raise UsageError(f"--num-fewshot expects a number of examples, got '{value}'")
        return None
    if isinstance(value, int):
        if value < 0:
            raise UsageError(f"--num-fewshot {value} is out of range; use 0 or more examples")
        return value
    if isinstance(value, dict):
        items = list(value.items())
    else:
        text = str(value).strip()
        if "=" not in text:
            try:
                return parse_num_fewshot(int(text))
            except ValueError:
                raise UsageError(f"--num-fewshot expects a number (e.g. 5) or per task "
                                 f"mmlu=5,default=0, got '{value}'") from None
        items = []
        for part in text.split(","):
            name, eq, n = part.partition("=")
            if not eq or not name.strip():
                raise UsageError(f"--num-fewshot '{value}': write TASK=N items, e.g. mmlu=5,default=0")
            items.append((name.strip(), n.strip()))
    out = {}
    for name, n in items:
        try:
            n = int(n)
        except (TypeError, ValueError):
            raise UsageError(f"--num-fewshot: '{name}' needs a number of examples, got '{n}'") from None
        if isinstance(n, bool) or n < 0:
            raise UsageError(f"--num-fewshot: '{name}={n}' is out of range; use 0 or more examples")
        if str(name) in out and out[str(name)] != n:
            raise UsageError(f"--num-fewshot gives '{name}' twice ({out[str(name)]} and {n}); keep one")
        out[str(name)] = n
    return out


RESERVED_MODEL_ARGS = {"pretrained": "--model", "dtype": "--dtype", "torch_dtype": "--dtype",
                       "device": "--device", "device_map": "--device auto", "batch_size": "--eval-batch-size",
                       "tokenizer": "the model folder's tokenizer"}


def parse_model_args(value) -> dict | None:
    """``revision=main,trust_remote_code=True,...`` (lm-eval's syntax and value parsing) -> dict."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, dict):
        args = dict(value)
    else:
        from lm_eval.utils import simple_parse_args_string

        text = str(value).strip()
        for part in text.split(","):
            if part.strip() and "=" not in part:
                raise UsageError(f"--model-args item '{part.strip()}' is not KEY=VALUE; write e.g. "
                                 "revision=main,trust_remote_code=True")
        args = simple_parse_args_string(text)
    for key in args:
        if key in RESERVED_MODEL_ARGS:
            raise UsageError(f"--model-args {key}=...: use {RESERVED_MODEL_ARGS[key]} instead")
    return args or None


def parse_batch_size(value):
    """lm-eval's batch size: a positive integer, ``auto`` or ``auto:K`` (re-detected K times)."""
    text = str(value).strip()
    if text == "auto":
        return "auto"
    if text.startswith("auto:"):
        k = text[5:]
        if not k.isdigit() or int(k) < 1:
            raise UsageError(f"--eval-batch-size '{value}' is not valid; auto:K needs a whole number K >= 1")
        return text
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"--eval-batch-size expects a positive integer, auto or auto:K, got '{value}'") from None
    if n < 1:
        raise UsageError(f"--eval-batch-size {n} is out of range; use a positive integer, auto or auto:K")
    return n


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    data_dir: str | None = None
    limit: int | None = None
    batch_size: int | str = defaults.EVAL_BATCH_SIZE  # N | "auto" | "auto:K" (lm-eval's HFLM)
    num_fewshot: int | dict | None = None  # None: each task's own default (lm-eval); dict: per task + "default"
    include_path: str | None = None  # a folder of the user's own lm-eval task YAMLs
    model_args: dict | None = None  # from_pretrained keyword arguments (--model-args, lm-eval's syntax)
    ppl: bool = False
    ppl_seq_len: int | None = None  # default: min(2048, model max positions)
    ppl_stride: int | None = None  # default: = seq_len (non-overlapping windows)
    ppl_max_windows: int | None = None
    suite: str | None = None  # a local suite directory (suite.json) instead of lm-eval tasks
    eval_impl: str = defaults.EVAL_IMPL  # "fast" | "fast-shared" (harness.evaluation.fastlm) | "stock" (lm-eval's)

    # how the scores are computed, not what they are: left out of the run key and the record's
    # ``eval`` (``identity_dict``); the path that ran is in the record's ``eval_details.eval_impl``
    IMPLEMENTATION_KEYS = ("eval_impl",)

    def identity_dict(self) -> dict:
        """``to_dict`` without the implementation choices (results must not depend on them)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.IMPLEMENTATION_KEYS}

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["data_dir"]:
            d["data_dir"] = str(Path(d["data_dir"]).resolve())
        if d["suite"]:
            d["suite"] = str(Path(d["suite"]).resolve())
        if d["include_path"]:
            d["include_path"] = str(Path(d["include_path"]).resolve())
            d["include_hash"] = include_hash(d["include_path"])  # edited task YAMLs are a new run
        return d


def include_hash(folder: str) -> str | None:
    root = Path(folder)
    if not root.is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".yaml", ".yml", ".py", ".jinja", ".txt", ".json", ".jsonl"):
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


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


# --- local data ----------------------------------------------------------------------------------

def _local_file(root: Path, stem: str) -> Path | None:
    for suffix in (".jsonl", ".jsonl.gz"):
        p = root / (stem + suffix)
        if p.is_file():
            return p
    return None


def _local_layout(cfg_task: dict) -> tuple[str, tuple] | None:
    """(file stem per split, with '{split}' in it; fields) for a stock dataset, else None."""
    key = (cfg_task.get("dataset_path"), cfg_task.get("dataset_name"))
    if key in LOCAL_DATASETS:
        folder, fields = LOCAL_DATASETS[key]
        return folder + "/{split}", fields
    if key[0] in MMLU_DATASETS and key[1]:
        return "mmlu/{split}/" + str(key[1]), MMLU_FIELDS
    return None


@dataclass
class LocalData:
    """Where a leaf task's splits come from under --data-dir."""
    files: dict  # split -> Path
    fields: tuple
    kind: str  # the local dataset (piqa, hellaswag, ..., mmlu): how its rows are checked (evaluation.rows)
    splits: dict  # training_split/validation_split/test_split/fewshot_split -> split or None
    fewshot_from: str | None  # which local split lm-eval draws the few shots from
    note: str | None = None


def local_data(name: str, task_cfg: dict, root: Path, shots: int | None = None) -> LocalData | None:
    """The local files of a leaf task (None: the task reads its own files); UsageError if the
    evaluated split is missing, or the few-shot split its config names when ``shots`` > 0."""
    path = task_cfg.get("dataset_path")
    if path in LOCAL_LOADERS or (isinstance(path, str) and Path(path).expanduser().is_dir()):
        return None
    layout = _local_layout(task_cfg)
    if layout is None:
        raise UsageError(f"task '{name}' reads the Hub dataset '{path}' ({task_cfg.get('dataset_name')}), which "
                         f"--data-dir has no layout for; local datasets: "
                         f"{', '.join(sorted({f for f, _ in LOCAL_DATASETS.values()}))}, mmlu")
    stem, fields = layout
    eval_split = task_cfg.get("test_split") or task_cfg.get("validation_split")
    files, splits = {}, {}
    for key in SPLIT_KEYS:
        split = task_cfg.get(key)
        f = _local_file(root, stem.format(split=split)) if split else None
        if f is not None:
            files[split] = f
        splits[key] = split if f is not None else None
    if eval_split not in files:
        raise UsageError(f"missing data file for task '{name}': {root / stem.format(split=eval_split)}.jsonl "
                         f"(its {eval_split} split); check --data-dir (see shared/data/SOURCES.md)")
    fs = task_cfg.get("fewshot_split")
    if shots and fs and fs not in files:
        raise UsageError(f"missing data file for task '{name}': {root / stem.format(split=fs)}.jsonl (its {fs} "
                         f"split, where its {shots} few-shot examples come from); check --data-dir")
    if splits["fewshot_split"]:
        source = splits["fewshot_split"]
    elif splits["training_split"]:
        source = splits["training_split"]
    elif splits["validation_split"] and splits["validation_split"] != eval_split:
        source = splits["validation_split"]
    else:
        source = eval_split
    wanted = task_cfg.get("fewshot_split") or task_cfg.get("training_split")
    note = None
    if shots and wanted and source != wanted:
        note = (f"{name}: no local {wanted} split, so its {shots} few-shot examples come from its {source} split "
                "(lm-eval's fallback; the evaluated item itself is never one of them)")
    return LocalData(files, fields, stem.split("/")[0], splits, source, note)


def _leaf_cfg(res: Resolution, leaf: str) -> dict:
    return private.entry_cfg(res.index[leaf])


def data_plan(cfg: EvalConfig, res: Resolution) -> dict:
    """leaf -> LocalData for every leaf that --data-dir relocates."""
    if not cfg.data_dir:
        return {}
    spec = parse_num_fewshot(cfg.num_fewshot)
    root = Path(cfg.data_dir)
    if not root.is_dir():
        raise UsageError(f"--data-dir '{cfg.data_dir}' is not a directory; point it at a folder laid out like "
                         "shared/data")
    plan = {}
    for col in res.columns:
        for leaf in res.leaves[col]:
            if leaf in res.user_tasks or leaf not in res.index:  # the user's own / inline tasks
                continue
            leaf_cfg = _leaf_cfg(res, leaf)
            shots = fewshot_for(leaf, res.ancestors.get(leaf, ()), spec)
            if shots is None or leaf_cfg.get("num_fewshot") == 0:  # lm-eval: a config's 0 is never overridden
                shots = leaf_cfg.get("num_fewshot")
            ld = local_data(leaf, leaf_cfg, root, shots)
            if ld is not None:
                plan[leaf] = ld
    return plan


# --- validation (before any model is loaded) ----------------------------------------------------

def validate_tasks(cfg: EvalConfig) -> Resolution | None:
    """Task names, --num-fewshot keys, --limit, --eval-batch-size, --include-path and the local
    layout; nothing here loads a model. Returns the resolution (None for a suite)."""
    if cfg.limit is not None and cfg.limit < 1:
        raise UsageError(f"--limit {cfg.limit} is out of range; use a positive integer")
    cfg.batch_size = parse_batch_size(cfg.batch_size)
    cfg.num_fewshot = parse_num_fewshot(cfg.num_fewshot)
    cfg.model_args = parse_model_args(cfg.model_args)
    if cfg.suite:
        suite_tasks(cfg.suite)  # raises on a bad suite
        return None
    if not cfg.tasks:
        raise UsageError("no tasks given; pass --tasks piqa,hellaswag,... ")
    res = resolve_tasks(cfg)
    check_fewshot_keys(cfg, res)
    data_plan(cfg, res)
    if cfg.ppl and cfg.data_dir and not (Path(cfg.data_dir) / WIKITEXT_LOCAL).is_file():
        raise UsageError(f"missing data file for --ppl: {Path(cfg.data_dir) / WIKITEXT_LOCAL}; check --data-dir")
    return res


def static_column_metrics(cfg: EvalConfig) -> dict[str, list[str] | None]:
    """{column: metrics its config declares} without loading any data (a group: its aggregate
    metrics; None where only the task's code knows them). Validates the task names first."""
    res = validate_tasks(cfg)
    if res is None:  # a suite: multiple choice, acc and acc_norm
        return {name: ["acc", "acc_norm"] for name in suite_tasks(cfg.suite)["tasks"]}
    out = {}
    for col in res.columns:
        entry = res.index.get(col)
        cfg_col = private.entry_cfg(entry) if entry is not None else {}
        if res.kinds[col] == "group":
            items = cfg_col.get("aggregate_metric_list") or []
        else:
            items = cfg_col.get("metric_list")
        if items is None or "class" in cfg_col:
            out[col] = None
            continue
        items = items if isinstance(items, list) else [items]
        out[col] = [m["metric"] if isinstance(m, dict) else str(m) for m in items
                    if not isinstance(m, dict) or isinstance(m.get("metric"), str)] or None
    return out


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


def check_task_files(cfg: EvalConfig) -> list[Path]:
    """Open every local file the evaluation reads and check its records (missing, empty,
    binary, truncated, wrong fields: one UsageError naming the file); returns the files."""
    from harness.evaluation import rows
    from harness.io import check_jsonl_file

    files: list[Path] = []
    shots = parse_num_fewshot(cfg.num_fewshot)
    if cfg.suite:
        suite = suite_tasks(cfg.suite)
        files.append(Path(cfg.suite) / "suite.json")
        for name, info in suite["tasks"].items():
            f = Path(cfg.suite) / info["file"]
            n = check_jsonl_file(f, f"suite task '{name}' file", ("query", "choices", "label"), rows.suite)
            _check_shots(name, fewshot_for(name, (), shots), n - 1, "its own items (the scored one excluded)")
            files.append(f)
        return files
    if cfg.data_dir:
        res = resolve_tasks(cfg)
        counts: dict = {}
        for leaf, ld in data_plan(cfg, res).items():
            for split, f in sorted(ld.files.items()):
                if f not in counts:
                    counts[f] = check_jsonl_file(f, f"{split} file of task '{leaf}'", ld.fields,
                                                 rows.CHECKS.get(ld.kind))
                    files.append(f)
            source = ld.fewshot_from
            eval_split = ld.splits.get("test_split") or ld.splits.get("validation_split")
            available = counts[ld.files[source]] - (1 if source == eval_split else 0)
            _check_shots(leaf, fewshot_for(leaf, res.ancestors.get(leaf, ()), shots), available,
                         f"its {source} split")
        if cfg.ppl:
            f = Path(cfg.data_dir) / WIKITEXT_LOCAL
            check_jsonl_file(f, "wikitext-2 test file (--ppl)", ("text",))
            files.append(f)
    return files


def _check_shots(task: str, shots: int | None, available: int, source: str) -> None:
    """More few-shot examples than the task's few-shot source holds: one line, not lm-eval's
    'Sample larger than population' traceback mid-run."""
    if shots and shots > available:
        raise UsageError(f"--num-fewshot {shots} for task '{task}', but {source} holds only {available} examples; "
                         f"use at most {available}")


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
_SAFE_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")


def suite_tasks(suite_dir: str) -> dict:
    p = Path(suite_dir) / "suite.json"
    if not p.is_file():
        raise UsageError(f"suite directory '{suite_dir}' has no suite.json; pass a directory written by the world generator")
    try:
        suite = json.loads(p.read_text(encoding="utf-8"))
        tasks = suite["tasks"].items()
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # not JSON, or not a suite
        raise UsageError(f"{p} is not a suite description ({type(exc).__name__}: {str(exc)[:120]}); "
                         "pass a directory written by the world generator") from None
    if not suite["tasks"]:
        raise UsageError(f"{p} lists no tasks; a suite needs at least one task with its data file")
    for name, info in tasks:  # names become file names in a temporary folder: never a path
        if not (isinstance(name, str) and _SAFE_NAME.fullmatch(name)):
            raise UsageError(f"{p}: suite task name {str(name)[:80]!r} is not a plain name (letters, digits, '_', '-'); "
                             "rename it in suite.json")
        file = info.get("file") if isinstance(info, dict) else None
        if not (isinstance(file, str) and _SAFE_FILE.fullmatch(file) and file not in (".", "..")):
            raise UsageError(f"{p}: suite task '{name}' must name its data file inside the suite folder "
                             f"(a plain file name), got {str(file)[:80]!r}")
        if not (Path(suite_dir) / file).is_file():
            raise UsageError(f"suite task '{name}' file {Path(suite_dir) / file} is missing")
    return suite


# --- loading -------------------------------------------------------------------------------------

def _override_spec(leaf: str, entry, ld: LocalData) -> dict:
    """The stock config ``include``d unchanged; only the data location and the local splits."""
    spec = {
        "include": str(entry.yaml_path),
        "task": leaf,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(f.resolve()) for split, f in ld.files.items()}},
    }
    spec.update(ld.splits)
    return spec


def _suite_specs(cfg: EvalConfig, workdir: str) -> list[str]:
    import yaml

    suite = suite_tasks(cfg.suite)
    paths = []
    for name, info in suite["tasks"].items():
        spec = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str((Path(cfg.suite) / info["file"]).resolve())}},
            "output_type": "multiple_choice",
            "test_split": "test",
            "doc_to_text": "{{query}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}",
            "target_delimiter": info.get("target_delimiter", ""),
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
            "metadata": {"version": suite.get("version", 1.0)},
        }
        path = Path(workdir) / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        paths.append(str(path))
    return paths


def _task_yaml_specs(cfg: EvalConfig, workdir: str) -> list[str]:
    """The specs lm-eval loads: suite YAMLs, or each relocated task's YAML (as written for the
    run), or the task names as given. (benchmarks/perf.py evaluates these with raw lm-eval.)"""
    if cfg.suite:
        return _suite_specs(cfg, workdir)
    import yaml

    res = resolve_tasks(cfg)
    plan = data_plan(cfg, res)
    out = []
    for name in cfg.tasks:
        if name in plan:
            path = Path(workdir) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(_override_spec(name, res.index[name], plan[name])))
            out.append(str(path))
        else:
            out.append(name)
    return out


def write_task_yamls(cfg: EvalConfig, folder: Path) -> list[Path]:
    """The lm-eval task YAMLs of a run's local data (``--data-dir`` tasks, the ``--suite``), written
    into ``folder`` so that stock ``lm_eval --include_path folder --tasks ...`` evaluates the same
    items (the stock config included, only the data location and splits replaced); [] when the run
    reads no local data."""
    if not (cfg.suite or cfg.data_dir):
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(spec) for spec in _task_yaml_specs(cfg, str(folder)) if spec.endswith(".yaml")]


@dataclass
class LoadedTasks:
    objects: list  # Task | Group objects, one per top-level spec (tags expanded)
    manager: object  # the TaskManager simple_evaluate is given
    resolution: Resolution | None
    default_shots: dict  # leaf -> num_fewshot of its own config (before any override)
    notes: list
    workdir: object = None


def load_tasks(cfg: EvalConfig) -> LoadedTasks:
    """Build lm-eval's Task/Group objects for ``cfg`` (datasets are read here); a dataset that
    cannot be loaded is one error line naming the task."""
    from lm_eval.api.group import Group

    from harness.io import make_temp_dir

    workdir = make_temp_dir("sb_tasks")
    if cfg.suite:
        tm = private.manager_over({})
        specs, res, notes = _suite_specs(cfg, workdir.name), None, []
    else:
        import yaml

        res = resolve_tasks(cfg)
        plan = data_plan(cfg, res)
        index = dict(res.index)
        for leaf, ld in plan.items():
            entry = res.index[leaf]
            path = Path(workdir.name) / f"{leaf}.yaml"
            path.write_text(yaml.safe_dump(_override_spec(leaf, entry, ld)))
            index[leaf] = private.new_task_entry(leaf, path, entry.tags)
        tm = private.manager_over(index)
        specs = list(cfg.tasks)
        notes = [ld.note for ld in plan.values() if ld.note]
    objects = []
    for spec in specs:
        try:
            obj = private.load_spec(tm, spec)
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - datasets/network/config errors: one line
            first = (str(exc).strip().splitlines() or [""])[0][:240]
            hint = "" if cfg.data_dir or cfg.suite else \
                " (offline? pass --data-dir with local files, see shared/data/SOURCES.md)"
            raise UsageError(f"could not load task '{Path(spec).stem if cfg.suite else spec}' "
                             f"({type(exc).__name__}: {first}){hint}") from exc
        objects.extend(obj if isinstance(obj, list) else [obj])
    leaves = []
    for obj in objects:
        leaves.extend(obj.get_all_tasks() if isinstance(obj, Group) else [obj])
    shots = {t.task_name: t.get_config("num_fewshot") for t in leaves}
    return LoadedTasks(objects, tm, res, shots, notes, workdir)


def fewshot_for(leaf: str, ancestors: tuple, spec) -> int | None:
    """The --num-fewshot value for one leaf task: its own key, else its nearest group's or tag's,
    else ``default``; None = the task's own default."""
    if not isinstance(spec, dict):
        return spec
    for key in (leaf, *reversed(ancestors)):
        if key in spec:
            return spec[key]
    return spec.get("default")


def _apply_fewshot(loaded: LoadedTasks, cfg: EvalConfig):
    """Per-task few-shot (dict) set on the Task objects with lm-eval's rule (a task whose own
    config says 0 stays 0-shot); returns what simple_evaluate's num_fewshot gets."""
    from lm_eval.api.group import Group

    leaves = []
    for obj in loaded.objects:
        leaves.extend(obj.get_all_tasks() if isinstance(obj, Group) else [obj])
    for t in leaves:  # the objects are reused across models: start from each task's own value
        t.set_config(key="num_fewshot", value=loaded.default_shots.get(t.task_name))
    if not isinstance(cfg.num_fewshot, dict):
        return cfg.num_fewshot  # lm-eval's own handling of --num_fewshot N
    anc = loaded.resolution.ancestors if loaded.resolution else {}
    for t in leaves:
        own = loaded.default_shots.get(t.task_name)
        n = fewshot_for(t.task_name, anc.get(t.task_name, ()), cfg.num_fewshot)
        if own == 0 or n is None:
            continue
        t.set_config(key="num_fewshot", value=n)
    return None


class TaskCache:
    """lm-eval Task objects loaded once per run and reused for every model.

    Loading (and HellaSwag's document preprocessing) costs more than scoring a small model;
    the Task objects hold no model state, and each evaluation rebuilds its requests.
    """

    def __init__(self):
        self._key = None
        self._loaded = None

    def get(self, cfg: EvalConfig) -> LoadedTasks:
        key = json.dumps(cfg.identity_dict(), sort_keys=True, default=str)
        if self._key != key:
            self._loaded = load_tasks(cfg)
            self._key = key
        return self._loaded


_DEFAULT_CACHE = TaskCache()


def preload_tasks(cfg: EvalConfig) -> None:
    """Load the tasks' datasets now (the validation phase, before any model): a Hub dataset that
    cannot be fetched (offline) is one error line, not a traceback after the dense run started.
    The evaluation reuses the loaded tasks."""
    _DEFAULT_CACHE.get(cfg)


def check_eval_impl(value: str) -> str:
    if value not in IMPLS:
        raise UsageError(f"--eval-impl '{value}' is not one of {', '.join(IMPLS)}")
    return value


def auto_cpu_batch_cap(model, total_memory: int | None = None) -> int:
    """The largest batch ``--eval-batch-size auto`` may choose on CPU (the rule: harness.defaults,
    AUTO_CPU_*): full logits of that many sequences of AUTO_CPU_SEQ_LEN tokens fit in a quarter of
    the machine's memory, at most AUTO_CPU_MAX_BATCH, at least 1."""
    import psutil

    total = total_memory or psutil.virtual_memory().total
    per_sequence = defaults.AUTO_CPU_SEQ_LEN * int(model.config.vocab_size) * 4
    return max(1, min(defaults.AUTO_CPU_MAX_BATCH, int(total * defaults.AUTO_CPU_MEMORY_SHARE) // per_sequence))


def make_lm(model, tokenizer, batch_size, impl: str = defaults.EVAL_IMPL):
    """lm-eval's HFLM over the in-memory model (data-parallel launches: its rank-aware
    subclass, see evaluation.distributed); ``impl="fast"``: with the fast loglikelihood path
    (evaluation.fastlm), ``"fast-shared"``: that path running shared contexts once
    (evaluation.shared_context), ``"stock"``: lm-eval's own."""
    from harness.evaluation.distributed import hflm_class

    fast = check_eval_impl(impl) != "stock"
    batch_size = parse_batch_size(batch_size)
    extra = {}
    if str(batch_size).startswith("auto") and model_device(model).type == "cpu":
        extra["max_batch_size"] = auto_cpu_batch_cap(model)
    lm = hflm_class(fast=fast)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                               device=str(model_device(model)), **extra)
    if fast:
        lm.eval_impl, lm.share_contexts = impl, impl == "fast-shared"
    return lm


def _clean(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def metric_row(res: dict, n: int | None) -> dict:
    """lm-eval's ``{"acc,none": v, "acc_stderr,none": s, ...}`` -> ``{acc: v, acc_stderr: s, n}``.
    A metric under a filter other than ``none`` is stored as ``metric/filter``."""
    row = {}
    for key, value in res.items():
        if "," not in key:
            continue
        metric, filt = key.split(",", 1)
        if isinstance(value, str) or value is None:  # "N/A" stderr
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        name = metric if filt == "none" else f"{metric}/{filt}"
        if metric.endswith("_stderr") and filt != "none":
            name = f"{metric[:-7]}/{filt}_stderr"
        row[name] = _clean(value)
    row["n"] = n
    return row


def serializable(obj):
    """lm-eval's output as plain JSON (its own converter; NaN/inf -> None)."""
    from lm_eval.utils import handle_non_serializable

    text = json.dumps(obj, default=handle_non_serializable)
    return json.loads(text, parse_constant=lambda _c: None)


def run_lm_eval(model, tokenizer, cfg: EvalConfig, log_samples: bool = False, cache: TaskCache | None = None) -> dict:
    """Evaluate ``model`` in memory. Returns

    - ``metrics``: ``{column: {metric: v, metric_stderr: v, n}}`` (a scored group: lm-eval's group score),
    - ``details``: ``{"subtasks": {name: row}, "groups": {group: [members]}, "n_shot": {name: n},
      "higher_is_better": {name: {metric: bool}}, "versions": {...}, "batch_sizes": [...], "notes": [...]}``,
    - ``lm_eval``: lm-eval's own results dict (``results``, ``groups``, ``configs``, ``versions``,
      ``n-shot``, ``config``, ...; JSON-safe, no samples),
    - ``samples`` (with ``log_samples``): lm-eval's per-sample rows per leaf task.

    No request cache is used: lm-eval's cache key ignores the model, so differently pruned
    models must never share one.
    """
    import lm_eval

    cfg.batch_size = parse_batch_size(cfg.batch_size)
    cfg.num_fewshot = parse_num_fewshot(cfg.num_fewshot)
    lm = make_lm(model, tokenizer, cfg.batch_size, cfg.eval_impl)
    loaded = (cache or _DEFAULT_CACHE).get(cfg)
    num_fewshot = _apply_fewshot(loaded, cfg)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=loaded.objects,
        task_manager=loaded.manager,  # else lm-eval re-indexes every task YAML per call (~15 s)
        num_fewshot=num_fewshot,
        limit=cfg.limit,
        use_cache=None,
        cache_requests=False,
        log_samples=log_samples,
    )
    out = broadcast_object(out)  # data-parallel: lm-eval returns the gathered result on rank 0 only
    samples = out.pop("samples", None)
    results = {**out.get("results", {}), **out.get("groups", {})}
    n_samples = out.get("n-samples", {})

    def n_of(name):
        if name in n_samples:
            return int(n_samples[name].get("effective") or 0) or None
        return int(results.get(name, {}).get("sample_len") or 0) or None

    res = loaded.resolution
    columns = res.columns if res else list(out.get("results", {}))
    metrics = {c: metric_row(results.get(c, {}), n_of(c)) for c in columns}
    subtasks = {name: metric_row(r, n_of(name)) for name, r in results.items() if name not in metrics}
    details = {
        "subtasks": subtasks,
        "groups": out.get("group_subtasks", {}),
        "n_shot": out.get("n-shot", {}),
        "higher_is_better": out.get("higher_is_better", {}),
        "versions": out.get("versions", {}),
        "batch_sizes": list(getattr(lm, "batch_sizes", {}).values()),
        "notes": list(loaded.notes),
        "eval_impl": getattr(lm, "eval_impl_used", "stock"),  # the loglikelihood path that ran
    }
    result = {"metrics": metrics, "details": serializable(details), "lm_eval": serializable(out)}
    if log_samples:
        from harness.evaluation.stability import annotate_token_counts

        result["samples"] = samples or {}
        annotate_token_counts(lm, result["samples"])  # per-token mean scores for stability
    return result

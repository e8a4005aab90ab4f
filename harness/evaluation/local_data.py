"""Local data (``--data-dir``, ``--suite``): where each task's splits come from, and the task YAMLs
that point lm-eval at them.

``--data-dir`` (layout of ``../shared/data``): the stock task configs are loaded unchanged
(prompts, metrics, few-shot sampler) and only the dataset location and the splits that exist
locally change: ``<folder>/<split>.jsonl[.gz]`` per dataset (``LOCAL_DATASETS``), and for MMLU
``mmlu/<split>/<subject>.jsonl[.gz]`` (test evaluated, dev for the few shots). ``--suite``: a
folder with ``suite.json`` naming one multiple-choice data file per task.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UsageError
from harness.evaluation import lmeval_private as private
from harness.evaluation.eval_config import EvalConfig, fewshot_for
from harness.evaluation.task_resolution import Resolution, resolution

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
    spec = cfg.num_fewshot
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


# --- the task YAMLs of local data ----------------------------------------------------------------

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


def relocated_index(res: Resolution, plan: dict, workdir: str) -> dict:
    """``res.index`` with each leaf of ``plan`` defined by its YAML written into ``workdir`` (the
    stock config included, only the data location and the local splits replaced)."""
    import yaml

    index = dict(res.index)
    for leaf, ld in plan.items():
        entry = res.index[leaf]
        path = Path(workdir) / f"{leaf}.yaml"
        path.write_text(yaml.safe_dump(_override_spec(leaf, entry, ld)))
        index[leaf] = private.new_task_entry(leaf, path, entry.tags)
    return index


def suite_specs(cfg: EvalConfig, workdir: str) -> list[str]:
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
        return suite_specs(cfg, workdir)
    import yaml

    res = resolution(cfg)
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

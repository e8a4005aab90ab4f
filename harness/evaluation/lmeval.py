"""Evaluation: lm-eval tasks on the in-memory model, and wikitext-2 perplexity."""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.errors import UsageError
from harness.model.loading import model_device

# task -> (split lm-eval evaluates, file under --data-dir); layout of ../shared/data
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


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    data_dir: str | None = None
    limit: int | None = None
    batch_size: int = 8
    num_fewshot: int = 0
    ppl: bool = False
    ppl_seq_len: int | None = None  # default: min(2048, model max positions)
    ppl_stride: int | None = None  # default: = seq_len (non-overlapping windows)
    ppl_max_windows: int | None = None
    suite: str | None = None  # a local suite directory (suite.json) instead of lm-eval tasks

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["data_dir"]:
            d["data_dir"] = str(Path(d["data_dir"]).resolve())
        if d["suite"]:
            d["suite"] = str(Path(d["suite"]).resolve())
        return d


_TASK_MANAGER = None


def task_manager():
    global _TASK_MANAGER
    if _TASK_MANAGER is None:
        from lm_eval.tasks import TaskManager

        _TASK_MANAGER = TaskManager()
    return _TASK_MANAGER


def validate_tasks(cfg: EvalConfig) -> None:
    """Unknown task names and missing local files are usage errors (checked before any run)."""
    if cfg.limit is not None and cfg.limit < 1:
        raise UsageError(f"--limit {cfg.limit} is out of range; use a positive integer")
    if cfg.suite:
        suite_tasks(cfg.suite)  # raises on a bad suite
        return
    if not cfg.tasks:
        raise UsageError("no tasks given; pass --tasks piqa,hellaswag,... ")
    if cfg.data_dir:
        root = Path(cfg.data_dir)
        if not root.is_dir():
            raise UsageError(f"--data-dir '{cfg.data_dir}' is not a directory; point it at a folder laid out like shared/data")
        for t in cfg.tasks:
            if t not in LOCAL_TASK_FILES:
                raise UsageError(
                    f"task '{t}' has no local file layout for --data-dir; local tasks: {', '.join(LOCAL_TASK_FILES)}"
                )
            f = root / LOCAL_TASK_FILES[t][1]
            if not f.is_file():
                raise UsageError(f"missing data file for task '{t}': {f}; check --data-dir (see shared/data/SOURCES.md)")
        if cfg.ppl and not (root / WIKITEXT_LOCAL).is_file():
            raise UsageError(f"missing data file for --ppl: {root / WIKITEXT_LOCAL}; check --data-dir")
    else:
        known = set(task_manager().all_tasks)
        for t in cfg.tasks:
            if t not in known:
                raise UsageError(f"unknown task '{t}'; use an lm-eval task name such as {', '.join(DEFAULT_TASKS)}")


def suite_tasks(suite_dir: str) -> dict:
    p = Path(suite_dir) / "suite.json"
    if not p.is_file():
        raise UsageError(f"suite directory '{suite_dir}' has no suite.json; pass a directory written by the world generator")
    suite = json.loads(p.read_text())
    for name, info in suite["tasks"].items():
        if not (Path(suite_dir) / info["file"]).is_file():
            raise UsageError(f"suite task '{name}' file {Path(suite_dir) / info['file']} is missing")
    return suite


def _task_yaml_specs(cfg: EvalConfig, workdir: str) -> list[str]:
    """Write lm-eval YAML files for the requested tasks; return their paths.

    With --data-dir, each stock task config is ``include``d unchanged (prompt templates,
    metrics) and only the dataset location and splits are overridden.
    """
    import yaml

    paths = []
    if cfg.suite:
        suite = suite_tasks(cfg.suite)
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
    if not cfg.data_dir:
        return list(cfg.tasks)
    tm = task_manager()
    for t in cfg.tasks:
        split, rel = LOCAL_TASK_FILES[t]
        entry = tm._entry(t)
        spec = {
            "include": str(entry.yaml_path),
            "task": t,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str((Path(cfg.data_dir) / rel).resolve())}},
            "training_split": None,
            "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None,
        }
        path = Path(workdir) / f"{t}.yaml"
        path.write_text(yaml.safe_dump(spec))
        paths.append(str(path))
    return paths


def make_lm(model, tokenizer, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model_device(model)))


class TaskCache:
    """lm-eval Task objects loaded once per run and reused for every model.

    Loading (and HellaSwag's document preprocessing) costs more than scoring a small model;
    the Task objects hold no model state, and each evaluation rebuilds its requests.
    """

    def __init__(self):
        self._key = None
        self._tasks = None
        self._workdir = None

    def get(self, cfg: EvalConfig):
        key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
        if self._key != key:
            self._workdir = tempfile.TemporaryDirectory(prefix="sb_tasks_")
            specs = _task_yaml_specs(cfg, self._workdir.name)
            self._tasks = list(task_manager().load(specs)["tasks"].values())
            self._key = key
        return self._tasks


_DEFAULT_CACHE = TaskCache()


def run_lm_eval(model, tokenizer, cfg: EvalConfig, log_samples: bool = False, cache: TaskCache | None = None) -> dict:
    """Evaluate ``model`` in memory; returns ``{"metrics": {task: {metric: v, metric_stderr: v, n}}}``.

    No request cache is used: lm-eval's cache key ignores the model, so differently pruned
    models must never share one.
    """
    import lm_eval

    lm = make_lm(model, tokenizer, cfg.batch_size)
    tasks = (cache or _DEFAULT_CACHE).get(cfg)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager(),  # else lm-eval re-indexes every task YAML per call (~15 s)
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        use_cache=None,
        cache_requests=False,
        log_samples=log_samples,
    )
    metrics = {}
    for task, res in out["results"].items():
        row = {}
        for key, value in res.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, _filter = key.split(",", 1)
            row[metric] = None if (isinstance(value, float) and math.isnan(value)) else float(value)
        row["n"] = int(out.get("n-samples", {}).get(task, {}).get("effective", 0)) or None
        metrics[task] = row
    result = {"metrics": metrics}
    if log_samples:
        result["samples"] = out.get("samples", {})
    return result

"""Evaluation through lm-eval on the in-memory model: the run's tasks loaded once (``TaskCache``),
few-shot set per task, lm-eval's ``simple_evaluate`` on the model, and its results as table rows.

The rest of the evaluation stage: the settings (``eval_config``), what the task names mean
(``task_resolution``), where local data comes from (``local_data``) and the checks made before any
model is loaded (``task_checks``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from harness import defaults
from harness.errors import UsageError
from harness.evaluation import lmeval_private as private
from harness.evaluation.distributed import broadcast_object
from harness.evaluation.eval_config import EvalConfig, check_eval_impl, fewshot_for, parse_batch_size
from harness.evaluation.local_data import data_plan, relocated_index, suite_specs
from harness.evaluation.task_resolution import Resolution, resolution
from harness.model.loading import model_device


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
        specs, res, notes = suite_specs(cfg, workdir.name), None, []
    else:
        res = resolution(cfg)
        plan = data_plan(cfg, res)
        tm = private.manager_over(relocated_index(res, plan, workdir.name))
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

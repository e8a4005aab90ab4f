"""The evaluation settings checked before any model is loaded: task names, --num-fewshot keys,
--limit, --eval-batch-size, --model-args, --include-path and the local layout (``validate_tasks``),
the metrics each column's config declares (``static_column_metrics``), and every local file the run
reads, opened and its records checked (``check_task_files``). Each mistake is one error line.
"""
from __future__ import annotations

from pathlib import Path

from harness.errors import UsageError
from harness.evaluation import lmeval_private as private
from harness.evaluation.eval_config import WIKITEXT_LOCAL, EvalConfig, fewshot_for, parse_batch_size, parse_model_args
from harness.evaluation.local_data import data_plan, suite_tasks
from harness.evaluation.task_resolution import Resolution, check_fewshot_keys, resolution


def validate_tasks(cfg: EvalConfig) -> Resolution | None:
    """Task names, --num-fewshot keys, --limit, --eval-batch-size, --include-path and the local
    layout; nothing here loads a model. Returns the resolution (None for a suite)."""
    if cfg.limit is not None and cfg.limit < 1:
        raise UsageError(f"--limit {cfg.limit} is out of range; use a positive integer")
    cfg.batch_size = parse_batch_size(cfg.batch_size)
    cfg.model_args = parse_model_args(cfg.model_args)
    if cfg.suite:
        suite_tasks(cfg.suite)  # raises on a bad suite
        return None
    if not cfg.tasks:
        raise UsageError("no tasks given; pass --tasks piqa,hellaswag,... ")
    res = resolution(cfg)
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


def check_task_files(cfg: EvalConfig) -> list[Path]:
    """Open every local file the evaluation reads and check its records (missing, empty,
    binary, truncated, wrong fields: one UsageError naming the file); returns the files."""
    from harness.evaluation import rows
    from harness.io import check_jsonl_file

    files: list[Path] = []
    shots = cfg.num_fewshot
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
        res = resolution(cfg)
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


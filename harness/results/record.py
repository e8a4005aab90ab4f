"""The result record: every key of a run's JSON, defined once.

One run (the dense model or one method) is one JSON object of type ``RunRecord``. The runner
fills it (``new_record``), the store writes and reads it, and reports, the regression check and
stability read it by these names. ``RECORD_KEYS`` (the top-level keys, in file order) is what
the README's key table is checked against (tests/test_architecture.py).

TypedDicts, not classes: a record is plain JSON data that any tool can read, and the same
names serve the writer and every reader.
"""
from __future__ import annotations

from typing import Any, Optional, TypedDict, get_type_hints

SCHEMA_VERSION = 1


class ModelInfo(TypedDict):
    name: str  # as given on the command line (Hub id, folder or reference name)
    class_: str  # stored as "class"
    model_type: str
    num_layers: int
    hidden_size: int
    params: int
    dtype: str
    device: str


class TargetInfo(TypedDict, total=False):
    ratio: Optional[float]
    layers: Optional[int]
    num_remove: int


class ParamsInfo(TypedDict, total=False):
    dense: int
    pruned: int
    removed: int
    added: int
    ratio: float
    pruned_layers: int


class RunRecord(TypedDict, total=False):
    schema: int  # format version (SCHEMA_VERSION)
    method: str  # "dense" or the registered method / pipeline name
    label: str  # table label: name plus non-default options
    status: str  # "ok", or "failed": the method's own numbers went wrong (see failure); no metrics then
    failure: Optional[str]  # why it failed (training diverged, non-finite scores or outputs, the method raised); None when ok
    failure_traceback: Optional[str]  # where the method raised, when it did (a bug to report); None otherwise
    method_config: dict  # every option of the method, defaults included
    model: ModelInfo  # the dense model the run started from
    eval: dict  # tasks, data dir, limit, batch size, few-shot, perplexity settings
    target: Optional[TargetInfo]  # ratio or layers as asked, num_remove as resolved (None for dense)
    calibration: Optional[dict]  # source, split, field, samples, seq len, seed, token count, text hash
    seed: int
    manifest: dict  # removed_layers, scores, replacement, method extras (training log, ...)
    params: ParamsInfo  # parameter counts and the measured pruning ratio
    metrics: dict  # table column (task or scored group) -> {metric: value, metric_stderr: value, n}
    eval_details: Optional[dict]  # lm-eval: subtasks' metrics, groups, n-shot, higher_is_better, versions, batch sizes, notes
    perplexity: Optional[dict]  # with --ppl: ppl, nll_per_token, window, stride, ...; else None
    stability: Optional[dict]  # agreement with the dense model per task (None for dense)
    efficiency: Optional[dict]  # with --efficiency: params, FLOPs/token, prefill latency, decode tokens/s, peak memory, settings; pruned runs add dense and vs_dense ratios
    timings: dict  # stage -> seconds
    environment: dict  # package versions, git commit, threads, device, platform, creation time
    saved_model: Optional[str]  # with --save-models: the folder of the saved pruned model
    fingerprint: Optional[dict]  # model: SHA-256 of the pruned network (harness.model.sharing.fingerprint); eval: of the evaluation's inputs
    reused_evaluation: Optional[dict]  # set when an earlier run had the same fingerprint: its file and method; metrics, perplexity, per-item samples (and efficiency) are its


RECORD_KEYS: tuple[str, ...] = tuple(get_type_hints(RunRecord))
REQUIRED_KEYS = ("schema", "method", "label", "model", "eval", "metrics", "params", "environment")


def new_record(**fields: Any) -> RunRecord:
    """A record with every key of ``RunRecord`` in file order (absent ones None); unknown keys
    are a programming error."""
    unknown = set(fields) - set(RECORD_KEYS)
    if unknown:
        raise KeyError(f"not keys of RunRecord: {sorted(unknown)}")
    rec: dict = {"schema": SCHEMA_VERSION}
    for key in RECORD_KEYS:
        if key != "schema":
            rec[key] = fields.get(key)
    if rec.get("status") is None:
        rec["status"] = "ok"
    return rec  # type: ignore[return-value]


def model_info(*, name: str, cls: str, model_type: str, num_layers: int, hidden_size: int, params: int,
               dtype: str, device: str) -> dict:
    """``ModelInfo`` as stored ("class" is a Python keyword, hence ``class_`` in the type)."""
    return {"name": name, "class": cls, "model_type": model_type, "num_layers": num_layers,
            "hidden_size": hidden_size, "params": params, "dtype": dtype, "device": device}


def is_record(data: Any) -> bool:
    return isinstance(data, dict) and data.get("schema") == SCHEMA_VERSION and all(k in data for k in REQUIRED_KEYS)

"""The evaluation settings of a run: ``EvalConfig`` and the parsing of its flags (``--num-fewshot``,
``--model-args``, ``--eval-batch-size``, ``--eval-impl``), the default task list and the built-in
local layouts. Parsed values are checked here, once, when the configuration is built; the other
modules of the evaluation stage (task_resolution, local_data, task_checks, lmeval) read them.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness import defaults
from harness.errors import UsageError

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


def parse_num_fewshot(value) -> int | dict | None:
    """``5`` | ``mmlu=5,default=0`` (or a mapping from a config file) -> int, {name: int} or None.
    Called once per run, by ``EvalConfig`` (later code reads the parsed ``cfg.num_fewshot``)."""
    if value is None or isinstance(value, bool):
        if isinstance(value, bool):
            raise UsageError(f"--num-fewshot expects a number of examples, got '{value}'")
        return None
    if isinstance(value, int):
        return _shots(value)
    if isinstance(value, dict):
        items = list(value.items())
    else:
        text = str(value).strip()
        if "=" not in text:
            try:
                return _shots(int(text))
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


def _shots(n: int) -> int:
    if n < 0:
        raise UsageError(f"--num-fewshot {n} is out of range; use 0 or more examples")
    return n


def fewshot_for(leaf: str, ancestors: tuple, spec) -> int | None:
    """The --num-fewshot value for one leaf task: its own key, else its nearest group's or tag's,
    else ``default``; None = the task's own default."""
    if not isinstance(spec, dict):
        return spec
    for key in (leaf, *reversed(ancestors)):
        if key in spec:
            return spec[key]
    return spec.get("default")


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

    _resolution = None  # (tasks, include_path) and its Resolution: task_resolution.resolution, once per config

    def __post_init__(self):  # parsed once, here: a bad value is one error line before anything runs
        self.num_fewshot = parse_num_fewshot(self.num_fewshot)

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


def check_eval_impl(value: str) -> str:
    if value not in defaults.EVAL_IMPLS:
        raise UsageError(f"--eval-impl '{value}' is not one of {', '.join(defaults.EVAL_IMPLS)}")
    return value

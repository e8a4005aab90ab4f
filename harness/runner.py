"""The pipeline: model -> activations -> scores -> plan -> pruned model -> evaluation -> JSON.

``run_benchmark`` evaluates the dense model once, then each requested method on its own copy
of the dense model. Every run (dense included) is one result JSON, written atomically; a run
whose JSON exists is skipped unless ``force``, so a sweep that dies resumes where it stopped.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.errors import UsageError
from harness.evaluation.lmeval import EvalConfig, run_lm_eval, validate_tasks
from harness.evaluation.perplexity import perplexity
from harness.evaluation.stability import (
    compact_samples,
    load_samples,
    samples_path,
    save_samples,
)
from harness.evaluation.stability import compare as stability_vs_dense
from harness.io import write_json_atomic
from harness.model.adapters import get_adapter
from harness.model.loading import (
    check_model_source,
    load_config,
    load_model,
    resolve_device,
    resolve_dtype,
)
from harness.model.saving import save_pruned
from harness.model.surgery import count_params
from harness.model.target import Target, resolve_num_remove
from harness.plugins.context import MethodContext
from harness.plugins.registry import (
    PipelineConfig,
    check_option_targets,
    config_dict,
    resolve_method,
)
from harness.results.store import SCHEMA_VERSION, environment, run_path
from harness.signals.calibration import CalibrationConfig, load_calibration

log = logging.getLogger("streamline_bench")


@dataclass
class RunOptions:
    model: str
    methods: list[str]
    method_options: dict[str, dict[str, str]] = field(default_factory=dict)
    target: Target = field(default_factory=lambda: Target(ratio=0.25))
    eval: EvalConfig = field(default_factory=EvalConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    output_dir: str = "results/runs"
    force: bool = False
    save_models: bool = False
    progress: bool = True
    skip_dense_eval: bool = False


def method_label(name: str, cfg) -> str:
    """Method name plus the options that differ from the method's defaults
    (a pipeline: each component's label joined by '+', e.g. ``remove+lora(r=4)``)."""
    if isinstance(cfg, PipelineConfig):
        return "+".join(method_label(part, part_cfg) for part, part_cfg in cfg.items())
    diffs = []
    defaults = type(cfg)()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value != getattr(defaults, f.name):
            diffs.append(f"{f.name}={value}")
    return f"{name}({', '.join(diffs)})" if diffs else name


def prepare(opts: RunOptions):
    """Validate every input before anything runs; returns ``[(name, spec, cfg)]``."""
    resolve_dtype(opts.dtype)
    resolve_device(opts.device)
    opts.target.validate()
    if not opts.methods:
        raise UsageError("no methods given; pass --methods streamline,shortgpt (see --list-methods)")
    plan = []
    for name in opts.methods:  # METHOD or METHOD+POSTSTEP (e.g. shortgpt+lora); see registry.resolve_method
        spec, cfg = resolve_method(name, opts.method_options)
        plan.append((name, spec, cfg))
    check_option_targets(opts.method_options, opts.methods)
    validate_tasks(opts.eval)
    check_model_source(opts.model)
    if opts.target.layers is not None:  # from the config alone: no weights are loaded for a bad --layers
        total = getattr(load_config(opts.model), "num_hidden_layers", None)
        if isinstance(total, int) and opts.target.layers >= total:
            raise UsageError(f"removing {opts.target.layers} layers does not fit a model with {total} decoder "
                             f"layers; ask for fewer (--layers < {total})")
    cal = opts.calibration
    if cal.num_samples < 1 or cal.seq_len < 2 or cal.batch_size < 1:
        raise UsageError("calibration needs --calib-samples >= 1, --calib-seq-len >= 2, --calib-batch-size >= 1")
    return plan


def _model_record(opts: RunOptions, model, adapter) -> dict:
    return {
        "name": opts.model,
        "class": type(model).__name__,
        "model_type": model.config.model_type,
        "num_layers": adapter.num_layers,
        "hidden_size": adapter.hidden_size,
        "params": count_params(model),
        "dtype": opts.dtype,
        "device": opts.device,
    }


def _evaluate(model, tokenizer, opts: RunOptions, timings: dict,
              samples_out: dict | None = None) -> tuple[dict, dict | None]:
    """lm-eval metrics and perplexity; per-item data (compact, for stability) into ``samples_out``."""
    t = time.perf_counter()
    out = run_lm_eval(model, tokenizer, opts.eval, log_samples=samples_out is not None)
    metrics = out["metrics"]
    if samples_out is not None:
        samples_out.update(compact_samples(out.get("samples", {})))
    timings["eval"] = time.perf_counter() - t
    ppl = None
    if opts.eval.ppl:
        t = time.perf_counter()
        ppl = perplexity(model, tokenizer, opts.eval, progress=opts.progress)
        timings["ppl"] = time.perf_counter() - t
    return metrics, ppl


def run_benchmark(opts: RunOptions, echo=print) -> list[dict]:
    plan = prepare(opts)
    t_load = time.perf_counter()
    model, tokenizer = load_model(opts.model, opts.dtype, opts.device)
    load_seconds = time.perf_counter() - t_load
    adapter = get_adapter(model)
    n = resolve_num_remove(opts.target, model, adapter)
    for _name, _spec, cfg in plan:  # model-dependent options (a window start) fail before any run
        if callable(getattr(cfg, "validate", None)):
            cfg.validate(adapter.num_layers, n)
    # bad calibration input (missing, empty, shorter than one block) fails before any result is written
    t_cal = time.perf_counter()
    calibration = load_calibration(opts.calibration, tokenizer)
    calibration_seconds = time.perf_counter() - t_cal
    dense_record = _model_record(opts, model, adapter)
    dense_params = dense_record["params"]
    eval_dict = opts.eval.to_dict()
    echo(f"model {opts.model}: {adapter.num_layers} layers, {dense_params:,} parameters; "
         f"removing n={n} layers ({opts.target.to_dict()})")
    records = []

    # --- dense ------------------------------------------------------------------------
    dense_key = {"model": opts.model, "dtype": opts.dtype, "eval": eval_dict}
    dense_path = run_path(opts.output_dir, opts.model, "dense", dense_key)
    # the per-item side file is part of the dense run (stability needs it): re-run without it
    if dense_path.exists() and samples_path(dense_path).exists() and not opts.force:
        echo(f"dense: result exists, skipping ({dense_path})")
        records.append(_read(dense_path))
        dense_samples = load_samples(dense_path)
    else:
        echo("dense: evaluating")
        timings = {"load": load_seconds}
        torch.manual_seed(opts.seed)
        dense_samples = {}
        metrics, ppl = _evaluate(model, tokenizer, opts, timings, samples_out=dense_samples)
        save_samples(dense_path, dense_samples)
        rec = {
            "schema": SCHEMA_VERSION, "method": "dense", "label": "Dense", "method_config": {},
            "model": dense_record, "eval": eval_dict, "target": None, "calibration": None, "seed": opts.seed,
            "manifest": {"removed_layers": []},
            "params": {"dense": dense_params, "pruned": dense_params, "removed": 0, "added": 0, "ratio": 0.0},
            "metrics": metrics, "perplexity": ppl, "timings": timings, "environment": environment(),
        }
        write_json_atomic(dense_path, rec)
        rec["_path"] = str(dense_path)
        records.append(rec)

    # --- methods ----------------------------------------------------------------------
    stats_cache: dict = {}
    cal_dict = dataclasses.asdict(opts.calibration)
    for name, spec, cfg in plan:
        cfg_dict = config_dict(cfg)
        key = {"model": opts.model, "dtype": opts.dtype, "method": name, "method_config": cfg_dict,
               "target": opts.target.to_dict(), "calibration": cal_dict, "eval": eval_dict, "seed": opts.seed}
        path = run_path(opts.output_dir, opts.model, name, key)
        if path.exists() and not opts.force:
            echo(f"{name}: result exists, skipping ({path})")
            records.append(_read(path))
            continue
        echo(f"{name}: pruning")
        timings = {}
        if calibration_seconds is not None:  # recorded with the first method that runs
            timings["calibration_load"], calibration_seconds = calibration_seconds, None
        t = time.perf_counter()
        if opts.device == "auto":
            work_model, _ = load_model(opts.model, opts.dtype, opts.device)
        else:
            work_model = copy.deepcopy(model)
        timings["copy_model"] = time.perf_counter() - t
        ctx = MethodContext(model=work_model, adapter=get_adapter(work_model), tokenizer=tokenizer,
                            calibration=calibration, num_remove=n, seed=opts.seed, progress=opts.progress,
                            stats_cache=stats_cache, dense_stats_key=opts.model, timings=timings)
        torch.manual_seed(opts.seed)
        t = time.perf_counter()
        result = spec.fn(ctx, cfg)
        timings["prune"] = time.perf_counter() - t  # includes "score" and any training
        pruned = result.model
        pruned.eval()
        pruned_params = count_params(pruned)
        added = (result.replacement or {}).get("params", 0) if result.replacement else 0
        removed = dense_params - pruned_params + added
        torch.manual_seed(opts.seed)
        samples = {}
        metrics, ppl = _evaluate(pruned, tokenizer, opts, timings, samples_out=samples)
        manifest = result.manifest()
        rec = {
            "schema": SCHEMA_VERSION, "method": name, "label": method_label(name, cfg), "method_config": cfg_dict,
            "model": dense_record, "eval": eval_dict, "target": opts.target.to_dict() | {"num_remove": n},
            "calibration": calibration.description, "seed": opts.seed, "manifest": manifest,
            "params": {"dense": dense_params, "pruned": pruned_params, "removed": removed, "added": added,
                       "ratio": (dense_params - pruned_params) / dense_params,
                       "pruned_layers": get_adapter(pruned).num_layers},
            "metrics": metrics, "perplexity": ppl, "timings": timings, "environment": environment(),
        }
        rec["stability"] = stability_vs_dense(dense_samples, samples)  # vs the dense run; None if no overlap
        save_samples(path, samples)
        if opts.save_models:
            save_dir = path.parent / "models" / path.stem
            t = time.perf_counter()
            save_pruned(pruned, tokenizer, save_dir, {"method": name, "method_config": cfg_dict, **manifest,
                                                        "source_model": opts.model})
            timings["save"] = time.perf_counter() - t
            rec["saved_model"] = str(save_dir)
        write_json_atomic(path, rec)
        rec["_path"] = str(path)
        records.append(rec)
        echo(f"{name}: removed layers {manifest['removed_layers']}, measured ratio {100 * rec['params']['ratio']:.1f}%")
        del work_model, pruned, result, ctx
        gc.collect()
    return records


def _read(path: Path) -> dict:
    import json

    rec = json.loads(Path(path).read_text())
    rec["_path"] = str(path)
    return rec

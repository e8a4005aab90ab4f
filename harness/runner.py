"""The pipeline: model -> activations -> scores -> plan -> pruned model -> evaluation -> JSON.

``run_benchmark`` evaluates the dense model once, then each requested method on its own shell
of the dense model (harness.model.sharing: new module objects over the dense tensors). Every
run (dense included) is one result JSON, written atomically; a run whose JSON exists is skipped
unless ``force``, so a sweep that dies resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from harness.model.sharing import WeightGuard, shell_of
from harness.model.surgery import count_params
from harness.model.target import Target, resolve_num_remove
from harness.plugins.context import MethodContext
from harness.plugins.pipeline import check_option_targets, resolve_method
from harness.results.record import model_info, new_record
from harness.results.store import environment, run_path
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


def prepare(opts: RunOptions):
    """Validate every input before anything runs; returns ``[(name, spec, cfg)]``."""
    resolve_dtype(opts.dtype)
    resolve_device(opts.device)
    opts.target.validate()
    if not opts.methods:
        raise UsageError("no methods given; pass --methods streamline,shortgpt (see --list-methods)")
    plan = []
    for name in opts.methods:  # METHOD or METHOD+POSTSTEP (e.g. shortgpt+lora); see plugins.pipeline
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
    return model_info(name=opts.model, cls=type(model).__name__, model_type=model.config.model_type,
                      num_layers=adapter.num_layers, hidden_size=adapter.hidden_size, params=count_params(model),
                      dtype=opts.dtype, device=opts.device)


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


@dataclass
class Session:
    """What every run of one invocation shares: the dense model, its tokenizer and adapter, the
    calibration blocks, the resolved n, the layer statistics cache and the dense run's samples."""
    opts: RunOptions
    model: Any
    tokenizer: Any
    adapter: Any
    calibration: Any
    num_remove: int
    dense_info: dict
    timings: dict = field(default_factory=dict)  # load / calibration_load, reported once
    stats_cache: dict = field(default_factory=dict)
    dense_samples: dict | None = None

    @property
    def dense_params(self) -> int:
        return self.dense_info["params"]


def open_session(opts: RunOptions, plan, echo=print) -> Session:
    """Load the dense model and calibration data; check model-dependent options first."""
    t = time.perf_counter()
    model, tokenizer = load_model(opts.model, opts.dtype, opts.device)
    load_seconds = time.perf_counter() - t
    adapter = get_adapter(model)
    n = resolve_num_remove(opts.target, model, adapter)
    for _name, _spec, cfg in plan:  # model-dependent options (a window start) fail before any run
        cfg.validate(adapter.num_layers, n)
    # bad calibration input (missing, empty, shorter than one block) fails before any result is written
    t = time.perf_counter()
    calibration = load_calibration(opts.calibration, tokenizer)
    session = Session(opts, model, tokenizer, adapter, calibration, n, _model_record(opts, model, adapter),
                      timings={"load": load_seconds, "calibration_load": time.perf_counter() - t})
    echo(f"model {opts.model}: {adapter.num_layers} layers, {session.dense_params:,} parameters; "
         f"removing n={n} layers ({opts.target.to_dict()})")
    return session


def run_benchmark(opts: RunOptions, echo=print) -> list[dict]:
    """The dense run, then one run per method; returns their records (finished ones read back)."""
    plan = prepare(opts)
    session = open_session(opts, plan, echo)
    records = [run_dense(session, echo)]
    for name, spec, cfg in plan:
        records.append(run_method(session, name, spec, cfg, echo))
    return records


def run_dense(s: Session, echo=print) -> dict:
    opts = s.opts
    eval_dict = opts.eval.to_dict()
    path = run_path(opts.output_dir, opts.model, "dense", {"model": opts.model, "dtype": opts.dtype, "eval": eval_dict})
    # the per-item side file is part of the dense run (stability needs it): re-run without it
    if path.exists() and samples_path(path).exists() and not opts.force:
        echo(f"dense: result exists, skipping ({path})")
        s.dense_samples = load_samples(path)
        return _read(path)
    echo("dense: evaluating")
    timings = {"load": s.timings["load"]}
    torch.manual_seed(opts.seed)
    s.dense_samples = {}
    metrics, ppl = _evaluate(s.model, s.tokenizer, opts, timings, samples_out=s.dense_samples)
    save_samples(path, s.dense_samples)
    p = s.dense_params
    rec = new_record(method="dense", label="Dense", method_config={}, model=s.dense_info, eval=eval_dict,
                     seed=opts.seed, manifest={"removed_layers": []},
                     params={"dense": p, "pruned": p, "removed": 0, "added": 0, "ratio": 0.0},
                     metrics=metrics, perplexity=ppl, timings=timings, environment=environment())
    return _store(path, rec)


def run_method(s: Session, name: str, spec, cfg, echo=print) -> dict:
    """Prune a shell of the dense model (shared weights) with one method, evaluate it, store its record."""
    opts = s.opts
    cfg_dict = cfg.to_dict()
    key = {"model": opts.model, "dtype": opts.dtype, "method": name, "method_config": cfg_dict,
           "target": opts.target.to_dict(), "calibration": dataclasses.asdict(opts.calibration),
           "eval": opts.eval.to_dict(), "seed": opts.seed}
    path = run_path(opts.output_dir, opts.model, name, key)
    if path.exists() and not opts.force:
        echo(f"{name}: result exists, skipping ({path})")
        return _read(path)
    echo(f"{name}: pruning")
    timings = {}
    if "calibration_load" in s.timings:  # recorded with the first method that runs
        timings["calibration_load"] = s.timings.pop("calibration_load")
    t = time.perf_counter()
    work_model = copy_model(s)
    timings["copy_model"] = time.perf_counter() - t
    ctx = MethodContext(model=work_model, adapter=get_adapter(work_model), tokenizer=s.tokenizer,
                        calibration=s.calibration, num_remove=s.num_remove, seed=opts.seed, progress=opts.progress,
                        stats_cache=s.stats_cache, dense_stats_key=opts.model, timings=timings)
    torch.manual_seed(opts.seed)
    t = time.perf_counter()
    guard = WeightGuard(s.model)
    result = spec.fn(ctx, cfg)
    guard.check(f"method '{name}'")  # the dense model is shared by every run: a leak stops the sweep
    timings["prune"] = time.perf_counter() - t  # includes "score" and any training
    pruned = result.model
    pruned.eval()
    torch.manual_seed(opts.seed)
    samples = {}
    metrics, ppl = _evaluate(pruned, s.tokenizer, opts, timings, samples_out=samples)
    manifest = result.manifest()
    rec = new_record(method=name, label=cfg.label(name), method_config=cfg_dict, model=s.dense_info,
                     eval=opts.eval.to_dict(), target=opts.target.to_dict() | {"num_remove": s.num_remove},
                     calibration=s.calibration.description, seed=opts.seed, manifest=manifest,
                     params=_params(s, pruned, result), metrics=metrics, perplexity=ppl, timings=timings,
                     environment=environment(), stability=stability_vs_dense(s.dense_samples, samples))
    save_samples(path, samples)
    if opts.save_models:
        save_dir = path.parent / "models" / path.stem
        t = time.perf_counter()
        save_pruned(pruned, s.tokenizer, save_dir, {"method": name, "method_config": cfg_dict, **manifest,
                                                      "source_model": opts.model})
        timings["save"] = time.perf_counter() - t
        rec["saved_model"] = str(save_dir)
    _store(path, rec)
    echo(f"{name}: removed layers {manifest['removed_layers']}, measured ratio {100 * rec['params']['ratio']:.1f}%")
    del work_model, pruned, result, ctx
    gc.collect()
    return rec


def copy_model(s: Session):
    """The method's own model: a shell over the dense model's tensors (harness.model.sharing),
    the same on every device map (``--device auto`` included: no reload). A method copies the
    layers whose weights it changes (``ctx.own_layer``)."""
    return shell_of(s.model)


def _params(s: Session, pruned, result) -> dict:
    pruned_params = count_params(pruned)
    added = (result.replacement or {}).get("params", 0) if result.replacement else 0
    return {"dense": s.dense_params, "pruned": pruned_params, "removed": s.dense_params - pruned_params + added,
            "added": added, "ratio": (s.dense_params - pruned_params) / s.dense_params,
            "pruned_layers": get_adapter(pruned).num_layers}


def _store(path: Path, rec: dict) -> dict:
    write_json_atomic(path, {k: v for k, v in rec.items() if not k.startswith("_")})
    rec["_path"] = str(path)
    return rec


def _read(path: Path) -> dict:
    import json

    rec = json.loads(Path(path).read_text())
    rec["_path"] = str(path)
    return rec

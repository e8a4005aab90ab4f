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
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from harness import defaults
from harness.errors import MethodFailed, NonFiniteOutput, UsageError
from harness.evaluation import distributed
from harness.evaluation.eval_config import EvalConfig
from harness.evaluation.lmeval import run_lm_eval
from harness.evaluation.perplexity import perplexity
from harness.evaluation.stability import DEFAULT_SCORES as DEFAULT_STABILITY_SCORES
from harness.evaluation.stability import check_scores as check_stability_scores
from harness.evaluation.stability import (
    compact_samples,
    has_token_counts,
    load_samples,
    rescored,
    samples_path,
    save_samples,
)
from harness.evaluation.stability import compare as stability_vs_dense
from harness.evaluation.task_checks import validate_tasks
from harness.finite import (
    DEFAULT_MAX_LOSS_GROWTH,
    FirstForwardGuard,
    first_nonfinite,
    training_failure,
)
from harness.io import repo_relative, write_json_atomic
from harness.model.adapters import get_adapter
from harness.model.loading import (
    check_model_source,
    load_config,
    load_model,
    resolve_device,
    resolve_dtype,
)
from harness.model.saving import save_pruned
from harness.model.sharing import WeightGuard, fingerprint, own_tensors, shell_of
from harness.model.surgery import count_params
from harness.model.target import Target, check_on_config, decoder_params_on_config, resolve_num_remove
from harness.plugins.context import MethodContext
from harness.plugins.registry import PruneResult
from harness.plugins.pipeline import check_option_targets, code_identity, resolve_method
from harness.reference.episodes import identity as lm_text_identity
from harness.reference.episodes import training_text as reference_training_text
from harness.results.cache import (
    calibration_identity,
    clean_output_dir,
    data_identity,
    model_identity,
    read_cached,
    read_cached_gz,
    without_location,
)
from harness.results import claim
from harness.results.record import model_info, new_record
from harness.results.store import environment, run_path
from harness.signals.calibration import CalibrationConfig, load_calibration

log = logging.getLogger("streamline_bench")


@dataclass(frozen=True)
class RunOptions:
    model: str
    methods: list[str]
    method_options: dict[str, dict[str, str]] = field(default_factory=dict)
    targets: tuple = (Target(ratio=defaults.RATIO),)  # one or more (--ratio 0.1,0.2 / --layers 2,4: a sweep)
    eval: EvalConfig = field(default_factory=EvalConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    dtype: str = defaults.DTYPE
    device: str = defaults.DEVICE
    seed: int = defaults.SEED
    output_dir: str = defaults.OUTPUT_DIR
    force: bool = False
    save_models: bool = False
    progress: bool = True
    skip_dense_eval: bool = False
    max_loss_growth: float = DEFAULT_MAX_LOSS_GROWTH  # a training whose final loss exceeds start x this fails
    efficiency: Any = None  # an EfficiencyConfig: measure every model (harness.evaluation.efficiency)
    all_layer_stats: bool = False  # score every window length in the shared pass (plots); sweeps always do
    log_samples: bool = False  # also write lm-eval's per-sample JSONL beside each run (--log-samples)
    stability_scores: str = DEFAULT_STABILITY_SCORES  # per-choice scores behind stability: sum | mean

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))  # frozen: set once, here
        if not self.targets:
            raise UsageError("no target: give --layers N or --ratio R")

    def sweep(self) -> list[Target]:
        return list(self.targets)


class Prepared(NamedTuple):
    """What the validation phase hands the run."""
    plan: list  # [(name, spec, cfg)], each cfg checked when it was built
    identity: dict  # the inputs by content: part of every run key
    checked: frozenset  # the n every method's options were validated at (from the config, before the weights)


def validate_plan(plan, num_layers: int, num_remove: int) -> None:
    """Every method's model-dependent options at one target (its n), once."""
    for _name, _spec, cfg in plan:
        cfg.validate(num_layers, num_remove)


def prepare(opts: RunOptions) -> Prepared:
    """Validate every input before anything runs: the options, each target resolved from the
    model's config (a --ratio on a weightless copy) and every method's options at it, the files."""
    from harness.io import clean_stale_temp_dirs

    clean_stale_temp_dirs()  # folders of runs killed with SIGKILL (named by their process)
    resolve_dtype(opts.dtype)
    resolve_device(opts.device)
    check_stability_scores(opts.stability_scores)
    for target in opts.sweep():
        target.validate()
    if opts.efficiency is not None:
        opts.efficiency.validate()
    if not opts.methods:
        raise UsageError("no methods given; pass --methods streamline,shortgpt (see --list-methods)")
    plan = []
    for name in opts.methods:  # METHOD or METHOD+POSTSTEP (e.g. shortgpt+lora); see plugins.pipeline
        spec, cfg = resolve_method(name, opts.method_options)
        plan.append((name, spec, cfg))
    check_option_targets(opts.method_options, opts.methods)
    validate_tasks(opts.eval)
    check_model_source(opts.model, opts.eval.model_args)
    config = load_config(opts.model, opts.eval.model_args)
    total = getattr(config, "num_hidden_layers", None)
    checked = set()
    for target in opts.sweep():  # from the config alone: no weights are loaded for a bad --ratio or --layers
        n = target.layers if target.layers is not None else check_on_config(target, config)
        if target.layers is not None and isinstance(total, int) and n >= total:
            raise UsageError(f"removing {target.layers} layers does not fit a model with {total} decoder "
                             f"layers; ask for fewer (--layers < {total})")
        if n is not None and isinstance(total, int) and n not in checked:
            validate_plan(plan, total, n)
            checked.add(n)
    cal = opts.calibration
    if cal.num_samples < 1 or cal.seq_len < 2 or cal.batch_size < 1:
        raise UsageError("calibration needs --calib-samples >= 1, --calib-seq-len >= 2, --calib-batch-size >= 1")
    identity = validate_inputs(opts, plan)
    if not (opts.eval.data_dir or opts.eval.suite):  # Hub datasets: fetched (or refused offline) before any model
        from harness.evaluation.lmeval import preload_tasks

        preload_tasks(opts.eval)
    return Prepared(plan, identity, frozenset(checked))


def validate_inputs(opts: RunOptions, plan=()) -> dict:
    """The rest of the validation phase (harness.validation), before any weights load: files the
    run reads, lengths against the model's positions, the output folder; then the run keys'
    content identity of model, calibration text and task data."""
    from harness import validation

    validation.check_batch_size(opts.eval.batch_size)
    config = load_config(opts.model, opts.eval.model_args)
    cal = opts.calibration
    validation.check_lengths(config, ppl=opts.eval.ppl, ppl_seq_len=opts.eval.ppl_seq_len,
                             ppl_stride=opts.eval.ppl_stride, calib_seq_len=cal.seq_len)
    decoder_params = None
    for name, _spec, cfg in plan:  # a method's own lengths (e.g. streamline.train_seq_len) and widths
        validation.check_option_lengths(config, name, cfg.to_dict())
        if decoder_params is None and _has_width(cfg.to_dict()):
            decoder_params = decoder_params_on_config(config)
        validation.check_option_widths(config, name, cfg.to_dict(), decoder_params)
        validation.check_option_files(name, cfg.to_dict())
    validation.check_calibration_source(cal.source, cal.field)
    files = validation.check_task_data(opts.eval)
    validation.check_output_dir(opts.output_dir)
    if distributed.is_main():  # data-parallel: rank 0 owns the output folder
        clean_output_dir(opts.output_dir)
    return {"model": model_identity(opts.model, opts.eval.model_args),
            "calibration": calibration_identity(cal.source),
            "data": data_identity(files, opts.eval.suite or opts.eval.data_dir),
            "lm_text": lm_text_identity(opts.model, cal.source)}


def _has_width(options: dict) -> bool:
    return any(_has_width(v) if isinstance(v, dict) else k in ("hidden_size", "hidden_mult")
               for k, v in options.items())


def _eval_key(opts: RunOptions) -> dict:
    """The evaluation settings without where the data lies (its content is in identity.data) and
    without how scores are computed (``--eval-impl``, ``--eval-batch-size``: the results do not depend
    on them, tests/test_reliability_round2.py; both are recorded)."""
    ev = without_location(opts.eval.identity_dict())
    ev.pop("batch_size", None)
    return ev


def _model_record(opts: RunOptions, model, adapter) -> dict:
    return model_info(name=opts.model, cls=type(model).__name__, model_type=model.config.model_type,
                      num_layers=adapter.num_layers, hidden_size=adapter.hidden_size, params=count_params(model),
                      dtype=opts.dtype, device=opts.device)


def _evaluate(model, tokenizer, opts: RunOptions, timings: dict,
              samples_out: dict | None = None, extra: dict | None = None) -> tuple[dict, dict | None]:
    """lm-eval metrics and perplexity; per-item data (compact, for stability) into ``samples_out``;
    lm-eval's details, its results dict and (with --log-samples) its samples into ``extra``."""
    t = time.perf_counter()
    out = run_lm_eval(model, tokenizer, opts.eval, log_samples=samples_out is not None or opts.log_samples)
    metrics = out["metrics"]
    if extra is not None:
        extra.update(details=out.get("details"), lm_eval=out.get("lm_eval"),
                     samples=out.get("samples") if opts.log_samples else None)
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
    target: Target  # this session's target (a sweep: one session per target, harness.runner.target_sessions)
    identity: dict  # the inputs' content identity (prepare): part of every run key
    checked: frozenset = frozenset()  # the n the methods' options were validated at before loading (prepare)
    lm_text: Any = None  # the calibration text in the model's own training format (reference models), or None
    timings: dict = field(default_factory=dict)  # load / calibration_load, reported once
    stats_cache: dict = field(default_factory=dict)
    dense_samples: dict | None = None
    shared: dict = field(default_factory=dict)  # across a sweep's per-target sessions: dense efficiency, ...

    @property
    def dense_params(self) -> int:
        return self.dense_info["params"]


def open_session(opts: RunOptions, prepared: Prepared, echo=print) -> Session:
    """Load the dense model and calibration data (a target the config could not resolve is
    resolved, and the options validated at it, now)."""
    plan, identity = prepared.plan, prepared.identity
    from harness.model.loading import load_tokenizer

    # calibration first, with the tokenizer alone: a text shorter than one block fails before the weights load
    t = time.perf_counter()
    calibration = load_calibration(opts.calibration, load_tokenizer(opts.model, model_args=opts.eval.model_args))
    lm_text = reference_training_text(opts.model, opts.calibration.source)
    calibration_seconds = time.perf_counter() - t
    t = time.perf_counter()
    model, tokenizer = load_model(opts.model, opts.dtype, opts.device, model_args=opts.eval.model_args)
    load_seconds = time.perf_counter() - t
    adapter = get_adapter(model)
    target = opts.targets[0]
    n = resolve_num_remove(target, model, adapter)
    if n not in prepared.checked:  # a target only the loaded model resolves (its config built no meta model)
        validate_plan(plan, adapter.num_layers, n)
    from harness.validation import check_dense_finite

    check_dense_finite(model, adapter, calibration, opts.model)
    session = Session(opts, model, tokenizer, adapter, calibration, n, _model_record(opts, model, adapter),
                      target, identity, checked=prepared.checked, lm_text=lm_text,
                      timings={"load": load_seconds, "calibration_load": calibration_seconds})
    echo(f"model {opts.model}: {adapter.num_layers} layers, {session.dense_params:,} parameters; "
         f"removing n={n} layers ({target.to_dict()})")
    return session


def run_benchmark(opts: RunOptions, echo=print, on_session=None) -> list[dict]:
    """The dense run, then one run per method; returns their records (finished ones read back)."""
    opts = dataclasses.replace(opts, device=distributed.init(opts.device))  # torchrun / accelerate launch: join
    if not distributed.is_main():  # the group, this rank's GPU; rank 0 prints; every rank runs the same sweep
        echo = _silent
    prepared = prepare(opts)
    plan = prepared.plan
    session = open_session(opts, prepared, echo)
    if on_session is not None:  # the caller keeps it (plots read its cached layer statistics)
        on_session(session)
    targets = resolve_targets(session, plan, echo)  # every target resolved and checked before any run
    session.shared["sweep_lags"] = sorted({1, session.num_remove, *(n for _t, n in targets)})
    records = [run_dense(session, echo)]
    if opts.efficiency is not None:
        records[0] = dense_efficiency_record(session, records[0], echo)
    # a sweep: dense evaluated once, layer statistics computed once for all targets
    left = 0
    for s in target_sessions(session, targets):
        for name, spec, cfg in plan:
            rec = run_method(s, name, spec, cfg, echo)
            if rec is None:  # claimed by another process sharing the sweep
                left += 1
            else:
                records.append(rec)
            gc.collect()  # the method's model and its reference cycles go before the next one is built
    if left:
        echo(f"{left} run(s) were left to other processes sharing this sweep and are not in the tables below")
    return records


def resolve_targets(s: Session, plan, echo=print) -> list[tuple[Target, int]]:
    """``(target, n)`` for the sweep's further targets, each checked against every method's options."""
    out = []
    for target in s.opts.sweep()[1:]:
        n = resolve_num_remove(target, s.model, s.adapter)
        if n not in s.checked:
            validate_plan(plan, s.adapter.num_layers, n)
        out.append((target, n))
        echo(f"target {target.to_dict()}: removing n={n} layers")
    return out


def target_sessions(s: Session, targets: list[tuple[Target, int]]) -> list[Session]:
    """One session per target of the sweep, sharing the dense model, calibration, stats cache,
    dense samples and dense efficiency (taken after the dense run); the first is ``s`` itself."""
    return [s] + [dataclasses.replace(s, target=t, num_remove=n)
                  for t, n in targets]


def shared_layer_stats(s: Session, timings: dict | None = None, every_lag: bool = False):
    """The dense model's statistics in one forward pass, then cached: for every window length when
    the plots need them, else for 1 and every n of the sweep (memory grows with the longest lag);
    what every method at every target reads. ``None`` for a single target without plots (or
    ``every_lag``, the scores command's)."""
    from harness.results.scores import all_lags
    from harness.signals.activations import cached_layer_stats

    every_lag = every_lag or s.opts.all_layer_stats
    if len(s.opts.sweep()) < 2 and not every_lag:
        return None
    if every_lag:
        lags = tuple(all_lags(s.adapter.num_layers))
    else:
        lags = tuple(s.shared.get("sweep_lags") or all_lags(s.adapter.num_layers))
    stats, seconds = cached_layer_stats(s.stats_cache, s.opts.model, s.model, s.adapter, s.calibration, lags,
                                        progress=s.opts.progress)
    if seconds is not None and timings is not None:
        timings["score_shared"] = seconds  # every window length, for every method and target
    return stats


def layer_scores(s: Session) -> dict:
    """Every window cosine, angular distance and BI of the dense model (the cached pass, or one now)."""
    from harness.results.scores import scores_payload

    stats = shared_layer_stats(s, every_lag=True)
    return scores_payload(stats, s.opts.model, s.calibration.description)


def _efficiency_settings_match(eff: dict | None, cfg) -> bool:
    if not eff:
        return False
    want = dataclasses.asdict(cfg)
    have = eff.get("requested") or {}
    return have == want


def dense_efficiency(s: Session) -> dict:
    """The dense model measured once in this process (the reference of every pruned model's ratios)."""
    from harness.evaluation.efficiency import measure

    if "dense_efficiency" not in s.shared:
        s.shared["dense_efficiency"] = measure(s.model, s.opts.efficiency) | {
            "requested": dataclasses.asdict(s.opts.efficiency)}
    return s.shared["dense_efficiency"]


def dense_efficiency_record(s: Session, rec: dict, echo=print) -> dict:
    """Attach the dense efficiency to the dense record (measured now if it lacks it or was measured
    with other settings; metrics are untouched)."""
    if rec.get("status") == "failed" or _efficiency_settings_match(rec.get("efficiency"), s.opts.efficiency):
        return rec
    echo("dense: measuring efficiency")
    rec["efficiency"] = dense_efficiency(s)
    return _store(Path(rec["_path"]), rec)


def pruned_efficiency(s: Session, pruned) -> dict:
    """A pruned model's measurements, with its ratios to the dense model measured in this process."""
    from harness.evaluation.efficiency import compare, measure_pair

    dense = dense_efficiency(s)
    eff, dense_now = measure_pair(pruned, s.model, s.opts.efficiency, dense)
    eff["requested"] = dataclasses.asdict(s.opts.efficiency)
    keys = ("params", "flops_per_token", "prefill_latency_s", "decode_tokens_per_s", "peak_memory_bytes")
    eff["dense"] = {k: dense_now[k] for k in keys}
    eff["vs_dense"] = compare(eff, dense_now)
    return eff


def run_dense(s: Session, echo=print) -> dict:
    opts = s.opts
    eval_dict = opts.eval.identity_dict()  # --eval-impl: in eval_details (the path that ran)
    ident = s.identity
    path = run_path(opts.output_dir, opts.model, "dense", {"model": ident["model"], "dtype": opts.dtype,
                                                           "eval": _eval_key(opts), "data": ident["data"]})
    cached = None if opts.force else _dense_cached(s, path, echo)
    if cached is not None:
        return cached
    # every other run needs it: a second process sharing the sweep waits for the first one's
    with claim.wait_claim(path, "dense", echo) as held:
        cached = _dense_cached(s, path, echo) if held.waited else None
        return cached if cached is not None else _evaluate_dense(s, path, eval_dict, echo)


def _dense_cached(s: Session, path: Path, echo) -> dict | None:
    """The stored dense run with its side files (``s.dense_samples`` set), or None."""
    opts = s.opts
    # the per-item side file is part of the dense run (stability needs it): re-run without it
    cached = read_cached(path)
    samples = read_cached_gz(samples_path(path), lambda _p: load_samples(path)) if cached is not None else None
    # --stability-scores mean needs the token counts (side files written before them lack them)
    counts_ok = opts.stability_scores != "mean" or has_token_counts(samples)
    if cached is not None and samples is not None and counts_ok and not _layout_missing(path, opts):
        echo(f"dense: result exists, skipping ({path})")
        s.dense_samples = samples
        return cached
    return None


def _evaluate_dense(s: Session, path: Path, eval_dict: dict, echo) -> dict:
    opts = s.opts
    echo("dense: evaluating")
    timings = {"load": s.timings["load"]}
    torch.manual_seed(opts.seed)
    s.dense_samples = {}
    extra: dict = {}
    try:
        with FirstForwardGuard(s.model, s.adapter):
            metrics, ppl = _evaluate(s.model, s.tokenizer, opts, timings, samples_out=s.dense_samples, extra=extra)
    except NonFiniteOutput as exc:
        raise UsageError(f"model '{opts.model}' produces non-finite values (NaN or inf) in {exc.where} on the first "
                         "evaluation batch; its weights are broken or the dtype overflows (try --dtype float32)"
                         ) from None
    bad = first_nonfinite({"metrics": metrics, "perplexity": ppl})
    if bad:
        raise UsageError(f"the dense model's evaluation gave a non-finite number ({bad}); its weights are broken "
                         "or the dtype overflows (try --dtype float32)")
    save_samples(path, s.dense_samples)
    p = s.dense_params
    rec = new_record(method="dense", label="Dense", method_config={}, model=s.dense_info, eval=eval_dict,
                     seed=opts.seed, manifest={"removed_layers": []},
                     params={"dense": p, "pruned": p, "removed": 0, "added": 0, "ratio": 0.0},
                     metrics=metrics, eval_details=extra.get("details"), perplexity=ppl, timings=timings,
                     environment=environment())
    _write_lm_eval_layout(path, rec, extra, opts)  # before the record: a stored record means a complete run
    _store(path, rec)
    return rec


def run_method(s: Session, name: str, spec, cfg, echo=print) -> dict | None:
    """Prune a shell of the dense model (shared weights) with one method, evaluate it, store its record
    (None when another process sharing the sweep holds the run: harness.results.claim)."""
    path = _method_path(s, name, cfg, spec)
    cached, action = _cached_action(s, name, path, echo)
    if action == "reuse":
        return cached
    held = claim.try_claim(path)
    if held is None:  # another process sharing the sweep runs it
        echo(f"{name}: another process is running it ({claim.holder(path)}); leaving it to that process "
             f"(`run_benchmarks.py report {path.parent}` shows it once it ends)")
        return None
    with held:
        # that process may have finished it between the look above and the claim
        again, action = _cached_action(s, name, path, _silent)
        if action == "reuse":
            echo(f"{name}: finished by another process meanwhile ({path})")
            return again
        return _run_claimed(s, name, spec, cfg, path, again, action, echo)


def _run_claimed(s: Session, name: str, spec, cfg, path: Path, cached: dict | None, action: str, echo) -> dict:
    echo(f"{name}: pruning")
    timings = {}
    if "calibration_load" in s.timings:  # recorded with the first method that runs
        timings["calibration_load"] = s.timings.pop("calibration_load")
    opts = s.opts
    base = {"method": name, "label": cfg.label(name), "method_config": cfg.to_dict(), "model": s.dense_info,
            "eval": opts.eval.identity_dict(), "target": s.target.to_dict() | {"num_remove": s.num_remove},
            "calibration": s.calibration.description, "seed": opts.seed, "timings": timings}
    result, reason = _prune(s, name, spec, cfg, timings)
    if reason is not None:
        return _fail(s, path, base, reason, result.manifest() if result else {}, echo)
    pruned, manifest = result.model, result.manifest()
    if action == "measure":  # a finished run that lacks --efficiency's numbers: measure, no re-evaluation
        if manifest["removed_layers"] != (cached.get("manifest") or {}).get("removed_layers"):
            raise UsageError(f"{name}: pruning again removed layers {manifest['removed_layers']}, the stored run "
                             f"removed {cached['manifest'].get('removed_layers')}; re-run it with --force")
        cached["efficiency"] = pruned_efficiency(s, pruned)
        return _store(path, cached)
    fp = _fingerprint(s, pruned)
    twin = _twin(s, fp, path)
    if twin is not None:
        return _reuse_evaluation(s, twin, base, result, manifest, path, fp, echo)
    samples, extra = {}, {}
    metrics, ppl, reason = _evaluate_pruned(s, pruned, timings, samples, extra)
    if reason is not None:
        return _fail(s, path, base, reason, manifest, echo)
    rec = new_record(**base, manifest=manifest, params=_params(s, pruned, result), metrics=metrics,
                     eval_details=extra.get("details"), perplexity=ppl, environment=environment(),
                     stability=stability_vs_dense(s.dense_samples, samples, scores=opts.stability_scores),
                     fingerprint=fp)
    save_samples(path, samples)
    _save_and_measure(s, rec, pruned, manifest, path, timings)
    _write_lm_eval_layout(path, rec, extra, opts)  # before the record: a stored record means a complete run
    _store(path, rec)
    echo(f"{name}: removed layers {manifest['removed_layers']}, measured ratio {100 * rec['params']['ratio']:.1f}%")
    return rec


def _fingerprint(s: Session, pruned) -> dict | None:
    """The pruned network's fingerprint and its evaluation inputs' (model, dtype, evaluation
    settings, task data, seed): two runs equal in both evaluate to the same numbers."""
    import hashlib
    import json

    model_fp = fingerprint(pruned, s.model)
    if model_fp is None:
        return None
    inputs = {"model": s.identity["model"], "dtype": s.opts.dtype, "eval": _eval_key(s.opts),
              "data": s.identity["data"], "seed": s.opts.seed}
    return {"model": model_fp,
            "eval": hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()}


def _twin(s: Session, fp: dict | None, path: Path) -> tuple[Path, dict] | None:
    """A finished run in this folder with the same fingerprint (the same network, evaluated the same
    way) whose per-item samples and lm-eval results are there to reuse; None with --force (every
    run evaluated afresh), --log-samples (lm-eval's own sample files are not copied) and data-parallel
    runs (every rank must take the same path)."""
    import json

    opts = s.opts
    if fp is None or opts.force or opts.log_samples or distributed.active():
        return None
    from harness.results.lmeval_files import layout_dir
    from harness.results.record import is_record

    for other in sorted(path.parent.glob("*.json")):
        if other == path:
            continue
        try:  # read only: another file that does not parse is not this run's to move aside
            rec = json.loads(other.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            continue
        if (is_record(rec) and rec.get("status") == "ok" and rec.get("fingerprint") == fp
                and samples_path(other).is_file() and any(layout_dir(other).glob("results_*.json"))):
            return other, rec
    return None


def _reuse_evaluation(s: Session, twin: tuple[Path, dict], base: dict, result, manifest: dict, path: Path,
                      fp: dict, echo=print) -> dict:
    """The run of a network an earlier run already evaluated (``_twin``): its metrics, perplexity,
    per-item samples and lm-eval results (and efficiency, when measured with these settings) are
    this run's; stability is recomputed against this session's dense run. The record says whose."""
    import json

    from harness.results.lmeval_files import layout_dir

    opts = s.opts
    twin_path, twin_rec = twin
    samples = load_samples(twin_path)
    results_file = sorted(layout_dir(twin_path).glob("results_*.json"))[-1]
    extra = {"lm_eval": json.loads(results_file.read_text(encoding="utf-8"))}
    reused = ["metrics", "eval_details", "perplexity", "samples", "lm_eval results"]
    rec = new_record(**base, manifest=manifest, params=_params(s, result.model, result),
                     metrics=twin_rec["metrics"], eval_details=twin_rec.get("eval_details"),
                     perplexity=twin_rec.get("perplexity"), environment=environment(),
                     stability=stability_vs_dense(s.dense_samples, samples, scores=opts.stability_scores),
                     fingerprint=fp)
    save_samples(path, samples)
    measure = opts.efficiency is not None and not _efficiency_settings_match(twin_rec.get("efficiency"),
                                                                             opts.efficiency)
    if opts.efficiency is not None and not measure:
        rec["efficiency"] = twin_rec["efficiency"]
        reused.append("efficiency")
    rec["reused_evaluation"] = {"from": twin_path.name, "method": twin_rec["method"], "reused": reused,
                                "why": "the same network (fingerprint.model) evaluated the same way (fingerprint.eval)"}
    _save_and_measure(s, rec, result.model, manifest, path, rec["timings"], efficiency=measure)
    _write_lm_eval_layout(path, rec, extra, opts)  # before the record: a stored record means a complete run
    _store(path, rec)
    echo(f"{base['method']}: removed layers {rec['manifest']['removed_layers']}: the same network as "
         f"{twin_rec['method']}'s run ({twin_path.name}); its evaluation reused (--force evaluates it again)")
    return rec


def _method_path(s: Session, name: str, cfg, spec=None) -> Path:
    """The run's file: its key names every input by content (model files, calibration text, task data,
    the method's source and the files its options name)."""
    opts = s.opts
    ident = s.identity
    cal_key = dataclasses.asdict(opts.calibration) | {"source": ident["calibration"]}
    key = {"model": ident["model"], "dtype": opts.dtype, "method": name, "method_config": cfg.to_dict(),
           "target": s.target.to_dict(), "calibration": cal_key, "eval": _eval_key(opts),
           "data": ident["data"], "seed": opts.seed, "max_loss_growth": opts.max_loss_growth}
    if ident.get("lm_text"):  # a reference model trains with the LM loss on its own episodes (absent: blocks)
        key["lm_text"] = ident["lm_text"]
    if spec is not None:
        key["method_inputs"] = code_identity(spec, cfg)
    return run_path(opts.output_dir, opts.model, name, key)


def _saved_model_dir(path: Path) -> Path:
    return path.parent / "models" / path.stem


def _cached_action(s: Session, name: str, path: Path, echo) -> tuple[dict | None, str]:
    """``(record, action)``: ``reuse`` a finished run, ``run`` it (again), or ``measure`` efficiency only."""
    opts = s.opts
    cached = None if opts.force else read_cached(path)
    if cached is None:
        return None, "run"
    from harness.model.saving import MANIFEST

    ok = cached.get("status") != "failed"
    if ok and opts.save_models and not (_saved_model_dir(path) / MANIFEST).is_file():
        echo(f"{name}: result exists but its saved model ({_saved_model_dir(path)}) is missing; running it again "
             "to save it")
        return cached, "run"
    if ok and opts.efficiency is not None and not _efficiency_settings_match(cached.get("efficiency"),
                                                                             opts.efficiency):
        echo(f"{name}: result exists without efficiency numbers; pruning again to measure them (no re-evaluation)")
        return cached, "measure"
    if ok and _layout_missing(path, opts):
        echo(f"{name}: result exists without lm-eval's per-sample files; running it again (--log-samples)")
        return cached, "run"
    state = " (failed: " + str(cached.get("failure")) + ")" if not ok else ""
    echo(f"{name}: result exists{state}, skipping ({path})")
    stored = cached.get("stability")
    if stored and stored.get("scores", "sum") != opts.stability_scores:
        # stored with other --stability-scores: recomputed from the side files
        cached["stability"] = rescored(cached, s.dense_samples, load_samples(path), opts.stability_scores)
        _store(path, cached)
    return cached, "reuse"


class Failure(str):
    """A failed run's reason, with the traceback when the method raised (stored beside it)."""

    def __new__(cls, reason: str, traceback_text: str | None = None):
        obj = super().__new__(cls, reason)
        obj.traceback = traceback_text
        return obj


def _prune(s: Session, name: str, spec, cfg, timings: dict):
    """Run the method on its own shell of the dense model; ``(result, failure reason or None)``
    (a method that raises, exits or returns something else fails its own run; the sweep goes on)."""
    opts = s.opts
    t = time.perf_counter()
    work_model = copy_model(s)
    timings["copy_model"] = time.perf_counter() - t
    ctx = MethodContext(model=work_model, adapter=get_adapter(work_model), tokenizer=s.tokenizer,
                        calibration=s.calibration, num_remove=s.num_remove, seed=opts.seed, progress=opts.progress,
                        stats_cache=s.stats_cache, dense_stats_key=opts.model, timings=timings,
                        lm_text=s.lm_text)
    shared_layer_stats(s, timings)  # sweeps/plots: one pass for every window length, before any method needs it
    torch.manual_seed(opts.seed)
    t = time.perf_counter()
    guard = WeightGuard(s.model)
    try:
        result = spec.fn(ctx, cfg)
    except MethodFailed as exc:
        guard.check(f"method '{name}'")
        timings["prune"] = time.perf_counter() - t
        return None, str(exc)
    except (UsageError, KeyboardInterrupt):  # bad input ends the sweep with one error line; Ctrl-C ends it
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a method's bug fails its own run, not the sweep
        guard.check(f"method '{name}'")
        timings["prune"] = time.perf_counter() - t
        trace = "".join(traceback.format_exception(exc)).rstrip()
        return None, Failure(f"the method raised {type(exc).__name__}: {str(exc).strip()[:300]}", trace)
    guard.check(f"method '{name}'")  # the dense model is shared by every run: a leak stops the sweep
    timings["prune"] = time.perf_counter() - t  # includes "score" and any training
    if not isinstance(result, PruneResult):
        return None, f"the method returned {type(result).__name__}, not a PruneResult"
    result.model.eval()
    if distributed.active():  # data-parallel: every process evaluates rank 0's plan and tensors
        distributed.same_on_every_rank(result.removed_layers, f"method '{name}': the removed layers")
        distributed.broadcast_own_tensors(own_tensors(result.model, s.model))
    manifest = result.manifest()
    reason = training_failure(manifest, opts.max_loss_growth)
    if reason is None and first_nonfinite(manifest.get("scores")):
        reason = f"non-finite layer score (manifest.scores.{first_nonfinite(manifest.get('scores'))})"
    return result, reason


def _evaluate_pruned(s: Session, pruned, timings: dict, samples: dict, extra: dict):
    """Metrics and perplexity of the pruned model; ``(metrics, ppl, failure reason or None)``."""
    torch.manual_seed(s.opts.seed)
    try:
        with FirstForwardGuard(pruned, get_adapter(pruned)):
            metrics, ppl = _evaluate(pruned, s.tokenizer, s.opts, timings, samples_out=samples, extra=extra)
    except NonFiniteOutput as exc:
        return None, None, f"the pruned model produces non-finite values in {exc.where} on the first evaluation batch"
    bad = first_nonfinite({"metrics": metrics, "perplexity": ppl})
    if bad:
        return None, None, f"non-finite evaluation result ({bad})"
    return metrics, ppl, None


def _save_and_measure(s: Session, rec: dict, pruned, manifest: dict, path: Path, timings: dict,
                      efficiency: bool = True) -> None:
    """``--save-models`` and ``--efficiency`` for a finished run (its record gains the folder and numbers)."""
    opts = s.opts
    if opts.save_models and distributed.is_main():
        t = time.perf_counter()
        save_pruned(pruned, s.tokenizer, _saved_model_dir(path), {"method": rec["method"],
                                                                   "method_config": rec["method_config"],
                                                                   **manifest, "source_model": opts.model})
        timings["save"] = time.perf_counter() - t
        rec["saved_model"] = str(_saved_model_dir(path))
    if opts.efficiency is not None and efficiency:
        t = time.perf_counter()
        rec["efficiency"] = pruned_efficiency(s, pruned)
        timings["efficiency"] = time.perf_counter() - t


def _layout_missing(path: Path, opts: RunOptions) -> bool:
    """--log-samples asked for, but the stored run has no lm-eval per-sample files beside it."""
    from harness.results.lmeval_files import layout_dir

    return opts.log_samples and not any(layout_dir(path).glob("samples_*.jsonl"))


def _write_lm_eval_layout(path: Path, rec: dict, extra: dict, opts: RunOptions) -> None:
    """lm-eval's results file (and with --log-samples its samples) beside the run's JSON."""
    if not extra.get("lm_eval") or not distributed.is_main():
        return
    from harness.results.lmeval_files import write_lm_eval_layout
    from harness.results.report import model_display_name

    write_lm_eval_layout(path, extra["lm_eval"], model_name=model_display_name(opts.model), method=rec["method"],
                         label=rec.get("label") or rec["method"], model_args=opts.eval.model_args,
                         dtype=opts.dtype, batch_size=opts.eval.batch_size, device=opts.device,
                         samples=extra.get("samples"))


def _fail(s: Session, path: Path, base: dict, reason: str, manifest: dict, echo=print) -> dict:
    """Store a method's failed run (``status: failed`` with the reason; no metrics): shown as
    failed in the table, never a number in Per. or --check."""
    from harness.finite import finite_or_none

    rec = new_record(**base, status="failed", failure=str(reason), failure_traceback=getattr(reason, "traceback", None),
                     manifest=finite_or_none(manifest),
                     params={"dense": s.dense_params}, metrics={}, perplexity=None, stability=None,
                     environment=environment())
    _store(path, rec)
    echo(f"{base['method']}: FAILED: {reason}")
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


def _silent(*_args, **_kwargs) -> None:
    pass


def _store(path: Path, rec: dict) -> dict:
    clean = repo_relative({k: v for k, v in rec.items() if not k.startswith("_")})
    rec.update(clean)  # the record in memory is the record on disk (shipped paths repository-relative)
    write_json_atomic(path, clean)
    rec["_path"] = str(path)
    return rec

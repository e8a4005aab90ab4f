#!/usr/bin/env python
"""Harness overhead on a randomly initialised model of facebook/opt-125m's shape.

Three measured ratios, each printed with its target and PASS/FAIL and written to a JSON file:

(a) scoring: ``harness.activations.collect_layer_stats`` with every lag 1..L (all Streamline
    window cosines, ShortGPT's BI and the angular distances in one pass) / one plain forward
    pass of the model over the same calibration batches.                       target <= 1.2
    The same pass / a forward of the decoder stack alone (``model.get_decoder()``: the layers and
    the final norm, no LM head), issue 19's measure.                         target <= 1.05
(b) memory: peak RSS of Streamline's replacement training (``harness.fitting.fit.fit_to_boundaries``
    as methods/streamline.py calls it) with 4N training samples / with N. Each size runs in a
    fresh subprocess; the peak is the kernel's VmHWM, reset right before training (so model
    construction does not mask it).                                           target <= 1.1
(c) evaluation: ``harness.evaluation.run_lm_eval`` (as the runner calls it) / a raw
    ``lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok), tasks=[yaml], limit=...)``
    on the same in-memory model and the same local task YAML (both get one warm-up run, then
    the medians of interleaved repeats are compared).                         target <= 1.05

Times are this process's CPU seconds (``time.process_time``) on one torch thread by default, so
another job on the machine stretches neither side; wall-clock ratios are recorded next to them.

Nothing is downloaded: the model is built from an OPTConfig, the tokenizer from
<data-dir>/tokenizers/opt_derived, calibration text and task files from <data-dir>.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/perf.py --data-dir ../shared/data
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGETS = {"scoring": 1.2, "train_memory": 1.1, "evaluation": 1.05}
SCORING_VS_DECODER = 1.05  # (a), against the decoder stack alone
OPT_125M = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072, vocab_size=50272,
                word_embed_proj_dim=768, max_position_embeddings=2048, pad_token_id=1, bos_token_id=2,
                eos_token_id=2)


# --- shared setup ----------------------------------------------------------------------------

def build_model(seed: int = 0):
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(**OPT_125M))
    model.eval()
    return model


def build_tokenizer(data_dir: Path):
    from transformers import GPT2TokenizerFast

    tok_dir = data_dir / "tokenizers" / "opt_derived"
    if not (tok_dir / "vocab.json").is_file():
        sys.exit(f"error: no OPT tokenizer files under {tok_dir}; pass --data-dir pointing at shared/data")
    tok = GPT2TokenizerFast(vocab=str(tok_dir / "vocab.json"), merges=str(tok_dir / "merges.txt"),
                            bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                            add_bos_token=True)
    return tok


def calibration(data_dir: Path, tok, samples: int, seq_len: int, batch_size: int, seed_offset: int = 0):
    from harness.signals.calibration import (
        LOCAL_DEFAULT,
        CalibrationConfig,
        load_calibration,
    )

    cfg = CalibrationConfig(source=str(data_dir / LOCAL_DEFAULT), num_samples=samples, seq_len=seq_len,
                            batch_size=batch_size, seed=0)
    return load_calibration(cfg, tok, seed_offset=seed_offset)


def verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio <= target else "FAIL"


def timed(fn):
    """(wall seconds, CPU seconds of this process, result). CPU time decides the verdicts: on a
    shared machine another process's load stretches wall time, not this process's CPU time."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def compare(times: dict[str, list[tuple[float, float]]], num: str, den: str) -> dict:
    """Median CPU and wall ratios of ``num`` over ``den``."""
    med = {k: {"wall": statistics.median(w for w, _ in v), "cpu": statistics.median(c for _, c in v)}
           for k, v in times.items()}
    return {"ratio": med[num]["cpu"] / med[den]["cpu"], "ratio_wall": med[num]["wall"] / med[den]["wall"],
            "medians": med, "seconds": {k: [{"wall": w, "cpu": c} for w, c in v] for k, v in times.items()}}


# --- (a) scoring vs one plain forward pass -----------------------------------------------------

def bench_scoring(model, cal, repeats: int) -> dict:
    import torch

    from harness.model.adapters import get_adapter
    from harness.signals.activations import collect_layer_stats

    adapter = get_adapter(model)
    lags = list(range(1, adapter.num_layers + 1))

    def plain():
        with torch.no_grad():
            for ids, mask in cal.batches():
                model(input_ids=ids, attention_mask=mask, use_cache=False)

    def decoder():
        with torch.no_grad():
            for ids, mask in cal.batches():
                model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)

    def scoring():
        return collect_layer_stats(model, adapter, cal, lags=lags, progress=False)

    timed(plain)  # warm both (allocator, oneDNN kernels)
    stats = timed(scoring)[2]
    assert set(stats.window_cos) == set(lags) and len(stats.window_cos[1]) == adapter.num_layers
    times = {"plain_forward": [], "decoder_forward": [], "collect_layer_stats": []}
    for _ in range(repeats):  # interleaved, so background load hits all alike
        times["plain_forward"].append(timed(plain)[:2])
        times["decoder_forward"].append(timed(decoder)[:2])
        times["collect_layer_stats"].append(timed(scoring)[:2])
    r = compare(times, "collect_layer_stats", "plain_forward")
    d = compare(times, "collect_layer_stats", "decoder_forward")
    r["vs_decoder"] = {"ratio": d["ratio"], "ratio_wall": d["ratio_wall"], "target": SCORING_VS_DECODER,
                       "verdict": verdict(d["ratio"], SCORING_VS_DECODER)}
    return {**r, "target": TARGETS["scoring"], "verdict": verdict(r["ratio"], TARGETS["scoring"]), "lags": lags,
            "calibration": {"samples": len(cal), "seq_len": int(cal.input_ids.shape[1]),
                            "batch_size": cal.config.batch_size}}


# --- (b) training memory at N and 4N samples --------------------------------------------------

def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def train_child(args) -> None:
    """Runs in a fresh process: build model and data, reset the peak, train, print one JSON line."""
    import torch

    from harness.fitting.fit import fit_to_boundaries
    from harness.model.adapters import get_adapter
    from harness.model.replacement import MLPReplacement
    from harness.plugins.context import MethodContext

    torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir)
    tok = build_tokenizer(data_dir)
    model = build_model()
    cal = calibration(data_dir, tok, args.calib_samples, args.calib_seq_len, args.batch_size)
    ctx = MethodContext(model=model, adapter=get_adapter(model), tokenizer=tok, calibration=cal,
                        num_remove=args.window, seed=0, progress=False)
    # the same calls as methods/streamline.py: a separate draw of training blocks, an h = 2d MLP
    data = ctx.training_data(args.child_train_samples)
    d = ctx.adapter.hidden_size
    mlp = MLPReplacement(d, 2 * d, activation="relu")
    start = args.window_start
    gc.collect()
    before_kb = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        peak_source = "VmHWM reset by /proc/self/clear_refs before training"
    except OSError as exc:
        peak_source = f"VmHWM over the whole process (could not reset it: {exc})"
    t = time.perf_counter()
    log = fit_to_boundaries(ctx, mlp, data, start, start + args.window, epochs=1, lr=4e-4,
                            batch_size=args.batch_size, seed=0, progress=False)
    seconds = time.perf_counter() - t
    peak_kb = _status_kb("VmHWM")
    print(json.dumps({"samples": len(data), "rss_before_kb": before_kb, "peak_kb": peak_kb,
                      "peak_source": peak_source, "train_seconds": seconds, "steps": log["steps"],
                      "tokens": log["tokens_per_epoch"]}))


def bench_train_memory(args) -> dict:
    runs = {}
    for n in (args.train_samples, 4 * args.train_samples):
        cmd = [sys.executable, __file__, "--_child-train-samples", str(n), "--data-dir", str(args.data_dir),
               "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               "--window", str(args.window), "--window-start", str(args.window_start)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"error: training subprocess for {n} samples failed:\n{proc.stderr[-3000:]}")
        runs[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    small, large = runs[args.train_samples], runs[4 * args.train_samples]
    ratio = large["peak_kb"] / small["peak_kb"]
    growth = [r["peak_kb"] - r["rss_before_kb"] for r in (small, large)]
    return {"ratio": ratio, "target": TARGETS["train_memory"], "verdict": verdict(ratio, TARGETS["train_memory"]),
            "N": args.train_samples, "runs": {str(k): v for k, v in runs.items()},
            "growth_during_training_kb": {"N": growth[0], "4N": growth[1]},
            "window": [args.window_start, args.window_start + args.window]}


# --- (c) evaluation: harness vs raw lm-eval --------------------------------------------------------

def bench_evaluation(model, tok, args) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from harness.evaluation.eval_config import EvalConfig
    from harness.evaluation.lmeval import TaskCache, run_lm_eval
    from harness.evaluation.local_data import _task_yaml_specs
    from harness.evaluation.task_checks import validate_tasks
    from harness.evaluation.task_resolution import task_manager

    cfg = EvalConfig(tasks=[args.eval_task], data_dir=str(args.data_dir), limit=args.eval_limit,
                     batch_size=args.eval_batch_size)
    validate_tasks(cfg)
    workdir = tempfile.TemporaryDirectory(prefix="perf_tasks_")
    (yaml_path,) = _task_yaml_specs(cfg, workdir.name)  # the very YAML the harness evaluates
    tm = task_manager()  # built once, shared: indexing lm-eval's task folder is not what is measured

    def harness_cached():  # as the runner calls it (per-item samples kept for the stability column)
        return run_lm_eval(model, tok, cfg, log_samples=True)["metrics"]

    def harness_cold():  # a fresh Task cache each call: the same work as the raw call
        return run_lm_eval(model, tok, cfg, log_samples=True, cache=TaskCache())["metrics"]

    def raw():
        out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=args.eval_batch_size),
                                      tasks=[yaml_path], limit=args.eval_limit, task_manager=tm)
        return out["results"]

    h = timed(harness_cached)[2]
    r = timed(raw)[2]
    timed(harness_cold)
    acc_h, acc_r = h[args.eval_task]["acc"], r[args.eval_task]["acc,none"]
    if abs(acc_h - acc_r) > 1e-9:
        sys.exit(f"error: harness and raw lm-eval disagree on {args.eval_task} acc ({acc_h} vs {acc_r})")
    times = {"harness": [], "harness_cold_tasks": [], "raw": []}
    for _ in range(args.repeats):  # interleaved, so background load hits all alike
        times["raw"].append(timed(raw)[:2])
        times["harness"].append(timed(harness_cached)[:2])
        times["harness_cold_tasks"].append(timed(harness_cold)[:2])
    res = compare(times, "harness", "raw")
    cold = compare(times, "harness_cold_tasks", "raw")
    workdir.cleanup()
    target = TARGETS["evaluation"]
    return {**res, "target": target, "verdict": verdict(res["ratio"], target),
            "ratio_cold_task_cache": cold["ratio"], "ratio_cold_task_cache_wall": cold["ratio_wall"],
            "verdict_cold_task_cache": verdict(cold["ratio"], target),
            "task": args.eval_task, "limit": args.eval_limit, "batch_size": args.eval_batch_size, "acc": acc_h}


# --- main --------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"),
                   help="shared/data checkout (tokenizer, wikitext-2 calibration text, task files)")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="calibration / training batch size")
    p.add_argument("--train-samples", type=int, default=16, help="N for (b); the second run uses 4N")
    p.add_argument("--window", type=int, default=3, help="layers replaced in (b) (25%% of 12)")
    p.add_argument("--window-start", type=int, default=4)
    p.add_argument("--eval-task", default="piqa")
    p.add_argument("--eval-limit", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: CPU-time ratios stay meaningful next to other load)")
    p.add_argument("--only", default="scoring,train_memory,evaluation", help="comma-separated subset")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "perf_results.json"))
    p.add_argument("--_child-train-samples", dest="child_train_samples", type=int, default=None,
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.data_dir = data_dir_or_exit(p, args.data_dir)
    if args.window < 1 or not 0 <= args.window_start <= OPT_125M["num_hidden_layers"] - args.window:
        p.error("--window/--window-start do not fit 12 layers")
    if min(args.calib_samples, args.train_samples, args.repeats, args.eval_limit, args.batch_size) < 1:
        p.error("sample counts, --repeats, --eval-limit and --batch-size must be >= 1")
    known_or_exit(p, "--only", args.only, TARGETS)
    return args


def data_dir_or_exit(p: argparse.ArgumentParser, value) -> Path:
    """``--data-dir`` as a Path, or the parser's error when it is not a shared/data checkout."""
    path = Path(value)
    if not (path / "SOURCES.md").is_file():
        p.error(f"--data-dir {path} is not a shared/data checkout (no SOURCES.md)")
    return path


def known_or_exit(p: argparse.ArgumentParser, flag: str, value: str, known) -> None:
    """The parser's error for names in the comma-list ``value`` that are not in ``known``."""
    unknown = set(value.split(",")) - set(known)
    if unknown:
        p.error(f"{flag}: unknown {', '.join(sorted(unknown))}; choose from {', '.join(known)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.child_train_samples is not None:
        train_child(args)
        return 0
    import logging

    for name in ("lm_eval", "lm-eval", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.disable_progress_bar()

    only = args.only.split(",")
    results = {"model": "random OPT, facebook/opt-125m shape", "config": OPT_125M, "threads": args.threads,
               "load_average_at_start": os.getloadavg(), "torch": torch.__version__}
    tok = build_tokenizer(args.data_dir)
    model = build_model()
    t0 = time.perf_counter()
    if "scoring" in only:
        cal = calibration(args.data_dir, tok, args.calib_samples, args.calib_seq_len, args.batch_size)
        results["scoring"] = bench_scoring(model, cal, args.repeats)
        r = results["scoring"]
        m = r["medians"]
        print(f"(a) scoring all windows/BI/angular (lags 1..12) / plain forward: {r['ratio']:.3f} "
              f"(target <= {r['target']}) {r['verdict']}  [CPU medians {m['collect_layer_stats']['cpu']:.2f}s vs "
              f"{m['plain_forward']['cpu']:.2f}s; wall ratio {r['ratio_wall']:.3f}]", flush=True)
        v = r["vs_decoder"]
        print(f"(a') the same pass / the decoder stack alone (no LM head): {v['ratio']:.3f} (target <= {v['target']}) "
              f"{v['verdict']}  [CPU medians {m['collect_layer_stats']['cpu']:.2f}s vs {m['decoder_forward']['cpu']:.2f}s; "
              f"wall ratio {v['ratio_wall']:.3f}]", flush=True)
    if "train_memory" in only:
        results["train_memory"] = bench_train_memory(args)
        r = results["train_memory"]
        runs = r["runs"]
        n, n4 = runs[str(args.train_samples)], runs[str(4 * args.train_samples)]
        print(f"(b) replacement-training peak RSS, {4 * args.train_samples} / {args.train_samples} samples: "
              f"{r['ratio']:.3f} (target <= {r['target']}) {r['verdict']}  "
              f"[{n4['peak_kb'] / 1024:.0f} vs {n['peak_kb'] / 1024:.0f} MiB; growth during training "
              f"{r['growth_during_training_kb']['4N'] / 1024:.0f} vs {r['growth_during_training_kb']['N'] / 1024:.0f} MiB]",
              flush=True)
    if "evaluation" in only:
        results["evaluation"] = bench_evaluation(model, tok, args)
        r = results["evaluation"]
        m = r["medians"]
        print(f"(c) harness run_lm_eval / raw lm_eval.simple_evaluate ({r['task']}, limit {r['limit']}): "
              f"{r['ratio']:.3f} (target <= {r['target']}) {r['verdict']}  "
              f"[CPU medians {m['harness']['cpu']:.2f}s vs {m['raw']['cpu']:.2f}s; wall ratio {r['ratio_wall']:.3f}; "
              f"with a cold task cache {r['ratio_cold_task_cache']:.3f} {r['verdict_cold_task_cache']}]", flush=True)
    results["seconds_total"] = time.perf_counter() - t0
    results["load_average_at_end"] = os.getloadavg()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    failed = [k for k in TARGETS if k in results and results[k]["verdict"] != "PASS"]
    failed += ["scoring vs decoder"] if results.get("scoring", {}).get("vs_decoder", {}).get("verdict") == "FAIL" else []
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Peak memory of a pruning sweep against evaluating the dense model alone (issue 11).

A randomly initialised model of a real model's shape (default ``facebook/opt-1.3b``: 1.3B
parameters, float32, about 5.3 GB) is saved once to a temporary folder, with the OPT tokenizer
rebuilt from ../shared/data/tokenizers/opt_derived. Each measurement runs in its own process
(its peak RSS from ``wait4``; per-stage peaks from a 2 ms /proc sampler inside it):

  dense   load, calibration, evaluation of the dense model alone
  sweep   the same, then ``--methods remove,shortgpt,angular,streamline`` (shells over the
          dense weights: harness.model.sharing)
  before  the same sweep with a deep copy of the dense model per method (the old runner), for
          the time (and memory) before this change; ``--no-before`` skips it

Prints the peak RSS of each, the ratio sweep/dense (target <= 1.15) and the sweep times, and
writes everything to ``--out`` (JSON). ``--shape opt-125m`` / ``opt-350m`` give the small
shapes that benchmarks/scale_plan.py's predictions are checked against (``--stages``).

    python benchmarks/memory_sweep.py                       # opt-1.3b shape: ~20 GB of RAM free needed for 'before'
    python benchmarks/memory_sweep.py --shape opt-125m --no-before
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("STREAMLINE_SHARED_DATA", REPO.parent / "shared" / "data"))
CONFIGS = REPO / "benchmarks" / "configs"
METHODS = "remove,shortgpt,angular,streamline"


# --- the measured process ------------------------------------------------------------------

class Sampler:
    """RSS of this process every ``every`` seconds; the peak per labelled stage."""

    def __init__(self, every: float = 0.002):
        self.every = every
        self.stage = "start"
        self.peaks: dict[str, int] = {}
        self.order: list[str] = []
        self.page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def set(self, stage: str) -> None:
        self.note()
        self.stage = stage
        if stage not in self.peaks:
            self.order.append(stage)
        self.note()

    def note(self) -> None:
        r = self.rss()
        if r > self.peaks.get(self.stage, 0):
            self.peaks[self.stage] = r

    def _run(self):
        while not self._stop.is_set():
            self.note()
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.note()


def child(args) -> None:
    """One measured run (dense | sweep | before), in this process; writes its JSON to args.result."""
    import copy

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    import harness.runner as runner
    from harness.evaluation.eval_config import EvalConfig
    from harness.model.target import Target
    from harness.plugins.context import MethodContext
    from harness.signals.calibration import CalibrationConfig

    sampler = Sampler()
    with sampler:
        sampler.set("baseline")  # python, torch, transformers, lm-eval imported; no model yet
        method_options = {"streamline": {"train_samples": str(args.train_samples), "epochs": str(args.epochs)}}
        opts = runner.RunOptions(
            model=args.model, methods=METHODS.split(","), method_options=method_options,
            targets=[Target(layers=args.layers)],
            eval=EvalConfig(tasks=args.tasks.split(","), data_dir=str(SHARED), limit=args.limit,
                            batch_size=args.eval_batch_size),
            calibration=CalibrationConfig(source=str(SHARED / "wikitext2" / "wikitext-2-raw-v1" / "test.jsonl"),
                                          split="test", num_samples=args.calib_samples, seq_len=args.calib_seq_len,
                                          batch_size=args.calib_batch_size),
            output_dir=args.output_dir, progress=False, force=True)
        current = {"method": "dense"}
        load_model = runner.load_model

        def staged_load(*a, **k):
            sampler.set("load")
            return load_model(*a, **k)

        evaluate = runner._evaluate

        def staged_eval(*a, **k):
            sampler.set(f"eval:{current['method']}")
            try:
                return evaluate(*a, **k)
            finally:
                sampler.set(f"after:{current['method']}")

        run_method = runner.run_method

        def staged_method(s, name, *a, **k):
            current["method"] = name
            sampler.set(f"prune:{name}")
            return run_method(s, name, *a, **k)

        layer_stats = MethodContext.layer_stats

        def staged_stats(self, *a, **k):
            sampler.set("score")
            try:
                return layer_stats(self, *a, **k)
            finally:
                sampler.set(f"prune:{current['method']}")

        from lm_eval.models.huggingface import HFLM

        eval_shapes: list = []
        model_call = HFLM._model_call

        def recorded_call(self, inps, *a, **k):
            eval_shapes.append(tuple(inps.shape))
            return model_call(self, inps, *a, **k)

        HFLM._model_call = recorded_call
        import harness.model.loading as loading

        fixed = {}  # RSS growth of model-independent loads (tokenizer, calibration blocks)

        def measured(name, fn):
            def run(*a, **k):
                before = sampler.rss()
                try:
                    return fn(*a, **k)
                finally:
                    fixed[name] = fixed.get(name, 0) + sampler.rss() - before
            return run

        loading.load_tokenizer = measured("tokenizer", loading.load_tokenizer)
        runner.load_calibration = measured("calibration", runner.load_calibration)
        runner.load_model = staged_load
        runner._evaluate = staged_eval
        runner.run_method = staged_method
        MethodContext.layer_stats = staged_stats
        if args.child == "before":  # the old runner: a full copy of the dense model per method
            runner.copy_model = lambda s: copy.deepcopy(s.model)
        t0 = time.perf_counter()
        if args.child == "dense":
            session = runner.open_session(opts, runner.prepare(opts), echo=lambda *_: None)
            runner.run_dense(session, echo=lambda *_: None)
        else:
            runner.run_benchmark(opts, echo=lambda *_: None)
        seconds = time.perf_counter() - t0
    Path(args.result).write_text(json.dumps({
        "kind": args.child, "seconds": seconds, "peak_bytes": max(sampler.peaks.values()),
        "fixed_bytes": fixed,
        "eval_batch_max": max(eval_shapes, key=lambda s: s[0] * s[1]) if eval_shapes else None,
        "stages": {k: sampler.peaks[k] for k in sampler.order}}, indent=1))


# --- the driver ------------------------------------------------------------------------------

def shape_config(shape: str):
    from transformers import OPTConfig

    raw = json.loads((CONFIGS / f"{shape}.json").read_text())
    raw.pop("_source", None)
    raw.pop("model_type", None)
    return OPTConfig(**raw)


def build(shape: str, folder: Path) -> None:
    """A random model of ``shape`` (float32) and the OPT tokenizer, saved to ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2TokenizerFast

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(shape_config(shape), dtype=torch.float32)
    model.save_pretrained(folder)
    tok_dir = SHARED / "tokenizers" / "opt_derived"
    tok = GPT2TokenizerFast(vocab=str(tok_dir / "vocab.json"), merges=str(tok_dir / "merges.txt"), bos_token="</s>",
                            eos_token="</s>", unk_token="<unk>", pad_token="<pad>", add_bos_token=True)
    tok.save_pretrained(folder)


def measure(kind: str, model_dir: Path, args, work: Path) -> dict:
    result = work / f"{kind}.json"
    cmd = [sys.executable, __file__, "--child", kind, "--model", str(model_dir), "--result", str(result),
           "--output-dir", str(work / f"runs-{kind}"), *_settings(args)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{kind} run failed (status {status})")
    out = json.loads(result.read_text())
    out["maxrss_bytes"] = usage.ru_maxrss * 1024
    return out


def _settings(args) -> list[str]:
    return ["--tasks", args.tasks, "--limit", str(args.limit), "--calib-samples", str(args.calib_samples),
            "--calib-seq-len", str(args.calib_seq_len), "--calib-batch-size", str(args.calib_batch_size),
            "--eval-batch-size", str(args.eval_batch_size), "--train-samples", str(args.train_samples),
            "--epochs", str(args.epochs), "--layers", str(args.layers)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="opt-1.3b", help="a JSON file in benchmarks/configs (opt-125m, opt-350m, opt-1.3b)")
    p.add_argument("--tasks", default="piqa")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--calib-batch-size", type=int, default=4)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--train-samples", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--layers", type=int, default=6, help="layers removed by each method")
    p.add_argument("--no-before", action="store_true", help="skip the deep-copy ('before') sweep")
    p.add_argument("--out", default=None, help="JSON file for the numbers (default: benchmarks/memory_<shape>.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--output-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if not (SHARED / "SOURCES.md").is_file():
        raise SystemExit(f"needs the benchmark data at {SHARED} (set STREAMLINE_SHARED_DATA)")
    gb = 1e9
    with tempfile.TemporaryDirectory(prefix="sb_mem_") as tmp:
        work = Path(tmp)
        model_dir = work / f"random-{args.shape}"
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                               f"from benchmarks.memory_sweep import build; from pathlib import Path; "
                               f"build({args.shape!r}, Path({str(model_dir)!r}))"], cwd=REPO)
        if proc.returncode:
            raise SystemExit("building the random model failed")
        print(f"random {args.shape} saved to {model_dir} in {time.perf_counter() - t:.0f} s")
        runs = {}
        for kind in ("dense", "sweep") + (() if args.no_before else ("before",)):
            runs[kind] = measure(kind, model_dir, args, work)
            r = runs[kind]
            print(f"{kind:>6}: peak RSS {r['maxrss_bytes'] / gb:.2f} GB (sampled {r['peak_bytes'] / gb:.2f} GB), "
                  f"{r['seconds']:.0f} s")
    ratio = runs["sweep"]["maxrss_bytes"] / runs["dense"]["maxrss_bytes"]
    print(f"sweep / dense peak RSS: {ratio:.3f} (target <= 1.15)")
    if "before" in runs:
        b = runs["before"]
        print(f"before (deep copy per method): peak {b['maxrss_bytes'] / gb:.2f} GB, ratio "
              f"{b['maxrss_bytes'] / runs['dense']['maxrss_bytes']:.3f}; 4-method sweep time "
              f"{b['seconds']:.0f} s before, {runs['sweep']['seconds']:.0f} s after")
    out = Path(args.out or REPO / "benchmarks" / f"memory_{args.shape}.json")
    out.write_text(json.dumps({"shape": args.shape, "settings": vars(args) | {"methods": METHODS, "out": None},
                               "ratio_sweep_over_dense": ratio, "runs": runs}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

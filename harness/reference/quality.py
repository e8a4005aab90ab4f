"""Measure the reference models' quality bars.

    python -m harness.reference.quality                # every trained reference model
    python -m harness.reference.quality --sizes small

Bars (issue: built-in reference benchmark): dense average accuracy on the suite >= 85%;
removing 25% of the layers with ``remove`` (Streamline's most-similar window, no replacement)
loses >= 15 points on average; the per-layer Streamline similarity profile is not flat. The
measurements use the harness itself (calibration, streaming layer statistics, layer removal) and
``scoring.evaluate_suite`` (lm-eval's acc definition). Results are printed and stored in the
model's ``manifest.json`` under ``quality``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from harness.io import write_json_atomic

from . import CALIB_SEQ_LEN, CALIBRATION_PATH, MODELS_DIR, NAMES, SUITE_DIR
from .scoring import evaluate_suite, load_suite

BARS = {"dense_acc_min": 0.85, "remove_drop_min": 0.15, "profile_spread_min": 0.05}


def measure(model_dir, tasks=None, calib_samples: int = 64) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.model.adapters import get_adapter
    from harness.model.surgery import remove_layers
    from harness.signals.activations import collect_layer_stats
    from harness.signals.calibration import CalibrationConfig, load_calibration

    if tasks is None:
        _, tasks = load_suite(SUITE_DIR)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    adapter = get_adapter(model)
    L = adapter.num_layers
    n = max(1, round(0.25 * L))
    cal = load_calibration(CalibrationConfig(source=str(CALIBRATION_PATH), num_samples=calib_samples,
                                             seq_len=CALIB_SEQ_LEN, seed=0), tok)
    stats = collect_layer_stats(model, adapter, cal, lags=(1, n), progress=False)
    dense = evaluate_suite(model, tok, tasks)
    start = stats.best_window(n)
    remove_layers(adapter, list(range(start, start + n)))
    removed = evaluate_suite(model, tok, tasks)
    per_layer = [round(v, 4) for v in stats.window_cos[1]]
    window = [round(v, 4) for v in stats.window_cos[n]]
    q = {
        "num_layers": L,
        "remove_n": n,
        "remove_window": [start, start + n - 1],
        "dense": {t: round(r["acc"], 4) for t, r in dense.items() if t != "average"},
        "dense_avg": round(dense["average"]["acc"], 4),
        "remove": {t: round(r["acc"], 4) for t, r in removed.items() if t != "average"},
        "remove_avg": round(removed["average"]["acc"], 4),
        "per_layer_cos": per_layer,  # S(i) for n = 1: cos(X_i, X_{i+1})
        f"window_cos_n{n}": window,
        "profile_spread": round(max(per_layer) - min(per_layer), 4),
        "profile_stdev": round(statistics.pstdev(per_layer), 4),
        "calibration": cal.description,
    }
    q["remove_drop"] = round(q["dense_avg"] - q["remove_avg"], 4)
    q["bars"] = {
        "dense_acc>=0.85": q["dense_avg"] >= BARS["dense_acc_min"],
        "remove_drop>=0.15": q["remove_drop"] >= BARS["remove_drop_min"],
        "profile_not_flat(max-min>=0.05)": q["profile_spread"] >= BARS["profile_spread_min"],
    }
    return q


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Measure the reference models' quality bars.")
    ap.add_argument("--sizes", default=None, help="comma list of small, medium, large (default: every trained one)")
    ap.add_argument("--no-write", action="store_true", help="do not store the result in manifest.json")
    args = ap.parse_args(argv)
    ok = True
    sizes = ([s.strip() for s in args.sizes.split(",") if s.strip()] if args.sizes
             else [k for k, n in NAMES.items() if (MODELS_DIR / n / "manifest.json").is_file()])
    for size in sizes:
        if size not in NAMES:
            print(f"error: unknown size {size!r}; choose from {', '.join(NAMES)}", file=sys.stderr)
            return 2
        d = MODELS_DIR / NAMES[size]
        if not (d / "manifest.json").is_file():
            print(f"error: {d} is not trained; run python -m harness.reference.train --sizes {size}", file=sys.stderr)
            return 2
        q = measure(d)
        print(f"{NAMES[size]}: dense {100 * q['dense_avg']:.1f}  remove@{q['remove_n']}/{q['num_layers']} "
              f"(layers {q['remove_window']}) {100 * q['remove_avg']:.1f}  drop {100 * q['remove_drop']:.1f} pts; "
              f"per-layer cos {q['per_layer_cos']}")
        print("  " + "  ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in q["bars"].items()))
        ok &= all(q["bars"].values())
        if not args.no_write:
            m = json.loads((d / "manifest.json").read_text())
            m["quality"] = q
            write_json_atomic(d / "manifest.json", m)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

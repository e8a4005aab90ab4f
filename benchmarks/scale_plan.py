#!/usr/bin/env python
"""A memory plan on paper for a pruning sweep: per stage, the predicted peak memory and the
number of 80 GB GPUs it needs with ``--device auto``.

    python benchmarks/scale_plan.py llama-3-8b                 # a config in benchmarks/configs
    python benchmarks/scale_plan.py path/to/model_or_config.json --dtype bfloat16 --lora
    python benchmarks/scale_plan.py --compare benchmarks/memory_opt-125m.json   # vs measured (CPU)

The model is built on PyTorch's meta device (no weights, no memory): parameter counts come
from the real module tree (embeddings, one decoder layer, final norm, LM head; tied weights
counted once). Stages of a sweep as the harness runs it:

  load        the dense weights W (methods never copy them: harness.model.sharing)
  score       W + one decoder layer's forward on a calibration batch + the streaming statistics
              (unit-normalised float32 states for lags up to n: (n + 2) B T d x 4 bytes)
  eval        W + one layer's forward on an evaluation batch + its logits and log-softmax (2 B T V)
  remove / shortgpt / angular   nothing beyond W (a shell over the dense tensors)
  streamline  W + the MLP (2d x 2d), its AdamW state, the fit batch's activations and, when it
              fits its limit, the activation cache of the training set
  streamline-layer  W + one layer copy, its AdamW state, the layer's activations per application
              (gradient checkpointing: the inputs only)
  +lora       W + a copy of every remaining layer (the merge writes into them) + the backward's
              activations through the model (checkpointing: one hidden state per layer) + logits
  laco        W + one layer copy (the merge candidate)

Every stage adds the process's fixed cost (``--runtime-gb``: CUDA context and allocator slack
per GPU, or on CPU the Python process with torch/transformers/lm-eval imported). GPUs needed =
ceil(peak / (gpu_gb x 0.92 - runtime)): what ``--device auto`` spreads the model over; data-
parallel processes (README) each need that many. Predictions for 7B-70B are on paper; the small
OPT shapes are checked against measured CPU peaks (``--compare``, from benchmarks/memory_sweep.py).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "benchmarks" / "configs"
GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def load_config(name: str):
    from transformers import AutoConfig

    path = Path(name)
    if not path.exists() and (CONFIGS / f"{name}.json").is_file():
        path = CONFIGS / f"{name}.json"
    if path.is_dir():
        return AutoConfig.from_pretrained(path), path.name
    if path.is_file():
        raw = json.loads(path.read_text())
        raw.pop("_source", None)
        raw.pop("torch_dtype", None)
        return AutoConfig.for_model(raw.pop("model_type"), **raw), path.stem
    known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.json")))
    raise SystemExit(f"error: '{name}' is neither a model folder, a config JSON nor one of: {known}")


def shape(config) -> dict:
    """Parameter counts from the model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unique = {id(p): p for p in model.parameters()}
    from harness.model.adapters import get_adapter

    adapter = get_adapter(model)
    layer = adapter.layers[0]
    gated = any("gate" in n for n, _ in layer.named_parameters())
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim")
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return {"params": sum(p.numel() for p in unique.values()), "layer_params": sum(p.numel() for p in layer.parameters()),
            "layers": adapter.num_layers, "d": config.hidden_size, "ffn": ffn, "vocab": config.vocab_size,
            "heads": config.num_attention_heads, "kv_dim": config.hidden_size * kv // config.num_attention_heads,
            "gated": gated}


def layer_forward(s: dict, tokens: int, a: int) -> int:
    """Peak live activations of one decoder layer's forward (no grad), ``tokens`` = B x T:
    input, residual, normed input, attention output, q/k/v, and the MLP's intermediates
    (2 for an ungated MLP, 3 for a gated one); SDPA attention keeps no T x T matrix."""
    d, f = s["d"], s["ffn"]
    return tokens * a * (5 * d + d + 2 * s["kv_dim"] + (3 if s["gated"] else 2) * f)


def layer_backward(s: dict, tokens: int, a: int) -> int:
    """Activations one layer saves for its backward pass (about its forward's intermediates, twice the MLP's)."""
    d, f = s["d"], s["ffn"]
    return tokens * a * (6 * d + 2 * s["kv_dim"] + (4 if s["gated"] else 3) * f)


def plan(s: dict, args) -> list[tuple[str, int]]:
    a = DTYPE_BYTES[args.dtype]
    W = s["params"] * a
    Wl = s["layer_params"] * a
    n = args.layers if args.layers is not None else max(1, round(args.ratio * s["layers"]))
    d, V = s["d"], s["vocab"]
    cal = args.calib_batch_size * args.calib_seq_len
    ev = args.eval_batch_size * args.eval_seq_len
    tr = args.train_batch_size * (args.train_seq_len or args.calib_seq_len)
    stages = [("load", W),
              ("score", W + layer_forward(s, cal, a) + (n + 2) * cal * d * 4),
              ("eval", W + layer_forward(s, ev, a) + 2 * ev * V * a)]
    for m in args.methods:
        if m in ("remove", "shortgpt", "angular", "streamline-none"):
            extra = 0
        elif m == "streamline":
            h = 2 * d
            mlp = 2 * d * h + h + d
            cache_bytes = 2 * args.train_samples * (args.train_seq_len or args.calib_seq_len) * d * a
            cache = cache_bytes if cache_bytes <= args.cache_gb * 2**30 else 0
            extra = (4 * mlp * 4 + layer_forward(s, tr, a) + 2 * tr * d * a + tr * (2 * h + 2 * d) * 4 + cache)
        elif m == "streamline-layer":
            act = layer_forward(s, tr, a) + (tr * d * a if args.checkpointing else layer_backward(s, tr, a))
            extra = 4 * Wl + 2 * tr * d * a + act
        elif m == "laco":
            extra = Wl + layer_forward(s, 5 * 32, a)
        elif m.endswith("+lora"):
            kept = s["layers"] - n
            per_layer = tr * d * a if args.checkpointing else layer_backward(s, tr, a)
            extra = kept * Wl + kept * per_layer + layer_forward(s, tr, a) + 3 * tr * V * 4
        else:
            raise SystemExit(f"error: no memory model for method '{m}'")
        stages.append((m, W + extra))
    return stages


def gpus(total: int, args) -> int:
    usable = args.gpu_gb * GB * 0.92 - args.runtime_gb * GB
    return max(1, math.ceil(total / usable))


def render(name: str, s: dict, args, stages) -> str:
    rt = args.runtime_gb * GB
    lines = [f"{name}: {s['params'] / 1e9:.2f}B parameters, {s['layers']} layers, d={s['d']}, {args.dtype}; "
             f"removing {args.layers if args.layers is not None else f'{args.ratio:.0%}'} layers; "
             f"calibration {args.calib_batch_size}x{args.calib_seq_len}, eval batch {args.eval_batch_size}x"
             f"{args.eval_seq_len}, training batch {args.train_batch_size}x{args.train_seq_len or args.calib_seq_len}"
             f"{', gradient checkpointing' if args.checkpointing else ''}",
             f"{'stage':<18}{'peak GB':>10}{'80 GB GPUs (--device auto)':>30}"]
    for stage, b in stages:
        lines.append(f"{stage:<18}{(b + rt) / GB:>10.1f}{gpus(b, args):>30}")
    peak = max(b for _, b in stages)
    lines.append(f"{'sweep peak':<18}{(peak + rt) / GB:>10.1f}{gpus(peak, args):>30}")
    k = gpus(peak, args)
    lines.append(f"8 x {args.gpu_gb:.0f} GB: {8 // k} data-parallel process(es) of {k} GPU(s) each "
                 f"(torchrun --nproc_per_node {8 // k} ... --device {'auto' if k > 1 else 'cuda'})" if k <= 8 else
                 f"8 x {args.gpu_gb:.0f} GB are not enough ({k} GPUs needed)")
    return "\n".join(lines)


def compare(path: Path, args) -> None:
    """Predicted vs measured CPU peaks of a benchmarks/memory_sweep.py result (float32)."""
    data = json.loads(path.read_text())
    st = data["settings"]
    config, name = load_config(data["shape"])
    s = shape(config)
    runs = data["runs"]
    fixed = runs["dense"].get("fixed_bytes", {})
    base = runs["dense"]["stages"]["baseline"] + sum(fixed.values())
    be, te = runs["dense"].get("eval_batch_max") or (st["eval_batch_size"], 64)
    ns = argparse.Namespace(dtype="float32", layers=st["layers"], ratio=None, calib_batch_size=st["calib_batch_size"],
                            calib_seq_len=st["calib_seq_len"], eval_batch_size=be, eval_seq_len=te,
                            train_batch_size=8, train_seq_len=None, train_samples=st["train_samples"], cache_gb=2.0,
                            checkpointing=False, methods=st["methods"].split(","), gpu_gb=80, runtime_gb=0)
    pred = dict(plan(s, ns))
    sweep = runs["sweep"]["stages"]
    rows = [("load", pred["load"], runs["dense"]["stages"].get("load")),
            ("score", pred["score"], sweep.get("score")),
            ("eval (dense)", pred["eval"], runs["dense"]["stages"].get("eval:dense")),
            ("streamline", pred["streamline"], sweep.get("prune:streamline")),
            ("dense-only run", max(pred["load"], pred["eval"]), runs["dense"]["maxrss_bytes"] - base),
            ("sweep run", max(pred.values()), runs["sweep"]["maxrss_bytes"] - base)]
    print(f"{name} (float32, CPU): fixed cost {base / GB:.2f} GB, measured without the model and added to every "
          f"prediction (the process with torch/transformers/lm-eval imported and the run validated "
          f"{runs['dense']['stages']['baseline'] / GB:.2f} GB, tokenizer and calibration blocks "
          f"{sum(fixed.values()) / GB:.2f} GB); eval batch {be}x{te} (the largest lm-eval batch of the run)")
    print("| stage | predicted GB | measured GB | error |\n|---|---:|---:|---:|")
    for stage, p, m in rows:
        if m is None:
            continue
        if stage in ("dense-only run", "sweep run"):
            p, m = p + base, m + base
        else:
            p = p + base
        print(f"| {stage} | {p / GB:.2f} | {m / GB:.2f} | {100 * (p - m) / m:+.1f}% |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="a config in benchmarks/configs (llama-3-8b, llama-2-70b, qwen2.5-72b, "
                                            "opt-125m, ...), a config JSON or a model folder")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--calib-batch-size", type=int, default=8)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--eval-seq-len", type=int, default=1024, help="longest request of a batch (MMLU 5-shot ~1000)")
    p.add_argument("--train-batch-size", type=int, default=8)
    p.add_argument("--train-seq-len", type=int, default=None, help="default: --calib-seq-len")
    p.add_argument("--train-samples", type=int, default=3000, help="streamline's training set (the cache size)")
    p.add_argument("--cache-gb", type=float, default=2.0, help="streamline.activation_cache_gb")
    p.add_argument("--methods", default="remove,shortgpt,angular,streamline,laco,streamline-layer,remove+lora")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="plan LoRA/layer training without gradient checkpointing (auto turns it on above 2B)")
    p.add_argument("--gpu-gb", type=float, default=80.0)
    p.add_argument("--runtime-gb", type=float, default=1.0, help="per-process fixed cost (CUDA context, allocator)")
    p.add_argument("--compare", type=Path, default=None, help="a benchmarks/memory_sweep.py JSON: predicted vs measured")
    args = p.parse_args()
    if args.compare:
        return compare(args.compare, args)
    if not args.model:
        p.error("give MODEL_OR_CONFIG or --compare FILE")
    args.methods = [m for m in args.methods.split(",") if m]
    config, name = load_config(args.model)
    s = shape(config)
    print(render(name, s, args, plan(s, args)))


if __name__ == "__main__":
    main()

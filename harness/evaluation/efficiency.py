"""Efficiency of a (pruned) model, measured in this process on its device.

For every model the same settings are used (recorded in the result JSON):

- ``params``: unique parameters (replacement networks included).
- ``flops_per_token``: analytic forward FLOPs per token at a context of ``seq_len`` tokens:
  2 x the multiply-accumulates of every matrix multiply that actually runs in one forward pass
  (counted by ``torch.utils.flop_counter`` on ``mm``/``addmm``, so a replacement network, a
  shared layer applied n times and the LM head all count), plus attention, 4 * T * d_attn per
  executed attention module (QK^T and A.V over the full T x T score matrix), counted with hooks.
- ``prefill_latency_s``: wall time of one forward pass over ``batch_size x seq_len`` tokens
  (no cache), median of ``repeats`` runs after ``warmup`` runs; a run of a tiny model repeats the
  pass until it lasts ``min_run_s`` and is divided by the count (``prefill_inner_loops``).
- ``decode_tokens_per_s``: greedy decoding with the KV cache: a ``decode_prompt_len`` prompt,
  then ``new_tokens`` single-token steps for ``decode_batch_size`` sequences; tokens/s of the
  steps only (the prompt's prefill is not timed), median of ``repeats``.
- ``peak_memory_bytes``: the bytes of the model's weights and buffers plus the peak of the
  allocator's extra live bytes over one prefill + decode: on CUDA ``max_memory_allocated`` minus
  ``memory_allocated`` before the pass (so the dense model the runner keeps resident does not
  count against a pruned one); on CPU the PyTorch profiler's memory events (allocations minus
  frees, in order).

Timed runs synchronise the device before reading the clock. Nothing here is derived from the
parameter count; ``ideal_speedup`` (1 / (1 - removed FLOP share)) is the reference a measured
speedup is compared with.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch

from harness.errors import UsageError
from harness.model.adapters import get_adapter, unwrap_layer
from harness.model.loading import model_device
from harness.model.surgery import count_params


@dataclass
class EfficiencyConfig:
    batch_size: int = 4  # prefill batch
    seq_len: int = 256  # prefill length and the context of flops_per_token (capped at the model's positions)
    decode_batch_size: int = 1
    decode_prompt_len: int = 32
    new_tokens: int = 64
    warmup: int = 2
    repeats: int = 5
    seed: int = 0
    min_run_s: float = 0.05  # a timed prefill run repeats the forward pass until it lasts this long (tiny models)

    def validate(self) -> None:
        if min(self.batch_size, self.seq_len, self.decode_batch_size, self.decode_prompt_len,
               self.new_tokens, self.repeats) < 1 or self.warmup < 0:
            raise UsageError("efficiency settings need batch sizes, lengths, --eff-new-tokens and --eff-repeats >= 1 "
                             "and --eff-warmup >= 0")

    def fitted(self, model) -> "EfficiencyConfig":
        """The settings capped at the model's position limit (prompt + new tokens included)."""
        max_pos = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        cfg = dataclasses.replace(self)
        cfg.seq_len = min(cfg.seq_len, max_pos)
        cfg.decode_prompt_len = min(cfg.decode_prompt_len, max(1, max_pos // 2))
        cfg.new_tokens = min(cfg.new_tokens, max(1, max_pos - cfg.decode_prompt_len))
        return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokens(model, batch: int, length: int, seed: int, device) -> torch.Tensor:
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise UsageError("cannot build efficiency inputs: the model config has no vocab_size")
    g = torch.Generator().manual_seed(seed)
    low = min(4, vocab - 1)  # keep clear of the usual special-token ids
    return torch.randint(low, vocab, (batch, length), generator=g).to(device)


def _attention_dim(config) -> int:
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None)
    if heads and head_dim:
        return int(heads) * int(head_dim)
    return int(config.hidden_size)


def _attention_modules(model) -> list[torch.nn.Module]:
    adapter = get_adapter(model)
    found, seen = [], set()
    for layer in adapter.layers:
        for mod in (layer, unwrap_layer(layer)):
            for sub in mod.modules():
                if type(sub).__name__.endswith("Attention") and id(sub) not in seen:
                    seen.add(id(sub))
                    found.append(sub)
    return found


def flops_per_token(model, seq_len: int) -> dict:
    """Forward FLOPs per token at context ``seq_len`` (see the module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = model_device(model)
    ids = _tokens(model, 1, seq_len, 0, device)
    calls = [0]

    def count(_module, _args, _output):
        calls[0] += 1

    handles = [m.register_forward_hook(count) for m in _attention_modules(model)]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    per_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    matmul = sum(v for k, v in per_op.items() if k.split(".")[-1] in ("mm", "addmm"))
    attention = calls[0] * 4 * seq_len * seq_len * _attention_dim(model.config)
    return {"flops_per_token": (matmul + attention) / seq_len, "matmul_flops_per_token": matmul / seq_len,
            "attention_flops_per_token": attention / seq_len, "attention_calls": calls[0], "context": seq_len}


def _timed(fn, device, warmup: int, repeats: int, inner: int = 1) -> list[float]:
    """Seconds per call of ``fn``: ``repeats`` timed runs of ``inner`` calls each, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t) / inner)
    return times


def _inner_loops(fn, device, min_run_s: float) -> int:
    """Calls per timed run so that one run lasts at least ``min_run_s`` (timer and scheduler noise
    would dominate a sub-millisecond forward pass); fn is called once here (a warm-up)."""
    one = max(_timed(fn, device, 0, 1)[0], 1e-6)
    return max(1, min(1000, math.ceil(min_run_s / one)))


def _decode(model, prompt: torch.Tensor, new_tokens: int, device) -> float:
    """Seconds for ``new_tokens`` cached single-token greedy steps after the prompt."""
    out = model(input_ids=prompt, use_cache=True)
    past = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    t = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - t


def _weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints start/stop lines to fd 2; keep them out of the user's terminal."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


def _cpu_peak_bytes(fn) -> int:
    """Peak of (allocated - freed) CPU bytes while ``fn`` runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def _inputs(model, cfg: EfficiencyConfig):
    """``(settings fitted to the model, device, prefill ids, decode prompt)``: the fixed random
    inputs every timing of ``model`` uses (the same seeds for the dense and the pruned model)."""
    cfg = cfg.fitted(model)
    device = model_device(model)
    prefill_ids = _tokens(model, cfg.batch_size, cfg.seq_len, cfg.seed, device)
    prompt = _tokens(model, cfg.decode_batch_size, cfg.decode_prompt_len, cfg.seed + 1, device)
    return cfg, device, prefill_ids, prompt


_BUSY_WARNED = False


@contextlib.contextmanager
def timing_threads(device):
    """On a busy CPU (1-minute load average at or above the core count), time with one thread.

    Measured on the 2-core machine at load average 4 (ref-opt-12l, default settings): one
    measurement took 9.7-10.4 s with 2 threads against 3.2-3.7 s with 1, decoding 56-79 against
    305-458 tokens/s: every small operation's parallel region waits for a thread the kernel has
    descheduled, so a multi-threaded timing under load stalls (an --efficiency sweep that took 54 s
    on a quiet machine did not end within 900 s at load 6). The thread count used is recorded in
    the settings (``torch_threads``); dense and pruned timings are interleaved, so ratios compare
    like with like."""
    global _BUSY_WARNED
    previous = torch.get_num_threads()
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    busy = device.type == "cpu" and previous > 1 and load >= cores
    if busy:
        if not _BUSY_WARNED:
            import sys

            print(f"warning: the machine is busy (load average {load:.1f} on {cores} cores); efficiency is timed "
                  "with 1 thread (multi-threaded timings stall under load; recorded as torch_threads)",
                  file=sys.stderr)
            _BUSY_WARNED = True
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure(model, cfg: EfficiencyConfig, timed: bool = True) -> dict:
    """Absolute efficiency numbers of ``model`` (eval mode, no gradients) under ``cfg``
    (``timed=False``: parameters, FLOPs and memory only); on a busy CPU timed with one thread
    (``timing_threads``)."""
    with timing_threads(model_device(model)):
        return _measure(model, cfg, timed)


def _measure(model, cfg: EfficiencyConfig, timed: bool = True) -> dict:
    cfg.validate()
    model.eval()
    cfg, device, prefill_ids, prompt = _inputs(model, cfg)
    out = {"settings": dataclasses.asdict(cfg) | {"device": str(device), "dtype": str(next(model.parameters()).dtype)
                                                   .replace("torch.", ""), "torch_threads": torch.get_num_threads()},
           "params": count_params(model)}
    with torch.no_grad():
        out.update(flops_per_token(model, cfg.seq_len))
        if timed:
            run = lambda: model(input_ids=prefill_ids, use_cache=False)  # noqa: E731
            inner = _inner_loops(run, device, cfg.min_run_s)
            prefill = _timed(run, device, cfg.warmup, cfg.repeats, inner)
            out["prefill_inner_loops"] = inner
            for _ in range(cfg.warmup):
                _decode(model, prompt, cfg.new_tokens, device)
            decode = [_decode(model, prompt, cfg.new_tokens, device) for _ in range(cfg.repeats)]

        def one_pass():
            model(input_ids=prefill_ids, use_cache=False)
            _decode(model, prompt, cfg.new_tokens, device)

        weights = _weight_bytes(model)
        if device.type == "cuda":
            _sync(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            one_pass()
            _sync(device)
            peak = weights + int(torch.cuda.max_memory_allocated(device)) - before
            how = ("weights and buffers + (torch.cuda.max_memory_allocated - memory_allocated before) over one "
                   "prefill + decode (other models resident on the device are not counted)")
        else:
            peak = weights + _cpu_peak_bytes(one_pass)
            how = ("weights and buffers + peak live CPU allocator bytes (torch profiler memory events) "
                   "over one prefill + decode")
    out.update({"weight_bytes": weights, "peak_memory_bytes": peak, "peak_memory_method": how})
    if timed:
        out.update(_timing_fields(cfg, prefill, decode))
    return out


def _timing_fields(cfg: EfficiencyConfig, prefill: list[float], decode: list[float]) -> dict:
    tokens = cfg.decode_batch_size * cfg.new_tokens
    return {"prefill_latency_s": statistics.median(prefill), "prefill_latency_all_s": prefill,
            "prefill_tokens_per_s": cfg.batch_size * cfg.seq_len / statistics.median(prefill),
            "decode_tokens_per_s": tokens / statistics.median(decode), "decode_seconds_all": decode}


def measure_pair(model, dense_model, cfg: EfficiencyConfig, dense: dict) -> tuple[dict, dict]:
    """``_measure_pair`` with one thread on a busy CPU (``timing_threads``)."""
    with timing_threads(model_device(model)):
        return _measure_pair(model, dense_model, cfg, dense)


def _measure_pair(model, dense_model, cfg: EfficiencyConfig, dense: dict) -> tuple[dict, dict]:
    """``model`` measured with its timed runs interleaved with the dense model's (dense, pruned,
    then pruned, dense, ...), so both medians see the same machine load; returns the pruned
    model's numbers and the dense numbers of this window (``dense``'s FLOPs and memory, fresh timings)."""
    cfg.validate()
    out = _measure(model, cfg, timed=False)  # FLOPs, memory, settings; timings below
    cfg, device, prefill_ids, prompt = _inputs(model, cfg)
    pair = (dense_model, model)
    times = {"prefill": ([], []), "decode": ([], [])}
    with torch.no_grad():
        for m in pair:
            for _ in range(cfg.warmup):
                m(input_ids=prefill_ids, use_cache=False)
                _decode(m, prompt, cfg.new_tokens, device)
        inner = _inner_loops(lambda: dense_model(input_ids=prefill_ids, use_cache=False), device, cfg.min_run_s)
        out["prefill_inner_loops"] = inner
        for r in range(cfg.repeats):
            for k in ((0, 1) if r % 2 == 0 else (1, 0)):
                times["prefill"][k].extend(_timed(lambda m=pair[k]: m(input_ids=prefill_ids, use_cache=False),
                                                  device, 0, 1, inner))
            for k in ((1, 0) if r % 2 == 0 else (0, 1)):
                times["decode"][k].append(_decode(pair[k], prompt, cfg.new_tokens, device))
    out.update(_timing_fields(cfg, times["prefill"][1], times["decode"][1]))
    out["timing"] = "interleaved with the dense model's timed runs"
    dense_now = dict(dense) | _timing_fields(cfg, times["prefill"][0], times["decode"][0])
    return out, dense_now


def paired_iqr(num: list | None, den: list | None) -> list[float] | None:
    """[Q1, Q3] of the ratios num_i / den_i of interleaved timed runs (None without a pair for each)."""
    if not num or not den or len(num) != len(den) or len(num) < 2 or not all(den):
        return None
    q = statistics.quantiles([a / b for a, b in zip(num, den)], n=4, method="inclusive")
    return [q[0], q[2]]


def compare(pruned: dict, dense: dict) -> dict:
    """Ratios of a pruned model's measurements to the dense model's (same process, same settings);
    the speedups' interquartile ranges over the interleaved pairs of timed runs beside them."""
    flop_share = 1.0 - pruned["flops_per_token"] / dense["flops_per_token"]
    return {
        "prefill_speedup_iqr": paired_iqr(dense.get("prefill_latency_all_s"), pruned.get("prefill_latency_all_s")),
        "decode_speedup_iqr": paired_iqr(dense.get("decode_seconds_all"), pruned.get("decode_seconds_all")),
        "prefill_speedup": dense["prefill_latency_s"] / pruned["prefill_latency_s"],
        "decode_speedup": pruned["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
        "memory_ratio": pruned["peak_memory_bytes"] / dense["peak_memory_bytes"],
        "params_ratio": pruned["params"] / dense["params"],
        "removed_flop_share": flop_share,
        "ideal_speedup": 1.0 / (1.0 - flop_share),
    }

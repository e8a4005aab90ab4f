"""Activation capture with forward hooks and streaming layer statistics.

X_0 is the input of decoder layer 0 (embeddings output), X_{i+1} the output of decoder layer
i; X_L is taken from the last layer's output, *before* the final norm, by default
(``top_boundary='pre-norm'``). ``'post-norm'`` applies the model's final norm to it first, as the
released LLM-Streamline ``get_cosine`` and the official ShortGPT code do by reading
``hidden_states[-1]`` of ``output_hidden_states`` (post-norm in Llama-style models). Only windows
that end at the top layer are affected. Every statistic is a running sum over real tokens (attention mask = 1), so
one forward pass of the calibration set scores every window and every layer, with memory
bounded by one batch.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness.model.adapters import ModelAdapter, first_tensor
from harness.model.loading import model_device


@contextmanager
def boundary_hooks(adapter: ModelAdapter, callback, stop_after: int | None = None):
    """Call ``callback(j, X_j)`` for each boundary j = 0..L during forward passes.

    If ``stop_after`` is given, the forward pass is aborted right after X_{stop_after} was
    delivered (raising ``_StopForward``, which ``run_forward`` swallows), so capturing an early
    boundary costs only the layers before it.
    """
    handles = []
    layers = adapter.layers

    def pre_hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        callback(0, hidden)
        if stop_after == 0:
            raise _StopForward

    handles.append(layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
    for i, layer in enumerate(layers):
        def hook(_module, _args, output, j=i + 1):
            callback(j, first_tensor(output))
            if stop_after == j:
                raise _StopForward

        handles.append(layer.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _StopForward(Exception):
    pass


def run_forward(model, input_ids, attention_mask) -> None:
    device = model_device(model)
    try:
        with torch.no_grad():
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    except _StopForward:
        pass


@dataclass
class LayerStats:
    """Mean cosine similarities between boundaries, over real tokens.

    ``window_cos[n][i]`` = mean_t cos(X_i[t], X_{i+n}[t]) for i = 0..L-n (Streamline's S(i)
    for window n; n = 1 gives 1 - BI). ``angular[n][i]`` = mean over sequences of
    arccos(cos(X_i[last], X_{i+n}[last])) / pi on each sequence's last real token.
    """

    num_layers: int
    window_cos: dict[int, list[float]] = field(default_factory=dict)
    angular: dict[int, list[float]] = field(default_factory=dict)
    tokens: int = 0
    sequences: int = 0

    def block_influence(self) -> list[float]:
        """ShortGPT's BI_i = 1 - mean cos(X_i, X_{i+1})."""
        return [1.0 - c for c in self.window_cos[1]]

    def best_window(self, n: int) -> int:
        """Streamline's i* = argmax_i S(i) (first maximum on ties)."""
        scores = self.window_cos[n]
        return max(range(len(scores)), key=lambda i: (scores[i], -i))

    def to_dict(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "tokens": self.tokens,
            "sequences": self.sequences,
            "window_cos": {str(k): v for k, v in self.window_cos.items()},
            "angular": {str(k): v for k, v in self.angular.items()},
        }


class StatsAccumulator:
    """Streaming sums of cos(X_j, X_{j-n}) for a set of lags n, per boundary j."""

    def __init__(self, num_layers: int, lags):
        self.L = num_layers
        self.lags = sorted(set(int(n) for n in lags if 1 <= int(n) <= num_layers))
        self.max_lag = max(self.lags)
        self.cos_sum = {n: torch.zeros(self.L - n + 1, dtype=torch.float64) for n in self.lags}
        self.ang_sum = {n: torch.zeros(self.L - n + 1, dtype=torch.float64) for n in self.lags}
        self.tokens = 0
        self.sequences = 0
        self._mask = None
        self._last_idx = None
        self._states: dict[int, torch.Tensor] = {}  # boundary -> its last-token unit vectors (float64)
        self._dev: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def begin_batch(self, attention_mask: torch.Tensor) -> None:
        self._mask = attention_mask.bool()
        lengths = attention_mask.long().sum(dim=1)
        # last real token per sequence (right padding or left padding both handled)
        positions = torch.arange(attention_mask.shape[1]).expand_as(attention_mask)
        self._last_idx = torch.where(self._mask, positions, torch.full_like(positions, -1)).max(dim=1).values
        self.tokens += int(lengths.sum())
        self.sequences += int((lengths > 0).sum())
        self._states = {}
        self._ring = None  # (tokens, max_lag, d): the unit vectors of the last max_lag boundaries

    def __call__(self, j: int, hidden: torch.Tensor) -> None:
        x = hidden.detach().float()
        dev = x.device
        b, t, d = x.shape
        unit = F.normalize(x.reshape(b * t, d), dim=-1)  # (B*T, d)
        # last real token per sequence, float64: arccos near 1 needs the precision
        last = F.normalize(x[torch.arange(b, device=dev), self._last_idx.to(dev).clamp(min=0)].double(), dim=-1)
        if self._ring is None:
            self._ring = torch.empty(b * t, self.max_lag, d, dtype=unit.dtype, device=dev)
        prev = [n for n in self.lags if j - n in self._states]
        if prev:
            # every lag's cosine at once: one batched dot of each token with its last max_lag boundaries
            filled = self._ring[:, :min(j, self.max_lag)]  # boundary i sits in slot i % max_lag
            cos = torch.bmm(filled, unit.unsqueeze(-1)).squeeze(-1)  # (B*T, filled slots)
            sums = cos[self._mask.to(dev).reshape(-1)].double().sum(0)
            valid = (self._last_idx >= 0).to(dev)
            for n in prev:
                cs, an = self._device_sums(n, dev)  # accumulated on the accelerator: no host sync per layer
                cs[j - n] += sums[(j - n) % self.max_lag].to(cs.device)
                lc = (last * self._states[j - n]).sum(-1).clamp(-1.0, 1.0)
                an[j - n] += (torch.arccos(lc[valid]) / math.pi).double().sum().to(an.device)
        self._ring[:, j % self.max_lag] = unit
        self._states[j] = last
        self._states.pop(j - self.max_lag, None)

    def _device_sums(self, n, dev):
        if n not in self._dev:
            self._dev[n] = (self.cos_sum[n].to(dev), self.ang_sum[n].to(dev))
        return self._dev[n]

    def result(self) -> LayerStats:
        for n, (cs, an) in self._dev.items():
            self.cos_sum[n] = cs.cpu()
            self.ang_sum[n] = an.cpu()
        stats = LayerStats(num_layers=self.L, tokens=self.tokens, sequences=self.sequences)
        for n in self.lags:
            stats.window_cos[n] = (self.cos_sum[n] / max(self.tokens, 1)).tolist()
            stats.angular[n] = (self.ang_sum[n] / max(self.sequences, 1)).tolist()
        return stats


TOP_BOUNDARIES = ("pre-norm", "post-norm")


def collect_layer_stats(model, adapter: ModelAdapter, calibration, lags=(1,), progress: bool = True,
                        top_boundary: str | None = None) -> LayerStats:
    """One forward pass over the calibration set; returns cosine/angular stats for ``lags``.
    ``top_boundary`` (default: the calibration config's) says whether X_L is taken before or after
    the final norm."""
    acc = StatsAccumulator(adapter.num_layers, lags)
    batches = list(calibration.batches())
    top = top_boundary or getattr(calibration.config, "top_boundary", TOP_BOUNDARIES[0])
    if top not in TOP_BOUNDARIES:
        raise ValueError(f"unknown top boundary '{top}'; use one of {TOP_BOUNDARIES}")
    norm = adapter.final_norm if top == "post-norm" else None
    last = adapter.num_layers

    def deliver(j, hidden):
        acc(j, norm(hidden) if j == last and norm is not None else hidden)

    # the pass stops right after X_L: the final norm (applied here when asked) and LM head are not run
    with boundary_hooks(adapter, deliver, stop_after=adapter.num_layers):
        for input_ids, attention_mask in tqdm(batches, desc="scoring layers", disable=not progress):
            acc.begin_batch(attention_mask)
            run_forward(model, input_ids, attention_mask)
    return acc.result()


def iter_boundary_pairs(model, adapter: ModelAdapter, data, start: int, end: int,
                        batch_size: int | None = None, boundaries=None):
    """Yield ``(states, mask)`` per batch, where ``states[j]`` is X_j for each requested j.

    By default the boundaries are ``(start, end)``. The forward pass stops right after X_end,
    so only the layers before the window's end are computed. Nothing is kept between batches.
    """
    wanted = sorted(set(boundaries or (start, end)))
    for input_ids, attention_mask in data.batches(batch_size):
        captured: dict[int, torch.Tensor] = {}

        def grab(j, hidden):
            if j in wanted:
                captured[j] = hidden.detach()

        with boundary_hooks(adapter, grab, stop_after=wanted[-1]):
            run_forward(model, input_ids, attention_mask)
        yield captured, attention_mask.bool()


def cached_layer_stats(cache: dict, model_key: str, model, adapter: ModelAdapter, calibration, lags,
                       progress: bool = True) -> tuple[LayerStats, float | None]:
    """The dense model's statistics for ``lags`` from ``cache`` ({(model, lags): stats}, shared by the
    runner and every method of a run) when a stored pass covers them, else one forward pass, stored.
    Returns the statistics and the seconds the pass took (None when served from the cache)."""
    import time

    lags = tuple(lags)
    for (key, have), stats in cache.items():
        if key == model_key and set(lags) <= set(have):
            return stats, None
    t = time.perf_counter()
    stats = collect_layer_stats(model, adapter, calibration, lags, progress=progress)
    cache[(model_key, lags)] = stats
    return stats, time.perf_counter() - t

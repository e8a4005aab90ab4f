"""LaCo (Yang et al., 2024, "Layer Collapse"): collapse rear layers into a prior layer.

RDSC merge: to collapse layers l+1..l+m into layer l, every non-norm parameter of layer l becomes
theta_l + sum_k (theta_{l+k} - theta_l) (accumulated in float32; norms keep layer l's values), and
layers l+1..l+m are removed.

Search (``laco``, the paper's Algorithm 1, steered to the target n): from l = H - C downwards, merge
m = min(C - 1, layers still to remove) following layers into l tentatively (windows stay below H);
keep the merge if the mean cosine between the merged and the dense model's last hidden states on a
few sentences exceeds T (then l -= I), else roll it back (l -= 1). Short of n, ``fallback=relax``
runs more passes with a lowered T (every pass in the manifest, a warning logged); ``fallback=error``
fails. Merges are done in place with a one-layer backup: the model is never copied.
Defaults, scaled to depth: C = max(3, round(7 L / 40)), H = L - 1, lowest layer 0, I = 1, T = 0.45,
sentences = the first 5 calibration blocks cut to 32 tokens.

``laco-code`` replays the released notebook (yangyifei729/LaCo, commit 8483587) step for step: its
telescoping in-place merge (the merged layer holds layer l+m's weights), windows cut only by the end
of the current model, its index movement, and the similarity after the final norm.

The full description, the cost of a step, and every difference between the two and from the
notebook: docs/methods/laco.md.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness import (
    CalibrationData,
    MethodConfig,
    MethodContext,
    PruneResult,
    UsageError,
    option,
    register_method,
    remove_layers,
    restore_layers,
    snapshot_layers,
)

log = logging.getLogger("streamline_bench")

PAPER_DEPTH, PAPER_C = 40, 7


@dataclass
class LaCoConfig(MethodConfig):
    merge_layers: int | None = option(None, "C (a step merges C-1 layers into one); None = max(3, round(7L/40))")
    highest_layer: int | None = option(None, "H (original index; layers >= H are never merged); None = L-1")
    lowest_layer: int = option(0, "L: lowest merge base")
    interval: int = option(1, "I: step down after an accepted merge")
    threshold: float = option(0.45, "T: accept when similarity > T")
    sentences: list[str] = option(default_factory=list, help="few-shot sentences (default: calibration blocks)")
    sentences_file: str | None = option(None, "one sentence per line")
    num_sentences: int = option(5, "calibration blocks used when no sentences are given")
    sentence_tokens: int = option(32, "tokens kept from each calibration block")
    reference: str = option("dense", "dense | current: the model the merged model is compared with")
    final_norm: bool = option(False, "apply the final norm to X_L before comparing")
    fallback: str = option("relax", "relax | error: what happens when a pass ends short of n")
    relax_step: float = option(0.05, "threshold decrease per extra pass (fallback=relax)")
    def check(self) -> None:
        name = self.method_name
        if self.merge_layers is not None and self.merge_layers < 2:
            raise UsageError(f"{name}.merge_layers={self.merge_layers} is too small; use >= 2 (a step merges C-1 "
                             "layers into one)")
        if self.interval < 1:
            raise UsageError(f"{name}.interval={self.interval} must be >= 1")
        if not -1.0 <= self.threshold <= 1.0:
            raise UsageError(f"{name}.threshold={self.threshold} is not a cosine; use a value in [-1, 1]")
        if self.reference not in ("dense", "current"):
            raise UsageError(f"{name}.reference='{self.reference}' is unknown; use dense or current")
        if self.fallback not in ("relax", "error"):
            raise UsageError(f"{name}.fallback='{self.fallback}' is unknown; use relax or error")
        if self.fallback == "relax" and not self.relax_step > 0:
            raise UsageError(f"{name}.relax_step={self.relax_step} must be > 0")
        if self.num_sentences < 1 or self.sentence_tokens < 1:
            raise UsageError(f"{name} needs num_sentences >= 1 and sentence_tokens >= 1")
        if self.sentences and self.sentences_file:
            raise UsageError(f"give {name}.sentences or {name}.sentences_file, not both")
        if self.sentences_file and not Path(self.sentences_file).is_file():
            raise UsageError(f"{name}.sentences_file '{self.sentences_file}' does not exist; pass a "
                             "text file with one sentence per line")

    def validate(self, num_layers: int, num_remove: int) -> None:
        """The merge range and n against the layer count."""
        from types import SimpleNamespace

        _resolve(SimpleNamespace(num_layers=num_layers, num_remove=num_remove), self, self.method_name)


# --- the merge ---------------------------------------------------------------------------

def rdsc_merge(base: torch.Tensor, following: list[torch.Tensor]) -> torch.Tensor:
    """RDSC: ``base + sum_k (following[k] - base)``, accumulated in float32 (or float64)."""
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    b = base.to(work)
    out = b.clone()
    for t in following:
        out += t.to(work) - b
    return out.to(base.dtype)


def released_code_merge(base: torch.Tensor, following: list[torch.Tensor]) -> torch.Tensor:
    """The released notebook's in-place loop: ``out += following[k] - out`` (telescopes to the last)."""
    out = base.clone()
    for t in following:
        out.add_(t - out)
    return out


def merge_into(adapter, layers, l: int, m: int, merge_fn) -> None:
    """Write the merge of layers l+1..l+m into layer l's attention/MLP tensors (in place): every
    parameter outside the norms, as the model's adapter names them (``adapter.layer_weights``)."""
    base = adapter.layer_weights(layers[l])
    others = [adapter.layer_weights(layers[l + k]) for k in range(1, m + 1)]
    with torch.no_grad():
        for name, p in base.items():
            p.copy_(merge_fn(p.detach(), [o[name].detach() for o in others]))


# --- few-shot sentences and similarity -----------------------------------------------------

def _sentences(ctx: MethodContext, cfg: LaCoConfig) -> tuple[CalibrationData, dict]:
    texts = list(cfg.sentences)
    if cfg.sentences_file:
        path = Path(cfg.sentences_file).expanduser()
        if not path.is_file():
            raise UsageError(f"laco.sentences_file '{cfg.sentences_file}' does not exist; pass a text file "
                             "with one sentence per line")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise UsageError(f"laco.sentences_file '{cfg.sentences_file}' has no sentences; put one per line")
    if texts:
        ids = [list(ctx.tokenizer(t)["input_ids"]) for t in texts]
        if any(len(x) == 0 for x in ids):
            raise UsageError("laco.sentences contains an empty sentence; remove it")
        width = max(len(x) for x in ids)
        pad = getattr(ctx.tokenizer, "pad_token_id", None) or 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        desc = {"source": "sentences_file" if cfg.sentences_file else "sentences", "count": len(ids),
                "tokens": int(mask.sum())}
    else:
        k = min(cfg.num_sentences, len(ctx.calibration))
        input_ids = ctx.calibration.input_ids[:k, : cfg.sentence_tokens].clone()
        mask = ctx.calibration.attention_mask[:k, : cfg.sentence_tokens].clone()
        desc = {"source": "calibration", "count": k, "tokens_each": int(input_ids.shape[1]),
                "calibration_seed": ctx.calibration.description.get("seed")}
    return CalibrationData(input_ids, mask, ctx.calibration.config, desc), desc


def try_merge(ctx: MethodContext, l: int, m: int, merge_fn, ref, data: CalibrationData, final_norm: bool,
              threshold: float) -> tuple[float, bool]:
    """One search step of both loops: merge layers l+1..l+m into (the method's own copy of) layer l,
    remove them, and compare the model's final states with ``ref``. Kept when the similarity
    exceeds ``threshold``; otherwise the layer list and layer l's tensors are restored exactly
    (memory: one layer's backup, never a model copy). Returns ``(similarity, accepted)``."""
    adapter = ctx.adapter
    snap = snapshot_layers(adapter)
    ctx.own_layer(l)  # the merge writes into layer l: a copy, never the dense model's (shared) layer
    layers = list(adapter.layers)  # snap keeps the shared layer: a rejected merge restores it
    backup = {k: v.detach().clone() for k, v in adapter.layer_weights(layers[l]).items()}
    merge_into(adapter, layers, l, m, merge_fn)
    remove_layers(adapter, range(l + 1, l + 1 + m))
    sim = _similarity(ref, _final_states(ctx, data, final_norm))
    ok = sim > threshold
    if not ok:
        with torch.no_grad():
            for k, v in adapter.layer_weights(layers[l]).items():
                v.copy_(backup[k])
        restore_layers(adapter, snap)
    return sim, ok


def _final_states(ctx: MethodContext, data: CalibrationData, final_norm: bool) -> list[torch.Tensor]:
    """Per sentence: X_L on its real tokens, flattened (float64)."""
    last = ctx.adapter.num_layers
    norm = ctx.adapter.final_norm if final_norm else None
    out = []
    with torch.no_grad():
        for states, mask in ctx.boundary_pairs(data, last, last, batch_size=len(data), boundaries=(last,)):
            x = states[last]
            if norm is not None:
                x = norm(x)
            mask = mask.to(x.device)
            for b in range(x.shape[0]):
                out.append(x[b][mask[b]].double().flatten())
    return out


def _similarity(ref: list[torch.Tensor], cur: list[torch.Tensor]) -> float:
    sims = []
    for a, b in zip(ref, cur):
        b = b.to(a.device)
        denom = a.norm() * b.norm()
        sims.append(float((a @ b) / denom) if denom > 0 else float("nan"))
    s = sum(sims) / len(sims)
    return s if math.isnan(s) else max(-1.0, min(1.0, s))


# --- the search -----------------------------------------------------------------------------

def _resolve(ctx: MethodContext, cfg: LaCoConfig, name: str) -> tuple[int, int, int]:
    L0, n = ctx.num_layers, ctx.num_remove
    H = cfg.highest_layer if cfg.highest_layer is not None else L0 - 1
    lo = cfg.lowest_layer
    if cfg.merge_layers is not None:
        C = cfg.merge_layers
    else:  # scaled default, shrunk (never below 2) when the merge range is shorter than that
        C = max(2, min(max(3, round(PAPER_C * L0 / PAPER_DEPTH)), H - lo))
    if not 0 <= lo < L0 or not lo + 2 <= H <= L0:
        raise UsageError(f"{name}: merge range lowest_layer={lo}, highest_layer={H} does not fit {L0} layers; "
                         f"need 0 <= lowest_layer and lowest_layer + 2 <= highest_layer <= {L0}")
    if H - C < lo:
        raise UsageError(f"{name}.merge_layers={C} does not fit the merge range [{lo}, {H}); "
                         f"use merge_layers <= {H - lo}")
    if n > H - 1 - lo:
        raise UsageError(f"{name} cannot remove {n} layers within the merge range [{lo}, {H}) "
                         f"(at most {H - 1 - lo}); lower {name}.lowest_layer or raise {name}.highest_layer")
    return C, H, lo


def laco_search(ctx: MethodContext, cfg: LaCoConfig, merge_fn, name: str) -> PruneResult:
    """The paper's Algorithm 1 (see the module docstring): the window stays below H."""
    return _search(ctx, cfg, merge_fn, name, released=False)


def released_search(ctx: MethodContext, cfg: LaCoConfig, merge_fn, name: str) -> PruneResult:
    """The released notebook's search loop (see the module docstring), steered to the target n.

    ``lay`` is a position in the current (partly merged) layer list, as in the notebook. Each
    step merges m = min(C - 1, layers after ``lay``, layers still to remove) following layers
    into ``lay``: the window is capped by the end of the *current* model, not by H, so after an
    accepted merge it may take in the original top layers. Accepted: ``lay -= I`` (and the
    notebook's reset to ``#layers - 1 - C`` when ``lay`` is past the end, unreachable for
    I >= 1, kept for fidelity). Rejected: ``lay -= 1``. A pass ends when ``lay < L`` or n
    layers are gone.
    """
    return _search(ctx, cfg, merge_fn, name, released=True)


@dataclass
class _Search:
    """A search's state across its passes."""
    orig: list  # original index of each current position
    ref: object  # the reference final states (dense, or the current model's with reference=current)
    removed: list = field(default_factory=list)
    merges: list = field(default_factory=list)
    candidates: list = field(default_factory=list)


def _one_pass(ctx, cfg, merge_fn, st: _Search, data, p: int, threshold: float, bounds: tuple, n: int,
              released: bool) -> dict:
    """One pass at ``threshold``: walk the merge base down, merging where the similarity holds."""
    C, H, lo = bounds
    adapter = ctx.adapter
    merge_keys = ("position",) * released + ("layer", "merged", "similarity", "threshold", "pass")
    evaluated = accepted = 0
    # the notebook starts at H - C; a relaxed pass (harness addition) starts at the current
    # position of original layer H, minus C (the same place while nothing is merged)
    orig = st.orig
    l = max(lo, sum(1 for o in orig if o < H) - C)
    while l >= lo and len(st.removed) < n:
        l, m = _step(adapter, orig, l, C, H, n - len(st.removed), released)
        if l < lo or m < 1:  # paper: no window fits below H; released: cannot happen, never loop idle
            break
        sim, ok = try_merge(ctx, l, m, merge_fn, st.ref, data, cfg.final_norm, threshold)
        evaluated += 1
        entry = {"pass": p, **({"position": l} if released else {}), "layer": orig[l],
                 "merged": orig[l + 1: l + 1 + m], "similarity": sim, "threshold": threshold, "accepted": ok}
        st.candidates.append(entry)
        if ok:
            accepted += 1
            st.removed.extend(orig[l + 1: l + 1 + m])
            st.merges.append({k: entry[k] for k in merge_keys})
            del orig[l + 1: l + 1 + m]
            if cfg.reference == "current":
                st.ref = _final_states(ctx, data, cfg.final_norm)
            l -= cfg.interval
            if released and l >= adapter.num_layers:  # the notebook's reset (unreachable for interval >= 1)
                l = adapter.num_layers - 1 - C
        else:
            l -= 1
    return {"threshold": threshold, "evaluated": evaluated, "accepted": accepted}


def _search(ctx: MethodContext, cfg: LaCoConfig, merge_fn, name: str, released: bool) -> PruneResult:
    """Both searches: passes at a relaxing threshold, each walking the merge base ``l`` (a position
    in the current layer list) down from H - C. They differ only in the window at each step
    (``_step``) and the notebook's reset after an accepted merge."""
    n = ctx.num_remove
    ctx.check_window(n)
    C, H, lo = _resolve(ctx, cfg, name)
    t0 = time.perf_counter()
    data, sent_desc = _sentences(ctx, cfg)
    st = _Search(orig=list(range(ctx.num_layers)), ref=_final_states(ctx, data, cfg.final_norm))
    removed, passes = st.removed, []
    threshold = cfg.threshold
    max_passes = 1 if cfg.fallback == "error" else math.ceil((cfg.threshold + 1.0) / cfg.relax_step) + 2
    for p in range(max_passes):
        if p:
            threshold = cfg.threshold - p * cfg.relax_step
            log.warning("%s: threshold %.3f removed %d of %d layers; relaxing to %.3f (recorded in the manifest)",
                        name, passes[-1]["threshold"], len(removed), n, threshold)
        passes.append(_one_pass(ctx, cfg, merge_fn, st, data, p, threshold, (C, H, lo), n, released))
        if len(removed) >= n:
            break
        if cfg.fallback == "error":
            raise UsageError(f"{name}: threshold {cfg.threshold} removed only {len(removed)} of {n} layers; "
                             f"lower {name}.threshold or use {name}.fallback=relax")
    if len(removed) < n:
        raise UsageError(f"{name}: removed only {len(removed)} of {n} layers even at threshold {threshold:.3f} "
                         "(similarities were NaN?); check the model's outputs or the merge range")
    ctx.timings["search"] = time.perf_counter() - t0
    rule = {"merge_rule": "rdsc" if merge_fn is rdsc_merge else "released-code"}
    if released:
        rule["search"] = "released-notebook"
    return PruneResult(
        model=ctx.model, removed_layers=sorted(removed),
        scores={"candidates": st.candidates, "passes": passes, "threshold": cfg.threshold,
                "threshold_final": threshold},
        extra={"laco": {"merges": st.merges, **rule,
                        "merge_layers": C, "highest_layer": H, "lowest_layer": lo, "interval": cfg.interval,
                        "reference": cfg.reference, "final_norm": cfg.final_norm, "sentences": sent_desc,
                        "requested": n, "removed": len(removed)}},
    )


def _step(adapter, orig: list[int], l: int, C: int, H: int, remaining: int, released: bool) -> tuple[int, int]:
    """The merge base and the number m of following layers merged into it at this step.

    Paper: m = min(C - 1, layers still to remove), and the window l..l+m stays below original
    layer H (``l`` moves down if it must). Released notebook: the window is capped by the end of
    the current model instead, ``l`` stays."""
    if released:
        return l, min(C - 1, adapter.num_layers - l - 1, remaining)
    hi = sum(1 for o in orig if o < H)  # positions 0..hi-1 may be merged
    m = min(C - 1, remaining)
    return min(l, hi - 1 - m), m


@register_method("laco", LaCoConfig, "LaCo: collapse rear layers into a prior one (RDSC merge, threshold search)")
def laco(ctx: MethodContext, cfg: LaCoConfig) -> PruneResult:
    return laco_search(ctx, cfg, rdsc_merge, "laco")


@dataclass
class LaCoCodeConfig(LaCoConfig):
    """``laco-code``'s options: LaCo's, but the similarity is taken after the final norm by default,
    as the released notebook's ``hidden_states[-1]`` is."""

    final_norm: bool = option(True, "apply the final norm to X_L before comparing (the notebook's hidden_states[-1])")


@register_method("laco-code", LaCoCodeConfig,
                 "LaCo as released: the notebook's search loop and in-place merge (a copy of the last merged layer)")
def laco_code(ctx: MethodContext, cfg: LaCoCodeConfig) -> PruneResult:
    return released_search(ctx, cfg, released_code_merge, "laco-code")

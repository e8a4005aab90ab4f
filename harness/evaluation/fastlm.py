"""A faster ``loglikelihood`` for lm-eval's ``HFLM``: the LM head and log-softmax only where a
token is scored (``--eval-impl fast``, the default; ``stock`` is lm-eval's own path).

lm-eval's ``HFLM._loglikelihood_tokens`` computes logits and a log-softmax over the whole
vocabulary at every position of every padded row, then keeps only the continuation positions.
With a large vocabulary that is most of the work (Gemma 3 270M, 262k tokens: ~77% of the forward
time). ``FastLoglikelihood`` overrides only that method and keeps everything else of lm-eval's:
the same ``Collator`` (sort order, the one-token-continuation cache of ``group_by="contexts"``),
the same batches (fixed or ``auto``), left truncation to ``max_length``, right padding
(``pad_and_concat``), the same ``_model_call`` (no_grad, autocast), ``softmax_dtype``, greedy
check (argmax over the full vocabulary at the scored positions), cache hooks, progress bar and
return order. ``loglikelihood_rolling`` goes through the same method (it scores every position
of each window, so it saves little there, but stays exact).

How only the scored positions reach the head: a forward pre-hook on the model's output
embedding (``get_output_embeddings()``, the module the ``*ForCausalLM`` applies to the decoder's
final hidden states) replaces its input ``[B, T, H]`` by the ``N`` scored rows ``[1, N, H]``.
Everything before the head (decoder layers, replaced layers, the final norm, OPT's
``project_out``) and after it (Gemma 2/3's ``final_logit_softcapping``, Granite's and Cohere's
logit scaling, ...) is the model's own code, run unchanged, so no family's head arithmetic is
re-implemented here. The rows are gathered on the hidden states' device; a model placed with
``device_map`` moves them to the head's device itself (accelerate's hook runs after this one).

A model the fast path cannot serve falls back to lm-eval's path with one logged warning per
reason: a non-causal backend (encoder-decoder), no output-embedding module, or - found on the
first batch - a head that is not called exactly once on ``[B, T, H]`` states or whose logits do
not come back as ``[1, N, V]``. Such a failure after a successful first batch is an error, never
a silent switch. ``eval_impl_used`` says which path ran (recorded in the run's eval details).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from harness.evaluation.scored import GatherScored, warn_once
from harness.evaluation.shared_context import score_shared

_HF_LOG = logging.getLogger("lm_eval.models.huggingface")  # lm-eval's own truncation warning goes here
_CLASSES: dict[type, type] = {}


class FastPathUnsupported(Exception):
    """The model's structure does not allow gathering the scored positions before its head."""


def unsupported_reason(lm) -> str | None:
    """Why ``lm`` (an HFLM) cannot take the fast path before running anything, or None."""
    if getattr(lm, "backend", None) != "causal":
        return f"backend '{getattr(lm, 'backend', None)}' is not a decoder-only causal LM"
    model = lm.model
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return f"{type(model).__name__} is an encoder-decoder model"
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module):
        return f"{type(model).__name__} has no output-embedding (LM head) module"
    return None


def _collate(req):  # lm-eval's sort key: longest first, ties by tokens
    toks = req[1] + req[2]
    return -len(toks), tuple(toks)


def _lookup_one_token_cont(req):  # lm-eval's one-token cache key: context + continuation[:-1]
    return req[-2] + req[-1][:-1]


class FastLoglikelihood:
    """Mixin over ``HFLM`` (or its data-parallel subclass): see the module docstring."""

    eval_impl = "fast"  # or "fast-shared" (make_lm sets both)
    share_contexts = False  # also run a context shared by several requests once (shared_context.py)
    _fast_verified = False  # a first batch went through the fast path and passed every check
    _fast_fallback: str | None = None  # why this model uses lm-eval's path instead
    _shared_verified = False  # a packed batch of shared contexts matched the plain path (shared_context.py)
    _shared_fallback: str | None = None  # why contexts are not shared after all
    _shared_deep_verified = False  # ... and a packed row deeper than the sliding window did too
    _shared_deep_fallback = False  # rows deeper than the sliding window are scored the plain way

    @property
    def eval_impl_used(self) -> str:
        if self._fast_fallback is not None:
            return f"stock (fast path unsupported: {self._fast_fallback})"
        if self.eval_impl == "fast-shared" and self._shared_fallback is not None:
            return f"fast (contexts not shared: {self._shared_fallback})"
        if self.eval_impl == "fast-shared" and self.batch_size == "auto":
            return "fast (contexts not shared with lm-eval's automatic batch size)"
        return self.eval_impl

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self._fast_fallback is None and not self._fast_verified:
            self._fast_fallback = unsupported_reason(self)
        if self._fast_fallback is not None:
            warn_once(self._fast_fallback)
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        try:
            return self._fast_loglikelihood_tokens(requests, disable_tqdm, override_bs)
        except FastPathUnsupported as exc:
            if self._fast_verified:  # the first batch passed: a later failure is a bug, not a model property
                raise RuntimeError(f"--eval-impl fast: {exc} (after earlier batches passed); "
                                   "rerun with --eval-impl stock and report this") from None
            self._fast_fallback = str(exc)  # raised on the first batch, before any result or cache hook
            warn_once(self._fast_fallback)
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    # --- lm-eval's _loglikelihood_tokens (causal branch), scored positions only ------------------
    def _fast_loglikelihood_tokens(self, requests, disable_tqdm, override_bs):
        from lm_eval.models.utils import Collator
        from tqdm import tqdm

        res = []
        re_ord = Collator(requests, sort_fn=_collate, group_by="contexts" if self.logits_cache else None,
                          group_fn=_lookup_one_token_cont)
        n_reordered = len(re_ord)
        batch_size = self.batch_size if self.batch_size != "auto" else override_bs if override_bs is not None else 0
        batch_fn = (self._batch_scheduler if self.batch_size == "auto" and n_reordered > 0 and not override_bs
                    else None)
        if batch_fn is not None:
            self.batch_sizes = {}  # lm-eval re-detects per call (its issue 1678)
        pbar = tqdm(total=len(requests), disable=(disable_tqdm or (self.rank != 0)),
                    desc="Running loglikelihood requests")
        try:
            if self.share_contexts and self.logits_cache and batch_fn is None:
                score_shared(self, re_ord, batch_size, res, pbar)
            else:
                for chunk in re_ord.get_batched(n=batch_size, batch_fn=batch_fn):
                    self._score_chunk(chunk, re_ord, res, pbar)
        finally:
            pbar.close()
        return re_ord.get_original(res)

    def _input(self, context_enc: list[int], continuation_enc: list[int]) -> list[int]:
        """lm-eval's model input for one request: left-truncated to max_length, last token dropped."""
        assert len(context_enc) > 0
        assert len(continuation_enc) > 0
        assert len(continuation_enc) <= self.max_length
        total_length = len(context_enc) + len(continuation_enc)
        if total_length > self.max_length + 1:
            _HF_LOG.warning(
                f"Combined length of context ({len(context_enc)}) and continuation "
                f"({len(continuation_enc)}) exceeds model's maximum length ({self.max_length}). "
                f"Truncating {total_length - self.max_length + 1} tokens from the left.")
        return (context_enc + continuation_enc)[-(self.max_length + 1):][:-1]

    def _score_chunk(self, chunk, re_ord, res: list, pbar) -> None:
        """One batch of lm-eval's: right-padded rows, one forward pass, answers appended to ``res``."""
        scored = self._plain_log_probs(chunk)
        self._fast_verified = True
        for req, logits in zip(chunk, scored, strict=True):
            self._answer(req, logits, re_ord, res, pbar)

    def _plain_log_probs(self, chunk) -> tuple[torch.Tensor, ...]:
        """``[contlen, vocab]`` log-probs per request of ``chunk``, from lm-eval's right-padded rows."""
        from lm_eval.models.utils_hf import pad_and_concat

        inps = [torch.tensor(self._input(ctx, cont), dtype=torch.long, device=self.device) for _, ctx, cont in chunk]
        inplens = [inp.shape[0] for inp in inps]
        batched_inps = pad_and_concat(max(inplens), inps, padding_side="right")
        return self._scored_log_probs(batched_inps, inplens, [len(req[2]) for req in chunk])

    def _answer(self, req, logits: torch.Tensor, re_ord, res: list, pbar) -> None:
        """lm-eval's per-request scoring from the ``[contlen, vocab]`` log-probs of ``req`` (and of
        the requests the one-token cache groups with it)."""
        request_str, ctx_tokens, cont_toks = req
        logits = logits.unsqueeze(0)  # [1, contlen, vocab]
        greedy_tokens = logits.argmax(dim=-1)
        for request_str, cont_toks, logits in re_ord.get_cache(  # noqa: B020 - lm-eval's loop
                req_str=request_str, cxt_toks=ctx_tokens, cont_toks=cont_toks, logits=logits):
            cont_toks = torch.tensor(cont_toks, dtype=torch.long, device=logits.device).unsqueeze(0)
            max_equal = (greedy_tokens[:, -cont_toks.shape[1]:] == cont_toks).all()
            logits = torch.gather(logits, 2, cont_toks.unsqueeze(-1)).squeeze(-1)
            answer = (float(logits.sum()), bool(max_equal))
            res.append(answer)
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
            pbar.update(1)

    def _call(self, **kwargs):
        """``self.model(**kwargs)`` under lm-eval's ``_model_call`` context (no_grad, autocast)."""
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            return self.model(**kwargs)

    def _head_call(self, gather: "GatherScored", n: int, fn):
        """Run ``fn()`` (a forward pass) with ``gather`` on the LM head; check the head saw one
        ``[B, T, H]`` input and the logits came back ``[1, n, V]``; returns the model output."""
        handle = self.model.get_output_embeddings().register_forward_pre_hook(gather)
        try:
            out = fn()
        finally:
            handle.remove()
        logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
        if gather.error is None and gather.calls != 1:
            gather.error = f"the LM head was called {gather.calls} times in one forward pass (expected once)"
        if gather.error is None and (not isinstance(logits, torch.Tensor) or logits.dim() != 3
                                     or tuple(logits.shape[:2]) != (1, n)):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            gather.error = f"the model's logits came back as {shape}, not [1, {n}, vocab]"
        if gather.error is not None:
            raise FastPathUnsupported(gather.error)
        return out

    def _scored_log_probs(self, batched_inps: torch.Tensor, inplens: list[int],
                          contlens: list[int]) -> tuple[torch.Tensor, ...]:
        """Per row, the log-softmax ``[contlen, vocab]`` at the ``contlen`` positions before
        ``inplen`` (lm-eval's ``_select_cont_toks``), the head applied at those positions only."""
        rows = torch.cat([torch.full((c,), i, dtype=torch.long) for i, c in enumerate(contlens)])
        cols = torch.cat([torch.arange(n - c, n, dtype=torch.long) for n, c in zip(inplens, contlens, strict=True)])
        gather = GatherScored(rows, cols, batched_inps.shape[0], batched_inps.shape[1])
        logits = self._head_call(gather, rows.numel(), lambda: self._model_call(batched_inps))
        logp = F.log_softmax(logits[0], dim=-1, dtype=self.softmax_dtype)  # [N, vocab]
        return logp.split(contlens, dim=0)


def fast_class(base: type) -> type:
    """``base`` (HFLM or a subclass) with the fast loglikelihood path; one class per base."""
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Fast{base.__name__}", (FastLoglikelihood, base), {
            "__doc__": f"{base.__name__} with harness.evaluation.fastlm's loglikelihood path."})
    return _CLASSES[base]

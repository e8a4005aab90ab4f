"""Finite-number guards: NaN or infinity is never a result.

``first_nonfinite`` finds the first non-finite number in nested JSON-like data (a score vector,
a training log, a metrics dict) and says where it is; ``FirstForwardGuard`` hooks one forward pass
(embeddings, decoder layers, logits) and names the first place whose output is not finite;
``first_nonfinite_layer`` runs such a pass.
"""
from __future__ import annotations

import math
import numbers


def first_tensor(output):
    """The hidden states in a decoder layer's output (a tensor, or a tuple starting with one)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"no hidden states in a layer output of type {type(output)}")


def _bad(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return not math.isfinite(float(value))
    except (OverflowError, ValueError):
        return True


def first_nonfinite(data, where: str = "") -> str | None:
    """Path (``metrics.piqa.acc``, ``scores[3]``) of the first NaN/inf in ``data``, or None.

    Tensors and arrays count element-wise."""
    if _bad(data):
        return where or "value"
    if isinstance(data, dict):
        for k, v in data.items():
            hit = first_nonfinite(v, f"{where}.{k}" if where else str(k))
            if hit:
                return hit
        return None
    if isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            hit = first_nonfinite(v, f"{where}[{i}]")
            if hit:
                return hit
        return None
    if hasattr(data, "dtype") and hasattr(data, "tolist") and not isinstance(data, (str, bytes)):
        try:
            import torch

            if isinstance(data, torch.Tensor):
                if data.is_floating_point() and not bool(torch.isfinite(data).all()):
                    idx = int((~torch.isfinite(data.flatten())).nonzero()[0])
                    return f"{where or 'tensor'}[{idx}]"
                return None
        except ImportError:  # pragma: no cover
            pass
        return first_nonfinite(data.tolist(), where)
    return None


def first_nonfinite_layer(model, adapter, input_ids, attention_mask=None) -> str | None:
    """One forward pass; the first of embeddings / decoder layer i / logits whose output holds
    NaN or infinity (``"decoder layer 3"``), or None when everything is finite."""
    import torch

    from harness.errors import NonFiniteOutput

    device = next(model.parameters()).device
    try:
        with torch.no_grad(), FirstForwardGuard(model, adapter):
            model(input_ids=input_ids.to(device),
                  attention_mask=None if attention_mask is None else attention_mask.to(device), use_cache=False)
    except NonFiniteOutput as e:
        return e.where
    return None


DEFAULT_MAX_LOSS_GROWTH = 2.0  # a training run ending above 2x its first loss has diverged


def _training_logs(data, where: str = ""):
    """Every training log in a manifest: dicts with ``epoch_loss`` or ``loss_first``/``loss_last``."""
    if isinstance(data, dict):
        if isinstance(data.get("epoch_loss"), list) or ("loss_first" in data and "loss_last" in data):
            yield where or "training", data
        for k, v in data.items():
            yield from _training_logs(v, f"{where}.{k}" if where else str(k))
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            yield from _training_logs(v, f"{where}[{i}]")


def training_failure(manifest: dict, max_growth: float = DEFAULT_MAX_LOSS_GROWTH) -> str | None:
    """Why a method's training diverged (a non-finite loss, or a final loss above its starting
    loss x ``max_growth``), or None when every training log in ``manifest`` is sound."""
    for where, log in _training_logs(manifest):
        hit = first_nonfinite(log)
        if hit:
            return f"non-finite training value at {where}.{hit}" if not hit.startswith("[") else \
                f"non-finite training value at {where}{hit}"
        if isinstance(log.get("epoch_loss"), list) and log["epoch_loss"]:
            start = log.get("loss_first_step", log["epoch_loss"][0])
            final = log["epoch_loss"][-1]
        else:
            start, final = log.get("loss_first"), log.get("loss_last")
        if isinstance(start, (int, float)) and isinstance(final, (int, float)) and start > 0 \
                and final > start * max_growth:
            return (f"training diverged ({where}): final loss {final:.4g} > {max_growth:g} x starting loss "
                    f"{start:.4g}; lower the learning rate (or raise --max-loss-growth)")
    return None


class FirstForwardGuard:
    """Checks the first forward pass of ``model`` inside the ``with`` block (lm-eval's first
    batch, or ``first_nonfinite_layer``'s pass): NaN/inf in the input embeddings, any decoder
    layer's output or the logits raises ``NonFiniteOutput`` naming the first such place. Later
    passes run without hooks."""

    def __init__(self, model, adapter):
        self.model, self.adapter = model, adapter
        self.handles: list = []
        self.found: list[str] = []

    def __enter__(self):
        import torch

        def nonfinite(t) -> bool:
            return isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())

        def part_hook(label):
            def fn(_m, _i, output):
                if self.found:
                    return
                try:
                    t = first_tensor(output)
                except TypeError:
                    return
                if nonfinite(t):
                    self.found.append(label)
            return fn

        def model_hook(_m, _i, output):
            from harness.errors import NonFiniteOutput

            logits = getattr(output, "logits", None)
            if logits is None and isinstance(output, (tuple, list)) and output:
                logits = output[0]
            where = self.found[0] if self.found else ("the output head (logits)" if nonfinite(logits) else None)
            self._remove()
            if where:
                raise NonFiniteOutput(where)

        emb = self.model.get_input_embeddings()
        if emb is not None:
            self.handles.append(emb.register_forward_hook(part_hook("the input embeddings")))
        for i, layer in enumerate(self.adapter.layers):
            self.handles.append(layer.register_forward_hook(part_hook(f"decoder layer {i}")))
        self.handles.append(self.model.register_forward_hook(model_hook))
        return self

    def _remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def __exit__(self, *exc):
        self._remove()
        return False


def map_leaves(data, fn):
    """A copy of JSON-like ``data`` (dicts, lists, tuples as lists) with ``fn`` applied to every leaf."""
    if isinstance(data, dict):
        return {k: map_leaves(v, fn) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [map_leaves(v, fn) for v in data]
    return fn(data)


def finite_or_none(data):
    """A copy of JSON-like ``data`` with every NaN/inf replaced by None (for a failed run's
    diagnostic log, which is stored but never read as a number)."""
    return map_leaves(data, lambda v: None if _bad(v) else v)

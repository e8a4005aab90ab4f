"""Finite-number guards: NaN or infinity is never a result.

``first_nonfinite`` finds the first non-finite number in nested JSON-like data (a score vector,
a training log, a metrics dict) and says where it is; ``first_nonfinite_layer`` runs one forward
pass with hooks on the decoder layers and names the first layer whose output is not finite.
"""
from __future__ import annotations

import math
import numbers


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

    from harness.model.adapters import first_tensor
    from harness.model.loading import model_device

    found: list[str] = []
    handles = []

    def hook(label):
        def fn(_module, _inputs, output):
            if found:
                return
            try:
                t = first_tensor(output)
            except TypeError:
                return
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                found.append(label)
        return fn

    emb = model.get_input_embeddings()
    if emb is not None:
        handles.append(emb.register_forward_hook(hook("the input embeddings")))
    for i, layer in enumerate(adapter.layers):
        handles.append(layer.register_forward_hook(hook(f"decoder layer {i}")))
    try:
        device = model_device(model)
        with torch.no_grad():
            out = model(input_ids=input_ids.to(device),
                        attention_mask=None if attention_mask is None else attention_mask.to(device),
                        use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if found:
        return found[0]
    logits = getattr(out, "logits", None)
    if logits is not None and not bool(torch.isfinite(logits).all()):
        return "the output head (logits)"
    return None

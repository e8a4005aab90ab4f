"""wikitext-2 perplexity with a fixed window (Hugging Face's fixed-length recipe)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from harness.errors import UsageError
from harness.evaluation.eval_config import WIKITEXT_LOCAL, EvalConfig
from harness.model.loading import model_device


def load_wikitext_test(data_dir: str | None) -> str:
    if data_dir:
        path = Path(data_dir) / WIKITEXT_LOCAL
        rows = [json.loads(line)["text"] for line in path.open(encoding="utf-8") if line.strip()]
        return "\n\n".join(rows)
    try:
        import datasets

        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as exc:  # noqa: BLE001
        raise UsageError(
            f"could not load wikitext-2 test from the Hub ({type(exc).__name__}); offline, pass --data-dir"
        ) from exc
    return "\n\n".join(ds["text"])


def _exp(x: float) -> float:
    """exp, with an overflow as infinity (the runner's finite check then fails the run)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def perplexity(model, tokenizer, cfg: EvalConfig, progress: bool = True) -> dict:
    """Fixed-window perplexity on wikitext-2-raw test (``"\\n\\n".join(texts)``).

    Windows of ``seq_len`` tokens advance by ``stride``; only the tokens not scored by the
    previous window are counted (Hugging Face's fixed-length perplexity recipe).
    """
    text = load_wikitext_test(cfg.data_dir)
    ids = tokenizer(text, return_tensors="pt").input_ids
    max_pos = getattr(model.config, "max_position_embeddings", 2048) or 2048
    seq_len = cfg.ppl_seq_len or min(2048, max_pos)
    if seq_len > max_pos:
        raise UsageError(f"--ppl-seq-len {seq_len} exceeds the model's {max_pos} positions")
    stride = cfg.ppl_stride or seq_len
    if not 0 < stride <= seq_len:
        raise UsageError(f"--ppl-stride {stride} must be between 1 and the window length {seq_len}")
    device = model_device(model)
    total = ids.shape[1]
    starts = list(range(0, total, stride))
    if cfg.ppl_max_windows:
        starts = starts[: cfg.ppl_max_windows]
    nll_sum, counted, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in tqdm(starts, desc="perplexity", disable=not progress):
            end = min(begin + seq_len, total)
            trg_len = end - prev_end
            input_ids = ids[:, begin:end].to(device)
            labels = input_ids.clone()
            labels[:, :-trg_len] = -100
            logits = model(input_ids=input_ids, use_cache=False).logits.float()
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1)
            loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
            nll_sum += float(loss)
            counted += int((shift_labels != -100).sum())
            prev_end = end
            if end == total:
                break
    return {
        "ppl": _exp(nll_sum / max(counted, 1)),
        "nll_per_token": nll_sum / max(counted, 1),
        "seq_len": seq_len,
        "stride": stride,
        "windows": len(starts),
        "scored_tokens": counted,
        "total_tokens": total,
        "dataset": "wikitext-2-raw-v1 test",
    }

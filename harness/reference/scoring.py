"""Minimal, self-contained measurement code for the reference models (independent of the harness).

* ``evaluate_suite``: lm-eval style multiple choice. For each choice, the sum of the log-probs of
  its tokens given the query (``acc``) and that sum divided by the choice's length in bytes
  (``acc_norm``); query and choice are concatenated with no delimiter.

It is fast enough to probe accuracy during training; ``run_benchmarks.py`` measures the same
numbers through lm-eval (tests/test_reference.py checks that the two agree).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F


def load_suite(suite_dir: Path) -> tuple[dict, dict[str, list[dict]]]:
    meta = json.loads((suite_dir / "suite.json").read_text(encoding="utf-8"))
    tasks = {}
    for task, info in meta["tasks"].items():
        lines = (suite_dir / info["file"]).read_text(encoding="utf-8").splitlines()
        tasks[task] = [json.loads(line) for line in lines if line.strip()]
    return meta, tasks


@torch.no_grad()
def choice_logprobs(model, tokenizer, items: list[dict], batch_size: int = 64) -> list[list[float]]:
    """Sum of log-probs of each choice continuation, per item."""
    pad = tokenizer.pad_token_id
    reqs = []  # (item index, choice index, ids, n_choice_tokens)
    for i, it in enumerate(items):
        q = tokenizer(it["query"], add_special_tokens=False)["input_ids"]
        for j, ch in enumerate(it["choices"]):
            whole = tokenizer(it["query"] + ch, add_special_tokens=False)["input_ids"]
            assert whole[:len(q)] == q, "query/choice boundary does not tokenize cleanly"
            reqs.append((i, j, whole, len(whole) - len(q)))
    out = [[0.0] * len(it["choices"]) for it in items]
    model.eval()
    for s in range(0, len(reqs), batch_size):
        chunk = reqs[s:s + batch_size]
        T = max(len(r[2]) for r in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for k, (_, _, seq, _) in enumerate(chunk):
            ids[k, :len(seq)] = torch.tensor(seq)
            mask[k, :len(seq)] = 1
        logp = F.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        for k, (i, j, seq, n) in enumerate(chunk):
            L = len(seq)
            tgt = torch.tensor(seq[L - n:])
            out[i][j] = logp[k, L - n - 1:L - 1].gather(-1, tgt[:, None]).sum().item()
    return out


def evaluate_suite(model, tokenizer, tasks: dict[str, list[dict]], batch_size: int = 64) -> dict:
    res = {}
    for task, items in tasks.items():
        lps = choice_logprobs(model, tokenizer, items, batch_size)
        acc = acc_norm = 0
        for it, lp in zip(items, lps):
            norm = [v / len(c.encode("utf-8")) for v, c in zip(lp, it["choices"])]
            acc += int(max(range(len(lp)), key=lp.__getitem__) == it["label"])
            acc_norm += int(max(range(len(norm)), key=norm.__getitem__) == it["label"])
        res[task] = {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}
    res["average"] = {"acc": sum(r["acc"] for r in res.values()) / len(tasks),
                      "acc_norm": sum(r["acc_norm"] for r in res.values()) / len(tasks)}
    return res

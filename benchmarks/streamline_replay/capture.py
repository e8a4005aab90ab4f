"""Score many top-window replacements of Gemma 3 270M on lm-eval tasks cheaply (README: Streamline on
a real model). A window that ends at the top (layers S..17) leaves every layer below S unchanged, so
per lm-eval request the hidden states entering layers 12/14/16 and leaving layer 17 are captured once
at the scored positions (one dense pass); each variant f is then replayed as final norm + LM head on
f(X_S) inside lm-eval's own loop (its requests, metrics and aggregation). The replay of `identity_14`
gives remove's numbers and `dense` the dense model's.

    python benchmarks/streamline_replay/capture.py capture 200 2     # LIMIT THREADS: ~12 min
    python benchmarks/streamline_replay/fit.py 128 1 cosine,fncos 14   # BLOCKS THREADS LOSSES STARTS
    python benchmarks/streamline_replay/score.py 200 2 dense identity_14 cosine_14_128 fncos_14_128

Files go to $REPLAY_DIR (default /tmp/streamline_replay); needs the real extra and ../shared/data."""
import os
import sys
import time

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
import lm_eval

from harness.model.loading import load_model
from harness.evaluation.eval_config import EvalConfig
from harness.evaluation.lmeval import _DEFAULT_CACHE, _apply_fewshot

TASKS = ["piqa", "arc_easy", "hellaswag", "winogrande"]
STARTS = (12, 14, 16)
mode, limit = sys.argv[1], int(sys.argv[2])
DIR = os.environ.get("REPLAY_DIR", "/tmp/streamline_replay")
os.makedirs(DIR, exist_ok=True)
STORE = f"{DIR}/store_{limit}.pt"
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
model, tok = load_model("gemma-3-270m")
layers = model.model.layers
cfg = EvalConfig(tasks=TASKS, data_dir="../shared/data", limit=limit)
loaded = _DEFAULT_CACHE.get(cfg)
shots = _apply_fewshot(loaded, cfg)


def key(ctx, cont):
    return tuple(ctx) + (-1,) + tuple(cont)


class Capture(HFLM):
    store: dict = {}

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        grabbed = {}
        hooks = [layers[s].register_forward_pre_hook(
            lambda m, a, k, s=s: grabbed.__setitem__(s, (a[0] if a else k["hidden_states"]).detach()), with_kwargs=True)
            for s in STARTS]
        hooks.append(layers[-1].register_forward_hook(
            lambda m, a, o: grabbed.__setitem__(18, (o[0] if isinstance(o, tuple) else o).detach())))
        try:
            for i, (_, ctx, cont) in enumerate(requests):
                k = key(ctx, cont)
                if k not in self.store:
                    toks = (ctx + cont)[-(self.max_length + 1):][:-1]
                    with torch.no_grad():
                        model.model(input_ids=torch.tensor([toks]))
                    n = len(cont)
                    self.store[k] = {s: grabbed[s][0, -n:].clone() for s in (*STARTS, 18)} | {"cont": torch.tensor(cont)}
                if i % 500 == 0:
                    print("captured", i, len(requests), flush=True)
        finally:
            for h in hooks:
                h.remove()
        return [(0.0, False)] * len(requests)


class Replay(HFLM):
    store: dict = {}
    fn = None  # (states dict) -> final pre-norm hidden rows

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        keys = [key(ctx, cont) for _, ctx, cont in requests]
        sts = [self.store[k] for k in keys]
        sizes = [len(st["cont"]) for st in sts]
        with torch.no_grad():
            allst = {s: torch.cat([st[s] for st in sts]) for s in (*STARTS, 18)}
            conts = torch.cat([st["cont"] for st in sts])
            h = self.fn(allst)
            lls, greedy = [], []
            for i in range(0, len(h), 2048):
                logits = model.lm_head(model.model.norm(h[i:i + 2048]))
                cap = model.config.final_logit_softcapping
                if cap is not None:
                    logits = torch.tanh(logits / cap) * cap
                lp = F.log_softmax(logits.float(), -1)
                c = conts[i:i + 2048]
                lls.append(lp.gather(1, c[:, None])[:, 0])
                greedy.append(lp.argmax(-1) == c)
            lls, greedy = torch.cat(lls), torch.cat(greedy)
        out, at = [], 0
        for n in sizes:
            out.append((float(lls[at:at + n].sum()), bool(greedy[at:at + n].all())))
            at += n
        return out


def evaluate(lm):
    out = lm_eval.simple_evaluate(model=lm, tasks=loaded.objects, task_manager=loaded.manager, num_fewshot=shots,
                                  limit=limit, use_cache=None, cache_requests=False, log_samples=True)
    res = {t: {m: out["results"][t].get(f"{m},none") for m in ("acc", "acc_norm")} for t in TASKS}
    per_item = {t: [s["acc"] for s in sorted(out["samples"][t], key=lambda s: s["doc_id"])] for t in TASKS}
    return res, per_item


if mode == "capture":
    t = time.time()
    lm = Capture(pretrained=model, tokenizer=tok, batch_size=1)
    evaluate(lm)
    torch.save(Capture.store, STORE)
    print("stored", len(Capture.store), "requests in", time.time() - t, "s")

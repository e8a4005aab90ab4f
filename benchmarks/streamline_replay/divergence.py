"""How far each replayed variant's next-token distribution is from the dense model's on the tasks' own
text: over every continuation token in the capture ($REPLAY_DIR/store_LIMIT.pt, see capture.py), mean
KL(dense || variant) and mean cross-entropy of the continuation token (final norm + LM head on the
stored states; window S..17 replaced by removal or by an MLP from fit.py).
usage: divergence.py LIMIT THREADS NAME... (NAME as in score.py, e.g. fncos_14_256; removal is always shown)"""
import os
import sys

import torch
import torch.nn.functional as F

from harness.model.adapters import get_adapter
from harness.model.loading import load_model
from harness.model.replacement import MLPReplacement

limit, threads, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
DIR = os.environ.get("REPLAY_DIR", "/tmp/streamline_replay")
torch.set_num_threads(threads)
m, _tok = load_model("gemma-3-270m")
head = get_adapter(m).logits  # final norm, LM head, soft-capping
store = torch.load(f"{DIR}/store_{limit}.pt")
Y = torch.cat([v[18] for v in store.values()])
C = torch.cat([v["cont"] for v in store.values()])
print("task continuation tokens", len(Y), flush=True)


def variant(name):
    start = int(name.split("_")[-2])
    mlp = MLPReplacement(640, 1280, init="identity")
    mlp.load_state_dict(torch.load(f"{DIR}/mlp_{name}.pt"))
    return start, mlp.eval()


with torch.no_grad():
    for name, (start, f) in {"identity_14": (14, lambda x: x), **{n: variant(n) for n in names}}.items():
        X = torch.cat([v[start] for v in store.values()])
        kl = ce = ce_dense = 0.0
        for i in range(0, len(X), 1024):
            t = F.log_softmax(head(Y[i:i + 1024]), -1)
            s = F.log_softmax(head(f(X[i:i + 1024])), -1)
            c = C[i:i + 1024, None]
            kl += float(F.kl_div(s, t, log_target=True, reduction="sum"))
            ce += float(-s.gather(1, c).sum())
            ce_dense += float(-t.gather(1, c).sum())
        print(f"{name:16s} KL(dense||pruned) {kl / len(X):.3f}  CE {ce / len(X):.3f}  (dense CE {ce_dense / len(X):.3f})",
              flush=True)

"""Fit identity-started MLPs (h = 2d, 5 epochs, AdamW lr 4e-4, 8 x 512 tokens a step) for top windows
(X_S -> X_18, S = 12/14/16) of Gemma 3 270M on wikitext-2 calibration blocks with several losses
(mse; cosine = the harness's; fnmse / fncos = MSE / 1 - cos after the final norm, what the LM head
reads = the harness's `normed`; fisher = the second-order KL of the head's softmax, with its Fisher
averaged over calibration tokens; kl = KL(dense || pruned) of the head's softmax itself, on $KL_POSITIONS (512)
random tokens of each step of 4,096); saves each MLP for score.py.
usage: fit.py NBLOCKS THREADS LOSS,LOSS START,START [LR,LR] (see capture.py). A learning rate other than
4e-4 is saved as mlp_{LOSS}lr{LR}_{START}_{NBLOCKS}.pt. Weight decay 0, as in the harness."""
import os
import sys
import time

import torch
import torch.nn.functional as F

from harness.model.loading import load_model
from harness.model.adapters import get_adapter
from harness.signals.calibration import CalibrationConfig, load_calibration
from harness.signals.activations import iter_boundary_pairs
from harness.model.replacement import MLPReplacement

nblocks, threads = int(sys.argv[1]), int(sys.argv[2])
DIR = os.environ.get("REPLAY_DIR", "/tmp/streamline_replay")
os.makedirs(DIR, exist_ok=True)
losses = sys.argv[3].split(",")
starts = [int(s) for s in sys.argv[4].split(",")] if len(sys.argv) > 4 else [14]
lrs = [float(v) for v in sys.argv[5].split(",")] if len(sys.argv) > 5 else [4e-4]
torch.set_num_threads(threads)
torch.manual_seed(0)
m, tok = load_model("gemma-3-270m")
a = get_adapter(m)
cal = load_calibration(CalibrationConfig(source="../shared/data/wikitext2/wikitext-2-v1-tokens/valid.txt", seq_len=512,
                                         num_samples=nblocks), tok)
norm = m.model.norm
for p in m.parameters():
    p.requires_grad_(False)
t = time.time()
X = {s: [] for s in starts}
Y = []
for s in starts:
    for states, mask in iter_boundary_pairs(m, a, cal, s, 18, batch_size=8):
        X[s].append(states[s][mask])
        if s == starts[0]:
            Y.append(states[18][mask])
Y = torch.cat(Y)
X = {s: torch.cat(v) for s, v in X.items()}
print("captured", Y.shape, time.time() - t, flush=True)
W = (1 + norm.weight.detach()) if "gemma" in m.config.model_type else norm.weight.detach()
M = None  # fisher: the LM head's average Fisher in the normed space, E[E^T (diag p - p p^T) E]


def head_fisher(sample=8192, chunk=512):
    """KL(dense || pruned) to second order in d = normed(pred) - normed(y) is d^T F d / 2 with F the
    Fisher of the head's softmax at y; its average over calibration tokens is E^T diag(mean p) E -
    mean(u u^T) with u = E^T p (E = the LM head's weight), computed once."""
    E = m.lm_head.weight.detach()
    idx = torch.randperm(len(Y), generator=torch.Generator().manual_seed(1))[:sample]
    pbar, uu = torch.zeros(E.shape[0]), torch.zeros(E.shape[1], E.shape[1])
    for i in range(0, len(idx), chunk):
        p = torch.softmax((rmsn(Y[idx[i:i + chunk]]) * W) @ E.T, dim=-1)
        pbar += p.sum(0)
        u = p @ E
        uu += u.T @ u
    pbar, uu = pbar / len(idx), uu / len(idx)
    return E.T @ (pbar[:, None] * E) - uu


KL_POSITIONS = int(os.environ.get("KL_POSITIONS", 512))


def rmsn(v):
    return v * torch.rsqrt(v.float().pow(2).mean(-1, keepdim=True) + 1e-6)


def loss_fn(kind, p, y):
    if kind == "mse":
        return F.mse_loss(p, y)
    if kind == "cosine":
        cos = F.cosine_similarity(p, y, dim=-1)
        r = torch.log(p.norm(dim=-1).clamp(min=1e-6) / y.norm(dim=-1).clamp(min=1e-6))
        return (1 - cos).mean() + r.pow(2).mean()
    if kind == "fnmse":  # what the LM head reads: the final norm's output (with its weight)
        return F.mse_loss(rmsn(p) * W, rmsn(y) * W) / (W.pow(2).mean())
    if kind == "fncos":
        cos = F.cosine_similarity(rmsn(p) * W, rmsn(y) * W, dim=-1)
        return (1 - cos).mean()
    if kind == "kl":  # KL(dense || pruned) of the LM head's softmax, on KL_POSITIONS random rows of the step
        rows = torch.randperm(len(p))[:KL_POSITIONS]
        with torch.no_grad():
            teacher = F.log_softmax(a.logits(y[rows]), -1)
        return F.kl_div(F.log_softmax(a.logits(p[rows]), -1), teacher, log_target=True, reduction="batchmean")
    if kind == "fisher":
        d = rmsn(p) * W - rmsn(y) * W
        return ((d @ M) * d).sum(-1).mean()
    raise ValueError(kind)


def fit(kind, s, epochs=5, lr=4e-4, tokens_per_step=8 * 512):
    mlp = MLPReplacement(640, 1280, init="identity")
    opt = torch.optim.AdamW(mlp.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    Xs = X[s]
    for ep in range(epochs):
        perm = torch.randperm(len(Xs), generator=g)
        tot = 0
        for i in range(0, len(Xs), tokens_per_step):
            idx = perm[i:i + tokens_per_step]
            loss = loss_fn(kind, mlp(Xs[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item()
        print(kind, s, "epoch", ep, tot, flush=True)
    return mlp.eval()


if "fisher" in losses:
    t = time.time()
    M = head_fisher()
    print("fisher", time.time() - t, "eig max/min", torch.linalg.eigvalsh(M)[[-1, 0]].tolist(), flush=True)
for s in starts:
    for kind in losses:
        for lr in lrs:
            t = time.time()
            mlp = fit(kind, s, lr=lr)
            name = kind if lr == 4e-4 else f"{kind}lr{lr:g}"
            torch.save(mlp.state_dict(), f"{DIR}/mlp_{name}_{s}_{nblocks}.pt")
            print("fit", name, s, time.time() - t, flush=True)

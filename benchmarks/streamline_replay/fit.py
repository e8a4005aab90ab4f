"""Fit identity-started MLPs (h = 2d, 5 epochs, AdamW lr 4e-4, 8 x 512 tokens a step) for top windows
(X_S -> X_18, S = 12/14/16) of Gemma 3 270M on wikitext-2 calibration blocks with several losses
(mse; cosine = the harness's; fnmse / fncos = MSE / 1 - cos after the final norm, what the LM head
reads = the harness's `normed`); saves each MLP for score.py.
usage: fit.py NBLOCKS THREADS LOSS,LOSS START,START (see capture.py)"""
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
    raise ValueError(kind)


def fit(kind, s, epochs=5, lr=4e-4, tokens_per_step=8 * 512):
    mlp = MLPReplacement(640, 1280, init="identity")
    opt = torch.optim.AdamW(mlp.parameters(), lr=lr)
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


for s in starts:
    for kind in losses:
        t = time.time()
        mlp = fit(kind, s)
        torch.save(mlp.state_dict(), f"{DIR}/mlp_{kind}_{s}_{nblocks}.pt")
        print("fit", kind, s, time.time() - t, flush=True)

"""Why Streamline lost to plain removal on Gemma 3 270M (README: Streamline on a real model).

Captures X_14 and X_18 (the window layers 14-17 that --layers 4 picks) for 80 blocks of 256 tokens of
wikitext-2 (needs ../shared/data and the real-model extra), fits the identity-started MLP (h = 2d, 5
epochs, lr 4e-4) on 64 blocks with four losses, and scores the pruned model by next-token
cross-entropy on 16 other blocks. Writes benchmarks/streamline_fit_losses_results.json. One thread:
about 10 minutes.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/streamline_fit_losses.py
"""
import copy, json, time, torch, torch.nn.functional as F
from pathlib import Path
OUT = Path(__file__).with_name("streamline_fit_losses_results.json")
torch.set_num_threads(1); torch.manual_seed(0)
from harness.model.loading import load_model
from harness.model.adapters import get_adapter
from harness.signals.calibration import CalibrationConfig, load_calibration
from harness.signals.activations import iter_boundary_pairs
from harness.model.replacement import MLPReplacement
from harness.model.surgery import remove_layers, insert_replacement
m, tok = load_model("gemma-3-270m"); a = get_adapter(m)
S, E = 14, 18
cal = load_calibration(CalibrationConfig(source="../shared/data/wikitext2/wikitext-2-v1-tokens/valid.txt", seq_len=256, num_samples=80), tok, seed_offset=1)
X, Y = [], []
t = time.time()
for states, mask in iter_boundary_pairs(m, a, cal, S, E, batch_size=8):
    X.append(states[S][mask]); Y.append(states[E][mask])
X, Y = torch.cat(X), torch.cat(Y); print("captured", X.shape, time.time() - t, flush=True)
ntr = 64 * 256
Xtr, Ytr, Xte, Yte = X[:ntr], Y[:ntr], X[ntr:], Y[ntr:]
print("|X| rms", X.pow(2).mean().sqrt().item(), "top dims", Y.abs().mean(0).topk(5).values.tolist(), flush=True)
std = Ytr.std(0).clamp(min=1e-3)
def loss_fn(kind, p, y):
    if kind == "mse": return F.mse_loss(p, y)
    if kind == "std": return (((p - y) / std) ** 2).mean()
    if kind == "cos": return (1 - F.cosine_similarity(p, y, dim=-1)).mean()
    if kind == "rms":  # what an RMSNorm after the window sees
        n = lambda v: v / v.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        return F.mse_loss(n(p), n(y))
def fit(kind, epochs=5, lr=4e-4, bs=4096):
    mlp = MLPReplacement(640, 1280, init="identity")
    opt = torch.optim.AdamW(mlp.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for ep in range(epochs):
        perm = torch.randperm(len(Xtr), generator=g)
        for i in range(0, len(Xtr), bs):
            idx = perm[i:i + bs]
            loss = loss_fn(kind, mlp(Xtr[idx]), Ytr[idx]); opt.zero_grad(); loss.backward(); opt.step()
    return mlp.eval()
held = load_calibration(CalibrationConfig(source="../shared/data/wikitext2/wikitext-2-v1-tokens/valid.txt", seq_len=256, num_samples=16), tok, seed_offset=7)
@torch.no_grad()
def ce(model):
    tot, n = 0.0, 0
    for ids, am in held.batches(8):
        lg = model(input_ids=ids, attention_mask=am).logits[:, :-1]
        tot += F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item(); n += ids[:, 1:].numel()
    return tot / n
out = {"dense_ce": ce(m)}
def pruned(mlp):
    mm = copy.deepcopy(m); aa = get_adapter(mm); remove_layers(aa, list(range(S, E)))
    if mlp is not None: insert_replacement(aa, S, mlp)
    return mm
out["remove_ce"] = ce(pruned(None)); print(out, flush=True)
with torch.no_grad():
    for name, p in (("identity", Xte),):
        out[f"{name}_test"] = {k: loss_fn(k, p, Yte).item() for k in ("mse", "std", "cos", "rms")}
for kind in ("mse", "std", "cos", "rms"):
    t = time.time(); mlp = fit(kind)
    with torch.no_grad():
        p = mlp(Xte); out[kind] = {"test": {k: loss_fn(k, p, Yte).item() for k in ("mse", "std", "cos", "rms")}, "ce": ce(pruned(mlp)), "s": time.time() - t}
    print(kind, out[kind], flush=True)
json.dump(out, open(OUT, "w"), indent=1)

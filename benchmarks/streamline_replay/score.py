"""Replay variants through lm-eval on the captured states (see capture.py).
usage: score.py LIMIT THREADS VARIANT...; VARIANT = dense | identity_S (plain removal of S..17) | NAME
(the MLP $REPLAY_DIR/mlp_NAME.pt from fit.py, e.g. fncos_14_128); NAME@T interpolates that MLP's weights
with the identity start's, (1 - T) * identity + T * fitted (T = 1 is the fit, T = 0 removal). Prints acc per
task and Per."""
import json
import sys
from pathlib import Path

import torch
sys.argv = [sys.argv[0], "score", sys.argv[1], sys.argv[2], *sys.argv[3:]]
variants = sys.argv[4:]
exec(open(Path(__file__).with_name("capture.py")).read())
from harness.model.replacement import MLPReplacement
Replay.store = torch.load(STORE)
lm = Replay(pretrained=model, tokenizer=tok, batch_size=1)
results = {}
for v in variants:
    if v == "dense":
        Replay.fn = staticmethod(lambda st: st[18])
    elif v.startswith("identity"):
        s = int(v.split("_")[1]) if "_" in v else 14
        Replay.fn = staticmethod(lambda st, s=s: st[s])
    else:
        name, _, t = v.partition("@")
        s = int(name.split("_")[-2])
        mlp = MLPReplacement(640, 1280, init="identity")
        start = {k: w.clone() for k, w in mlp.state_dict().items()}
        fitted = torch.load(f"{DIR}/mlp_{name}.pt")
        t = float(t) if t else 1.0
        mlp.load_state_dict({k: (1 - t) * start[k] + t * fitted[k] for k in fitted}); mlp.eval()
        Replay.fn = staticmethod(lambda st, s=s, mlp=mlp: mlp(st[s]))
    res, items = evaluate(lm)
    ave = sum(res[t]["acc"] for t in TASKS) / len(TASKS)
    results[v] = {"res": res, "ave": ave, "items": items}
    print(v, {t: round(100 * res[t]["acc"], 1) for t in TASKS}, "ave", round(100 * ave, 2), flush=True)
d = results.get("dense")
if d:
    for v, r in results.items():
        print(f"{v:28s} Per. {100 * r['ave'] / d['ave']:.1f}")
json.dump({v: {"res": r["res"], "ave": r["ave"], "items": r["items"]} for v, r in results.items()},
          open(f"{DIR}/score_{limit}_{'_'.join(variants)[:80]}.json", "w"))

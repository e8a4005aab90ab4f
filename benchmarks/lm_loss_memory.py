"""Peak memory of one LM-loss training step on Gemma 3 270M (the LoRA post-step's, full-parameter
gradients off, LoRA r=8 on q/v), the model's own ``labels=`` path against the chunked path
(harness.fitting.training._chunked_lm_loss). Each measurement runs in a fresh process and reports
its peak RSS (ru_maxrss) and the step's loss.

    python benchmarks/lm_loss_memory.py [BATCH] [SEQ]        # both paths, default 8 x 512
    python benchmarks/lm_loss_memory.py 8 512 chunked         # one path only

Needs the real extra (pip install -e ".[real]")."""
import json
import subprocess
import sys

batch = int(sys.argv[1]) if len(sys.argv) > 1 else 8
seq = int(sys.argv[2]) if len(sys.argv) > 2 else 512
paths = sys.argv[3].split(",") if len(sys.argv) > 3 else ["own", "chunked"]

CHILD = r"""
import json, resource, sys, time, torch
from peft import LoraConfig, get_peft_model
from harness.model.loading import load_model
from harness.fitting import training
batch, seq, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model, tok = load_model("gemma-3-270m")
model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ids = torch.randint(3, model.config.vocab_size, (batch, seq))
mask = torch.ones_like(ids)
t = time.perf_counter()
loss = training.lm_loss(model, ids, mask, logits_budget=2**62 if path == "own" else training.LOGITS_BUDGET_BYTES)
loss.backward()
print(json.dumps({"path": path, "loss": float(loss), "seconds": time.perf_counter() - t,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "rss_after_load_gib": base / 2**20}))
"""
rows = []
for path in paths:
    out = subprocess.run([sys.executable, "-c", CHILD, str(batch), str(seq), path], capture_output=True, text=True)
    if out.returncode:
        print(f"{path}: failed ({out.returncode}): {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ''}")
        continue
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    r = rows[-1]
    print(f"{path:8s} batch {batch} x {seq}: loss {r['loss']:.4f}, peak RSS {r['peak_rss_gib']:.1f} GiB "
          f"(after loading {r['rss_after_load_gib']:.1f}), step {r['seconds']:.0f} s")
if len(rows) == 2:
    print(f"peak RSS chunked / own: {rows[1]['peak_rss_gib'] / rows[0]['peak_rss_gib']:.2f}; "
          f"loss difference {abs(rows[0]['loss'] - rows[1]['loss']):.2e}")

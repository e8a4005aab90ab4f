"""Train the reference OPT models on the generated world (CPU, deterministic).

    python -m harness.reference.train                 # every size (small, medium, large)
    python -m harness.reference.train --sizes small   # one size

Each size trains until the held-out stopping rule (``StopRule``, the same for every size) ends it,
checkpointing to ``reference/checkpoints/<name>.pt`` (not checked in) every 200 steps; the same
command resumes an interrupted run from there (``--fresh`` starts over).

Writes ``reference/models/<name>/`` (``config.json``, ``model.safetensors``, the world tokenizer,
``manifest.json``) and ``reference/suite/`` + ``reference/calibration.txt``. The manifest records
the command, seed, training-data hash, the stopping rule and why it stopped, the held-out and
training loss curves, wall time, thread count and the dense model's accuracy on the suite.
Same command + same machine (same thread count) -> same weights.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from harness.io import write_json_atomic

from . import MODELS_DIR, NAMES, REFERENCE_DIR  # noqa: E402
from . import world as W
from .scoring import evaluate_suite, load_suite
from .tokenizer import EOS_ID, PAD_ID, build_tokenizer, word_ids


@dataclass(frozen=True)
class Size:
    name: str
    layers: int
    hidden: int = 64
    heads: int = 2
    ffn: int = 256
    batch: int = 128  # documents per step
    seq_len: int = 24  # every document fits (the longest has 17 tokens)
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    sinusoidal_init: bool = True
    sinusoidal_scale: float = 0.1
    # The stopping rule (the same for every size; see StopRule): held-out loss every `eval_every`
    # steps; the constant-LR phase ends once the best held-out loss has not improved by
    # `min_rel_improvement` for `patience` steps (never before `min_steps`, nor before the held-out
    # loss fell below `min_progress` x its first measurement: the models start on a unigram plateau
    # near 2.4 that deep ones leave only after 1000+ steps), then the LR decays linearly to 0 over
    # `cooldown_frac` of the steps so far (at least `min_cooldown`).
    eval_every: int = 100
    heldout_docs: int = 1024
    patience: int = 1000
    min_rel_improvement: float = 0.01
    min_steps: int = 2000
    min_progress: float = 0.5
    cooldown_frac: float = 0.2
    min_cooldown: int = 300
    max_steps: int = 20000  # a cap, not the rule: a run that reaches it is recorded as not converged


SIZES = {
    "small": Size(NAMES["small"], layers=12),
    "medium": Size(NAMES["medium"], layers=16),
    "large": Size(NAMES["large"], layers=24),
}
# Settings that only decide when the constant-LR phase ends: a checkpoint taken before it ended may
# resume under new values of these (the trajectory so far is the same); any other change refuses it.
STOP_FIELDS = {"patience", "min_rel_improvement", "min_steps", "min_progress", "cooldown_frac", "min_cooldown",
               "max_steps"}
CHECKPOINT_EVERY = 200  # steps between resumable checkpoints (reference/checkpoints/, not checked in)


def model_dir(size: str) -> Path:
    return MODELS_DIR / SIZES[size].name


def tokenizer_for(world: W.World):
    return build_tokenizer(world.vocabulary(), model_max_length=256)


def encode_episode(ctx: str, answer: str, ids: dict[str, int]) -> tuple[list[int], list[int]]:
    """``(context ids, scored ids)`` of one episode as training sees it: the context words are input
    only; what the context determines (the answer words, their ``.``) and the closing ``</s>`` are
    scored. No BOS: a row starts with the episode's first word, as the suite's queries do."""
    return [ids[w] for w in ctx.split()], [ids[w] for w in answer.split()] + [EOS_ID]


def _rows(docs, n: int, seq_len: int, ids: dict[str, int]):
    x = torch.full((n, seq_len), PAD_ID, dtype=torch.long)
    y = torch.full((n, seq_len), -100, dtype=torch.long)
    for r in range(n):
        c, a = encode_episode(*next(docs), ids)
        toks = c + a
        if len(toks) > seq_len:
            raise ValueError(f"document of {len(toks)} tokens does not fit seq_len={seq_len}")
        x[r, :len(toks)] = torch.tensor(toks)
        y[r, len(c):len(toks)] = x[r, len(c):len(toks)]
    return x, y


def step_batch(world: W.World, step: int, batch: int, seq_len: int, ids: dict[str, int]):
    """``(input_ids, labels)`` of shape (batch, seq_len) for training step ``step``: one document per
    row, starting at position 0 (as the suite's queries do), ended by ``</s>``, right-padded.

    Each step draws from its own random stream (``train/<step>``), so a batch is a function of the
    step number alone and a resumed run sees exactly the documents an uninterrupted one would.
    Only the part of each episode that its context determines (and the closing ``</s>``) is
    scored; the random context words are input only. With every token scored, 12-layer d=64 models
    never left the unigram plateau within the CPU budget (copy loss stayed at ln 40 for 900 steps);
    with the answers scored, copying is learned in ~200 steps.
    """
    return _rows(world.documents(f"train/{step}", 10 ** 12, parts=True), batch, seq_len, ids)


def doc_batches(world: W.World, steps: int, batch: int, seq_len: int, ids: dict[str, int]):
    """Steps ``0..steps-1`` of :func:`step_batch`, stacked to (steps, batch, seq_len)."""
    xs, ys = zip(*(step_batch(world, s, batch, seq_len, ids) for s in range(steps)))
    return torch.stack(xs), torch.stack(ys)


def heldout_batch(world: W.World, size: Size, ids: dict[str, int]):
    """The fixed held-out documents the stopping rule measures (their own stream, never trained on)."""
    return _rows(world.documents("heldout", 10 ** 12, parts=True), size.heldout_docs, size.seq_len, ids)


class StopRule:
    """When to stop, from held-out loss alone (warmup - stable - decay).

    ``update(step, loss)`` is called after every held-out evaluation. While the LR is constant, a
    loss counts as progress when it beats the best so far by ``min_rel_improvement`` (relative).
    When ``patience`` steps pass without progress (and at least ``min_steps`` were taken, and the
    loss has fallen below ``min_progress`` x its first measurement), the stable phase ends
    ("plateau"); at ``max_steps`` it ends anyway ("cap", recorded as not converged). The LR then decays linearly to 0 over ``max(min_cooldown, cooldown_frac * step)``
    steps and training stops.
    """

    def __init__(self, size: Size, state: dict | None = None):
        self.size = size
        s = state or {}
        self.first = s.get("first")
        self.best = s.get("best", math.inf)
        self.best_step = s.get("best_step", 0)
        self.cooldown_start = s.get("cooldown_start")
        self.cooldown_len = s.get("cooldown_len")
        self.reason = s.get("reason")

    def state(self) -> dict:
        return {"first": self.first, "best": self.best, "best_step": self.best_step,
                "cooldown_start": self.cooldown_start, "cooldown_len": self.cooldown_len, "reason": self.reason}

    def lr(self, step: int) -> float:
        z = self.size
        if step < z.warmup:
            return z.lr * (step + 1) / z.warmup
        if self.cooldown_start is None or step < self.cooldown_start:
            return z.lr
        return z.lr * max(0.0, 1.0 - (step - self.cooldown_start) / self.cooldown_len)

    def update(self, step: int, loss: float) -> None:
        """Record the held-out loss measured after ``step`` completed steps."""
        if self.cooldown_start is not None:
            return
        z = self.size
        if self.first is None:
            self.first = loss
        if loss < self.best * (1 - z.min_rel_improvement):
            self.best, self.best_step = loss, step
        if step >= z.max_steps:
            self.reason = "cap"
        elif (step >= z.min_steps and step - self.best_step >= z.patience
              and self.best < z.min_progress * self.first):
            self.reason = "plateau"
        if self.reason:
            self.cooldown_start = step
            self.cooldown_len = max(z.min_cooldown, round(z.cooldown_frac * step))

    def done(self, step: int) -> bool:
        return self.cooldown_start is not None and step >= self.cooldown_start + self.cooldown_len

    @staticmethod
    def describe(z: Size) -> str:
        return (f"warmup {z.warmup} steps, then constant LR {z.lr}; held-out loss ({z.heldout_docs} documents "
                f"of their own stream) every {z.eval_every} steps; the constant phase ends when the best "
                f"held-out loss has not improved by {z.min_rel_improvement:.0%} (relative) for {z.patience} "
                f"steps (not before step {z.min_steps}, nor before the held-out loss fell below {z.min_progress} x its "
                f"first measurement; at step {z.max_steps} regardless, recorded as not "
                f"converged); then the LR decays linearly to 0 over max({z.min_cooldown}, "
                f"{z.cooldown_frac} x steps so far) steps and training stops.")


def build_model(size: Size, vocab_size: int):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=vocab_size, hidden_size=size.hidden, num_hidden_layers=size.layers, ffn_dim=size.ffn,
        num_attention_heads=size.heads, max_position_embeddings=256, word_embed_proj_dim=size.hidden,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, do_layer_norm_before=True,
        pad_token_id=1, bos_token_id=EOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=True)
    torch.manual_seed(size.seed)
    model = OPTForCausalLM(cfg)
    if size.sinusoidal_init:
        # OPT's positions are learned from scratch; starting them at sinusoids (scaled like the token
        # embeddings) gives attention a relative-position signal from step 0. Without it these small
        # models sat on a loss plateau (~1.45) at chance accuracy for 1200+ steps.
        pos = model.model.decoder.embed_positions.weight
        with torch.no_grad():
            pos.copy_(_sinusoids(pos.shape[0], pos.shape[1]) * size.sinusoidal_scale)
    return model


def _sinusoids(n: int, d: int) -> torch.Tensor:
    t = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)
    out = torch.zeros(n, d)
    out[:, 0::2] = torch.sin(t * freq)
    out[:, 1::2] = torch.cos(t * freq)
    return out


def _heldout_loss(model, x, y, batch: int = 256) -> float:
    """Mean loss over the scored tokens of the held-out documents (as the training loss is defined)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb, yb = x[i:i + batch], y[i:i + batch]
            logits = model(input_ids=xb, attention_mask=(xb != PAD_ID).long()).logits[:, :-1]
            tgt = yb[:, 1:]
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="sum"))
            count += int((tgt != -100).sum())
    return total / count


def _save_checkpoint(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def train(size_key: str, world: W.World, tasks: dict, out_dir: Path, *, log=print, probe_every: int = 1000,
          checkpoint: Path | None = None, stop_after: int | None = None) -> dict | None:
    """Train one size until its StopRule says so; write the model and its manifest to ``out_dir``.
    With ``checkpoint`` (a file), save the full state there every ``CHECKPOINT_EVERY`` steps and
    resume from it (_resume); ``stop_after`` ends after that many steps with a checkpoint and no
    model (what an interruption leaves)."""
    size = SIZES[size_key]
    torch.manual_seed(size.seed)
    tok = tokenizer_for(world)
    ids = word_ids(world.vocabulary())
    hx, hy = heldout_batch(world, size, ids)
    model = build_model(size, len(tok))
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.dim() >= 2],
                              "weight_decay": size.weight_decay},
                             {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=size.lr, betas=(0.9, 0.95))
    probe = {t: items[:60] for t, items in tasks.items()}
    st = _resume(checkpoint, size, model, opt, log)
    rule = StopRule(size, st["rule"])
    model.train()
    t0 = time.perf_counter() - st["seconds"]
    while not rule.done(st["step"]):
        step = _train_step(model, opt, rule, st, world, size, ids)
        if step % size.eval_every == 0:
            _heldout_probe(model, size, rule, st, hx, hy, t0, log)
        if probe_every and step % probe_every == 0:
            model.eval()
            r = evaluate_suite(model, tok, probe)
            model.train()
            st["probe"].append({"step": step, **{t: round(v["acc"], 3) for t, v in r.items() if t != "average"}})
            log(f"[{size.name}] probe acc {st['probe'][-1]}")
        if checkpoint is not None and (step % CHECKPOINT_EVERY == 0 or step == stop_after):
            st["rule"], st["seconds"] = rule.state(), time.perf_counter() - t0
            _save_checkpoint(checkpoint, {"size": asdict(size), "model": model.state_dict(), "optimizer": opt.state_dict(),
                                          "state": st})
        if stop_after is not None and step >= stop_after:
            return None
    train_s = time.perf_counter() - t0
    model.eval()
    dense = evaluate_suite(model, tok, tasks)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    manifest = _manifest(size_key, size, model, world, st, rule, train_s, dense)
    write_json_atomic(out_dir / "manifest.json", manifest)
    log(f"[{size.name}] done in {train_s:.0f}s after {st['step']} steps ({rule.reason}), held-out loss "
        f"{manifest['final_heldout_loss']}, dense acc {dense['average']['acc']:.3f}: "
        + ", ".join(f"{t} {r['acc']:.3f}" for t, r in dense.items()))
    return manifest


def _train_step(model, opt, rule, st: dict, world, size, ids) -> int:
    """One optimiser step on the step's batch (its hash chained into st["data_sha"]); the new step."""
    step = st["step"]
    for g in opt.param_groups:
        g["lr"] = rule.lr(step)
    x, y = step_batch(world, step, size.batch, size.seq_len, ids)
    st["data_sha"] = hashlib.sha256(st["data_sha"].encode() + x.numpy().tobytes()).hexdigest()
    st["n_tokens"] += int((y != -100).sum())
    loss = model(input_ids=x, attention_mask=(x != PAD_ID).long(), labels=y).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    st["losses"].append(loss.item())
    st["step"] = step + 1
    if not math.isfinite(st["losses"][-1]):
        raise SystemExit(f"error: [{size.name}] training loss is not finite at step {step + 1}")
    return step + 1


def _resume(checkpoint: Path | None, size, model, opt, log) -> dict:
    """The training state: fresh, or the checkpoint's (model and optimiser loaded) when it exists
    and was written for the same size settings (a stopping-rule change is allowed before cooldown)."""
    st = {"step": 0, "losses": [], "heldout": [], "probe": [], "rule": None, "data_sha": "", "seconds": 0.0,
          "n_tokens": 0}
    if checkpoint is None or not checkpoint.is_file():
        return st
    ck = torch.load(checkpoint, weights_only=False)
    old, new = ck["size"], asdict(size)
    changed = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
    if changed - STOP_FIELDS or (changed and ck["state"]["rule"] and ck["state"]["rule"]["cooldown_start"]):
        raise SystemExit(f"error: checkpoint {checkpoint} was written for other settings "
                         f"({', '.join(sorted(changed))}); delete it or pass --fresh")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    log(f"[{size.name}] resuming at step {ck['state']['step']} from {checkpoint.name}")
    return ck["state"]


def _heldout_probe(model, size, rule, st: dict, hx, hy, t0: float, log) -> None:
    """The held-out loss at this step: fed to the stopping rule, recorded and logged."""
    step = st["step"]
    model.eval()
    h = _heldout_loss(model, hx, hy)
    model.train()
    rule.update(step, h)
    st["heldout"].append({"step": step, "loss": round(h, 5), "lr": round(rule.lr(step - 1), 7)})
    log(f"[{size.name}] step {step} train {sum(st['losses'][-100:]) / min(100, len(st['losses'])):.4f} held-out {h:.4f} "
        f"(best {rule.best:.4f} @ {rule.best_step}) lr {rule.lr(step - 1):.2e} "
        f"({time.perf_counter() - t0:.0f}s)" + (f" -> cooldown ({rule.reason}) to step "
                                               f"{rule.cooldown_start + rule.cooldown_len}"
                                               if rule.cooldown_start == step else ""))


def _manifest(size_key: str, size, model, world, st: dict, rule, train_s: float, dense: dict) -> dict:
    losses = st["losses"]
    return {
        "name": size.name,
        "command": "python -m harness.reference.train --sizes " + size_key,
        "size": asdict(size),
        "params": sum(p.numel() for p in model.parameters()),
        "world": {"suite": W.SUITE_NAME, "seed": world.seed, "n_people": world.n_people},
        "train_tokens": st["n_tokens"],
        "train_data_sha256": st["data_sha"],
        "steps": st["step"],
        "stopping_rule": StopRule.describe(size),
        "stop_reason": rule.reason,
        "converged": rule.reason == "plateau",
        "best_heldout_loss_before_cooldown": round(rule.best, 5),
        "best_heldout_step": rule.best_step,
        "cooldown": [rule.cooldown_start, rule.cooldown_start + rule.cooldown_len],
        "final_heldout_loss": st["heldout"][-1]["loss"] if st["heldout"] else None,
        "final_loss": round(sum(losses[-100:]) / min(100, len(losses)), 5),
        "heldout_curve": st["heldout"],
        "loss_curve": [round(sum(losses[i:i + 100]) / len(losses[i:i + 100]), 4) for i in range(0, len(losses), 100)],
        "loss_curve_every": 100,
        "probe_history": st["probe"],
        "train_seconds": round(train_s, 1),
        "torch_threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "dense_suite_accuracy": {t: {k: round(v, 4) for k, v in r.items()} for t, r in dense.items()},
        "note": "dense_suite_accuracy is measured by harness.reference.scoring (lm-eval's acc/acc_norm "
                "definitions, no delimiter); run_benchmarks.py reports the same numbers through lm-eval.",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train the reference OPT models on the generated world.")
    ap.add_argument("--sizes", default="small,medium,large", help=f"comma list of {', '.join(SIZES)} "
                    "(default: all three, the checked-in sizes)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the manifest records it)")
    ap.add_argument("--out", type=Path, default=MODELS_DIR)
    ap.add_argument("--fresh", action="store_true", help="ignore (and overwrite) existing checkpoints")
    args = ap.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        print(f"error: unknown size {bad[0]!r}; choose from {', '.join(SIZES)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    world = W.World()
    W.write_world_files(world)
    _, tasks = load_suite(W.SUITE_DIR)
    for s in sizes:
        ck = REFERENCE_DIR / "checkpoints" / f"{SIZES[s].name}.pt"
        if args.fresh and ck.is_file():
            ck.unlink()
        train(s, world, tasks, args.out / SIZES[s].name, log=lambda m: print(m, flush=True), checkpoint=ck)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""LoRA recovery ("healing"), a post-step composable with any method: ``--methods shortgpt+lora``.

PEFT LoRA adapters on the remaining decoder layers' linear projections (default: the
architecture's attention and MLP projections, from the model adapter; OPT: q/k/v/out_proj,
fc1, fc2; Llama/Mistral/Qwen2: q/k/v/o_proj, gate/up/down_proj), trained with the LM loss on a
training text (default: a fresh draw from the calibration source by ``ctx.lm_training_data``:
blocks with every token scored, or for a reference model whole episodes with the loss on the
answers, as it was trained), then merged into
the weights (``merge_and_unload``): the result is a plain HF model again. Replacement networks
inserted by a method (an MLP in a ``ReplacedBlock``, a ``ReplacementLayer``) get no adapters
and stay as they are.

Defaults follow the LLM-Pruner / Shortened-LLaMA recipe: r=8, alpha=16, dropout 0.05, lr 1e-4,
2 epochs. ``match_params=N`` picks the rank whose adapter parameter count is closest to N
(``match_params=mlp``: the size of LLM-Streamline's default MLP, h=2d, for this model — the
paper's Table 5 "None" row trains LoRA with as many parameters as the MLP). The chosen rank,
the exact count and the target are recorded in the manifest (``lora``).

Options: ``-o lora.r=16`` (every +lora run) or ``-o remove+lora.lora.r=16`` (that run only).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from harness import (
    CHECKPOINT_CHOICES,
    MethodConfig,
    MethodContext,
    PruneResult,
    ReplacedBlock,
    ReplacementLayer,
    UsageError,
    mlp_params,
    mlp_width,
    option,
    register_post_step,
    steps_for,
    train_lm,
    use_checkpointing,
)

SEED_OFFSET = 3  # the training draw differs from calibration (0), streamline's fit (1) and post-training (2)


@dataclass
class LoRAConfig(MethodConfig):
    r: int = option(8, "LoRA rank")
    alpha: float = option(16.0, "LoRA alpha (scaling alpha/r)")
    dropout: float = option(0.05, "LoRA dropout")
    target_modules: list[str] = option(default_factory=list,
                                       help="leaf names, a/b/c; empty = the adapter's projections")
    match_params: str | None = option(None, "N (an integer) or 'mlp': choose r so the adapter size is closest to N")
    lr: float = option(1e-4, "AdamW learning rate")
    epochs: int = option(2, "passes over the training blocks (when steps is None)")
    steps: int | None = option(None, "optimiser steps; None = epochs over the training samples")
    batch_size: int = option(8, "blocks per optimiser step")
    samples: int | None = option(None, "training blocks; None = steps * batch_size, or the calibration count")
    seq_len: int | None = option(None, "None = calibration sequence length")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 = none)")
    text: str | None = option(None, ".txt/.jsonl file or Hub dataset id[:config]; None = the calibration source")
    text_split: str = option("train", "with text")
    text_field: str = option("text", "with text")
    grad_checkpointing: str = option("auto", "auto|on|off: recompute decoder layers in the backward pass "
                                     "(auto: above 2B parameters)")

    def check(self) -> None:
        if self.grad_checkpointing not in CHECKPOINT_CHOICES:
            raise UsageError(f"lora.grad_checkpointing={self.grad_checkpointing} is unknown; use auto, on or off")
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise UsageError("lora needs r >= 1, alpha > 0 and 0 <= dropout < 1")
        if self.lr <= 0 or self.batch_size < 1 or self.epochs < 1 or (self.steps is not None and self.steps < 1):
            raise UsageError("lora needs lr > 0, batch_size >= 1, epochs >= 1 and steps >= 1")
        if (self.samples is not None and self.samples < 1) or (self.seq_len is not None and self.seq_len < 2):
            raise UsageError("lora needs samples >= 1 and seq_len >= 2")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise UsageError("lora needs max_grad_norm >= 0 (0 = no clipping) and weight_decay >= 0")
        parse_match(self.match_params)

    def check_model(self, model, adapter) -> None:
        """Before the method runs (pipelines call this): the target names exist in this architecture."""
        names = list(self.target_modules or adapter.projections)
        if not names:
            raise UsageError(f"no default LoRA targets for model type '{model.config.model_type}'; "
                             "set lora.target_modules=a/b/c")
        lora_targets(model, adapter, names)


def parse_match(value: str | None) -> int | str | None:
    if value is None or value == "mlp":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise UsageError(f"lora.match_params={value} is not a parameter count; give an integer >= 1 or 'mlp'")
    return n


def _replacement_modules(model: nn.Module) -> set[int]:
    """ids of every module inside a replacement network (these get no adapters)."""
    out: set[int] = set()
    for module in model.modules():
        if isinstance(module, ReplacedBlock):
            out.update(id(m) for m in module.replacement.modules())
        elif isinstance(module, ReplacementLayer):
            out.update(id(m) for m in module.inner.modules())
    return out


def lora_targets(model: nn.Module, adapter, leaf_names) -> dict[str, nn.Linear]:
    """``{full module name: Linear}`` for the remaining decoder layers' projections named ``leaf_names``."""
    skip = _replacement_modules(model)
    in_layers = {id(m) for layer in adapter.layers for m in layer.modules()} - skip
    found, available = {}, set()
    for name, module in model.named_modules():
        if id(module) not in in_layers or not isinstance(module, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        available.add(leaf)
        if leaf in leaf_names:
            found[name] = module
    missing = sorted(set(leaf_names) - available)
    if missing:
        raise UsageError(f"lora.target_modules: {', '.join(missing)} is not a linear projection of the remaining "
                         f"layers; available: {'/'.join(sorted(available)) or '(none)'}")
    return found


def params_per_rank(targets: dict[str, nn.Linear]) -> int:
    """LoRA adds A (r x in) and B (out x r) to each target: r * (in + out) parameters."""
    return sum(m.in_features + m.out_features for m in targets.values())


def choose_rank(per_rank: int, target: int) -> int:
    """The rank r >= 1 whose count r * per_rank is closest to ``target`` (the smaller on a tie)."""
    lo = max(1, target // per_rank)
    return min((lo, lo + 1), key=lambda r: (abs(r * per_rank - target), r))


@register_post_step("lora", LoRAConfig,
                    "LoRA healing after any method (METHOD+lora): PEFT LoRA on the remaining layers' "
                    "projections, LM loss, merged back")
def lora(ctx: MethodContext, cfg: LoRAConfig, result: PruneResult) -> PruneResult:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model, adapter = result.model, ctx.adapter
    cfg.check_model(model, adapter)
    leaf_names = list(cfg.target_modules or adapter.projections)
    targets = lora_targets(model, adapter, leaf_names)
    per_rank = params_per_rank(targets)
    match = parse_match(cfg.match_params)
    match_target = None
    r = cfg.r
    if match is not None:
        if match == "mlp":
            d = adapter.hidden_size  # LLM-Streamline's default MLP (h = 2d): its parameter count
            match_target = mlp_params(d, mlp_width(d))
        else:
            match_target = match
        r = choose_rank(per_rank, match_target)

    if cfg.steps is not None:
        n_samples = cfg.samples or cfg.steps * cfg.batch_size
    else:
        n_samples = cfg.samples or len(ctx.calibration)
    data = ctx.lm_training_data(n_samples, cfg.seq_len, seed_offset=SEED_OFFSET, source=cfg.text,
                                split=cfg.text_split if cfg.text else None,
                                field=cfg.text_field if cfg.text else None)
    steps = cfg.steps if cfg.steps is not None else steps_for(len(data), cfg.batch_size, cfg.epochs)

    peft_cfg = PeftLoraConfig(r=r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                              target_modules=sorted(targets))
    ctx.own_layers()  # the merge writes into every adapted projection: this model's own copies, not the dense ones
    flags = {name: p.requires_grad for name, p in model.named_parameters()}  # PEFT freezes the base model
    peft_model = get_peft_model(model, peft_cfg)
    lora_params = [p for n, p in peft_model.named_parameters() if ".lora_" in n]
    trainable = sum(p.numel() for p in lora_params)
    if trainable != r * per_rank:  # PEFT wrapped something else than what was counted
        raise RuntimeError(f"LoRA has {trainable} parameters, expected r * {per_rank} = {r * per_rank}")
    log = train_lm(peft_model, lora_params, data, steps=steps, lr=cfg.lr, batch_size=cfg.batch_size,
                   weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm or None, seed=ctx.seed + SEED_OFFSET,
                   progress=ctx.progress, train_mode=True, desc="LoRA healing",
                   grad_checkpointing=use_checkpointing(cfg.grad_checkpointing, model))
    merged = peft_model.merge_and_unload()
    merged.eval()
    for name, p in merged.named_parameters():
        p.requires_grad_(flags.get(name, p.requires_grad))
    result.model = merged
    result.extra["lora"] = {
        "r": r, "alpha": cfg.alpha, "dropout": cfg.dropout, "target_modules": leaf_names,
        "targets": len(targets), "trainable_params": trainable, "params_per_rank": per_rank,
        "match_params": cfg.match_params, "match_target": match_target,
        "match_error": (trainable - match_target) / match_target if match_target else None,
        "merged": True, "training": {**log, "epochs": cfg.epochs if cfg.steps is None else None,
                                     "data": data.description},
    }
    return result

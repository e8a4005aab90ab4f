"""Remote code saved next to a pruned model with replacement MLPs (written by ``save_pruned``).

This file is copied into the saved folder as ``modeling_streamline.py`` and registered in the
folder's ``config.json`` through ``auto_map``, so stock tools load the pruned model exactly::

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    lm_eval --model hf --model_args pretrained=folder,trust_remote_code=True ...

It is self-contained on purpose (torch and transformers only; a user loading the folder may not
have the harness). The two marked lines below name the base architecture; ``save_pruned``
rewrites them for the saved model's architecture.

The model is the base architecture's ``*ForCausalLM`` with the pruned (shorter) layer list, plus
the replacement networks, registered as ``streamline_replacements`` (checkpoint keys
``streamline_replacements.<k>.*``) and applied by forward hooks on the decoder layer next to
the removed window: ``where="pre"`` runs the network on that layer's input hidden states,
``where="post"`` on its output (the window was at the end of the stack). The config's
``streamline_replacements`` list says which network sits where (``index`` in the pruned layer
list), ``streamline_layers_path`` where the decoder layers live. The config's ``model_type``
(``streamline_<base>``) is unknown to transformers, so loading the folder without
``trust_remote_code=True`` fails instead of returning the model without its replacements.

The modules mirror ``harness.model.replacement`` (same parameter names and arithmetic).
"""
# ruff: noqa: I001 - the marked import line is rewritten by save_pruned and must stay one line
from __future__ import annotations

import torch
from torch import nn

# --- base architecture: rewritten by harness.model.saving.save_pruned -------------------------
from transformers import OPTConfig as BaseConfig, OPTForCausalLM as BaseForCausalLM  # STREAMLINE-BASE
BASE_MODEL_TYPE = "opt"  # STREAMLINE-BASE
# -----------------------------------------------------------------------------------------------

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class MLPReplacement(nn.Module):
    """Linear(d, h) -> activation -> Linear(h, d), applied ``repeat`` times (parameter sharing),
    optionally residual (x + MLP(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "relu",
                 repeat: int = 1, residual: bool = False, init: str = "random"):
        super().__init__()  # ``init``: how training started; the saved weights are loaded over it
        self.up = nn.Linear(hidden_size, intermediate_size)
        self.act = ACTIVATIONS[activation]()
        self.down = nn.Linear(intermediate_size, hidden_size)
        self.repeat = repeat
        self.residual = residual

    def forward(self, x):
        for _ in range(self.repeat):
            y = self.down(self.act(self.up(x)))
            x = x + y if self.residual else y
        return x


class MultiMLPReplacement(nn.Module):
    """One ``MLPReplacement`` per removed layer, applied in order."""

    def __init__(self, hidden_size: int, intermediate_size: int, count: int, activation: str = "relu",
                 residual: bool = False, init: str = "random"):
        super().__init__()
        self.mlps = nn.ModuleList(MLPReplacement(hidden_size, intermediate_size, activation, 1, residual)
                                  for _ in range(count))

    def forward(self, x):
        for mlp in self.mlps:
            x = mlp(x)
        return x


REPLACEMENT_CLASSES = {"MLPReplacement": MLPReplacement, "MultiMLPReplacement": MultiMLPReplacement}


class StreamlineConfig(BaseConfig):
    model_type = "streamline_" + BASE_MODEL_TYPE


def _replace_hidden(output, fn):
    """Decoder layers return a tensor (transformers 5) or a tuple led by the hidden states."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    return (fn(output[0]),) + tuple(output[1:])


class _Hook:
    """Applies replacement ``k`` of ``owner`` around one decoder layer (picklable, copyable)."""

    def __init__(self, owner: nn.Module, k: int):
        self.owner = owner
        self.k = k

    def net(self) -> nn.Module:
        return self.owner.streamline_replacements[self.k]

    def pre(self, module, args, kwargs):
        if args:
            return (self.net()(args[0]),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = self.net()(kwargs["hidden_states"])
        return args, kwargs

    def post(self, module, args, kwargs, output):
        return _replace_hidden(output, self.net())


class StreamlineForCausalLM(BaseForCausalLM):
    """The base ``*ForCausalLM`` with the replacement networks re-inserted where they were."""

    config_class = StreamlineConfig

    def __init__(self, config):
        super().__init__(config)
        entries = list(getattr(config, "streamline_replacements", None) or [])
        self.streamline_replacements = nn.ModuleList(
            REPLACEMENT_CLASSES[e["class"]](**e["kwargs"]) for e in entries)
        layers = self.get_submodule(config.streamline_layers_path)
        for k, e in enumerate(entries):
            hook = _Hook(self, k)
            if e["where"] == "pre":
                layers[e["index"]].register_forward_pre_hook(hook.pre, with_kwargs=True)
            elif e["where"] == "post":
                layers[e["index"]].register_forward_hook(hook.post, with_kwargs=True)
            else:
                raise ValueError(f"streamline_replacements[{k}]: where must be 'pre' or 'post', not {e['where']!r}")

"""Lightweight replacement networks (the modules a method inserts in place of removed layers)
and their descriptions (enough to rebuild them when a saved model is loaded)."""
from __future__ import annotations

import torch
from torch import nn

DEFAULT_HIDDEN_MULT = 2.0  # LLM-Streamline's replacement MLP width: h = 2d


def mlp_width(d: int, hidden_size: int | None = None, hidden_mult: float = DEFAULT_HIDDEN_MULT) -> int:
    """The replacement MLP's width h: ``hidden_size`` if given, else ``hidden_mult`` x d."""
    return hidden_size or max(1, int(round(hidden_mult * d)))


def mlp_params(d: int, h: int) -> int:
    """Parameters of Linear(d, h) -> act -> Linear(h, d) with biases."""
    return 2 * d * h + h + d


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
INITS = ("random", "identity")


def identity_check(d: int, h: int, activation: str) -> str | None:
    """Why an MLP of width ``h`` over ``d`` cannot start at the identity, or None when it can."""
    if activation != "relu":
        return f"activation={activation} (identity needs relu: ReLU(x) - ReLU(-x) = x)"
    if h < 2 * d:
        return f"width h={h} < 2d={2 * d} (identity needs one +x and one -x unit per dimension)"
    return None


@torch.no_grad()
def identity_init(up: nn.Linear, down: nn.Linear, activation: str = "relu") -> None:
    """Set Linear(d, h) -> ReLU -> Linear(h, d) to compute exactly x: units 0..d-1 carry ReLU(x),
    units d..2d-1 carry ReLU(-x), and ``down`` adds the first and subtracts the second. Units past
    2d keep their random input weights and get zero output weights, so they start silent but
    receive gradients. The MLP then starts as plain removal of the window it replaces."""
    d, h = up.in_features, up.out_features
    why = identity_check(d, h, activation)
    if why:
        raise ValueError(f"an identity MLP is impossible here: {why}")
    eye = torch.eye(d, dtype=up.weight.dtype, device=up.weight.device)
    up.weight[:d] = eye
    up.weight[d:2 * d] = -eye
    up.bias[:2 * d] = 0
    down.weight.zero_()
    down.weight[:, :d] = eye
    down.weight[:, d:2 * d] = -eye
    down.bias.zero_()


class MLPReplacement(nn.Module):
    """Linear(d, h) -> activation -> Linear(h, d), optionally applied ``repeat`` times
    (parameter sharing) and optionally with a residual connection (x + MLP(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "relu",
                 repeat: int = 1, residual: bool = False, init: str = "random"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; choose from {', '.join(ACTIVATIONS)}")
        if init not in INITS:
            raise ValueError(f"unknown init '{init}'; choose from {', '.join(INITS)}")
        self.init_kwargs = dict(hidden_size=hidden_size, intermediate_size=intermediate_size,
                                activation=activation, repeat=repeat, residual=residual, init=init)
        self.up = nn.Linear(hidden_size, intermediate_size)
        self.act = ACTIVATIONS[activation]()
        self.down = nn.Linear(intermediate_size, hidden_size)
        self.repeat = repeat
        self.residual = residual
        if residual:  # start exactly at the identity (= plain removal) and improve from there
            nn.init.zeros_(self.down.weight)
            nn.init.zeros_(self.down.bias)
        elif init == "identity":
            identity_init(self.up, self.down, activation)

    def forward(self, x):
        for _ in range(self.repeat):
            y = self.down(self.act(self.up(x)))
            x = x + y if self.residual else y
        return x

    def extra_repr(self) -> str:
        return f"repeat={self.repeat}, residual={self.residual}"


def describe(module: nn.Module) -> dict:
    """Enough to rebuild ``module``: dotted class path and constructor kwargs."""
    cls = type(module)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "kwargs": getattr(module, "init_kwargs", {}),
            "params": sum(p.numel() for p in module.parameters())}


# The replacement classes a saved model may name (its manifest is data: nothing it names is imported).
REPLACEMENT_CLASSES: dict[str, type] = {}


def register_replacement(cls: type) -> type:
    """Allow ``cls`` in saved models' manifests (a plugin that inserts its own module registers it)."""
    REPLACEMENT_CLASSES[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def build_from_description(desc: dict) -> nn.Module:
    """Rebuild a replacement from a manifest entry: only classes in ``REPLACEMENT_CLASSES``, only with
    keyword arguments their constructor names and plain JSON values."""
    import inspect

    from harness.errors import UsageError

    name = desc.get("class") if isinstance(desc, dict) else None
    cls = REPLACEMENT_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UsageError(f"the saved model names replacement class {name!r}, which is not one the harness builds "
                         f"({', '.join(sorted(REPLACEMENT_CLASSES))}); a plugin adds its own with "
                         "harness.register_replacement")
    kwargs = desc.get("kwargs", {})
    accepted = set(inspect.signature(cls).parameters)
    if not isinstance(kwargs, dict) or set(kwargs) - accepted or \
            not all(isinstance(v, (int, float, str, bool)) for v in kwargs.values()):
        raise UsageError(f"the saved model's arguments for {name} are not plain values of its parameters "
                         f"({', '.join(sorted(accepted))}): {kwargs!r}")
    return cls(**kwargs)


class MultiMLPReplacement(nn.Module):
    """One ``MLPReplacement`` per removed layer, applied in order (LLM-Streamline Table 6,
    "Multiple MLP"); MLP k stands in for the k-th layer of the window."""

    def __init__(self, hidden_size: int, intermediate_size: int, count: int, activation: str = "relu",
                 residual: bool = False, init: str = "random"):
        super().__init__()
        self.init_kwargs = dict(hidden_size=hidden_size, intermediate_size=intermediate_size, count=count,
                                activation=activation, residual=residual, init=init)
        self.mlps = nn.ModuleList(MLPReplacement(hidden_size, intermediate_size, activation, 1, residual, init)
                                  for _ in range(count))

    def forward(self, x):
        for mlp in self.mlps:
            x = mlp(x)
        return x


def describe_layer(layer: nn.Module, repeat: int, init: str) -> dict:
    """The manifest entry of a decoder-layer replacement (it is saved inside the checkpoint)."""
    cls = type(layer)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "kind": "decoder_layer", "repeat": repeat,
            "init": init, "params": sum(p.numel() for p in layer.parameters())}


register_replacement(MLPReplacement)
register_replacement(MultiMLPReplacement)

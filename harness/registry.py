"""Method registry: plugins register a pruning method by name with a config dataclass.

A method is a function ``prune(ctx: MethodContext, cfg) -> PruneResult``. It receives the
(already copied) dense model, its adapter, calibration data and the number of layers to
remove, and returns the pruned model plus a manifest. Plugins live in ``methods/`` (imported
automatically) or in any file passed with ``--plugins``; nothing in ``harness/`` changes.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import UsageError


@dataclass
class MethodConfig:
    """Base class of every method's options (a dataclass; fields are CLI-settable)."""


@dataclass
class PruneResult:
    model: Any
    removed_layers: list[int]
    scores: dict = field(default_factory=dict)
    replacement: dict | None = None  # description of an inserted network, or None
    extra: dict = field(default_factory=dict)

    def manifest(self) -> dict:
        return {
            "removed_layers": list(self.removed_layers),
            "scores": self.scores,
            "replacement": self.replacement,
            **self.extra,
        }


@dataclass
class MethodSpec:
    name: str
    fn: Callable
    config_cls: type
    help: str
    module: str


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(name: str, config: type = MethodConfig, help: str = ""):
    """Decorator: ``@register_method("shortgpt", ShortGPTConfig, "one line")``."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config for method {name} must be a dataclass")

    def deco(fn):
        if name in _REGISTRY and _REGISTRY[name].fn is not fn and _REGISTRY[name].module != fn.__module__:
            raise ValueError(f"method '{name}' is registered twice ({_REGISTRY[name].module} and {fn.__module__})")
        _REGISTRY[name] = MethodSpec(name, fn, config, help or (fn.__doc__ or "").strip().splitlines()[0], fn.__module__)
        return fn

    return deco


_loaded_builtin = False


def load_builtin_methods() -> None:
    global _loaded_builtin
    if _loaded_builtin:
        return
    import methods

    for info in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"methods.{info.name}")
    _loaded_builtin = True


def load_plugin_file(path: str) -> None:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"plugin file '{path}' does not exist; pass a .py file that calls register_method")
    mod_name = f"_streamline_plugin_{abs(hash(str(p.resolve())))}"
    if mod_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(mod_name, p)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)


def available_methods() -> dict[str, MethodSpec]:
    load_builtin_methods()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> MethodSpec:
    methods = available_methods()
    if name not in methods:
        raise UsageError(f"unknown method '{name}'; available: {', '.join(methods)} (see --list-methods)")
    return methods[name]


def _coerce(value: str, typ, key: str):
    origin = typing.get_origin(typ)
    if typ is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"option {key} expects true/false, got '{value}'")
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        return _coerce(value, args[0], key)
    if origin in (list, tuple):
        (inner,) = typing.get_args(typ)[:1] or (str,)
        return [_coerce(v, inner, key) for v in value.split("/") if v != ""]
    try:
        return typ(value)
    except (TypeError, ValueError):
        raise UsageError(f"option {key} expects {getattr(typ, '__name__', typ)}, got '{value}'") from None


def build_config(spec: MethodSpec, options: dict[str, str]):
    """Build ``spec.config_cls`` from ``{field: string value}``; unknown fields are errors."""
    hints = typing.get_type_hints(spec.config_cls)
    names = {f.name for f in dataclasses.fields(spec.config_cls)}
    kwargs = {}
    for key, value in options.items():
        if key not in names:
            raise UsageError(
                f"method '{spec.name}' has no option '{key}'; its options: {', '.join(sorted(names)) or '(none)'}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{spec.name}.{key}")
    try:
        return spec.config_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bad options for method '{spec.name}': {exc}") from None

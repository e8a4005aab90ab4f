"""Plugin registries: methods and post-steps, by name.

A method is a function ``prune(ctx: MethodContext, cfg) -> PruneResult``; a post-step is
``step(ctx, cfg, result) -> PruneResult`` and runs after any method (``--methods shortgpt+lora``).
Both register with a config dataclass (a ``MethodConfig`` subclass). Plugins live in
``methods/`` (imported the first time a name is looked up) or in any file passed with
``--plugins``; nothing in ``harness/`` changes for a new method.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.errors import UsageError
from harness.plugins.options import MethodConfig

BUILTIN_PACKAGE = "methods"


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
class PluginSpec:
    name: str
    fn: Callable
    config_cls: type
    help: str
    module: str
    kind: str  # "method" | "post-step"


RESERVED_NAMES = {"dense"}  # the harness's own run of the unpruned model


class Registry:
    """Name -> ``PluginSpec`` for one kind of plugin. Built-in plugin modules are imported lazily,
    the first time any registry is read."""

    _all: list["Registry"] = []

    def __init__(self, kind: str):
        self.kind = kind
        self._specs: dict[str, PluginSpec] = {}
        Registry._all.append(self)

    def register(self, name: str, config: type, help: str):
        if not (isinstance(config, type) and dataclasses.is_dataclass(config) and issubclass(config, MethodConfig)):
            raise TypeError(f"config for {self.kind} {name} must be a dataclass subclassing harness.MethodConfig")
        if not name.strip() or any(c in name for c in "+.,/\\:") or name != name.strip() or " " in name:
            raise ValueError(f"{self.kind} name '{name}' may not be empty or contain '+', '.', ',', '/', '\\', ':' "
                             "or spaces (it names result files)")
        if name in RESERVED_NAMES:
            raise ValueError(f"'{name}' is a name the harness uses itself ({', '.join(sorted(RESERVED_NAMES))}); "
                             f"pick another name for this {self.kind}")

        def deco(fn):
            old = self._specs.get(name)
            if old is not None and old.fn is not fn and old.module != fn.__module__:
                raise ValueError(f"{self.kind} '{name}' is registered twice ({old.module} and {fn.__module__})")
            for other in Registry._all:
                if other is not self and name in other._specs:
                    raise ValueError(f"'{name}' is registered both as a {other.kind} and as a {self.kind}; "
                                     "pick another name")
            doc = help or next(iter((fn.__doc__ or "").strip().splitlines()), "")  # no docstring: no help
            self._specs[name] = PluginSpec(name, fn, _named(config, name), doc, fn.__module__, self.kind)
            return fn

        return deco

    def all(self) -> dict[str, PluginSpec]:
        load_builtin_methods()
        return dict(sorted(self._specs.items()))

    def __contains__(self, name: str) -> bool:
        return name in self.all()

    def get(self, name: str) -> PluginSpec | None:
        return self.all().get(name)


def _named(config: type, name: str) -> type:
    """``config`` as registered under ``name``: a subclass whose ``method_name`` is that name, so
    its errors name the option as ``NAME.KEY`` (one config class can serve several methods)."""
    return type(config.__name__, (config,), {"method_name": name, "__module__": config.__module__,
                                             "__qualname__": config.__qualname__, "__doc__": config.__doc__})


METHODS = Registry("method")
POST_STEPS = Registry("post-step")


def register_method(name: str, config: type = MethodConfig, help: str = ""):
    """Decorator: ``@register_method("shortgpt", ShortGPTConfig, "one line")``."""
    return METHODS.register(name, config, help)


def register_post_step(name: str, config: type = MethodConfig, help: str = ""):
    """Decorator: ``@register_post_step("lora", LoRAConfig, "one line")``.

    ``fn(ctx, cfg, result) -> PruneResult`` receives the context (``ctx.model`` / ``ctx.adapter``
    are the pruned model) and the method's result, and returns the result to evaluate. Several
    steps chain left to right (``remove+a+b``).
    """
    return POST_STEPS.register(name, config, help)


_loaded_builtin = False


def load_builtin_methods() -> None:
    global _loaded_builtin
    if _loaded_builtin:
        return
    _loaded_builtin = True
    package = importlib.import_module(BUILTIN_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{BUILTIN_PACKAGE}.{info.name}")


def load_plugin_file(path: str) -> None:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"plugin file '{path}' does not exist; pass a .py file that calls register_method")
    mod_name = f"_streamline_plugin_{abs(hash(str(p.resolve())))}"
    if mod_name in sys.modules:
        return
    load_builtin_methods()  # first: a plugin reusing a built-in name fails here, naming its file
    spec = importlib.util.spec_from_file_location(mod_name, p)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(mod_name, None)  # a failed import is not "loaded": the next try fails the same way
        raise


def available_methods() -> dict[str, PluginSpec]:
    return METHODS.all()


def available_post_steps() -> dict[str, PluginSpec]:
    return POST_STEPS.all()


def get_method(name: str) -> PluginSpec:
    spec = METHODS.get(name)
    if spec is None:
        if name in POST_STEPS:
            raise UsageError(f"'{name}' is a post-step, not a method; append it to a method, e.g. remove+{name}")
        raise UsageError(f"unknown method '{name}'; available: {', '.join(METHODS.all())} (see --list-methods)")
    return spec

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

from harness.errors import UsageError


@dataclass
class MethodConfig:
    """Base class of every method's options (a dataclass; fields are CLI-settable)."""

    def validate(self, num_layers: int, num_remove: int) -> None:
        """Check options that depend on the model (e.g. a forced window start) against its
        decoder layer count and the n layers to remove; raise ``UsageError``. The runner calls
        this after loading the model and before any run, so a bad option writes no result."""


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
        _check_component_name(name, "method", _POST_STEPS)
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
        if name in _POST_STEPS:
            raise UsageError(f"'{name}' is a post-step, not a method; append it to a method, e.g. remove+{name}")
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
                f"{_kind(spec)} '{spec.name}' has no option '{key}'; its options: {', '.join(sorted(names)) or '(none)'}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{spec.name}.{key}")
    try:
        return spec.config_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bad options for {_kind(spec)} '{spec.name}': {exc}") from None


def _kind(spec) -> str:
    return "post-step" if isinstance(spec, PostStepSpec) else "method"


# --- post-steps and pipelines (``method+step``, e.g. ``shortgpt+lora``) ----------------------

@dataclass
class PostStepSpec:
    name: str
    fn: Callable  # fn(ctx: MethodContext, cfg, result: PruneResult) -> PruneResult
    config_cls: type
    help: str
    module: str


_POST_STEPS: dict[str, PostStepSpec] = {}


def _check_component_name(name: str, kind: str, other: dict) -> None:
    if "+" in name or "." in name or "," in name or not name:
        raise ValueError(f"{kind} name '{name}' may not be empty or contain '+', '.' or ','")
    if name in other:
        raise ValueError(f"'{name}' is registered both as a method and as a post-step; pick another name")


def register_post_step(name: str, config: type = MethodConfig, help: str = ""):
    """Decorator: ``@register_post_step("lora", LoRAConfig, "one line")``.

    A post-step runs after any method when the method name is written ``METHOD+STEP``
    (``--methods shortgpt+lora``): ``fn(ctx, cfg, result) -> PruneResult`` receives the context
    (``ctx.model`` / ``ctx.adapter`` are the pruned model) and the method's result, and returns
    the result to evaluate. Several steps chain left to right (``remove+a+b``).
    """
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config for post-step {name} must be a dataclass")

    def deco(fn):
        old = _POST_STEPS.get(name)
        if old is not None and old.fn is not fn and old.module != fn.__module__:
            raise ValueError(f"post-step '{name}' is registered twice ({old.module} and {fn.__module__})")
        _check_component_name(name, "post-step", _REGISTRY)
        _POST_STEPS[name] = PostStepSpec(name, fn, config, help or (fn.__doc__ or "").strip().splitlines()[0],
                                         fn.__module__)
        return fn

    return deco


def available_post_steps() -> dict[str, PostStepSpec]:
    load_builtin_methods()
    return dict(sorted(_POST_STEPS.items()))


class PipelineConfig:
    """The configs of ``METHOD+STEP+...``, in order, keyed by component name.

    Recorded in the result JSON as ``method_config = {METHOD: {...}, STEP: {...}}``.
    """

    def __init__(self, components: list[tuple[str, Any]]):
        self.components = list(components)

    def items(self):
        return list(self.components)

    def __getitem__(self, name: str):
        for n, cfg in self.components:
            if n == name:
                return cfg
        raise KeyError(name)

    def validate(self, num_layers: int, num_remove: int) -> None:
        for _name, cfg in self.components:
            if callable(getattr(cfg, "validate", None)):
                cfg.validate(num_layers, num_remove)

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(cfg) for name, cfg in self.components}

    def __eq__(self, other):
        return isinstance(other, PipelineConfig) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"PipelineConfig({self.components!r})"


@dataclass
class PipelineSpec:
    """A method followed by post-steps; ``fn(ctx, cfg: PipelineConfig)`` like a method's."""
    name: str
    method: MethodSpec
    steps: list[PostStepSpec]

    @property
    def help(self) -> str:
        return " + ".join([self.method.help] + [s.help for s in self.steps])

    def fn(self, ctx, cfg: PipelineConfig) -> PruneResult:
        import time

        from harness.model.adapters import get_adapter

        for step in self.steps:  # model-dependent checks of the steps before the method spends its time
            check = getattr(cfg[step.name], "check_model", None)
            if callable(check):
                check(ctx.model, ctx.adapter)
        result = self.method.fn(ctx, cfg[self.method.name])
        for step in self.steps:
            ctx.model = result.model
            ctx.adapter = get_adapter(result.model)
            t = time.perf_counter()
            result = step.fn(ctx, cfg[step.name], result)
            ctx.timings[f"post_step.{step.name}"] = time.perf_counter() - t
        return result


def split_pipeline(name: str) -> list[str]:
    parts = [p.strip() for p in name.split("+")]
    if any(not p for p in parts):
        raise UsageError(f"method '{name}' has an empty part; write METHOD or METHOD+STEP, e.g. remove+lora")
    return parts


def resolve_method(name: str, options: dict[str, dict[str, str]] | None = None):
    """``(spec, cfg)`` for a method name, ``METHOD`` or ``METHOD+STEP+...``.

    Options come from ``options[COMPONENT]`` (e.g. ``-o lora.r=8``: every ``+lora`` in the run)
    and, for one pipeline only, ``options["METHOD+STEP"]["COMPONENT.KEY"]`` (e.g.
    ``-o remove+lora.lora.r=8``), which wins. A plain method is returned unchanged (its own
    spec and config), so its results and file names do not depend on this mechanism.
    """
    options = options or {}
    parts = split_pipeline(name)
    if len(parts) == 1:
        spec = get_method(name)
        return spec, build_config(spec, options.get(name, {}))
    method = get_method(parts[0])
    steps = []
    post = available_post_steps()
    for part in parts[1:]:
        if part not in post:
            hint = " (a method; only the first part of a name is a method)" if part in _REGISTRY else ""
            raise UsageError(f"unknown post-step '{part}' in '{name}'{hint}; available post-steps: "
                             f"{', '.join(post) or '(none)'} (see --list-methods)")
        steps.append(post[part])
    if len(set(parts)) != len(parts):
        raise UsageError(f"'{name}' names a component twice; each method or post-step may appear once")
    own: dict[str, dict[str, str]] = {}
    for key, value in options.get(name, {}).items():
        comp, dot, field_name = key.partition(".")
        if not dot or comp not in parts or not field_name:
            raise UsageError(f"option '{name}.{key}' does not name a component of '{name}'; write "
                             f"{name}.COMPONENT.KEY=VALUE with COMPONENT one of {', '.join(parts)} "
                             f"(or COMPONENT.KEY=VALUE for every run that uses it)")
        own.setdefault(comp, {})[field_name] = value
    components = []
    for spec in [method] + steps:
        components.append((spec.name, build_config(spec, {**options.get(spec.name, {}), **own.get(spec.name, {})})))
    return PipelineSpec(name, method, steps), PipelineConfig(components)


def check_option_targets(options: dict[str, dict[str, str]], names: list[str]) -> None:
    """Every ``-o TARGET.KEY=VALUE`` must address a run's method, one of its components, or a pipeline."""
    allowed = set(names)
    for name in names:
        allowed.update(split_pipeline(name))
    unknown = set(options) - allowed
    if unknown:
        raise UsageError(f"options given for methods not being run: {', '.join(sorted(unknown))} "
                         f"(running: {', '.join(names)})")


def config_dict(cfg) -> dict:
    """A run's ``method_config`` for the result JSON (a pipeline: one dict per component)."""
    return cfg.to_dict() if isinstance(cfg, PipelineConfig) else dataclasses.asdict(cfg)

"""Pipelines: a method followed by post-steps, written ``METHOD+STEP+...`` (``shortgpt+lora``).

``resolve_method(name, options)`` turns any name on ``--methods`` into ``(spec, cfg)``; a
pipeline's spec and config have the same interface as a method's (``spec.fn(ctx, cfg)``,
``cfg.validate``, ``cfg.to_dict``, ``cfg.label``), so the runner never asks which it has.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from harness.errors import UsageError
from harness.model.adapters import get_adapter
from harness.plugins.options import build_config
from harness.plugins.registry import (
    METHODS,
    POST_STEPS,
    PluginSpec,
    PruneResult,
    get_method,
)


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
            cfg.validate(num_layers, num_remove)

    def to_dict(self) -> dict:
        return {name: cfg.to_dict() for name, cfg in self.components}

    def label(self, name: str) -> str:
        """Each component's label joined by '+', e.g. ``remove+lora(r=4)``."""
        return "+".join(cfg.label(part) for part, cfg in self.components)

    def __eq__(self, other):
        return isinstance(other, PipelineConfig) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"PipelineConfig({self.components!r})"


@dataclass
class PipelineSpec:
    """A method followed by post-steps; ``fn(ctx, cfg: PipelineConfig)`` like a method's."""
    name: str
    method: PluginSpec
    steps: list[PluginSpec]
    kind: str = "pipeline"

    @property
    def help(self) -> str:
        return " + ".join([self.method.help] + [s.help for s in self.steps])

    def fn(self, ctx, cfg: PipelineConfig) -> PruneResult:
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
    post = POST_STEPS.all()
    for part in parts[1:]:
        if part not in post:
            hint = " (a method; only the first part of a name is a method)" if part in METHODS else ""
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


def check_option_targets(options: dict[str, dict[str, str]], names: list[str], echo=print) -> None:
    """Every ``-o TARGET.KEY=VALUE`` must address a run's method, one of its components, or a
    pipeline. Options for a known method that is not being run (a shared config file run with fewer
    --methods) are dropped with a note; a name no registry knows is an error (a typo)."""
    from harness.plugins.registry import available_methods, available_post_steps

    allowed = set(names)
    for name in names:
        allowed.update(split_pipeline(name))
    unknown = set(options) - allowed
    known = set(available_methods()) | set(available_post_steps())
    idle = sorted(n for n in unknown if all(part.strip() in known for part in n.split("+")))
    typos = sorted(unknown - set(idle))
    if typos:
        raise UsageError(f"options given for unknown methods: {', '.join(typos)} (running: {', '.join(names)}; "
                         "see --list-methods)")
    if idle:
        echo(f"note: ignoring the options given for methods not being run: {', '.join(idle)}")
        for name in idle:
            options.pop(name)


def code_identity(spec, cfg) -> dict:
    """What a run's method *is*, by content: the sha256 of each component's module source (a built-in
    or a --plugins file: an edited plugin is not served from the cache) and of every file an option
    names (laco.sentences_file, lora.text, streamline.post_train_text, ...)."""
    import sys
    from pathlib import Path

    from harness.io import file_sha256

    parts = [spec.method, *spec.steps] if isinstance(spec, PipelineSpec) else [spec]
    code = {}
    for part in parts:
        module = sys.modules.get(part.module)
        source = getattr(module, "__file__", None)
        code[part.name] = file_sha256(source) if source and Path(source).is_file() else None
    files = {}

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, str) and value and len(value) < 4096:
            p = Path(value).expanduser()
            try:
                if p.is_file():
                    files[value] = file_sha256(p)
            except OSError:
                pass

    walk(cfg.to_dict())
    return {"code": code, **({"option_files": files} if files else {})}

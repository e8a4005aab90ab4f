"""Method options: the config base class, option help, parsing ``-o METHOD.KEY=VALUE`` strings
into a config, and the table label (name plus the options that differ from the defaults)."""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import ClassVar

from harness.errors import UsageError


def option(default=dataclasses.MISSING, help: str = "", *, default_factory=dataclasses.MISSING):
    """A config field with its help text: ``epochs: int = option(5, "training epochs")``.

    The help is shown by ``--list-methods -v`` and in errors about that option."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help})


@dataclass
class MethodConfig:
    """Base class of every method's and post-step's options (a dataclass; fields are CLI-settable).

    Checked twice, each check once: ``check`` (the fields alone) when the config is built, and
    ``validate`` (against the model's layer count and n) once per target, before any weights load.
    Errors name the option as ``METHOD.KEY``; ``method_name`` is the registered name (the registry
    gives each registration its own subclass carrying it)."""

    method_name: ClassVar[str] = "method"

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Check the fields on their own (ranges, choices, files); raise ``UsageError``. Runs when
        the config is built, so a bad option fails before anything is loaded."""

    def validate(self, num_layers: int, num_remove: int) -> None:
        """Check options that depend on the model (e.g. a forced window start) against its
        decoder layer count and the n layers to remove; raise ``UsageError``. The runner calls
        this once per target from the model's config, before the weights load."""

    def to_dict(self) -> dict:
        """The run's ``method_config`` (every option, defaults included)."""
        return dataclasses.asdict(self)

    def label(self, name: str) -> str:
        """Table label: the name plus the options that differ from the defaults."""
        diffs = []
        defaults = type(self)()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != getattr(defaults, f.name):
                diffs.append(f"{f.name}={value}")
        return f"{name}({', '.join(diffs)})" if diffs else name


@dataclass
class WindowConfig(MethodConfig):
    """Options of a method that removes one contiguous window of n layers: ``start`` forces it."""

    start: int | None = option(None, "force the window's first layer (default: the method's own choice)")

    def validate(self, num_layers: int, num_remove: int) -> None:
        check_window(self.method_name, self.start, num_layers, num_remove)


def check_window(method: str, start: int | None, num_layers: int, num_remove: int) -> None:
    """A window of ``num_remove`` layers from ``start`` must fit ``num_layers`` (the one window check)."""
    if num_remove >= num_layers:
        raise UsageError(f"a window of {num_remove} layers does not fit a model with {num_layers} layers")
    if start is not None and not 0 <= start <= num_layers - num_remove:
        raise UsageError(f"{method}.start={start}: a window of {num_remove} layers starting there does not fit "
                         f"{num_layers} layers (use 0..{num_layers - num_remove})")


def option_help(config_cls: type, name: str) -> str:
    for f in dataclasses.fields(config_cls):
        if f.name == name:
            return f.metadata.get("help", "")
    return ""


def describe_options(config_cls: type) -> list[tuple[str, str, str, str]]:
    """``[(name, type, default, help)]`` for ``--list-methods -v``."""
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        typ = hints.get(f.name, f.type)
        out.append((f.name, getattr(typ, "__name__", str(typ).replace("typing.", "")), str(default),
                    f.metadata.get("help", "")))
    return out


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
        out = typ(value)
    except (TypeError, ValueError):
        raise UsageError(f"option {key} expects {getattr(typ, '__name__', typ)}, got '{value}'") from None
    if isinstance(out, float) and not math.isfinite(out):  # nan slips through every `x <= 0` check
        raise UsageError(f"option {key} must be a finite number, got '{value}'")
    return out


def build_config(spec, options: dict[str, str]):
    """Build ``spec.config_cls`` from ``{field: string value}``; unknown fields are errors."""
    hints = typing.get_type_hints(spec.config_cls)
    names = {f.name for f in dataclasses.fields(spec.config_cls)}
    kwargs = {}
    for key, value in options.items():
        if key not in names:
            raise UsageError(f"{spec.kind} '{spec.name}' has no option '{key}'; its options: "
                             f"{', '.join(sorted(names)) or '(none)'} (see --list-methods -v)")
        try:
            kwargs[key] = _coerce(value, hints[key], f"{spec.name}.{key}")
        except UsageError as exc:
            text = option_help(spec.config_cls, key)
            raise UsageError(f"{exc} ({key}: {text})" if text else str(exc)) from None
    try:
        return spec.config_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bad options for {spec.kind} '{spec.name}': {exc}") from None

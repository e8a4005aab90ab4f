"""``--config FILE``: a YAML file whose keys mirror the command-line flags.

Keys are flag names without the dashes (``model``, ``methods``, ``layers``, ``calib-samples`` or
``calib_samples``, ...). Comma-list flags (``methods``, ``tasks``, ``plugins``) also take YAML
lists. Method options go under ``method_opt`` (or ``options``), either as a list of
``TARGET.KEY=VALUE`` strings or as a mapping ``{TARGET: {KEY: VALUE}}``; a list value becomes
``a/b/c``. The file's values are defaults: flags given on the command line win (``--ratio`` on
the command line replaces the file's ``layers`` and vice versa), and command-line ``-o`` options
are added after the file's, so they override them. Relative paths are taken from the current
directory, as on the command line. ``num_fewshot`` takes a number or a mapping per task
(``{mmlu: 5, default: 0}``); ``labels`` maps method names to row labels (``{shortgpt: ShortGPT}``,
as ``--label``; labels given on the command line win).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from harness.errors import UsageError

LIST_FLAGS = ("methods", "tasks", "plugins", "ratio", "layers", "seed")  # ratio/layers/seed: a list sweeps
OPTION_KEYS = ("method_opt", "options")
EXCLUSIVE = (("ratio", "layers"),)
MAPPING_FLAGS = ("num_fewshot",)  # a YAML mapping becomes the flag's TASK=N,... form


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "/".join(_scalar(v) for v in value)
    return "none" if value is None else str(value)


def _options(value, path: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise UsageError(f"config file {path}: method_opt items must be 'METHOD.KEY=VALUE' strings")
        return list(value)
    if isinstance(value, dict):
        out = []
        for target, opts in value.items():
            if not isinstance(opts, dict):
                raise UsageError(f"config file {path}: method_opt.{target} must map option names to values, "
                                 f"e.g. {target}: {{epochs: 3}}")
            out.extend(f"{target}.{key}={_scalar(v)}" for key, v in opts.items())
        return out
    raise UsageError(f"config file {path}: method_opt must be a list of 'METHOD.KEY=VALUE' or a mapping")


def _labels(value, path: str) -> list[str]:
    if isinstance(value, dict):
        return [f"{method}={_scalar(text)}" for method, text in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UsageError(f"config file {path}: labels maps method names to row labels, e.g. {{shortgpt: ShortGPT}}")


def _strict_yaml(text: str, path: str):
    """``yaml.safe_load``, except that a key given twice in one mapping is an error (PyYAML keeps the
    last one silently, so a duplicated ``layers:`` would quietly change what runs)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                continue
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise UsageError(f"config file {path} line {key_node.start_mark.line + 1}: key '{key}' is given twice; "
                                 "keep one")
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass


def load_config_file(path: str, parser: argparse.ArgumentParser) -> dict:
    """The file's values as parser defaults (``{dest: value}``)."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"config file '{path}' does not exist; pass a YAML file with keys like model, methods")
    try:
        data = _strict_yaml(p.read_text(encoding="utf-8"), path)
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not UTF-8 text; pass a YAML file") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must be a mapping of flag names to values")
    actions = _actions(parser)
    out: dict = {}
    for raw_key, value in data.items():
        key = str(raw_key).lstrip("-").replace("-", "_")
        if key in OPTION_KEYS:
            out.setdefault("method_opt", []).extend(_options(value, path))
            continue
        if key in ("labels", "label"):  # {method: row label}: as --label METHOD=TEXT (the command line's win)
            out["label"] = _labels(value, path)
            continue
        if key in MAPPING_FLAGS and isinstance(value, dict):  # num_fewshot: {mmlu: 5, default: 0}
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
                raise UsageError(f"config file {path}: {raw_key} maps task names to numbers of examples, "
                                 "e.g. {mmlu: 5, default: 0}")
            out[key] = ",".join(f"{k}={v}" for k, v in value.items())
            continue
        action = actions.get(key)
        if action is None:
            raise UsageError(f"config file {path}: unknown key '{raw_key}'; keys are the command-line flags "
                             f"without dashes (e.g. model, methods, layers, calib_samples, method_opt)")
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise UsageError(f"config file {path}: '{raw_key}' is a switch; give true or false")
            out[key] = value
        elif key in LIST_FLAGS and isinstance(value, (list, tuple)):
            out[key] = ",".join(str(v) for v in value)
        elif value is None:
            out[key] = None
        elif isinstance(value, (dict, list)):
            raise UsageError(f"config file {path}: '{raw_key}' takes one value, not a {type(value).__name__}")
        else:
            text = _scalar(value)
            if action.type is not None:
                try:
                    out[key] = action.type(text)
                except argparse.ArgumentTypeError as exc:
                    raise UsageError(f"config file {path}: {exc}") from None
            else:
                out[key] = text
    return out


def parse_args_with_config(parser: argparse.ArgumentParser, argv):
    """Parse ``argv``; with ``--config FILE``, the file's values become defaults first."""
    args = parser.parse_args(argv)
    if not getattr(args, "config", None):
        return args
    values = load_config_file(args.config, parser)
    for a, b in EXCLUSIVE:
        if a in values and b in values and values[a] is not None and values[b] is not None:
            raise UsageError(f"config file {args.config}: give either {a} or {b}, not both")
    cli_opts = list(args.method_opt or [])
    parser.set_defaults(**{k: v for k, v in values.items() if k != "method_opt"})
    args = parser.parse_args(argv)
    args.method_opt = values.get("method_opt", []) + cli_opts  # file first: the command line overrides it
    for a, b in EXCLUSIVE:  # the command line's choice replaces the file's
        if getattr(args, a) is not None and getattr(args, b) is not None:
            setattr(args, b if a not in values else a, None)
    return args

"""The settings that shaped a folder's tables, stored beside them (``table_settings.yaml``), so that
``--report DIR`` renders the very tables the run printed: the metric per task (``--table-metric``,
``--table-preset``), the row labels, the method order, ``--stderr``, ``--per-task-retained``, ``--all-stability`` and ``--paired``.

Stored per output folder, not per run record: a finished run is re-tabulated by every later
invocation that reuses it, so the settings belong to the table written there, not to the run. A
flag given to ``--report`` overrides the stored value. The file is data, read with
``yaml.safe_load``: every field is checked for its type, the preset later against the known
presets (a bad file is one error line). YAML, not JSON: every ``*.json`` in a results folder is a
run record or lm-eval's, and scripts rely on that.
"""
from __future__ import annotations

from pathlib import Path

from harness.errors import UsageError
from harness.io import _write_atomic

FILENAME = "table_settings.yaml"
# field: (argparse attribute, type, value meaning "not given")
FIELDS = {"table_metric": (str, None), "table_preset": (str, None), "label": (list, []), "methods": (str, None),
          "stderr": (bool, False), "per_task_retained": (bool, False), "all_stability": (bool, False),
          "paired": (str, None)}


def of_args(args, method_order: list[str] | None) -> dict:
    """The table settings of an invocation (its method order as given, e.g. the run's methods)."""
    out = {name: getattr(args, name, empty) for name, (_t, empty) in FIELDS.items()}
    out["methods"] = ",".join(method_order) if method_order else None
    return out


def write(folder: Path, args, method_order: list[str] | None) -> Path:
    import yaml

    path = Path(folder) / FILENAME
    text = "# the settings of the tables in this folder; `run_benchmarks.py --report` reads them\n" + \
        yaml.safe_dump(of_args(args, method_order), sort_keys=False, allow_unicode=True)
    _write_atomic(path, text.encode("utf-8"))
    return path


def read(folder: Path) -> tuple[dict, Path] | None:
    """The stored settings of ``folder``, or of its one model subfolder (or several identical ones),
    checked; None when there are none."""
    folder = Path(folder)
    paths = [folder / FILENAME] if (folder / FILENAME).is_file() else sorted(folder.glob(f"*/{FILENAME}"))
    found = [(_check(p), p) for p in paths]
    if not found or any(s != found[0][0] for s, _p in found[1:]):
        return None
    return found[0]


def _check(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid YAML ({str(exc).splitlines()[0][:80]}); delete it to render with "
                         "the flags given") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a YAML mapping; delete it to render with the flags given")
    out = {}
    for name, (kind, empty) in FIELDS.items():
        value = data.get(name, empty)
        ok = value == empty or isinstance(value, kind) and (kind is not list or all(isinstance(v, str) for v in value))
        if not ok or (kind is not bool and isinstance(value, bool)):
            raise UsageError(f"{path}: '{name}' must be {kind.__name__}"
                             + (" of strings" if kind is list else "") + "; delete the file to render with the flags given")
        out[name] = value
    return out


def apply(args, folder: Path) -> Path | None:
    """Fill every table flag not given to ``--report`` from the folder's stored settings; returns the
    file used (None without one)."""
    stored = read(folder)
    if stored is None:
        return None
    settings, path = stored
    for name, (_kind, empty) in FIELDS.items():
        if getattr(args, name, empty) in (empty, None, False, []) and settings[name] not in (empty, None):
            setattr(args, name, settings[name])
    return path

"""The settings that shaped a folder's tables, stored beside them (``table_settings.json``), so that
``--report DIR`` renders the very tables the run printed: the metric per task (``--table-metric``,
``--table-preset``), the row labels, the method order, ``--stderr`` and ``--per-task-retained``.

Stored per output folder, not per run record: a finished run is re-tabulated by every later
invocation that reuses it, so the settings belong to the table written there, not to the run. A
flag given to ``--report`` overrides the stored value. The file is data: every field is checked
for its type, and the preset against the known presets (a bad file is one error line).
"""
from __future__ import annotations

import json
from pathlib import Path

from harness.errors import UsageError
from harness.io import write_json_atomic

FILENAME = "table_settings.json"
# field: (argparse attribute, type, value meaning "not given")
FIELDS = {"table_metric": (str, None), "table_preset": (str, None), "label": (list, []), "methods": (str, None),
          "stderr": (bool, False), "per_task_retained": (bool, False)}


def of_args(args, method_order: list[str] | None) -> dict:
    """The table settings of an invocation (its method order as given, e.g. the run's methods)."""
    out = {name: getattr(args, name, empty) for name, (_t, empty) in FIELDS.items()}
    out["methods"] = ",".join(method_order) if method_order else None
    return out


def write(folder: Path, args, method_order: list[str] | None) -> Path:
    path = Path(folder) / FILENAME
    write_json_atomic(path, {"what": "the settings of the tables in this folder (harness --report reads them)",
                             **of_args(args, method_order)})
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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid JSON ({str(exc)[:80]}); delete it to render with the flags given") \
            from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a JSON object; delete it to render with the flags given")
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

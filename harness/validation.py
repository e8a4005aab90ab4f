"""The validation phase: every user mistake becomes one ``error:`` line before any work starts.

Order (cheapest first; nothing here loads weights):
1. the command line: lists (no empty or repeated items), numbers in range, batch size;
2. plugins, imported here so that any error in a plugin file names the file;
3. files the run will read: the calibration text and the task data files are opened and their
   records checked (missing, empty, binary, truncated, wrong fields);
4. the model's config: every length (perplexity window, calibration blocks) against its
   maximum positions;
5. the output folder: created and proved writable with a probe file.

After the weights are loaded, ``check_dense_finite`` runs the dense model once on a
calibration batch and names the first layer whose output is not finite.
"""
from __future__ import annotations

import os
import tempfile
import traceback
from pathlib import Path

from harness.errors import UsageError
from harness.evaluation.eval_config import WIKITEXT_LOCAL, parse_batch_size
from harness.io import (  # the file checks live in io (base stage)
    check_jsonl_file,
    check_text_file,
)

# --- the command line --------------------------------------------------------------------------


def split_list(value: str | None, flag: str) -> list[str]:
    """``a,b,c`` -> ``[a, b, c]``; an empty item (``a,,b``, a trailing comma) or a repeated one
    is an error naming the flag."""
    if value is None or not str(value).strip():
        return []
    items = [v.strip() for v in str(value).split(",")]
    if any(not v for v in items):
        raise UsageError(f"{flag} '{value}' has an empty item; separate names with single commas, e.g. a,b")
    seen = set()
    for v in items:
        if v in seen:
            raise UsageError(f"{flag} '{value}' names '{v}' twice; give each item once")
        seen.add(v)
    return items


def check_range(flag: str, value, *, minimum=None, maximum=None, below=None, above=None) -> None:
    """``value`` (None = not given, fine) within the bounds; else one line naming the flag."""
    if value is None:
        return
    ok = (minimum is None or value >= minimum) and (maximum is None or value <= maximum) \
        and (below is None or value < below) and (above is None or value > above)
    if not ok:
        bounds = []
        if minimum is not None:
            bounds.append(f">= {minimum}")
        if above is not None:
            bounds.append(f"> {above}")
        if maximum is not None:
            bounds.append(f"<= {maximum}")
        if below is not None:
            bounds.append(f"< {below}")
        raise UsageError(f"{flag} {value} is out of range; it must be {' and '.join(bounds)}")


# a positive integer, or lm-eval's ``auto`` / ``auto:K``: one rule, owned by the evaluation stage
check_batch_size = parse_batch_size


def check_numbers(args) -> None:
    """Every numeric flag of the run in range (argparse checked the types)."""
    check_range("--limit", getattr(args, "limit", None), minimum=1)
    check_range("--calib-samples", getattr(args, "calib_samples", None), minimum=1)
    check_range("--calib-seq-len", getattr(args, "calib_seq_len", None), minimum=2)
    check_range("--calib-batch-size", getattr(args, "calib_batch_size", None), minimum=1)
    check_range("--ppl-seq-len", getattr(args, "ppl_seq_len", None), minimum=2)
    check_range("--ppl-stride", getattr(args, "ppl_stride", None), minimum=1)
    check_range("--ppl-max-windows", getattr(args, "ppl_max_windows", None), minimum=1)
    seeds = getattr(args, "seed", None)
    for seed in seeds if isinstance(seeds, list) else [seeds]:
        check_range("--seed", seed, minimum=0, maximum=2 ** 32 - 1)
    check_range("--max-loss-growth", getattr(args, "max_loss_growth", None), above=1.0)
    if getattr(args, "ppl_stride", None) and getattr(args, "ppl_seq_len", None) and args.ppl_stride > args.ppl_seq_len:
        raise UsageError(f"--ppl-stride {args.ppl_stride} must not exceed --ppl-seq-len {args.ppl_seq_len}")
    if getattr(args, "eval_batch_size", None) is not None:
        check_batch_size(args.eval_batch_size)


# --- plugins -------------------------------------------------------------------------------------


def load_plugins(paths: list[str]) -> None:
    """Import each plugin file; any failure (syntax error, an exception on import, a name that is
    already registered) is one line naming the file and, where known, the line."""
    from harness.plugins.registry import load_plugin_file

    for path in paths:
        try:
            load_plugin_file(path)
        except UsageError:
            raise
        except SyntaxError as exc:
            _forget_plugin(path)
            raise UsageError(f"plugin file '{path}' line {exc.lineno}: syntax error ({exc.msg})") from None
        except Exception as exc:  # noqa: BLE001 - anything a user's file raises is their input
            _forget_plugin(path)
            line = _plugin_line(path, exc)
            where = f" line {line}" if line else ""
            msg = str(exc).splitlines()[0][:300] if str(exc) else ""
            raise UsageError(f"plugin file '{path}'{where} failed to import: {type(exc).__name__}: {msg}") from None


def _plugin_line(path: str, exc: BaseException) -> int | None:
    target = os.path.realpath(os.path.expanduser(path))
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if os.path.realpath(frame.filename) == target:
            line = frame.lineno
    return line


def _forget_plugin(path: str) -> None:
    """A plugin that failed half-way must not count as loaded (a re-try would silently pass)."""
    import sys

    p = Path(path).expanduser()
    for name, mod in list(sys.modules.items()):
        if name.startswith("_streamline_plugin_") and getattr(mod, "__file__", None) and \
                os.path.realpath(mod.__file__) == os.path.realpath(p):
            del sys.modules[name]


# --- files ---------------------------------------------------------------------------------------

def check_calibration_source(source: str, field: str = "text") -> None:
    """A local calibration file: exists, text, not empty; JSON lines with ``field``."""
    from harness.signals.calibration import _is_local

    if not _is_local(source):
        return  # a Hub dataset id: checked when loaded (offline it fails with its own clear line)
    p = Path(source).expanduser()
    if not p.is_file():
        raise UsageError(f"calibration file '{source}' does not exist; pass an existing .txt or .jsonl file")
    if p.suffix == ".txt":
        check_text_file(p, "calibration file")
    else:
        from harness.evaluation.rows import text_field

        check_jsonl_file(p, "calibration file", (field,), text_field(field))


def check_task_data(cfg) -> list[Path]:
    """Open every task data file the evaluation reads and check every row (fields, types, the
    answer among the choices: harness.evaluation.task_checks.check_task_files); returns the files."""
    from harness.evaluation.task_checks import check_task_files

    if cfg.ppl and not cfg.data_dir and (os.environ.get("HF_DATASETS_OFFLINE") == "1"
                                         or os.environ.get("HF_HUB_OFFLINE") == "1"):
        raise UsageError("--ppl reads wikitext-2 test from the Hub, which is offline here; pass --data-dir "
                         "(a folder laid out like shared/data) so it is read from wikitext2/wikitext-2-raw-v1/test.jsonl")
    try:
        files = [Path(f) for f in check_task_files(cfg)]
    except (ValueError, KeyError, TypeError, OSError) as exc:  # e.g. a suite.json that is not JSON
        raise UsageError(f"task data could not be read ({type(exc).__name__}: {str(exc)[:200]}); "
                         "check --suite / --data-dir") from None
    wikitext = Path(cfg.data_dir) / WIKITEXT_LOCAL if cfg.data_dir else None
    if cfg.ppl and wikitext is not None and wikitext not in files:  # --ppl next to a --suite
        check_jsonl_file(wikitext, "wikitext-2 test file (--ppl)", ("text",))
        files.append(wikitext)
    return files


# --- the model's config --------------------------------------------------------------------------


def max_positions(config) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_lengths(config, *, ppl: bool, ppl_seq_len: int | None, ppl_stride: int | None,
                  calib_seq_len: int | None) -> None:
    """Every length the run uses fits the model's positions (from its config alone)."""
    limit = max_positions(config)
    if limit is None:
        return
    if ppl and ppl_seq_len is not None and ppl_seq_len > limit:
        raise UsageError(f"--ppl-seq-len {ppl_seq_len} exceeds the model's {limit} positions; use --ppl-seq-len <= {limit}")
    window = ppl_seq_len or min(2048, limit)
    if ppl and ppl_stride is not None and not 0 < ppl_stride <= window:
        raise UsageError(f"--ppl-stride {ppl_stride} must be between 1 and the window length {window}")
    if calib_seq_len is not None and calib_seq_len > limit:
        raise UsageError(f"--calib-seq-len {calib_seq_len} exceeds the model's {limit} positions; "
                         f"use --calib-seq-len <= {limit}")


def check_option_lengths(config, method: str, options: dict) -> None:
    """Every method option named ``*seq_len`` fits the model's positions (a pipeline's nested
    options too), so ``-o streamline.train_seq_len=4096`` fails here, not inside training."""
    limit = max_positions(config)
    if limit is None:
        return
    for key, value in options.items():
        if isinstance(value, dict):  # a pipeline's component: its options are -o COMPONENT.KEY=VALUE
            check_option_lengths(config, str(key), value)
        elif str(key).endswith("seq_len") and isinstance(value, int) and not isinstance(value, bool) \
                and value > limit:
            raise UsageError(f"-o {method}.{key}={value} exceeds the model's {limit} positions; "
                             f"use at most {limit}")


def check_option_widths(config, method: str, options: dict, decoder_params: int | None) -> None:
    """A replacement MLP's width (options ``hidden_size`` / ``hidden_mult``, as Streamline's) must give
    fewer parameters than the model's whole decoder stack (``decoder_params``, from a weightless copy):
    ``-o streamline.hidden_size=100000000`` fails here with the sizes, not as an allocation error
    inside training."""
    from harness.model.replacement import mlp_params, mlp_width

    for key, value in options.items():
        if isinstance(value, dict):  # a pipeline's component
            check_option_widths(config, str(key), value, decoder_params)
    d = getattr(config, "hidden_size", None)
    if decoder_params is None or not isinstance(d, int) or not ({"hidden_size", "hidden_mult"} & set(options)):
        return
    size, mult = options.get("hidden_size"), options.get("hidden_mult")
    if not (size is None or isinstance(size, int)) or not isinstance(mult, (int, float, type(None))):
        return
    h = mlp_width(d, size, mult) if mult is not None else mlp_width(d, size)
    params = mlp_params(d, h)
    if params > decoder_params:
        given = f"hidden_size={size}" if size else f"hidden_mult={mult}"
        raise UsageError(f"-o {method}.{given} makes the replacement MLP {params:,} parameters (width {h:,}, "
                         f"d = {d}), more than all of the model's decoder layers together ({decoder_params:,}); "
                         f"use a width below {decoder_params // (2 * d + 1):,} (the paper's is 2d = {2 * d})")


def check_option_files(method: str, options: dict) -> None:
    """Text files a method reads itself (``post_train_text``, ``lora.text``: any option named
    ``*text`` holding a local path) are checked like the calibration file, before any run."""
    for key, value in options.items():
        if isinstance(value, dict):  # a pipeline's component
            check_option_files(str(key), value)
        elif str(key).endswith("text") and isinstance(value, str) and value:
            field_key = f"{key[:-4]}field" if f"{key[:-4]}field" in options else f"{key}_field"
            field = options.get(field_key) or "text"
            try:
                check_calibration_source(value, field)
            except UsageError as exc:
                raise UsageError(f"-o {method}.{key}: {exc}") from None


# --- the output folder ---------------------------------------------------------------------------


def check_golden_target(path) -> None:
    """--write-golden FILE: a file path whose folder exists, checked before the run (not after it)."""
    if path is None or not str(path).strip():
        raise UsageError("--write-golden is empty; pass a .json file path")
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"--write-golden '{path}' is a folder; pass a file path, e.g. {Path(path) / 'golden.json'}")
    if not p.parent.is_dir():
        raise UsageError(f"--write-golden '{path}': its folder '{p.parent}' does not exist; create it first")


def check_output_dir(path) -> Path:
    """Create the output folder and prove it writable with a probe file (removed again)."""
    if path is None or not str(path).strip():
        raise UsageError("--output-dir is empty; pass a folder (default results/runs)")
    out = Path(path).expanduser()
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"--output-dir '{path}': '{parent}' is a file, not a folder; pass a folder path")
        if parent.exists():
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".sb_write_probe.", suffix=".tmp", dir=out)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"--output-dir '{path}' is not writable ({exc.strerror or exc}); pass a folder you can write to") \
            from None
    return out


# --- after loading: the dense model's numbers ----------------------------------------------------


def check_dense_finite(model, adapter, calibration, model_name: str = "the model") -> None:
    """One forward pass on the first calibration batch; NaN/inf in any layer's output is an error
    naming the first such layer (a model with broken weights is bad input, not a result)."""
    from harness.finite import first_nonfinite_layer

    ids, mask = next(iter(calibration.batches(min(2, len(calibration)))))
    where = first_nonfinite_layer(model, adapter, ids, mask)
    if where:
        raise UsageError(f"model '{model_name}' produces non-finite values (NaN or inf) in {where} on the "
                         "calibration data; its weights are broken or the dtype overflows (try --dtype float32)")

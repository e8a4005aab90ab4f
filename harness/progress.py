"""Progress bars only where someone watches.

Bars are drawn when stderr is a terminal, or when ``--progress`` forces them; ``--no-progress``
(or a log file / CI pipe as stderr) turns off every tqdm bar in the process, lm-eval's
"Running loglikelihood requests" included. lm-eval passes ``disable=False`` explicitly, which
wins over tqdm's ``TQDM_DISABLE`` environment variable, so the switch is made in tqdm itself.
"""
from __future__ import annotations

import sys

_ENABLED = True
_PATCHED = False


def decide(force_on: bool = False, force_off: bool = False, stream=None) -> bool:
    """Whether to draw bars: forced on or off, else only when ``stream`` (stderr) is a terminal."""
    if force_off:
        return False
    if force_on:
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _patch_tqdm() -> None:
    global _PATCHED
    if _PATCHED:
        return
    import tqdm.std

    original = tqdm.std.tqdm.__dict__["__init__"]

    def __init__(self, *args, **kwargs):
        if not _ENABLED:
            kwargs["disable"] = True
        return original.__get__(self, type(self))(*args, **kwargs)

    tqdm.std.tqdm.__init__ = __init__
    _PATCHED = True


def set_enabled(enabled: bool) -> None:
    """Turn every tqdm bar in this process on or off (transformers' and datasets' too)."""
    global _ENABLED
    _ENABLED = bool(enabled)
    _patch_tqdm()
    try:
        import transformers

        if enabled:
            transformers.utils.logging.enable_progress_bar()
        else:
            transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        import datasets

        if enabled:
            datasets.enable_progress_bars()
        else:
            datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def enabled() -> bool:
    return _ENABLED

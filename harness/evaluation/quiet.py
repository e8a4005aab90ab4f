"""lm-eval without noise: its git lookup runs ``git describe`` with stderr on the terminal, which
prints "fatal: not a git repository" whenever the harness runs outside a git checkout."""
from __future__ import annotations

import subprocess

_DONE = False


def _git_commit_hash_quietly():
    try:
        out = subprocess.run(["git", "describe", "--always"], check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def quiet_lm_eval() -> None:
    """Replace lm-eval's git lookup by one that keeps git's stderr to itself (idempotent)."""
    global _DONE
    if _DONE:
        return
    try:
        import lm_eval.evaluator
        import lm_eval.loggers.utils
    except ImportError:  # pragma: no cover
        return
    lm_eval.loggers.utils.get_git_commit_hash = _git_commit_hash_quietly
    if hasattr(lm_eval.evaluator, "get_git_commit_hash"):
        lm_eval.evaluator.get_git_commit_hash = _git_commit_hash_quietly
    _DONE = True

"""Small, real, trained reference models and the multiple-choice suite they are scored on.

``world`` generates (deterministically, from a seed) a synthetic training corpus and a held-out
multiple-choice task suite; ``tokenizer`` builds a word-level tokenizer for that world;
``train`` trains the reference OPT models (``python -m harness.reference.train``).

The trained checkpoints are checked in under ``reference/models/<name>/`` and can be passed to
``run_benchmarks.py --model`` by name (``--model ref-opt-12l``) or path.
"""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE_DIR = REPO_ROOT / "reference"
MODELS_DIR = REFERENCE_DIR / "models"
SUITE_DIR = REFERENCE_DIR / "suite"
CALIBRATION_PATH = REFERENCE_DIR / "calibration.txt"
NAMES = {"small": "ref-opt-12l", "medium": "ref-opt-16l", "large": "ref-opt-24l"}
REGIME_BAR = 0.60  # plain removal of the most similar 25% of layers keeps >= this share of dense accuracy
BARE_MAX_LAYERS = 16  # deeper models make the bare command exceed 60 s on 2 cores (README)
CALIB_SEQ_LEN = 24  # the length the models were trained on (one 13-17 word episode + </s> per row)


def shipped() -> list[str]:
    """Reference models checked in to this clone (a defined size may not be trained yet)."""
    return [n for n in NAMES.values() if (MODELS_DIR / n / "config.json").is_file()]


def resolve(name: str | None) -> Path | None:
    """The folder of a reference model given by name (``ref-opt-16l``) or path, else None."""
    if not name:
        return None
    if name in NAMES.values() and (MODELS_DIR / name).is_dir():
        return MODELS_DIR / name
    p = Path(name).expanduser()
    try:
        if p.is_dir() and p.resolve().parent == MODELS_DIR.resolve():
            return p
    except OSError:
        return None
    return None


def default_model() -> str:
    """The bare command's model, by the README's rule: the deepest shipped reference model of at
    most ``BARE_MAX_LAYERS`` layers whose manifest records a converged training run and plain
    removal at 25% keeping >= ``REGIME_BAR`` of dense accuracy. If none qualifies, the deepest
    shipped model within the layer limit (``quality`` reports which bar it misses)."""
    import json

    candidates = []
    for name in shipped():
        try:
            m = json.loads((MODELS_DIR / name / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        layers = m.get("size", {}).get("layers", 0)
        if layers <= BARE_MAX_LAYERS:
            ok = bool(m.get("converged")) and bool(m.get("quality", {}).get("regime", {}).get("meets_bar"))
            candidates.append((ok, layers, name))
    if not candidates:
        return NAMES["small"]
    return max(candidates)[2]

"""The reference models' LM-training text in their own format: whole episodes, loss on the answers.

The reference models were trained on one episode per row, starting at position 0, right-padded,
with the loss only on the part of each episode that its context determines (``train.step_batch``).
Calibration blocks cut from the concatenated ``reference/calibration.txt`` start mid-episode and
score every token, random context words included: LM-loss training on them (LLM-Streamline's
post-training, ``loss=lm``, LoRA healing) teaches a pruned model a task it was never trained on.

``training_text(model, calibration_source)`` returns that calibration text as a
``DocumentText`` of its episodes, split and encoded exactly as training splits and encodes
them (``train.encode_episode``), when the model is a shipped reference model whose manifest names
its world and the calibration text is that world's calibration stream (compared byte for byte,
so a copy elsewhere counts and an edited file does not); otherwise None and the text stays
plain blocks. Which text and mask a run trained on is recorded in its JSON with the training log
(``data.format``, ``data.loss_mask``).
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
from pathlib import Path

from harness.signals.calibration import DocumentText

from . import resolve
from . import world as W
from .tokenizer import PAD_ID, word_ids
from .train import encode_episode

FORMAT = "episodes"
LOSS_MASK = ("answers: the part of each episode its context determines, its '.' and the closing </s> "
             "(as harness.reference.train.step_batch scores them); context words and padding unscored")
LAYOUT = "one whole episode per row from position 0, no BOS, right-padded with <pad> (as the models were trained)"


def _world_of(model) -> W.World | None:
    """The world a shipped reference model's manifest names, else None."""
    folder = resolve(str(model)) if model else None
    if folder is None:
        return None
    try:
        spec = json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("world") or {}
    except (OSError, ValueError):
        return None
    if spec.get("suite") != W.SUITE_NAME or "seed" not in spec:
        return None
    return W.World(seed=int(spec["seed"]), n_people=int(spec.get("n_people", W.DEFAULT_N_PEOPLE)))


def _local_text(source: str) -> str | None:
    p = Path(source).expanduser()
    if p.suffix != ".txt" or not p.is_file():
        return None
    return p.read_text(encoding="utf-8")


@functools.lru_cache(maxsize=8)
def _cached(seed: int, n_people: int, source: str, text_sha256: str) -> DocumentText | None:
    world = W.World(seed=seed, n_people=n_people)
    if W.sha256_text(world.calibration_text()) != text_sha256:
        return None  # not this world's calibration text: no episode boundaries to give
    ids = word_ids(world.vocabulary())
    episodes = itertools.islice(world.documents("calibration", 10 ** 12, parts=True), W.CALIBRATION_DOCS)
    documents = tuple((tuple(c), tuple(a)) for c, a in (encode_episode(ctx, ans, ids) for ctx, ans in episodes))
    description = {
        "source": source, "text_sha256": text_sha256, "format": FORMAT, "layout": LAYOUT, "loss_mask": LOSS_MASK,
        "world": {"suite": W.SUITE_NAME, "seed": seed, "n_people": n_people, "stream": "calibration",
                  "episodes": len(documents)},
    }
    return DocumentText(documents=documents, pad_id=PAD_ID, description=description)


def training_text(model, calibration_source: str) -> DocumentText | None:
    """The calibration text as the model's training episodes (see the module docstring), or None."""
    world = _world_of(model)
    if world is None:
        return None
    text = _local_text(calibration_source)
    if text is None:
        return None
    return _cached(world.seed, world.n_people, calibration_source, hashlib.sha256(text.encode("utf-8")).hexdigest())


def identity(model, calibration_source: str) -> dict | None:
    """What decides the LM-training text beyond the calibration text itself (part of run keys), or None."""
    text = training_text(model, calibration_source)
    if text is None:
        return None
    return {"format": FORMAT, "loss_mask": "answers", "world": text.description["world"]}

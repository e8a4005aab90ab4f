"""A small generated world: a training corpus and a held-out multiple-choice suite.

Everything is derived from one integer seed with private ``random.Random`` streams (never the
global RNG, never ``hash()``-dependent ordering), so the same seed gives byte-identical corpus,
suite and calibration text on every machine and Python version >= 3.10.

Every document is one *episode*: a short context built from random fillers (items, invented
names, small numbers) followed by what the context determines. Each task of the suite asks for
the next word of a held-out episode of one kind:

``copy``      ``copy : cup pen hat box key bell ; cup pen hat`` -> `` box`` (continue a copy)
``reverse``   ``reverse : cup pen hat box key ; key box`` -> `` hat`` (continue a reversal)
``pattern``   ``repeat : cup pen hat cup pen hat cup`` -> `` pen`` (continue a period-2/3 pattern)
``sum``       ``safin has 7 coins . bigen has 5 coins . together they have`` -> `` 12``
              (read two numbers from the context and add them: 0..9 + 0..9)
``more``      ``safin has 7 coins . bigen has 5 coins . more has`` -> `` safin`` (compare, then
              copy the right name)

Design notes. An earlier version (v1: fact recall in a held-out phrasing, two-hop composition,
list lookup by content, variable pointer chasing), trained on packed text with every token
scored, did not train: a 16-layer d=64 model stayed at chance on all five tasks after 1,200
steps (loss plateau ~1.45). Two changes made these small models learn within a 2-core CPU
budget: episodes whose answer sits at a fixed offset (or is a small function of words at fixed
offsets), and scoring only the part of each episode its context determines (see
``train.step_batch``; with every token scored even pure copying stayed at ln 40 for 900 steps).

Held-out items never occur verbatim (query + correct choice) in the training text: episodes
whose context equals a test item's context are rejected whenever any stream is drawn (the
per-step training streams ``train/<step>`` included), and ``check_no_leak`` asserts it on a
12.3M-token sample of the "train" stream when the files are written.

Command line: ``python -m harness.reference.world`` writes ``reference/suite/`` and
``reference/calibration.txt`` and prints the corpus sha256.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from . import CALIBRATION_PATH, REFERENCE_DIR, SUITE_DIR  # noqa: F401

DEFAULT_SEED = 20240603
SUITE_NAME = "refworld-v2"
DEFAULT_N_PEOPLE = 200
DEFAULT_ITEMS = 300
DEFAULT_CORPUS_TOKENS = 12_300_000  # ~800k episodes of the "train" stream, leak-checked as a sample
CALIBRATION_DOCS = 4000

ITEMS = ["cup", "pen", "hat", "box", "key", "bell", "coin", "lamp", "book", "ring", "shoe", "sock",
         "fork", "bowl", "drum", "kite", "rope", "nail", "soap", "comb", "flag", "leaf", "seed",
         "star", "moon", "tree", "rock", "sand", "wave", "bird", "fish", "corn", "milk", "salt",
         "wool", "silk", "gold", "iron", "wood", "clay"]
OBJECTS = ["apples", "coins", "books", "stamps", "shells", "marbles", "cards", "pencils"]
NUMBERS = [str(i) for i in range(0, 19)]
COPY_LEN, REVERSE_LEN = 6, 5
TEMPLATE_WORDS = "copy reverse repeat ; : . has together they have more".split()

TASK_DESCRIPTIONS = {
    "copy": "continue copying a list of 6 random items given in the prompt",
    "reverse": "continue writing a list of 5 random items in reverse order",
    "pattern": "continue a repeating pattern of period 2 or 3",
    "sum": "add two numbers (0..9) stated about two people in the prompt",
    "more": "name the person of the two in the prompt who has more",
}
TASKS = tuple(TASK_DESCRIPTIONS)
DOC_WEIGHTS = {t: 1 for t in TASKS}


def _make_names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    onsets = "b d f g k l m n p r s t v z".split()
    vowels = "a e i o u".split()
    codas = ["", "n", "r", "l", "s", "k", "m"]
    names: list[str] = []
    seen = set(taken)
    while len(names) < n:
        k = rng.choice((2, 2, 3))
        name = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(k)) + rng.choice(codas)
        if len(name) >= 4 and name not in seen:
            seen.add(name)
            names.append(name)
    return names


@dataclass
class Item:
    task: str
    query: str
    choices: list[str]
    label: int
    key: str  # the episode's context, for structural collision rejection in the corpus

    def as_json(self) -> dict:
        return {"query": self.query, "choices": self.choices, "label": self.label}

    @property
    def gold_text(self) -> str:
        return self.query + self.choices[self.label]


class World:
    """Invented people plus generators for corpus episodes and held-out test items."""

    def __init__(self, seed: int = DEFAULT_SEED, n_people: int = DEFAULT_N_PEOPLE,
                 items_per_task: int = DEFAULT_ITEMS):
        self.seed = seed
        self.n_people = n_people
        self.items_per_task = items_per_task
        rng = random.Random(f"{seed}/world")
        self.people = _make_names(rng, n_people, set(self._fixed_words()))
        self._items: dict[str, list[Item]] | None = None
        self._test_keys: dict[str, set[str]] = {}

    @staticmethod
    def _fixed_words() -> list[str]:
        return TEMPLATE_WORDS + ITEMS + OBJECTS + NUMBERS

    def vocabulary(self) -> list[str]:
        """Every word the corpus and suite can contain, sorted (deterministic)."""
        return sorted(set(self._fixed_words()) | set(self.people))

    # ----------------------------------------------------------------- episodes
    # Each returns (key, context words, answer words): the doc is context + answer + ".",
    # a test item cuts it at a position inside the answer.
    def _copy(self, rng):
        items = rng.sample(ITEMS, COPY_LEN)
        ctx = f"copy : {' '.join(items)} ;"
        return ctx, ctx, items

    def _reverse(self, rng):
        items = rng.sample(ITEMS, REVERSE_LEN)
        ctx = f"reverse : {' '.join(items)} ;"
        return ctx, ctx, items[::-1]

    def _pattern(self, rng):
        period = rng.choice((2, 3))
        unit = rng.sample(ITEMS, period)
        seq = [unit[i % period] for i in range(10)]
        head = rng.randint(period + 1, 5)  # shown before the answer part starts
        ctx = f"repeat : {' '.join(seq[:head])}"
        return f"{period}:{' '.join(unit)}", ctx, seq[head:]  # the unit is held out, whatever is shown

    def _two_counts(self, rng, distinct: bool):
        p, q = rng.sample(self.people, 2)
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        while distinct and a == b:
            b = rng.randint(0, 9)
        obj = rng.choice(OBJECTS)
        return p, q, a, b, f"{p} has {a} {obj} . {q} has {b} {obj} ."

    def _sum(self, rng):
        p, q, a, b, ctx = self._two_counts(rng, distinct=False)
        return ctx + " together", ctx + " together they have", [str(a + b)]

    def _more(self, rng):
        p, q, a, b, ctx = self._two_counts(rng, distinct=True)
        return ctx + " more", ctx + " more has", [p if a > b else q]

    _EPISODES = {"copy": "_copy", "reverse": "_reverse", "pattern": "_pattern", "sum": "_sum", "more": "_more"}

    def _episode(self, task, rng):
        return getattr(self, self._EPISODES[task])(rng)

    def _doc(self, task, rng) -> tuple[str, str]:
        """(context, what the context determines) of a training episode."""
        while True:
            key, ctx, answer = self._episode(task, rng)
            if key not in self._test_keys.get(task, ()):
                return ctx, f"{' '.join(answer)} ."

    def _item(self, task, rng) -> Item:
        while True:
            key, ctx, answer = self._episode(task, rng)
            k = rng.randrange(len(answer))
            query = " ".join([ctx, *answer[:k]])
            gold = answer[k]
            wrong = self._distractors(task, rng, ctx, answer, k)
            if wrong is not None:
                return self._mc(task, rng, query, gold, wrong, key)

    def _distractors(self, task, rng, ctx, answer, k):
        gold = answer[k]
        if task in ("copy", "reverse", "pattern"):
            pool = [w for w in dict.fromkeys(ctx.split()[2:]) if w != gold and w in ITEMS]
            extra = [w for w in ITEMS if w not in pool and w != gold]
            pool = pool + rng.sample(extra, max(0, 3 - len(pool)))
            return rng.sample(pool, 3)
        words = ctx.split()
        if task == "sum":
            a, b, c = int(words[2]), int(words[7]), int(gold)
            cands = list(dict.fromkeys(str(v) for v in (c - 1, c + 1, a, b, c - 2, c + 2) if 0 <= v <= 18 and v != c))
            return cands[:3] if len(cands) >= 3 else None
        # more: the other name in the prompt and two other people
        other = words[5] if gold == words[0] else words[0]
        rest = [p for p in rng.sample(self.people, 4) if p not in (gold, other)][:2]
        return [other, *rest]

    @staticmethod
    def _mc(task: str, rng: random.Random, query: str, gold: str, wrong: list[str], key: str) -> Item:
        assert gold not in wrong and len(set(wrong)) == len(wrong) == 3, (task, gold, wrong)
        choices = [gold] + list(wrong)
        rng.shuffle(choices)
        return Item(task, query, [" " + c for c in choices], choices.index(gold), key)

    # ----------------------------------------------------------------- suite
    def items(self) -> dict[str, list[Item]]:
        """The held-out test items (generated once; also registers their keys for the corpus)."""
        if self._items is None:
            rng = random.Random(f"{self.seed}/suite")
            out: dict[str, list[Item]] = {}
            for task in TASKS:
                seen: set[str] = set()
                items: list[Item] = []
                while len(items) < self.items_per_task:
                    it = self._item(task, rng)
                    if it.key not in seen:  # no duplicate episodes inside the suite
                        seen.add(it.key)
                        items.append(it)
                out[task] = items
            self._items = out
            self._test_keys = {t: {it.key for it in its} for t, its in out.items()}
        return self._items

    # ----------------------------------------------------------------- corpus
    def documents(self, stream: str, n_tokens: int, parts: bool = False):
        """Yield documents (one line each) until about ``n_tokens`` whitespace tokens were produced.

        ``stream`` names an independent random stream ("train", "calibration", ...). Episodes
        whose context equals a test item's context are rejected and redrawn. With ``parts``,
        yield ``(context, answer)`` pairs instead of ``"context answer"`` lines.
        """
        self.items()  # test keys must be known before any training text is drawn
        rng = random.Random(f"{self.seed}/corpus/{stream}")
        kinds = list(DOC_WEIGHTS)
        weights = [DOC_WEIGHTS[k] for k in kinds]
        produced = 0
        while produced < n_tokens:
            ctx, answer = self._doc(rng.choices(kinds, weights)[0], rng)
            doc = f"{ctx} {answer}"
            produced += doc.count(" ") + 1
            yield (ctx, answer) if parts else doc

    def corpus_text(self, n_tokens: int = DEFAULT_CORPUS_TOKENS, stream: str = "train") -> str:
        """The training corpus: documents separated by blank lines, ending with a newline."""
        return "\n\n".join(self.documents(stream, n_tokens)) + "\n"

    def calibration_text(self, n_docs: int = CALIBRATION_DOCS) -> str:
        """Episodes from their own stream, each closed by ``</s>`` as in training."""
        docs = []
        for doc in self.documents("calibration", 10 ** 12):
            docs.append(doc + " </s>")
            if len(docs) == n_docs:
                break
        return "\n\n".join(docs) + "\n"


def check_no_leak(items: dict[str, list[Item]], corpus: str) -> None:
    """Assert that no item's query + correct choice occurs verbatim in the corpus."""
    leaks = [(t, it.gold_text) for t, its in items.items() for it in its if it.gold_text in corpus]
    assert not leaks, f"{len(leaks)} held-out items occur verbatim in the corpus, e.g. {leaks[:3]}"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def suite_files(world: World, corpus_sha256: str, corpus_tokens: int) -> dict[str, str]:
    """File name -> content of the suite directory (deterministic bytes)."""
    files: dict[str, str] = {}
    tasks = {}
    for task, items in world.items().items():
        name = f"{task}.jsonl"
        files[name] = "".join(json.dumps(it.as_json(), ensure_ascii=True) + "\n" for it in items)
        tasks[task] = {"file": name, "n": len(items), "description": TASK_DESCRIPTIONS[task],
                       "num_choices": len(items[0].choices)}
    meta = {
        "name": SUITE_NAME,
        "seed": world.seed,
        "n_people": world.n_people,
        "items_per_task": world.items_per_task,
        "tasks": tasks,
        "format": {"target_delimiter": "", "choices_have_leading_space": True,
                   "metrics": ["acc", "acc_norm (log-likelihood / byte length of the choice)"]},
        "corpus_tokens": corpus_tokens,
        "corpus_sha256": corpus_sha256,
        "calibration_file": "../calibration.txt",
        "generator": "python -m harness.reference.world",
    }
    files["suite.json"] = json.dumps(meta, indent=2, sort_keys=False) + "\n"
    return files


def write_world_files(world: World, out: Path = SUITE_DIR, calibration: Path = CALIBRATION_PATH,
                      corpus_tokens: int = DEFAULT_CORPUS_TOKENS) -> str:
    """Write the suite folder and the calibration text; return the corpus (leak-checked)."""
    corpus = world.corpus_text(corpus_tokens)
    check_no_leak(world.items(), corpus)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in suite_files(world, sha256_text(corpus), corpus_tokens).items():
        (out / name).write_text(content, encoding="utf-8")
    calibration.parent.mkdir(parents=True, exist_ok=True)
    calibration.write_text(world.calibration_text(), encoding="utf-8")
    return corpus


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--corpus-tokens", type=int, default=DEFAULT_CORPUS_TOKENS)
    ap.add_argument("--out", type=Path, default=SUITE_DIR, help="suite directory")
    ap.add_argument("--calibration", type=Path, default=CALIBRATION_PATH)
    ap.add_argument("--corpus-out", type=Path, default=None, help="also write the corpus text here")
    args = ap.parse_args(argv)
    corpus = write_world_files(World(args.seed), args.out, args.calibration, args.corpus_tokens)
    if args.corpus_out:
        args.corpus_out.write_text(corpus, encoding="utf-8")
    print(f"suite written to {args.out}; corpus {len(corpus)} chars, sha256 {sha256_text(corpus)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A small generated world: a training corpus and a held-out multiple-choice suite.

Everything is derived from one integer seed with private ``random.Random`` streams (never the
global RNG, never ``hash()``-dependent ordering), so the same seed gives byte-identical corpus,
suite and calibration text on every machine and Python version >= 3.10.

The world has ``n_people`` invented people (one word-token names), each with four attributes
(city, job, pet, color). The corpus mixes five kinds of documents; each task of the suite is
scored on held-out items of one kind:

``fact_recall``  parametric memory. ``the city of <p> is`` -> `` <city>``. Every fact is stated
                 many times in the corpus in several templates, but for the held-out (person,
                 attribute) pairs the canonical template ``the <a> of <p> is <v> .`` never
                 appears: the model has to carry the fact over from the other phrasings.
``fact_compose`` in-context binding composed with memory (two hops). ``<z> is the boss of <w> .
                 <x> is the boss of <y> . the pet of the boss of <y> is`` -> `` <pet of x>``;
                 the bosses are random in every document, the pets are memorised facts. The
                 distractors are the same attribute of the other three people in the prompt.
``list_next``    in-context retrieval (induction). ``the list is cup pen ... . after sun
                 comes`` -> the item that follows ``sun`` in the list; distractors are other
                 list items.
``var_chain``    in-context pointer chasing. A short program of ``let X = 7 .`` / ``let Y = X .``
                 lines; the query asks for a variable two references away from its constant.
                 Distractors are the other constants of the program.
``arith``        in-context state tracking plus small arithmetic. ``<p> has 4 coins . <q> has 9
                 coins . <p> gets 3 more . now <p> has`` -> `` 7``; distractors are the old count,
                 the other person's count and an off-by-one answer.

Held-out items never occur verbatim (query + correct choice) in the training corpus; this is
asserted when the files are written (``write_world_files``), after structural rejection of colliding
episodes during corpus generation.

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

DEFAULT_SEED = 20240603
SUITE_NAME = "refworld-v1"
DEFAULT_N_PEOPLE = 200
DEFAULT_ITEMS = 300
DEFAULT_CORPUS_TOKENS = 10_000_000  # >= every reference model's training tokens (2400 x 32 x 128)
CALIBRATION_DOCS = 400

from . import CALIBRATION_PATH, REFERENCE_DIR, SUITE_DIR  # noqa: E402,F401

ATTRS: dict[str, list[str]] = {
    "city": ["paris", "rome", "oslo", "cairo", "lima", "tokyo", "delhi", "boston", "berlin", "madrid",
             "dublin", "vienna", "prague", "sydney", "denver", "austin"],
    "job": ["baker", "farmer", "doctor", "teacher", "pilot", "singer", "writer", "painter", "nurse",
            "driver", "judge", "chef", "miner", "sailor", "tailor", "guard"],
    "pet": ["cat", "dog", "horse", "rabbit", "parrot", "turtle", "hamster", "goat", "duck", "snake",
            "frog", "pony"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white"],
}
ATTR_ORDER = ("city", "job", "pet", "color")

# Phrasings of a fact; the canonical one is held out for the fact_recall test pairs.
CANONICAL = "the {a} of {p} is {v} ."
FACT_TEMPLATES: dict[str, list[str]] = {
    "city": ["{p} lives in {v} .", "{p} is from {v} ."],
    "job": ["{p} works as a {v} .", "{p} has a job as a {v} ."],
    "pet": ["{p} owns a {v} .", "{p} has a pet {v} ."],
    "color": ["{p} likes the color {v} .", "{p} wears {v} every day ."],
}
QUESTION = "question : what is the {a} of {p} ? answer : {v} ."

LIST_ITEMS = ["cup", "pen", "hat", "box", "key", "bell", "coin", "lamp", "book", "ring", "shoe", "sock",
              "fork", "bowl", "drum", "kite", "rope", "nail", "soap", "comb", "flag", "leaf", "seed",
              "star", "moon", "tree", "rock", "sand", "wave", "bird", "fish", "corn", "milk", "salt",
              "wool", "silk", "gold", "iron", "wood", "clay"]
ARITH_OBJECTS = ["apples", "coins", "books", "stamps", "shells", "marbles", "cards", "pencils"]
VARIABLES = list("BCDFGHJKLMNPQRSTVWXZ")
DIGITS = [str(i) for i in range(1, 10)]
MAX_COUNT = 20
NUMBERS = [str(i) for i in range(0, MAX_COUNT + 1)]

# Literal words of all templates (placeholders removed).
TEMPLATE_TEXT = " ".join([
    CANONICAL, QUESTION, *[t for ts in FACT_TEMPLATES.values() for t in ts],
    "{z} is the boss of {w} . the {a} of the boss of {w} is {v} . the boss of {w} is {z} .",
    "the list is {items} . after {x} comes {y} .",
    "let {x} = {y} . so {x} is {v} .",
    "{p} has {n} {obj} . {p} gets {d} more . {p} loses {d} . now {p} has {n} .",
])

TASK_DESCRIPTIONS = {
    "fact_recall": "recall a memorised attribute of a person in a phrasing held out for that fact",
    "fact_compose": "two hops: resolve 'the boss of X' from the prompt, then recall the boss's attribute",
    "list_next": "in-context retrieval: which item follows a given item in a list given in the prompt",
    "var_chain": "in-context pointer chasing through two variable references to a constant",
    "arith": "track a count through one add/remove step (small arithmetic, 0..20)",
}
TASKS = tuple(TASK_DESCRIPTIONS)
# Relative frequency of document kinds in the corpus.
DOC_WEIGHTS = {"bio": 30, "fact_compose": 22, "list_next": 12, "var_chain": 20, "arith": 16}


def _template_words() -> list[str]:
    words = []
    for w in TEMPLATE_TEXT.split():
        if not (w.startswith("{") and w.endswith("}")):
            words.append(w)
    return words


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
    """The people and their facts, plus generators for corpus documents and test items."""

    def __init__(self, seed: int = DEFAULT_SEED, n_people: int = DEFAULT_N_PEOPLE,
                 items_per_task: int = DEFAULT_ITEMS):
        if items_per_task > n_people * len(ATTR_ORDER) // 2:
            raise ValueError("items_per_task too large for the number of facts")
        self.seed = seed
        self.n_people = n_people
        self.items_per_task = items_per_task
        rng = random.Random(f"{seed}/world")
        fixed = set(self._fixed_words())
        self.people = _make_names(rng, n_people, fixed)
        self.facts: dict[str, dict[str, str]] = {
            p: {a: rng.choice(ATTRS[a]) for a in ATTR_ORDER} for p in self.people}
        pairs = [(p, a) for p in self.people for a in ATTR_ORDER]
        rng.shuffle(pairs)
        self.heldout_pairs: list[tuple[str, str]] = pairs[:items_per_task]
        self._heldout = set(self.heldout_pairs)  # membership only
        self._items: dict[str, list[Item]] | None = None
        self._test_keys: dict[str, set[str]] = {}

    # ----------------------------------------------------------------- vocabulary
    @staticmethod
    def _fixed_words() -> list[str]:
        words = _template_words()
        for vals in ATTRS.values():
            words += vals
        words += list(ATTR_ORDER) + LIST_ITEMS + ARITH_OBJECTS + VARIABLES + DIGITS + NUMBERS
        return words

    def vocabulary(self) -> list[str]:
        """Every word the corpus and suite can contain, sorted (deterministic)."""
        return sorted(set(self._fixed_words()) | set(self.people))

    # ----------------------------------------------------------------- episodes
    def _bio(self, rng: random.Random) -> str:
        sents = []
        for p in rng.sample(self.people, rng.choice((1, 1, 2))):
            for a in rng.sample(ATTR_ORDER, rng.randint(2, 4)):
                options = list(FACT_TEMPLATES[a]) + [QUESTION]
                if (p, a) not in self._heldout:
                    options.append(CANONICAL)
                sents.append(rng.choice(options).format(p=p, a=a, v=self.facts[p][a]))
        return " ".join(sents)

    def _compose_episode(self, rng: random.Random, n_pairs: int):
        ppl = rng.sample(self.people, 2 * n_pairs)
        pairs = [(ppl[2 * i], ppl[2 * i + 1]) for i in range(n_pairs)]  # (boss, employee)
        setup = " ".join(f"{z} is the boss of {w} ." for z, w in pairs)
        return ppl, pairs, setup

    def _fact_compose_doc(self, rng: random.Random) -> str:
        while True:
            n = rng.choice((2, 2, 3))
            _, pairs, setup = self._compose_episode(rng, n)
            if setup not in self._test_keys.get("fact_compose", ()):
                break
        qs: list[str] = []
        for _ in range(rng.choice((1, 2, 2))):
            z, w = rng.choice(pairs)
            if rng.random() < 0.2:
                q = f"the boss of {w} is {z} ."
            else:
                a = rng.choice(ATTR_ORDER)
                q = f"the {a} of the boss of {w} is {self.facts[z][a]} ."
            if q not in qs:
                qs.append(q)
        return setup + " " + " ".join(qs)

    def _fact_compose_item(self, rng: random.Random) -> Item:
        while True:
            ppl, pairs, setup = self._compose_episode(rng, 2)
            a = rng.choice(ATTR_ORDER)
            vals = [self.facts[p][a] for p in ppl]
            if len(set(vals)) == len(vals):
                break
        z, w = rng.choice(pairs)
        query = f"{setup} the {a} of the boss of {w} is"
        gold = self.facts[z][a]
        return self._mc("fact_compose", rng, query, gold, [v for v in vals if v != gold], setup)

    def _fact_recall_item(self, rng: random.Random, p: str, a: str) -> Item:
        gold = self.facts[p][a]
        others = [v for v in ATTRS[a] if v != gold]
        query = f"the {a} of {p} is"
        return self._mc("fact_recall", rng, query, gold, rng.sample(others, 3), query)

    def _list_episode(self, rng: random.Random, lo: int, hi: int):
        items = rng.sample(LIST_ITEMS, rng.randint(lo, hi))
        return items, "the list is " + " ".join(items) + " ."

    def _list_doc(self, rng: random.Random) -> str:
        while True:
            items, setup = self._list_episode(rng, 5, 10)
            if setup not in self._test_keys.get("list_next", ()):
                break
        qs = []
        for i in rng.sample(range(len(items) - 1), min(3, len(items) - 1)):
            qs.append(f"after {items[i]} comes {items[i + 1]} .")
        return setup + " " + " ".join(qs)

    def _list_item(self, rng: random.Random) -> Item:
        items, setup = self._list_episode(rng, 6, 10)
        i = rng.randrange(len(items) - 1)
        x, gold = items[i], items[i + 1]
        others = [t for t in items if t not in (x, gold)]
        return self._mc("list_next", rng, f"{setup} after {x} comes", gold, rng.sample(others, 3), setup)

    def _program(self, rng: random.Random):
        """Three constants, a two-step reference chain and a one-step distractor reference."""
        names = rng.sample(VARIABLES, 6)
        c1, c2, c3, r1, r2, r3 = names
        vals = rng.sample(DIGITS, 3)
        defs = {c1: vals[0], c2: vals[1], c3: vals[2]}
        src = rng.choice((c1, c2, c3))
        other = rng.choice([c for c in (c1, c2, c3) if c != src])
        refs = {r1: src, r2: r1, r3: other}  # r2 -> r1 -> src (depth 2); r3 -> other (depth 1)
        # Random order in which every variable is defined before it is used.
        pending = [c1, c2, c3, r1, r2, r3]
        defined: list[str] = []
        while pending:
            ready = [v for v in pending if v in defs or refs[v] in defined]
            v = rng.choice(ready)
            pending.remove(v)
            defined.append(v)
        lines = [f"let {v} = {defs[v] if v in defs else refs[v]} ." for v in defined]
        value = dict(defs)
        for v in defined:
            if v in refs:
                value[v] = value[refs[v]]
        depth = {c1: 0, c2: 0, c3: 0, r1: 1, r2: 2, r3: 1}
        return " ".join(lines), value, depth, r2, vals

    def _var_doc(self, rng: random.Random) -> str:
        while True:
            setup, value, depth, _, _ = self._program(rng)
            if setup not in self._test_keys.get("var_chain", ()):
                break
        qs = []
        variables = sorted(value)
        for v in rng.sample(variables, 2):
            qs.append(f"so {v} is {value[v]} .")
        return setup + " " + " ".join(qs)

    def _var_item(self, rng: random.Random) -> Item:
        setup, value, _, target, consts = self._program(rng)
        gold = value[target]
        others = [c for c in consts if c != gold]
        others.append(rng.choice([d for d in DIGITS if d not in consts]))
        return self._mc("var_chain", rng, f"{setup} so {target} is", gold, others, setup)

    def _arith_episode(self, rng: random.Random):
        p, q = rng.sample(self.people, 2)
        obj = rng.choice(ARITH_OBJECTS)
        n = {p: rng.randint(0, 15), q: rng.randint(0, 15)}
        who = rng.choice((p, q))
        if n[who] > 0 and rng.random() < 0.5:
            d = rng.randint(1, min(9, n[who]))
            op, new = f"{who} loses {d} .", n[who] - d
        else:
            d = rng.randint(1, min(9, MAX_COUNT - n[who]))
            op, new = f"{who} gets {d} more .", n[who] + d
        setup = f"{p} has {n[p]} {obj} . {q} has {n[q]} {obj} . {op}"
        other = q if who == p else p
        return setup, who, other, n[who], new, n[other]

    def _arith_doc(self, rng: random.Random) -> str:
        while True:
            setup, who, other, old, new, n_other = self._arith_episode(rng)
            if setup not in self._test_keys.get("arith", ()):
                break
        qs = [f"now {who} has {new} ."]
        if rng.random() < 0.5:
            qs.append(f"now {other} has {n_other} .")
            if rng.random() < 0.5:
                qs.reverse()
        return setup + " " + " ".join(qs)

    def _arith_item(self, rng: random.Random) -> Item:
        while True:
            setup, who, _, old, new, n_other = self._arith_episode(rng)
            off = new + rng.choice((-1, 1))
            if off < 0 or off > MAX_COUNT:
                off = new - (off - new)
            wrong = [old, n_other, off]
            if len({new, *wrong}) == 4:
                break
        return self._mc("arith", rng, f"{setup} now {who} has", str(new), [str(w) for w in wrong], setup)

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
            out["fact_recall"] = [self._fact_recall_item(rng, p, a) for p, a in self.heldout_pairs]
            makers = {"fact_compose": self._fact_compose_item, "list_next": self._list_item,
                      "var_chain": self._var_item, "arith": self._arith_item}
            for task, make in makers.items():
                seen: set[str] = set()
                items: list[Item] = []
                while len(items) < self.items_per_task:
                    it = make(rng)
                    if it.key not in seen:  # no duplicate episodes inside the suite
                        seen.add(it.key)
                        items.append(it)
                out[task] = items
            self._items = {t: out[t] for t in TASKS}
            self._test_keys = {t: {it.key for it in its} for t, its in self._items.items()}
        return self._items

    # ----------------------------------------------------------------- corpus
    def documents(self, stream: str, n_tokens: int):
        """Yield documents (one line each) until about ``n_tokens`` whitespace tokens were produced.

        ``stream`` names an independent random stream ("train", "calibration", ...). Episodes
        whose context equals a test item's context are rejected and redrawn.
        """
        self.items()  # test keys must be known before any training text is drawn
        rng = random.Random(f"{self.seed}/corpus/{stream}")
        kinds = list(DOC_WEIGHTS)
        weights = [DOC_WEIGHTS[k] for k in kinds]
        makers = {"bio": self._bio, "fact_compose": self._fact_compose_doc, "list_next": self._list_doc,
                  "var_chain": self._var_doc, "arith": self._arith_doc}
        produced = 0
        while produced < n_tokens:
            kind = rng.choices(kinds, weights)[0]
            doc = makers[kind](rng)
            produced += doc.count(" ") + 1
            yield doc

    def corpus_text(self, n_tokens: int = DEFAULT_CORPUS_TOKENS, stream: str = "train") -> str:
        """The training corpus: documents separated by blank lines, ending with a newline."""
        return "\n\n".join(self.documents(stream, n_tokens)) + "\n"

    def calibration_text(self, n_docs: int = CALIBRATION_DOCS) -> str:
        docs = []
        for doc in self.documents("calibration", 10 ** 12):
            docs.append(doc)
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

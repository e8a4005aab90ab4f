"""Row checks for the local task files (``--data-dir``, ``--suite``): every row's fields have the
types the task's lm-eval config reads, and its answer is one of its choices. lm-eval itself scores
a label of 7 out of 4 choices, -1 or 1.5 as simply wrong; here such a row is one error line naming
the file and line before the model loads.

Each checker takes a row (a dict) and returns what is wrong with it, or None."""
from __future__ import annotations


def _texts(row: dict, *names: str) -> str | None:
    for name in names:
        if not isinstance(row.get(name), str):
            return f"'{name}' must be a string, got {_shown(row.get(name))}"
    return None


def _shown(value) -> str:
    return f"{type(value).__name__} {str(value)[:40]!r}" if value is not None else "nothing"


def _index(value, n: int, name: str, *, digits_ok: bool = False) -> str | None:
    """An answer index in 0..n-1: an int (not a bool), or with ``digits_ok`` a string of digits."""
    if digits_ok and isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return f"'{name}' must be a whole number, got {_shown(value)}"
    if not 0 <= value < n:
        return f"'{name}' is {value}, outside 0..{n - 1} ({n} choices)"
    return None


def _choice_list(row: dict, name: str, minimum: int = 2) -> str | None:
    value = row.get(name)
    if not isinstance(value, list) or len(value) < minimum or not all(isinstance(c, str) for c in value):
        return f"'{name}' must be a list of at least {minimum} strings, got {_shown(value)}"
    return None


def _lettered(row: dict, question: str) -> str | None:
    """ARC / OpenBookQA: choices {text: [...], label: [...]}, answerKey one of the labels."""
    bad = _texts(row, question, "answerKey")
    if bad:
        return bad
    choices = row.get("choices")
    if not isinstance(choices, dict):
        return f"'choices' must be an object with 'text' and 'label' lists, got {_shown(choices)}"
    bad = _choice_list(choices, "text") or _choice_list(choices, "label")
    if bad:
        return "choices." + bad.strip("'").replace("' must", " must", 1)
    if len(choices["text"]) != len(choices["label"]):
        return "'choices' has a different number of texts and labels"
    if row["answerKey"] not in choices["label"]:
        return f"'answerKey' {row['answerKey']!r} is not one of the choice labels {choices['label']}"
    return None


def piqa(row):
    return _texts(row, "goal", "sol1", "sol2") or _index(row.get("label"), 2, "label")


def hellaswag(row):
    return (_texts(row, "activity_label", "ctx_a", "ctx_b") or _choice_list(row, "endings")
            or _index(row.get("label"), len(row["endings"]), "label", digits_ok=True))


def winogrande(row):
    bad = _texts(row, "sentence", "option1", "option2")
    if bad:
        return bad
    if "_" not in row["sentence"]:
        return "'sentence' has no '_' blank to fill"
    if row.get("answer") not in ("1", "2"):
        return f"'answer' must be \"1\" or \"2\", got {_shown(row.get('answer'))}"
    return None


def boolq(row):
    return _texts(row, "question", "passage") or _index(row.get("label"), 2, "label")


def arc(row):
    return _lettered(row, "question")


def openbookqa(row):
    return _lettered(row, "question_stem")


def mmlu(row):
    return (_texts(row, "question") or _choice_list(row, "choices")
            or _index(row.get("answer"), len(row["choices"]), "answer"))


def suite(row):
    return (_texts(row, "query") or _choice_list(row, "choices")
            or _index(row.get("label"), len(row["choices"]), "label"))


# local data folder (local_data.LOCAL_DATASETS / mmlu / a suite) -> its row check
CHECKS = {"piqa": piqa, "hellaswag": hellaswag, "winogrande": winogrande, "boolq": boolq, "arc_easy": arc,
          "arc_challenge": arc, "openbookqa": openbookqa, "mmlu": mmlu, "suite": suite}


def text_field(field: str):
    """A calibration/training JSON-lines file: ``field`` holds text."""
    return lambda row: _texts(row, field)

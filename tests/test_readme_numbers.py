"""The README's Gemma 3 270M protocol table is written by hand from the committed records: every number in
it must be the one `results/real/gemma-3-270m/table.csv` (rendered from those records) holds."""
import csv
import re

import pytest
from conftest import REPO

README = REPO / "README.md"
TABLE = REPO / "results" / "real" / "gemma-3-270m" / "table.csv"
SECTION = "### The papers' protocol on Gemma 3 270M"
NUMERIC = ["Ratio", "PIQA", "HellaSwag", "WinoGrande", "ARC-e", "ARC-c", "OBQA", "BoolQ", "Ave.", "Per.", "PPL",
           "Speedup"]


def _readme_rows() -> tuple[list[str], list[list[str]]]:
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    lines = text[start:].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| method"))
    header = [c.strip() for c in lines[first].strip("|").split("|")]
    rows = []
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return header, rows


def _methods_and_target(label: str) -> tuple[list[str], str]:
    """``*2 of 18 layers:* remove (window 8–9)`` -> (["remove"], "n=2"); no prefix: the header's 4 layers."""
    m = re.match(r"\*(\d+)(?: of \d+ layers)?:\*\s*(.*)", label)
    target, rest = (f"n={m.group(1)}", m.group(2)) if m else ("n=4", label)
    names = rest.split(" (")[0]
    return [n.strip() for n in names.split(",")], target


def _close(shown: str, stored: str) -> bool:
    """``shown`` is ``stored`` rounded to the digits shown (thousands separators and bold allowed)."""
    shown = shown.replace("*", "").replace(",", "")
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return abs(float(shown) - float(stored)) <= 0.5 * 10 ** -decimals + 1e-9


def test_the_readme_protocol_table_equals_the_records():
    if not TABLE.is_file():
        pytest.skip(f"{TABLE} is not in this checkout")
    with TABLE.open(encoding="utf-8") as f:
        stored = {(r["Method"].lower(), r["Target"]): r for r in csv.DictReader(f)}
    header, rows = _readme_rows()
    assert rows, "no protocol table found in the README"
    checked = 0
    for row in rows:
        methods, target = _methods_and_target(row[0])
        for method in methods:
            key = ("dense", "-") if method == "dense" else (method, target)
            assert key in stored, f"README row {row[0]!r}: no {method} run at {target} in {TABLE.name}"
            for col in NUMERIC:
                if col not in header:
                    continue
                shown = row[header.index(col)]
                if shown in ("–", "-", ""):
                    continue
                assert _close(shown, stored[key][col]), (row[0], method, col, shown, stored[key][col])
                checked += 1
    assert checked >= 100  # the table was found and read, not skipped row by row

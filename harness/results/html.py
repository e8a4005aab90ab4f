"""``report.html``: one self-contained page per output folder (``--html``): the tables (pandas'
Styler), the figures (PNG embedded as data URIs, the PDF linked), the run settings and links to
every run's JSON. Rendered from a Jinja2 template, never by string concatenation; the page loads
nothing from the network. A small inline script marks on ``<body>`` how many images decoded
(``data-images-ok``), which the browser test reads.
"""
from __future__ import annotations

import base64
from pathlib import Path

import pandas as pd

from harness.io import _write_atomic

FILENAME = "report.html"

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table.results { border-collapse: collapse; margin: 0.5em 0; font-size: 0.85em; }
table.results th, table.results td { padding: 2px 8px; border-bottom: 1px solid #e5e5e5; text-align: right; }
table.results th:first-child, table.results td:first-child { text-align: left; }
p.note { font-size: 0.8em; color: #555; margin: 0.2em 0; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
dl.settings { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; font-size: 0.85em; }
dl.settings dt { font-weight: 600; } ul.runs { font-size: 0.85em; columns: 2; }
</style>
</head>
<body data-images-ok="0" data-images="{{ figures | length }}">
<h1>{{ title }}</h1>
<p class="note">Written by streamline-bench from the run records in this folder; the tables are the ones
<code>--report</code> prints.</p>
{% for table in tables %}
<h2>{{ table.title }}</h2>
{{ table.html | safe }}
{% for note in table.notes %}<p class="note">{{ note }}</p>
{% endfor %}{% endfor %}
{% if figures %}<h2>Figures</h2>{% endif %}
{% for fig in figures %}
<figure><img alt="{{ fig.name }}" src="data:image/png;base64,{{ fig.data }}">
<figcaption>{{ fig.name }}{% if fig.pdf %} (<a href="{{ fig.pdf }}">PDF</a>){% endif %}</figcaption></figure>
{% endfor %}
<h2>Run settings</h2>
<dl class="settings">
{% for key, value in settings %}<dt>{{ key }}</dt><dd>{{ value }}</dd>
{% endfor %}</dl>
<h2>Run records</h2>
<ul class="runs">
{% for run in runs %}<li><a href="{{ run.href }}">{{ run.name }}</a> ({{ run.method }})</li>
{% endfor %}</ul>
<script>
window.addEventListener("load", function () {
  var ok = Array.prototype.filter.call(document.images, function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute("data-images-ok", String(ok.length));
});
</script>
</body>
</html>
"""


def _table_html(df: pd.DataFrame) -> str:
    from harness.results.report import _fmt

    return _fmt(df).style.hide(axis="index").set_table_attributes('class="results"').to_html()


def _settings(runs: list[dict]) -> list[tuple[str, str]]:
    dense = next((r for r in runs if r.get("method") == "dense"), runs[0] if runs else {})
    ev = dense.get("eval") or {}
    model = dense.get("model") or {}
    pairs = [("model", model.get("name")), ("dtype", model.get("dtype")), ("tasks", ", ".join(ev.get("tasks") or [])),
             ("limit", ev.get("limit")), ("few-shot", ev.get("num_fewshot")), ("seeds", ", ".join(
                 str(s) for s in sorted({r.get("seed") for r in runs if r.get("seed") is not None}))),
             ("methods", ", ".join(sorted({r["method"] for r in runs if r.get("method") != "dense"}))),
             ("runs", len(runs))]
    return [(k, str(v)) for k, v in pairs if v not in (None, "")]


def write_html(folder: Path, tables: list, runs: list[dict], title: str) -> Path:
    """``folder/report.html`` from the rendered tables, the PNG figures in the folder and the runs."""
    from jinja2 import Environment

    folder = Path(folder)
    figures = []
    for png in sorted(folder.glob("*.png")):
        pdf = png.with_suffix(".pdf")
        figures.append({"name": png.stem, "data": base64.b64encode(png.read_bytes()).decode("ascii"),
                        "pdf": pdf.name if pdf.is_file() else None})
    records = [{"href": p.name, "name": p.name, "method": p.name.split("__")[0]}  # METHOD__KEY.json: a run record
               for p in sorted(folder.glob("*__*.json"))]
    env = Environment(autoescape=True)
    page = env.from_string(TEMPLATE).render(
        title=title, figures=figures, settings=_settings(runs), runs=records,
        tables=[{"title": t, "html": _table_html(df), "notes": notes} for t, df, notes in tables])
    path = folder / FILENAME
    _write_atomic(path, page.encode("utf-8"))
    return path


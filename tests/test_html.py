"""report.html (--html): a self-contained page with the tables, the figures and links to every run's
JSON; opened in headless Chromium (Debian's `chromium`) where installed, which must decode every image."""
import re
import shutil
import subprocess

import pytest
from test_summary import _put, _runs

from harness.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def report(tmp_path, capsys):
    folder = tmp_path / "opt-1.3b"
    for rec in _runs("facebook/opt-1.3b"):
        _put(folder, rec, f"{rec['method']}__x")
    assert main(["--report", str(folder), "--html"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {folder / 'report.html'}" in out
    return folder / "report.html"


def test_report_html_holds_tables_figures_and_links(report):
    page = report.read_text(encoding="utf-8")
    assert page.count('<table') >= 1 and ">streamline<" in page and ">Per.<" in page
    assert re.search(r'<img alt="accuracy_vs_ratio" src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', page)
    assert 'href="accuracy_vs_ratio.pdf"' in page
    assert {m for m in re.findall(r'<a href="([^"]+\.json)"', page)} == {"dense__x.json", "remove__x.json",
                                                                        "streamline__x.json"}
    assert "http://" not in page and "https://" not in page  # nothing loaded from the network


def test_report_html_renders_in_chromium(report, tmp_path):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium): the browser check needs it")
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
                          "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    body = re.search(r'<body data-images-ok="(\d+)" data-images="(\d+)"', dom)
    assert body and int(body.group(2)) >= 1 and body.group(1) == body.group(2)  # every figure decoded
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", dom)
    assert "streamline" in cells and "Dense" in cells and "100.0" in cells

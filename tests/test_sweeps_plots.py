"""Sweeps, layer scores, plots and the efficiency report (issue 12).

Plots are checked as images: each PNG is opened, has the size its figure was made at, is not
blank, and is drawn from the expected data (the marked window is the run's removed layers, read
back from the pixels in the method's colour).
"""
import copy
import json

import numpy as np
import pytest
import torch
from conftest import tiny_model

from harness import get_adapter, remove_layers
from harness.evaluation.efficiency import (
    EfficiencyConfig,
    compare,
    flops_per_token,
    measure,
    measure_pair,
)
from harness.results import plots
from harness.results.report import build_compact_table, build_target_tables, render_text
from harness.results.scores import (
    all_lags,
    read_scores,
    scores_csv,
    scores_payload,
    write_scores,
)
from harness.signals.activations import LayerStats, collect_layer_stats
from harness.signals.calibration import CalibrationConfig, CalibrationData

CAL = {"source": "/data/calib.txt", "num_samples": 4, "seq_len": 16}


def _calibration(vocab=128, n=4, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, t), generator=g)
    return CalibrationData(ids, torch.ones_like(ids), CalibrationConfig(num_samples=n, seq_len=t, batch_size=2), CAL)


def _payload(model):
    adapter = get_adapter(model)
    stats = collect_layer_stats(model, adapter, _calibration(), all_lags(adapter.num_layers), progress=False)
    return scores_payload(stats, "tiny-opt", CAL)


def _png(path):
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(int)


def _check_image(path, size):
    arr = _png(path)
    w, h = size
    assert arr.shape[:2] == (round(h * plots.DPI), round(w * plots.DPI))
    assert arr.std() > 10 and len(np.unique(arr.reshape(-1, 3), axis=0)) > 50  # not blank
    pdf = path.with_suffix(".pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and b"/CreationDate" not in pdf  # a re-render writes the same bytes
    return arr


def _color_pixels(arr, hex_color, tol=40):
    rgb = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
    return np.abs(arr - rgb).sum(-1) < tol


def test_scores_payload_matches_stats_and_csv():
    stats = LayerStats(num_layers=4, window_cos={1: [0.9, 0.95, 0.8, 0.7], 2: [0.85, 0.9, 0.6], 3: [0.8, 0.5]},
                       angular={1: [0.1, 0.05, 0.2, 0.3], 2: [0.2, 0.1, 0.4], 3: [0.3, 0.4]}, tokens=10, sequences=2)
    payload = scores_payload(stats, "m", CAL)
    assert payload["block_influence"] == pytest.approx([0.1, 0.05, 0.2, 0.3])
    assert payload["choices"]["streamline"] == {"1": 1, "2": 1, "3": 0}
    assert payload["choices"]["angular"] == {"1": 1, "2": 1, "3": 0}
    assert payload["choices"]["shortgpt"]["2"] == [0, 1]
    rows = scores_csv(payload).strip().splitlines()
    assert rows[0] == "score,n,start,end,value"
    assert len(rows) == 1 + (4 + 3 + 2) * 2 + 4  # every (n, start) of both scores, and every BI
    assert "window_cos,2,1,3,0.90000000" in rows


def test_scores_choices_agree_with_the_methods(tmp_path):
    """What the scores file says each method picks is what the methods pick from the same stats."""
    model = tiny_model("opt", layers=6, hidden=32)
    payload = _payload(model)
    for n in (1, 2, 3):
        stats = collect_layer_stats(model, get_adapter(model), _calibration(), (1, n), progress=False)
        assert payload["choices"]["streamline"][str(n)] == stats.best_window(n)
        assert payload["window_cos"][str(n)] == pytest.approx(stats.window_cos[n])
    paths = write_scores(payload, tmp_path)
    assert read_scores(tmp_path)["window_cos"] == json.loads(paths[0].read_text())["window_cos"]


def _run(method, label, removed, n, acc, ratio):
    return {"schema": 1, "method": method, "label": label, "status": "ok", "model": {"name": "tiny-opt"},
            "eval": {"tasks": ["a", "b"]}, "target": {"layers": n, "ratio": None, "num_remove": n},
            "calibration": CAL, "manifest": {"removed_layers": removed}, "params": {"ratio": ratio},
            "metrics": {"a": {"acc": acc}, "b": {"acc": acc / 2}}, "environment": {"created": "x"}}


def test_heatmaps_mark_each_runs_window(tmp_path):
    model = tiny_model("opt", layers=6, hidden=32)
    payload = _payload(model)
    start = payload["choices"]["streamline"]["2"]
    runs = [_run("remove", "remove", [start, start + 1], 2, 0.5, 0.3)]
    marks = plots.window_marks(runs, 6)
    assert marks == [("remove", start, 2)]
    for fn in (plots.window_cos_heatmap, plots.angular_heatmap):
        stem = tmp_path / fn.__name__
        fn(payload, marks, stem)
        arr = _check_image(stem.with_suffix(".png"), plots.HEATMAP_SIZE)
        # the method's outline colour sits where the removed window's cell is: recover the cell from pixels
        red = _color_pixels(arr, plots.method_color("remove"))
        ys, xs = np.nonzero(red)
        assert len(xs) > 50
        ax_box = _heatmap_axes_box(payload, marks)
        col = (np.median(xs) - ax_box[0]) / (ax_box[2] - ax_box[0]) * 6 - 0.5
        row = (ax_box[3] - np.median(ys)) / (ax_box[3] - ax_box[1]) * 5 + 0.5  # n = 1..5 bottom to top
        assert round(col) == start and round(row) == 2


def _heatmap_axes_box(payload, marks):
    """Pixel box (x0, y0 top, x1, y1 bottom) of the heatmap's data area, from a redraw."""
    import io

    from harness.results import plots as P

    saved = P._save
    box = {}

    def grab(fig, stem):
        fig.canvas.draw()
        ax = fig.axes[0]
        bb = ax.get_window_extent()
        h = fig.bbox.height
        box["b"] = (bb.x0, h - bb.y1, bb.x1, h - bb.y0)
        return []

    P._save = grab
    try:
        P._heatmap(payload, "window_cos", marks, io.StringIO())
    finally:
        P._save = saved
    return box["b"]


def test_block_influence_marks_shortgpt_layers(tmp_path):
    model = tiny_model("opt", layers=6, hidden=32)
    payload = _payload(model)
    removed = payload["choices"]["shortgpt"]["2"]
    runs = [_run("shortgpt", "shortgpt", removed, 2, 0.5, 0.3)]
    marks = plots.shortgpt_marks(runs)
    assert marks == [("shortgpt, n=2", removed)]
    plots.block_influence(payload, marks, tmp_path / "bi")
    arr = _check_image(tmp_path / "bi.png", plots.BI_SIZE)
    # removed layers' bars are red, the others grey: count red bar columns
    red_cols = np.nonzero(_color_pixels(arr, "#d62728", tol=30).sum(0) > 20)[0]
    groups = np.split(red_cols, np.nonzero(np.diff(red_cols) > 1)[0] + 1)
    assert len([g for g in groups if len(g) > 10]) == len(removed)


def test_accuracy_vs_ratio_from_runs(tmp_path):
    dense = _run("dense", "Dense", [], None, 0.8, 0.0) | {"target": None}
    runs = [dense, _run("remove", "remove", [2], 1, 0.7, 0.1), _run("remove", "remove", [2, 3], 2, 0.6, 0.2),
            _run("shortgpt", "shortgpt", [1], 1, 0.75, 0.1)]
    (series,) = plots.accuracy_series(runs)
    assert series["dense"][0] == pytest.approx(60.0)
    assert [p[0] for p in series["lines"]["remove"]] == pytest.approx([10.0, 20.0])
    assert series["lines"]["remove"][1][2] == pytest.approx(100 * 45 / 60)  # Per.
    paths = plots.render_plots(tmp_path, runs)
    assert [p.name for p in paths] == ["accuracy_vs_ratio.png", "accuracy_vs_ratio.pdf"]
    arr = _png(paths[0])
    assert arr.std() > 10
    assert _color_pixels(arr, plots.method_color("remove")).sum() > 100
    assert _color_pixels(arr, plots.method_color("shortgpt")).sum() > 100
    # grouped table: dense once, then one block per target; compact: methods x targets of Per.
    (title, df, _notes), = build_target_tables(runs)
    assert list(df["Target"]) == ["-", "n=1", "n=1", "n=2"]
    (_t, compact, _n), = build_compact_table(runs)
    assert list(compact.columns) == ["Method", "n=1", "n=2"]
    assert compact.set_index("Method").loc["remove", "n=2"] == pytest.approx(75.0)
    assert "n=2" in render_text(build_compact_table(runs))


def test_flops_count_replacement_and_removal():
    model = tiny_model("opt", layers=6, hidden=32)
    dense = flops_per_token(model, 16)
    pruned = copy.deepcopy(model)
    remove_layers(get_adapter(pruned), [1, 2])
    after = flops_per_token(pruned, 16)
    per_layer = (dense["matmul_flops_per_token"] - after["matmul_flops_per_token"]) / 2
    # an OPT layer: q, k, v, o (d x d) and fc1, fc2 (d x 4d): 2 x 12 d^2 FLOPs per token
    assert per_layer == pytest.approx(2 * 12 * 32 * 32)
    assert dense["attention_calls"] == 6 and after["attention_calls"] == 4
    from harness import MLPReplacement, insert_replacement

    insert_replacement(get_adapter(pruned), 1, MLPReplacement(32, 64))
    with_mlp = flops_per_token(pruned, 16)
    assert with_mlp["matmul_flops_per_token"] - after["matmul_flops_per_token"] == pytest.approx(2 * 2 * 32 * 64)


def test_efficiency_measures_and_compares():
    torch.manual_seed(0)
    model = tiny_model("llama", layers=4, hidden=32)
    cfg = EfficiencyConfig(batch_size=1, seq_len=16, decode_prompt_len=4, new_tokens=4, warmup=0, repeats=2)
    dense = measure(model, cfg)
    pruned = copy.deepcopy(model)
    remove_layers(get_adapter(pruned), [1])
    eff, dense_now = measure_pair(pruned, model, cfg, dense)
    for rec in (dense, eff, dense_now):
        assert rec["prefill_latency_s"] > 0 and rec["decode_tokens_per_s"] > 0 and rec["peak_memory_bytes"] > 0
    assert len(eff["prefill_latency_all_s"]) == 2 and eff["settings"]["new_tokens"] == 4
    assert eff["weight_bytes"] < dense["weight_bytes"]
    ratios = compare(eff, dense_now)
    assert 0 < ratios["removed_flop_share"] < 0.5 and ratios["ideal_speedup"] == pytest.approx(
        dense["flops_per_token"] / eff["flops_per_token"])
    assert ratios["memory_ratio"] < 1.0
    with pytest.raises(Exception, match="efficiency"):
        EfficiencyConfig(repeats=0).validate()


EFF = ["--eff-batch-size", "1", "--eff-seq-len", "16", "--eff-prompt-len", "4", "--eff-new-tokens", "4",
       "--eff-warmup", "0", "--eff-repeats", "1"]


def test_cli_sweep_plots_efficiency_then_rerun_skips(tmp_path, capsys):
    """One command sweeps two targets with plots; adding --efficiency measures the finished runs
    (pruned again, not re-evaluated); the re-run skips every run and only re-renders; the marked
    windows are the manifests' removed layers; `scores` and `--report` draw the same figures
    without evaluating."""
    from harness.cli import main

    out = tmp_path / "runs"
    argv = ["--model", "ref-opt-12l", "--methods", "remove,shortgpt", "--layers", "1,2", "--limit", "3",
            "--calib-samples", "8", "--output-dir", str(out), "--no-progress", "--plots"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.count("pruning") == 4 and "dense: evaluating" in first
    argv += ["--efficiency", *EFF[:-1], "3"]  # 3 timed pairs: an interquartile range
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert second.count("pruning again to measure") == 4 and "evaluating" not in second
    assert "dense: measuring efficiency" in second
    folder = out / "ref-opt-12l"
    runs = [json.loads(p.read_text()) for p in folder.glob("*.json") if p.name.split("__")[0] in ("remove", "shortgpt")]
    assert len(runs) == 4 and all(r["efficiency"]["vs_dense"]["ideal_speedup"] > 1 for r in runs)
    assert sum("score_shared" in r["timings"] for r in runs) == 1  # one pass of statistics for both targets
    assert all(r["metrics"] for r in runs) and all("efficiency" not in r["timings"] for r in runs)  # not re-run
    payload = read_scores(folder)
    for r in runs:  # each run's removed layers are what the shared scores say its method picks
        n = str(r["target"]["num_remove"])
        want = payload["choices"]["shortgpt"][n] if r["method"] == "shortgpt" else \
            list(range(payload["choices"]["streamline"][n], payload["choices"]["streamline"][n] + int(n)))
        assert r["manifest"]["removed_layers"] == want
    assert {m[1:] for m in plots.window_marks(runs, 12) if m[0] == "remove"} == \
        {(r["manifest"]["removed_layers"][0], len(r["manifest"]["removed_layers"])) for r in runs
         if r["method"] == "remove"}
    for stem, size in (("window_cos_heatmap", plots.HEATMAP_SIZE), ("angular_heatmap", plots.HEATMAP_SIZE),
                       ("block_influence", plots.BI_SIZE)):
        _check_image(folder / f"{stem}.png", size)
    assert _png(folder / "accuracy_vs_ratio.png").std() > 10
    table = (folder / "table.md").read_text()
    assert "Target" in table and "Dec. Speedup" in table and "Per. by target" in table
    for r in runs:  # the speedups' spread over the interleaved timed pairs, shown beside them
        q1, q3 = r["efficiency"]["vs_dense"]["prefill_speedup_iqr"]
        assert 0 < q1 <= q3 and f"{q1:.2f}\u2013{q3:.2f}" in table
    assert "Speedup IQR" in table and "Dec. IQR" in table
    mtime = (folder / "window_cos_heatmap.png").stat().st_mtime_ns

    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "pruning" not in second and "evaluating" not in second and "measuring" not in second
    assert second.count("skipping") == 5
    assert (folder / "window_cos_heatmap.png").stat().st_mtime_ns > mtime  # re-rendered

    assert main(["scores", "--model", "ref-opt-12l", "--calib-samples", "8", "--output-dir",
                 str(tmp_path / "scores"), "--no-progress"]) == 0
    again = read_scores(tmp_path / "scores" / "ref-opt-12l")
    for n, values in payload["window_cos"].items():  # same calibration: the same scores as the run's shared pass
        assert again["window_cos"][n] == pytest.approx(values, abs=1e-6)
    assert (tmp_path / "scores" / "ref-opt-12l" / "layer_scores.csv").is_file()
    _check_image(tmp_path / "scores" / "ref-opt-12l" / "block_influence.png", plots.BI_SIZE)
    assert not list((tmp_path / "scores").rglob("table.md"))

    (folder / "accuracy_vs_ratio.png").unlink()
    assert main(["--report", str(out)]) == 0
    assert (out / "accuracy_vs_ratio.png").is_file() and "Per. by target" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "ref-opt-12l", "--methods", "remove", "--ratio", "0.2,abc"], "expects a number"),
    (["--model", "ref-opt-12l", "--methods", "remove", "--ratio", "1.5,0.2"], "out of range"),
    (["--model", "ref-opt-12l", "--methods", "remove", "--layers", "2,2"], "twice"),
    (["--model", "ref-opt-12l", "--methods", "remove", "--layers", "20,2"], "does not fit"),
    (["--model", "ref-opt-12l", "--methods", "remove", "--efficiency", "--eff-repeats", "0"], "efficiency"),
    (["scores", "--model", "/nonexistent/model"], "does not exist"),
    (["scores", "--model", "ref-opt-12l", "--calib-data", "/nonexistent.txt"], "does not exist"),
])
def test_bad_sweep_and_scores_input(argv, message, tmp_path, capsys):
    from harness.cli import main

    assert main(argv + ["--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not (tmp_path / "out").exists()


def test_paired_iqr_is_the_quartiles_of_the_pairwise_ratios():
    from harness.evaluation.efficiency import paired_iqr

    assert paired_iqr([2.0, 4.0, 6.0, 8.0, 10.0], [1.0] * 5) == pytest.approx([4.0, 8.0])
    assert paired_iqr([1.0], [1.0]) is None and paired_iqr([1.0, 2.0], [1.0]) is None

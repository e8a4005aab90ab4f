"""Figures (matplotlib, PNG + PDF) from layer scores and result records.

- ``window_cos_heatmap`` / ``angular_heatmap``: start layer i x window length n of Streamline's
  S(i) = cos(X_i, X_{i+n}) (LLM-Streamline Fig. 2 style) and of the last-token angular distance
  (PruneMe's plot). Dark = redundant in both. Each row's optimum is dotted; every run whose
  removed layers form a contiguous window is outlined in its method's colour.
- ``block_influence``: ShortGPT's BI per layer, with the layers each ShortGPT run removed marked.
- ``accuracy_vs_ratio``: average accuracy, Per. and each task's accuracy against the measured
  pruning ratio, one line per method, the dense model as a dashed reference line.

Every figure has a fixed size (``FIGSIZE`` inches at ``DPI``), axis labels with units and a
title naming the model and the calibration set. Nothing here touches pyplot's global state
(``matplotlib.figure.Figure`` with the Agg canvas), so it is safe in tests and servers.
"""
from __future__ import annotations

import io
import math
from collections import OrderedDict
from pathlib import Path

from harness.io import _write_atomic
from harness.results.report import (
    TASK_LABELS,
    comparable_groups,
    parse_metric_spec,
    pick_metric,
)
from harness.results.store import slug

DPI = 200
HEATMAP_SIZE = (6.4, 4.8)
BI_SIZE = (6.4, 4.0)
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">"]
# one colour per method in every figure (heatmap outlines, BI marks, accuracy lines); a post-step
# (+lora) keeps its method's colour and is drawn dashed; other methods get a stable colour by name
METHOD_COLORS = {"remove": "#e377c2", "shortgpt": "#d62728", "streamline": "#1f77b4", "laco": "#2ca02c",
                 "laco-code": "#98df8a", "angular": "#ff7f0e", "streamline-iclr": "#9467bd",
                 "streamline-none": "#17becf", "streamline-mlp-shared": "#aec7e8", "streamline-multi-mlp": "#393b79",
                 "streamline-layer": "#8c564b", "streamline-layer-shared": "#c49c94"}
OTHER_COLORS = ["#7f7f7f", "#bcbd22", "#f7b6d2", "#dbdb8d", "#9edae5", "#c5b0d5", "#ff9896", "#ffbb78"]



def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, stem: Path) -> list[Path]:
    """``stem``.png and ``stem``.pdf, each written atomically; the PNG is exactly figsize x DPI."""
    paths = []
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=DPI,  # no software version in the PNG, no creation date in the PDF:
                    metadata={"Software": None} if ext == "png" else {"CreationDate": None})  # re-rendered, same bytes
        path = Path(f"{stem}.{ext}")
        _write_atomic(path, buf.getvalue())
        paths.append(path)
    return paths


def model_name(name: str) -> str:
    return slug(name)


def calibration_name(cal: dict | None) -> str:
    """'calibration.txt, 128 x 24 tokens' (the source's file or dataset name, blocks x tokens)."""
    if not cal:
        return "calibration: unknown"
    source = str(cal.get("source", "?"))
    short = Path(source).name if ("/" in source and Path(source).suffix) else source
    n, t = cal.get("num_samples"), cal.get("seq_len")
    return f"calibration {short}" + (f", {n}\u00d7{t} tokens" if n and t else "")


# --- layer-score heatmaps -------------------------------------------------------------------

def window_marks(runs: list[dict], num_layers: int) -> list[tuple[str, int, int]]:
    """``(label, start, n)`` for every run whose removed layers are one contiguous window."""
    marks = []
    for run in runs:
        if run.get("method") == "dense":
            continue
        removed = sorted((run.get("manifest") or {}).get("removed_layers") or [])
        if not removed or removed != list(range(removed[0], removed[0] + len(removed))):
            continue
        if removed[-1] >= num_layers:
            continue
        mark = (run.get("label") or run["method"], removed[0], len(removed))
        if mark not in marks:  # several seeds of a method removing the same window: one outline
            marks.append(mark)
    return marks


def base_method(label: str) -> str:
    """``shortgpt`` of ``shortgpt+lora`` and of ``shortgpt(seed=1)``, ``shortgpt, n=3``."""
    return label.split("(")[0].split(",")[0].split("+")[0].strip()


def method_color(label: str) -> str:
    """The colour of a method (by its base name, so a run's label options do not change it)."""
    import zlib

    name = base_method(label)
    return METHOD_COLORS.get(name) or OTHER_COLORS[zlib.crc32(name.encode()) % len(OTHER_COLORS)]


def method_linestyle(label: str) -> str:
    return "--" if "+" in label.split("(")[0] else "-"


def method_colors(labels) -> dict[str, str]:
    return OrderedDict((label, method_color(label)) for label in labels)


def _heatmap(payload: dict, which: str, marks, stem: Path) -> list[Path]:
    import numpy as np

    L = int(payload["num_layers"])
    rows = sorted(int(k) for k in payload[which])
    grid = np.full((len(rows), L), np.nan)
    for r, n in enumerate(rows):
        for i, v in enumerate(payload[which][str(n)]):
            if v is not None and i < L:
                grid[r, i] = v
    fig = _figure(HEATMAP_SIZE)
    ax = fig.add_subplot()
    data, norm, digits = _heatmap_cells(fig, ax, grid, rows, L, which)
    if L <= 16:  # values readable in the cells
        for r, n in enumerate(rows):
            for i in range(L):
                v = grid[r, i]
                if math.isfinite(v):
                    dark = float(norm(data[r, i])) < 0.45
                    ax.text(i, n, f"{v:.{digits}f}", ha="center", va="center", fontsize=5.0 if L > 12 else 6.0,
                            color="white" if dark else "#222222", zorder=6)
    handles = _heatmap_marks(ax, payload, which, marks, rows, ring=L <= 16)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), fontsize=6.5, frameon=False)
    title_kind = "Window cosine S(i)" if which == "window_cos" else "Angular distance d(i)"
    ax.set_title(f"{title_kind} of every window \u2014 {model_name(payload['model'])}\n"
                 f"{calibration_name(payload.get('calibration'))}", fontsize=9)
    return _save(fig, stem)


def _heatmap_cells(fig, ax, grid, rows: list[int], L: int, which: str):
    """The grey map, its colour bar and axes; returns (plotted data, norm, digits of the cell texts)."""
    import matplotlib
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    finite = grid[np.isfinite(grid)]
    if which == "window_cos":  # 1 - cos on a log scale: real LLMs sit at cos 0.95-0.999, where a linear scale saturates
        data = np.clip(1.0 - grid, 1e-6, None)
        ok = data[np.isfinite(data)]
        lo, hi = (float(ok.min()), float(ok.max())) if ok.size else (1e-3, 1.0)
        norm = LogNorm(vmin=lo, vmax=hi if hi > lo else lo * 10)
        cbar_label = "1 \u2212 cos(X$_i$, X$_{i+n}$), log scale; cells: cos"
    else:
        data = grid
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-9)
        cbar_label = "angular distance arccos(cos)/\u03c0, last token"
    cm = matplotlib.colormaps["Greys_r"].with_extremes(bad="#fff7e6")  # dark = low = redundant, in both; grey, so method outlines stand out
    extent = (-0.5, L - 0.5, rows[0] - 0.5, rows[-1] + 0.5)
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cm, norm=norm, origin="lower", aspect="auto", extent=extent,
                   interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, shrink=0.95)
    cbar.set_label(cbar_label + " (darker = more redundant)", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    ax.set_xlabel("first removed layer i (0-based)")
    ax.set_ylabel("window length n (layers removed)")
    ax.set_xticks(range(L) if L <= 24 else range(0, L, max(1, L // 12)))
    ax.set_yticks(rows if len(rows) <= 24 else rows[:: max(1, len(rows) // 12)])
    ax.tick_params(labelsize=7)
    digits = 3 if which == "window_cos" and finite.size and float(finite.max()) > 0.9 else 2
    return data, norm, digits


def _heatmap_marks(ax, payload: dict, which: str, marks, rows: list[int], ring: bool) -> list:
    """Each row's optimum (what streamline/remove or angular would pick at that n), centred on its
    cell: a ring around the value where values are printed (``ring``), else a dot; then every
    method's removed window outlined; returns the legend handles."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    best_label = "row maximum (Streamline's choice)" if which == "window_cos" else "row minimum (angular's choice)"
    best = payload.get("choices", {}).get("streamline" if which == "window_cos" else "angular", {})
    bx = [best[str(n)] for n in rows if str(n) in best]
    by = [n for n in rows if str(n) in best]
    ax.scatter(bx, by, s=300 if ring else 10, marker="o", facecolors="none" if ring else "#ffbf00",
               edgecolors="#ffbf00" if ring else "black", linewidths=1.4 if ring else 0.5, zorder=5)
    colors = method_colors(sorted({label for label, _s, _n in marks}))
    handles = [Line2D([], [], linestyle="", marker="o", markersize=7 if ring else 4,
                      markerfacecolor="none" if ring else "#ffbf00", markeredgecolor="#ffbf00" if ring else "black",
                      markeredgewidth=1.2 if ring else 0.5, label=best_label)]
    per_cell: dict[tuple[int, int], int] = {}
    for label, start, n in marks:
        if n not in rows:
            continue
        k = per_cell.get((start, n), 0)
        per_cell[(start, n)] = k + 1
        inset = 0.04 + 0.1 * k
        ax.add_patch(Rectangle((start - 0.5 + inset, n - 0.5 + inset), 1 - 2 * inset, 1 - 2 * inset, fill=False,
                               edgecolor=colors[label], linewidth=1.8, zorder=4))
    for label, color in colors.items():
        handles.append(Patch(facecolor="none", edgecolor=color, linewidth=1.8, label=f"{label}: removed window"))
    return handles


def window_cos_heatmap(payload: dict, marks, stem: Path) -> list[Path]:
    return _heatmap(payload, "window_cos", marks, stem)


def angular_heatmap(payload: dict, marks, stem: Path) -> list[Path]:
    return _heatmap(payload, "angular", marks, stem)


# --- Block Influence --------------------------------------------------------------------------

def shortgpt_marks(runs: list[dict]) -> list[tuple[str, list[int]]]:
    """``(label, removed layers)`` of every ShortGPT-style run (the method name starts with shortgpt)."""
    out = []
    for run in runs:
        if str(run.get("method", "")).split("+")[0] == "shortgpt":
            removed = sorted((run.get("manifest") or {}).get("removed_layers") or [])
            n = (run.get("target") or {}).get("num_remove", len(removed))
            out.append((f"{run.get('label') or run['method']}, n={n}", removed))
    return sorted(out, key=lambda m: (len(m[1]), m[0]))


def block_influence(payload: dict, marks, stem: Path) -> list[Path]:
    """Bars of BI per layer (log scale when BI spans more than a decade); above them one strip
    row per ShortGPT run with a marker on each layer it removed."""
    bi = [float("nan") if v is None else v for v in payload["block_influence"]]
    L = len(bi)
    fig = _figure(BI_SIZE)
    rows = len(marks)
    strip = None
    if marks:  # one strip row per ShortGPT run above the bars; none without a run (no empty panel)
        gs = fig.add_gridspec(2, 1, height_ratios=[0.55 + 0.35 * rows, 4.0])
        strip = fig.add_subplot(gs[0])
        ax = fig.add_subplot(gs[1], sharex=strip)
    else:
        ax = fig.add_subplot()
    removed_any = set().union(*[set(m[1]) for m in marks]) if marks else set()
    colors = ["#c7c7c7" if i not in removed_any else method_color("shortgpt") for i in range(L)]
    ax.bar(range(L), bi, color=colors, edgecolor="#555555", linewidth=0.4, width=0.8)
    positive = [v for v in bi if math.isfinite(v) and v > 0]
    if positive and max(positive) / min(positive) > 10:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("Block Influence BI$_i$ (log scale)", fontsize=8)
    else:
        ax.set_ylabel("Block Influence BI$_i$", fontsize=8)
    ax.set_xlabel("decoder layer i (0-based); BI$_i$ = 1 \u2212 mean cos(X$_i$, X$_{i+1}$), low = redundant",
                  fontsize=8)
    ax.set_xticks(range(L) if L <= 32 else range(0, L, max(1, L // 16)))
    ax.tick_params(labelsize=7)
    ax.grid(axis="y", alpha=0.3, linewidth=0.5)
    ax.set_xlim(-0.6, L - 0.4)
    if strip is not None:
        for k, (label, removed) in enumerate(marks):  # the method's colour; one marker shape per run
            strip.scatter(removed, [k] * len(removed), marker=MARKERS[k % len(MARKERS)], s=14,
                          color=method_color(label))
        strip.set_yticks(range(rows), [f"removed by {label}" for label, _r in marks], fontsize=6.5)
        strip.set_ylim(-0.7, rows - 0.3)
        strip.tick_params(axis="x", labelbottom=False, length=0)
        strip.grid(axis="x", alpha=0.3, linewidth=0.5)
        for side in ("top", "right"):
            strip.spines[side].set_visible(False)
    fig.suptitle(f"ShortGPT Block Influence per layer \u2014 {model_name(payload['model'])}\n"
                 f"{calibration_name(payload.get('calibration'))}", fontsize=9)
    return _save(fig, stem)


# --- accuracy vs measured pruning ratio -----------------------------------------------------

def _avg(run: dict, tasks, default, per_task) -> tuple[float | None, dict, dict]:
    """(Ave., {task: score}, {task: lm-eval stderr}) in points; Ave. None unless every task has a score."""
    scores, errs = {}, {}
    for t in tasks:
        metrics = (run.get("metrics") or {}).get(t, {})
        value, used = pick_metric(metrics, t, default, per_task)
        if value is not None:
            scores[t] = 100.0 * value
            se = metrics.get(f"{used}_stderr")
            if isinstance(se, (int, float)):
                errs[t] = 100.0 * se
    avg = sum(scores.values()) / len(scores) if len(scores) == len(tasks) and tasks else None
    return avg, scores, errs


def _point(runs: list[dict], tasks, default, per_task, d_avg) -> tuple | None:
    """``(ratio %, Ave., Per., {task: score}, {key: error bar})`` of one method at one target: one run
    with lm-eval's stderr as its error bars (Ave.'s from the tasks' stderrs, independent), or several
    seeds as their mean with the sample std over the seeds."""
    import statistics

    measured = [(100.0 * r["params"]["ratio"], *_avg(r, tasks, default, per_task)) for r in runs]
    measured = [m for m in measured if m[1] is not None]
    if not measured:
        return None
    if len(measured) == 1:
        ratio, avg, scores, errs = measured[0]
        err = dict(errs)
        if len(errs) == len(tasks):
            err["ave"] = math.sqrt(sum(e * e for e in errs.values())) / len(tasks)
            err["per"] = 100.0 * err["ave"] / d_avg if d_avg else None
        return ratio, avg, 100.0 * avg / d_avg if d_avg else None, scores, err

    def spread(values):
        return statistics.fmean(values), statistics.stdev(values)

    avg, ave_sd = spread([m[1] for m in measured])
    scores, err = {}, {"ave": ave_sd, "per": 100.0 * ave_sd / d_avg if d_avg else None}
    for t in tasks:
        values = [m[2][t] for m in measured if t in m[2]]
        if len(values) == len(measured):
            scores[t], err[t] = spread(values)
    return statistics.fmean(m[0] for m in measured), avg, 100.0 * avg / d_avg if d_avg else None, scores, err


def accuracy_series(runs: list[dict], metric_spec: str | None = None) -> list[dict]:
    """One entry per comparable group (model + evaluation): dense values and per-method points
    ``(measured ratio %, Ave., Per., {task: acc}, {key: error bar})`` sorted by ratio; a method's
    runs at one target that differ in seed are one point (mean, std over the seeds)."""
    from harness.results.report import target_key

    default, per_task = parse_metric_spec(metric_spec)
    out = []
    for d, group in comparable_groups(runs):
        tasks = list(d["metrics"].keys())
        d_avg, d_scores, _e = _avg(d, tasks, default, per_task)
        at: "OrderedDict[tuple, list[dict]]" = OrderedDict()
        cal = None
        for run in group:
            if run["method"] != "dense":
                at.setdefault((run.get("label") or run["method"], target_key(run)), []).append(run)
        lines: "OrderedDict[str, list]" = OrderedDict()
        seeds = 1
        for (label, _t), members in at.items():
            point = _point(members, tasks, default, per_task, d_avg)
            if point is None:
                continue
            seeds = max(seeds, len(members))
            cal = cal or members[0].get("calibration")
            lines.setdefault(label, []).append(point)
        for pts in lines.values():
            pts.sort(key=lambda p: p[0])
        lines = OrderedDict(sorted(lines.items()))  # a method keeps its colour whatever order the runs came in
        metrics = {t: pick_metric(d["metrics"].get(t, {}), t, default, per_task)[1] for t in tasks}
        out.append({"model": d["model"]["name"], "tasks": tasks, "metrics": metrics, "dense": (d_avg, d_scores),
                    "lines": lines, "calibration": cal, "eval": d.get("eval") or {}, "max_seeds": seeds})
    return out


MIN_SPAN_ACC = 10.0  # accuracy points: a y-axis never narrower, so one item does not look like a trend
MIN_SPAN_PER = 10.0


def _min_span(ax, span: float, top: float | None = None) -> None:
    """Widen the y-axis to at least ``span`` around its data, not past ``top`` (100% accuracy)."""
    lo, hi = ax.get_ylim()
    if hi - lo < span:
        mid = (lo + hi) / 2
        lo, hi = mid - span / 2, mid + span / 2
        if top is not None and hi > top + 1:
            lo, hi = lo - (hi - top - 1), top + 1
        ax.set_ylim(lo, hi)


def accuracy_vs_ratio(series: dict, stem: Path) -> list[Path]:
    tasks = series["tasks"]
    panels = [("Average accuracy (Ave.)", "ave"), ("Retained performance (Per.)", "per")] + \
        [(f"{TASK_LABELS.get(t, t)} ({series['metrics'].get(t, 'acc')})", t) for t in tasks]
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure((2.3 * ncols + 0.4, 2.1 * nrows + 0.9))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    d_avg, d_scores = series["dense"]
    max_x = max([p[0] for pts in series["lines"].values() for p in pts] + [1.0])
    n_lines = len(series["lines"])
    for idx, (title, key) in enumerate(panels):
        ax = axes[idx // ncols][idx % ncols]
        ref = {"ave": d_avg, "per": 100.0 if d_avg else None}.get(key, d_scores.get(key))
        if ref is not None:
            ax.axhline(ref, color="black", linestyle="--", linewidth=1.0, zorder=1)
            ax.scatter([0], [ref], color="black", s=12, zorder=3)
        for k, (label, pts) in enumerate(series["lines"].items()):
            xs = [p[0] for p in pts]
            ys = [p[1] if key == "ave" else p[2] if key == "per" else p[3].get(key) for p in pts]
            errs = [p[4].get(key) if len(p) > 4 else None for p in pts]
            if any(e is not None for e in errs):
                ax.errorbar(xs, ys, yerr=[e or 0.0 for e in errs], fmt="none", ecolor=method_color(label),
                            elinewidth=0.7, capsize=2, alpha=0.8, zorder=1 + k)
            # later lines thinner with larger hollow markers, so a line on top of another leaves it visible
            ax.plot(xs, ys, marker=MARKERS[k % len(MARKERS)], markersize=3.5 + 1.2 * (n_lines - 1 - k),
                    markerfacecolor="none" if k < n_lines - 1 else method_color(label),
                    linewidth=0.8 + 0.5 * (n_lines - 1 - k) / max(1, n_lines - 1), linestyle=method_linestyle(label),
                    color=method_color(label), label=label, zorder=2 + k)
        _min_span(ax, MIN_SPAN_PER, None) if key == "per" else _min_span(ax, MIN_SPAN_ACC, 100.0)
        ax.set_title(title, fontsize=8)
        ax.set_xlim(-0.03 * max_x, max_x * 1.08)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, linewidth=0.5)
        ax.set_ylabel("% of dense Ave." if key == "per" else "accuracy (%)", fontsize=7)
    spare = [axes[idx // ncols][idx % ncols] for idx in range(len(panels), nrows * ncols)]
    for ax in spare:
        ax.axis("off")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="black", linestyle="--", marker="o", markersize=3, label="Dense")]
    handles += [Line2D([], [], color=method_color(label), marker=MARKERS[k % len(MARKERS)], markersize=3.5,
                       markerfacecolor="none" if k < n_lines - 1 else method_color(label),
                       linestyle=method_linestyle(label), label=label) for k, label in enumerate(series["lines"])]
    if spare:  # the legend in the first empty panel slot, else below the panels
        spare[0].legend(handles=handles, loc="center", fontsize=7, frameon=False)
    else:
        fig.legend(handles=handles, loc="outside right center", fontsize=7, frameon=False)  # clear of the x label
    bars = "std over seeds" if series.get("max_seeds", 1) > 1 else "lm-eval's stderr"
    fig.supxlabel("measured pruning ratio (% of the dense model's parameters, (removed \u2212 added) / dense); "
                  f"error bars: {bars}", fontsize=8)
    ev = series["eval"]
    limit = f", --limit {ev['limit']}" if ev.get("limit") else ""
    fig.suptitle(f"Accuracy vs measured pruning ratio \u2014 {model_name(series['model'])} "
                 f"({len(tasks)} task{'s' if len(tasks) != 1 else ''}{limit}; {calibration_name(series['calibration'])})", fontsize=9)
    return _save(fig, stem)


# --- everything at once -----------------------------------------------------------------------

def render_plots(out_dir: Path, runs: list[dict] | None = None, scores: dict | None = None,
                 metric_spec: str | None = None, accuracy: bool = True) -> list[Path]:
    """Every figure the inputs allow, written into ``out_dir``: heatmaps and BI from ``scores``
    (a layer-scores payload) with the runs of the same model marked, accuracy vs ratio from the runs."""
    out_dir = Path(out_dir)
    runs = runs or []
    paths: list[Path] = []
    if scores is not None:
        mine = [r for r in runs if model_name(r["model"]["name"]) == model_name(scores["model"])]
        L = int(scores["num_layers"])
        marks = window_marks(mine, L)
        paths += window_cos_heatmap(scores, marks, out_dir / "window_cos_heatmap")
        paths += angular_heatmap(scores, marks, out_dir / "angular_heatmap")
        paths += block_influence(scores, shortgpt_marks(mine), out_dir / "block_influence")
    all_series = accuracy_series(runs, metric_spec) if runs and accuracy else []
    for k, series in enumerate(all_series):
        if not series["lines"]:
            continue
        suffix = "" if len(all_series) == 1 else f"_{k + 1}"
        paths += accuracy_vs_ratio(series, out_dir / f"accuracy_vs_ratio{suffix}")
    return paths

"""Every layer score the methods use, for every start and window length, as JSON and CSV.

One forward pass of the calibration set (``collect_layer_stats`` with lags 1..L-1) gives:

- ``window_cos[n][i]`` = mean over real tokens of cos(X_i, X_{i+n}) (LLM-Streamline's S(i));
- ``angular[n][i]`` = mean over sequences of arccos(cos(X_i[last], X_{i+n}[last])) / pi
  (Gromov et al.; PruneMe's heatmap);
- ``block_influence[i]`` = 1 - window_cos[1][i] (ShortGPT's BI).

``choices`` records what each method picks from these scores for every n (Streamline's and
``remove``'s argmax window, ``angular``'s argmin window, ShortGPT's n lowest-BI layers), so a
reader can check a run's removed layers against the scores.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from harness.io import write_json_atomic, write_text_atomic

SCORES_STEM = "layer_scores"


def all_lags(num_layers: int) -> list[int]:
    """Every window length a pruning target can ask for (n = 1 .. L-1)."""
    return list(range(1, max(2, num_layers)))


def _finite(values) -> list[float | None]:
    return [float(v) if v is not None and math.isfinite(v) else None for v in values]


def choices(payload: dict) -> dict:
    """What each score-based method removes at every n, from the scores alone."""
    out = {"streamline": {}, "angular": {}, "shortgpt": {}}
    bi = payload["block_influence"]
    for key, scores in payload["window_cos"].items():
        valid = [(v, i) for i, v in enumerate(scores) if v is not None]
        if valid:
            out["streamline"][key] = max(valid, key=lambda t: (t[0], -t[1]))[1]
    for key, scores in payload["angular"].items():
        valid = [(v, i) for i, v in enumerate(scores) if v is not None]
        if valid:
            out["angular"][key] = min(valid)[1]
    order = sorted(range(len(bi)), key=lambda i: (bi[i], i))
    for key in payload["window_cos"]:
        out["shortgpt"][key] = sorted(order[: int(key)])
    return out


def scores_payload(stats, model_name: str, calibration: dict | None) -> dict:
    """The JSON document of a ``LayerStats`` computed with lags 1..L-1."""
    window_cos = {str(n): _finite(v) for n, v in sorted(stats.window_cos.items()) if n < stats.num_layers}
    angular = {str(n): _finite(v) for n, v in sorted(stats.angular.items()) if n < stats.num_layers}
    payload = {
        "kind": "layer_scores",
        "model": model_name,
        "calibration": calibration,
        "num_layers": stats.num_layers,
        "tokens": stats.tokens,
        "sequences": stats.sequences,
        "window_cos": window_cos,
        "angular": angular,
        "block_influence": _finite(1.0 - c for c in stats.window_cos[1]),
        "definitions": {
            "window_cos": "window_cos[n][i] = mean over real tokens of cos(X_i, X_{i+n}); X_i enters layer i",
            "angular": "angular[n][i] = mean over sequences of arccos(cos(X_i, X_{i+n}) at the last real token) / pi",
            "block_influence": "BI[i] = 1 - mean over real tokens of cos(X_i, X_{i+1})",
        },
    }
    payload["choices"] = choices(payload)
    return payload


def scores_csv(payload: dict) -> str:
    """Long format: score, n, start, end (exclusive), layers, value."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["score", "n", "start", "end", "value"])
    for name in ("window_cos", "angular"):
        for key, values in payload[name].items():
            n = int(key)
            for i, v in enumerate(values):
                w.writerow([name, n, i, i + n, "" if v is None else f"{v:.8f}"])
    for i, v in enumerate(payload["block_influence"]):
        w.writerow(["block_influence", 1, i, i + 1, "" if v is None else f"{v:.8f}"])
    return buf.getvalue()


def write_scores(payload: dict, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    json_path = out_dir / f"{SCORES_STEM}.json"
    csv_path = out_dir / f"{SCORES_STEM}.csv"
    write_json_atomic(json_path, payload)
    write_text_atomic(csv_path, scores_csv(payload))
    return [json_path, csv_path]


def read_scores(out_dir: Path) -> dict | None:
    import json

    path = Path(out_dir) / f"{SCORES_STEM}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == "layer_scores" else None


def compute_scores(model, adapter, calibration, model_name: str, progress: bool = True) -> dict:
    """One forward pass: every window cosine, every angular distance and every BI."""
    from harness.signals.activations import collect_layer_stats

    stats = collect_layer_stats(model, adapter, calibration, all_lags(adapter.num_layers), progress=progress)
    return scores_payload(stats, model_name, calibration.description)

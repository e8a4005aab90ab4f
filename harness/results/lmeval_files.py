"""lm-eval's own output layout beside each run's JSON, for tools that read ``lm_eval --output_path``.

For a run ``<output-dir>/<model>/<method>__<hash>.json`` this writes the folder
``<method>__<hash>.lm_eval/`` holding ``results_<time>.json`` (lm-eval's keys: ``results``,
``groups``, ``group_subtasks``, ``configs``, ``versions``, ``n-shot``, ``higher_is_better``,
``n-samples``, ``config``, plus the tracker's ``model_name``, ``model_name_sanitized``, ``date``)
and, with ``--log-samples``, ``samples_<task>_<time>.jsonl`` per task (one lm-eval sample row per
line). The run's own JSON stays the source of truth for ``--report`` and ``--check``; these files
are written again when the run is.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from harness.io import repo_relative, write_json_atomic, write_text_atomic


def layout_dir(run_json: Path) -> Path:
    run_json = Path(run_json)
    return run_json.with_name(run_json.stem + ".lm_eval")


def lm_eval_results(out: dict, *, model_name: str, method: str, label: str, model_args: dict | None = None,
                    dtype: str | None = None, run_json: Path | None = None, batch_size=None,
                    device: str | None = None) -> dict:
    """lm-eval's results dict for this run: its ``config`` names the model (not a path) and the
    pruning method; ``model_args`` is in lm-eval's ``key=value,...`` form."""
    res = dict(out)
    res.pop("samples", None)
    args = {"pretrained": model_name, **({"dtype": dtype} if dtype else {}), **(model_args or {})}
    config = dict(res.get("config") or {})
    config.update({
        "model": "hf",
        "model_args": ",".join(f"{k}={v}" for k, v in args.items()),
        "model_name_or_path": model_name,
        **({"batch_size": batch_size} if batch_size is not None else {}),
        **({"device": device} if device else {}),
        "pruning": {"method": method, "label": label, **({"run": Path(run_json).name} if run_json else {})},
    })
    res["config"] = config
    shown = model_name if method == "dense" else f"{model_name} [{label}]"
    res["model_name"] = shown
    res["model_name_sanitized"] = shown.replace("/", "__").replace(" ", "_")
    return res


def write_lm_eval_layout(run_json: Path, out: dict, *, model_name: str, method: str, label: str,
                         model_args: dict | None = None, dtype: str | None = None, batch_size=None,
                         device: str | None = None, samples: dict | None = None) -> list[Path]:
    """Write ``results_<time>.json`` (and ``samples_<task>_<time>.jsonl`` when ``samples`` is
    given) into the run's ``.lm_eval`` folder, replacing what an earlier write of the run left
    (its files, and the temp files of a write that was killed: the runner writes this folder before
    the run's record, so a run whose record exists has its layout complete)."""
    from lm_eval.utils import handle_non_serializable

    folder = layout_dir(run_json)
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("results_*.json"), *folder.glob("samples_*.jsonl"), *folder.glob(".*.tmp")]:
        old.unlink()
    stamp = datetime.now().isoformat().replace(":", "-")
    written = []
    path = folder / f"results_{stamp}.json"
    results = lm_eval_results(out, model_name=model_name, method=method, label=label, model_args=model_args,
                              dtype=dtype, run_json=run_json, batch_size=batch_size, device=device)
    write_json_atomic(path, repo_relative(json.loads(json.dumps(results, default=handle_non_serializable),
                                                     parse_constant=lambda _c: None)))
    written.append(path)
    for task, rows in (samples or {}).items():
        p = folder / f"samples_{task}_{stamp}.jsonl"
        text = "".join(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n" for row in rows)
        write_text_atomic(p, text)
        written.append(p)
    return written

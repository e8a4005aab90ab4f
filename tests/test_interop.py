"""A run on local data writes its lm-eval task YAMLs beside the results; stock lm-eval, given them with
--include_path and no hand edits, scores the same items as the harness (here: the dense model)."""
import json
import os
import subprocess
import sys

import pytest
from conftest import SHARED_DATA, shared_data_or_skip

from harness.cli import main


@pytest.mark.slow
def test_stock_lm_eval_with_the_written_yamls_gives_the_harness_numbers(tiny_opt_dir, tmp_path, capsys):
    shared_data_or_skip()
    out = tmp_path / "runs"
    assert main(["--model", str(tiny_opt_dir), "--methods", "remove", "--layers", "1", "--tasks", "piqa,arc_easy",
                 "--limit", "6", "--data-dir", str(SHARED_DATA), "--calib-samples", "4", "--calib-seq-len", "32",
                 "--output-dir", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    folder = out / tiny_opt_dir.name / "lm_eval_tasks"
    assert sorted(p.name for p in folder.glob("*.yaml")) == ["arc_easy.yaml", "piqa.yaml"]
    assert f"--include_path {folder}" in text
    (dense,) = [json.loads(p.read_text()) for p in (out / tiny_opt_dir.name).glob("dense__*.json")]
    results = tmp_path / "stock"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={tiny_opt_dir},dtype=float32", "--tasks", "piqa,arc_easy",
                           "--include_path", str(folder), "--limit", "6", "--batch_size", "4", "--device", "cpu",
                           "--output_path", str(results)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = results.rglob("results_*.json")
    theirs = json.loads(result_file.read_text())["results"]
    for task in ("piqa", "arc_easy"):
        for metric in ("acc", "acc_norm"):
            assert theirs[task][f"{metric},none"] == dense["metrics"][task][metric], (task, metric)
    assert theirs["piqa"]["alias"] == "piqa"

"""--wandb PROJECT (offline): one W&B run per result with its config and summary (task metrics, Ave.,
Per.) and one for the tables; read back from W&B's offline transaction log, no network."""
import csv
import json
import struct

import pytest

from harness.cli import main

wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[test]' brings it)")


def _records(path):
    """The protobuf records of a .wandb file (W&B's LevelDB-style log: 32 KiB blocks of chunks)."""
    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            yield buf
            buf = b""


def _read_run(path):
    from wandb.proto import wandb_internal_pb2 as pb

    name, project, summary = None, None, {}
    for raw in _records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            name, project = rec.run.display_name, rec.run.project
        elif kind == "summary":
            summary.update({u.key: json.loads(u.value_json) for u in rec.summary.update if u.key})
    return name, project, summary


def test_wandb_offline_logs_every_run_and_the_tables(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "runs"
    assert main(["--model", "ref-opt-12l", "--methods", "remove", "--layers", "1", "--limit", "3", "--calib-samples",
                 "8", "--output-dir", str(out), "--no-progress", "--wandb", "pruning-test"]) == 0
    assert "logged 3 W&B run(s) to project pruning-test" in capsys.readouterr().out
    runs = {}
    for path in (out / "ref-opt-12l" / "wandb").glob("offline-run-*/run-*.wandb"):
        name, project, summary = _read_run(path)
        assert project == "pruning-test", f"{path.name} ({path.stat().st_size} bytes): run record project {project!r}"
        runs[name] = summary
    assert sorted(runs) == ["Dense", "ref-opt-12l tables", "remove"]
    (rec,) = [json.loads(p.read_text()) for p in (out / "ref-opt-12l").glob("remove__*.json")]
    for task, row in rec["metrics"].items():
        assert runs["remove"][f"{task}/acc"] == row["acc"]
    table = {r["Method"]: r for r in csv.DictReader((out / "ref-opt-12l" / "table.csv").open())}
    assert runs["remove"]["Per."] == pytest.approx(float(table["remove"]["Per."]), abs=1e-3)
    assert runs["remove"]["ratio"] == pytest.approx(rec["params"]["ratio"])
    assert runs["ref-opt-12l tables"]["table_0_title"] == "ref-opt-12l"


def test_wandb_without_a_project_name_is_one_error_line(tmp_path, capsys):
    from conftest import one_error_line

    one_error_line(main(["--model", "ref-opt-12l", "--methods", "remove", "--wandb", " ", "--output-dir",
                         str(tmp_path / "o")]), capsys, ["--wandb needs a project name"], tmp_path / "o")

"""The trainer benchmarks run end to end on tiny settings and write well-formed rows:
benchmarks/bench_train.py (epoch breakdown) and benchmarks/fidelity.py (metrics table)."""
import csv
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, env=None):
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "benchmarks", script), *args],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_bench_train_reports_a_breakdown(tmp_path):
    out = tmp_path / "train.csv"
    stdout = _run("bench_train.py", "--quick", "--methods", "fcmi", "--out", str(out))
    assert "measured" in stdout
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 1 and rows[0]["method"] == "fcmi" and rows[0]["status"] == "measured"
    parts = {key: float(rows[0][key]) for key in ("epoch_s", "model", "loss", "optimizer", "encode", "kmeans")}
    assert all(value >= 0 for value in parts.values()) and parts["epoch_s"] > 0
    assert 0.0 <= float(rows[0]["outside_model"]) < 1.0
    assert float(rows[0]["points_per_s"]) == pytest.approx(3000 / parts["epoch_s"], rel=1e-3)


def test_fidelity_table_and_rows(tmp_path):
    out = tmp_path / "fidelity.csv"
    stdout = _run("fidelity.py", "--methods", "fcmi", "ae-km", "--data", "appearance", "--seeds", "0",
                  "--set", "fcmi.epochs=3", "--set", "fcmi.warmup_epochs=1", "--set", "fcmi.width=0.05",
                  "--set", "ae-km.pretrain_epochs=1", "--set", "ae-km.finetune_epochs=1", "--set", "ae-km.width=0.05",
                  "--out", str(out))
    assert "| appearance | fcmi (epochs=3, warmup_epochs=1, width=0.05) | 1 |" in stdout
    rows = list(csv.DictReader(open(out)))
    assert [row["method"] for row in rows] == ["fcmi", "ae-km"]
    for row in rows:
        assert 0.0 <= float(row["acc"]) <= 1.0 and 0.0 <= float(row["mnce"]) <= 1.0
        assert row["commit"] and row["device"]

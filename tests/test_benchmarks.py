"""The benchmark scripts run (--quick, into a temp dir) and write rows with sane columns."""
import csv
import importlib
import os
import sys

import pytest

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH_DIR)

harness = importlib.import_module("harness")
FAMILY_OPS = {
    "fcmi": {"fcmi_loss", "fcmi_loss_from_embeddings"},
    "histogram": {"joint_histogram"},
    "assign": {"student_t_assign", "cosine_assign"},
    "dfc": {"dec_target", "kl_div", "dfc_loss", "dfc_loss_from_embeddings"},
}


def _read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _check_row(row):
    assert float(row["ms"]) > 0
    assert float(row["gbps"]) > 0
    assert float(row["frac_copy_bw"]) > 0
    assert row["pass"] in harness.PASSES
    assert int(row["n"]) > 0 and int(row["k"]) > 0
    assert int(row["threads"]) >= 1
    assert row["commit"] and row["device"] and row["torch"]
    assert row["peak_mb"] == "n/a" or float(row["peak_mb"]) >= 0
    speedup = float(row["speedup_vs_reference"])
    assert speedup > 0
    if row["backend"] == harness.EAGER:
        assert speedup == 1.0


@pytest.mark.parametrize("family", sorted(FAMILY_OPS))
def test_quick_run_writes_sane_rows(family, tmp_path):
    module = importlib.import_module(f"bench_{family}")
    returned = module.main(["--quick", "--device", "cpu", "--out-dir", str(tmp_path)])
    header, rows = _read_csv(tmp_path / f"{family}.csv")
    assert header == harness.CSV_COLUMNS
    assert len(rows) == len(returned) > 0
    assert {r["op"] for r in rows} == FAMILY_OPS[family]
    backends = {r["backend"] for r in rows}
    assert harness.EAGER in backends
    for row in rows:
        _check_row(row)
    # a second run appends rows under the same single header
    module.main(["--quick", "--device", "cpu", "--out-dir", str(tmp_path)])
    _, rows_after = _read_csv(tmp_path / f"{family}.csv")
    assert len(rows_after) == 2 * len(rows)


def test_run_all_table_and_plot(tmp_path, capsys):
    run_all = importlib.import_module("run_all")
    plot = importlib.import_module("plot")
    table = run_all.main(["--quick", "--device", "cpu", "--out-dir", str(tmp_path), "--only", "fcmi", "histogram"])
    lines = table.splitlines()
    assert lines[0].startswith("| op | backend")
    assert any(line.startswith("| fcmi_loss | reference | float32 | fwd+bwd | 256 | 4 | 2 |") for line in lines)
    assert any(line.startswith("| joint_histogram |") for line in lines)
    assert sorted(os.listdir(tmp_path)) == ["fcmi.csv", "histogram.csv"]
    out = plot.main(["--results-dir", str(tmp_path)])
    assert os.path.getsize(out) > 1000


def test_bad_flag_is_rejected(tmp_path):
    run_all = importlib.import_module("run_all")
    with pytest.raises(SystemExit):
        run_all.main(["--quick", "--dtype", "int8", "--out-dir", str(tmp_path)])

"""CLI end to end: train + evaluate on a tiny run, and a kill -9 mid-run followed by --resume
that must end exactly where an uninterrupted run ends."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fairkernels.cli import main
from fairkernels.train import checkpoint as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "synthetic", "--data-option", "n=400", "--data-option", "dim=6", "--data-option", "n_clusters=3",
        "--width", "0.05", "--batch-size", "128", "--backend", "reference", "--no-progress", "--seed", "5"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as handle:
        return json.load(handle)


def test_train_then_evaluate(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--method", "fcmi", "--epochs", "2", "--warmup", "1", "--out", out] + TINY) == 0
    report = _metrics(out)
    for key in ("acc", "nmi", "bal", "mnce", "f_beta", "fwd_mean", "fwd_max", "wall_seconds", "points_per_second",
                "peak_memory_bytes"):
        assert key in report
    assert report["epochs_run"] == 2 and len(report["history"]) == 2
    for name in ("fcmi_groups.png", "fcmi_curves.png", "fcmi_embedding.png"):
        assert os.path.getsize(os.path.join(out, "figures", name)) > 1000
    assert os.path.exists(os.path.join(out, "checkpoints", "last.pt"))

    from fairkernels import data
    ds = data.load("synthetic", n=400, dim=6, n_clusters=3)
    np.save(tmp_path / "y.npy", ds.y)
    np.savetxt(tmp_path / "g.txt", ds.groups, fmt="%d")
    capsys.readouterr()
    assert main(["evaluate", "--pred", os.path.join(out, "labels.npy"), "--labels", str(tmp_path / "y.npy"),
                 "--groups", str(tmp_path / "g.txt"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["mnce"] == pytest.approx(report["mnce"]) and printed["acc"] == pytest.approx(report["acc"])
    np.save(tmp_path / "short.npy", np.zeros(3, np.int64))
    assert main(["evaluate", "--pred", str(tmp_path / "short.npy"), "--groups", str(tmp_path / "g.txt")]) == 2


def test_option_for_other_method_is_rejected(tmp_path):
    with pytest.raises(SystemExit, match="--gamma"):
        main(["train", "--method", "fcmi", "--gamma", "1", "--out", str(tmp_path)] + TINY)


def _train_cmd(out, *extra):
    return [sys.executable, "-m", "fairkernels.cli", "train", "--method", "fcmi", "--epochs", "25", "--warmup", "2",
            "--out", out, "--no-figures"] + TINY + list(extra)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed_out = str(tmp_path / "killed")
    proc = subprocess.Popen(_train_cmd(killed_out), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    path = ckpt.checkpoint_path(os.path.join(killed_out, "checkpoints"))
    deadline = time.time() + 120
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    saved = ckpt.load(path)                      # intact: a complete, loadable checkpoint
    assert 0 <= saved["epoch"] < 24
    assert subprocess.run(_train_cmd(killed_out, "--resume"), cwd=REPO, env=env, capture_output=True).returncode == 0
    clean_out = str(tmp_path / "clean")
    assert subprocess.run(_train_cmd(clean_out), cwd=REPO, env=env, capture_output=True).returncode == 0
    resumed, clean = _metrics(killed_out), _metrics(clean_out)
    assert resumed["epochs_run"] < 25            # it really continued instead of restarting
    for key in ("acc", "nmi", "bal", "mnce", "f_beta", "fwd_mean", "fwd_max"):
        assert resumed[key] == clean[key], key
    strip = lambda history: [{k: v for k, v in r.items() if k != "seconds"} for r in history]  # noqa: E731
    assert strip(resumed["history"]) == strip(clean["history"])
    np.testing.assert_array_equal(np.load(os.path.join(killed_out, "labels.npy")),
                                  np.load(os.path.join(clean_out, "labels.npy")))

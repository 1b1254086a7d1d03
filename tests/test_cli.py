"""CLI end to end: train + evaluate on a tiny run; a kill -9 mid-run followed by --resume that must
end exactly where an uninterrupted run ends; and the newcomer's path: every user error is one
line on stderr with exit code 2 and no traceback, Ctrl-C exits 130 naming the --resume command,
and a missing matplotlib only skips the figures."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fairkernels import cli
from fairkernels.cli import main
from fairkernels.train import checkpoint as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "synthetic", "--data-option", "n=400", "--data-option", "dim=6", "--data-option", "n_clusters=3",
        "--width", "0.05", "--batch-size", "128", "--backend", "reference", "--no-progress", "--seed", "5"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


pytestmark = pytest.mark.usefixtures("one_thread")


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny FCMI run (2 epochs, 1 of warm-up) shared by the tests that need its outputs."""
    out = str(tmp_path_factory.mktemp("cli") / "run")
    assert main(["train", "--method", "fcmi", "--epochs", "2", "--warmup", "1", "--out", out] + TINY) == 0
    return out


def test_train_then_evaluate(run_dir, capsys):
    report = _metrics(run_dir)
    for key in ("acc", "nmi", "bal", "mnce", "f_beta", "fwd_mean", "fwd_max", "wall_seconds", "points_per_second",
                "peak_memory_bytes"):
        assert key in report
    assert report["epochs_run"] == 2 and len(report["history"]) == 2
    assert report["this_run"] == {"wall_seconds": report["wall_seconds"], "epochs_run": 2, "resumed_at_epoch": 0}
    for name in ("fcmi_groups.png", "fcmi_curves.png", "fcmi_embedding.png"):
        assert os.path.getsize(os.path.join(run_dir, "figures", name)) > 1000
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "last.pt"))

    from fairkernels import data
    ds = data.load("synthetic", n=400, dim=6, n_clusters=3)
    np.testing.assert_array_equal(np.load(os.path.join(run_dir, "y.npy")), ds.y)
    np.testing.assert_array_equal(np.load(os.path.join(run_dir, "groups.npy")), ds.groups)
    capsys.readouterr()
    # The README's example: every file it names is written by train.
    assert main(["evaluate", "--pred", os.path.join(run_dir, "labels.npy"), "--labels", os.path.join(run_dir, "y.npy"),
                 "--groups", os.path.join(run_dir, "groups.npy"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["mnce"] == pytest.approx(report["mnce"]) and printed["acc"] == pytest.approx(report["acc"])


def test_help_lists_datasets_and_defaults(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in ("digits-reverse", "synthetic", "adult", "har", "mnist-usps"):
        assert name in text
    from fairkernels.train import DFCConfig, FCMIConfig              # --epochs differs per method
    fcmi_epochs, dfc_epochs = FCMIConfig.epochs, DFCConfig.epochs
    expected = str(fcmi_epochs) if fcmi_epochs == dfc_epochs else f"fcmi {fcmi_epochs}, dfc/dec/ae-km {dfc_epochs}"
    assert f"--epochs EPOCHS clustering epochs (FCMI: including the warm-up) (default: {expected})" in text
    assert "(default: fcmi 512, dfc/dec/ae-km 256)" in text          # --batch-size differs per method
    assert "(default: 20)" in text and "(default: auto)" in text and "(default: runs/train)" in text


def test_unexpected_errors_keep_their_traceback(monkeypatch, tmp_path):
    def broken(args):
        raise RuntimeError("a bug, not a user error")
    monkeypatch.setattr(cli, "prepare_train", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", "--method", "fcmi", "--out", str(tmp_path)] + TINY)


def _user_error_cases(tmp_path, run_dir):
    csv = tmp_path / "table.csv"
    csv.write_text("a,b,sex\n1,2,m\n3,4,f\n")
    fractional = tmp_path / "g.txt"
    fractional.write_text("0\n1\n0.5\n")
    short = tmp_path / "short.txt"
    short.write_text("0\n1\n0\n")
    train = ["train", "--method", "fcmi", "--epochs", "1"]
    tiny_synthetic = ["--dataset", "synthetic", "--data-option", "n=50"]
    cases = {
        "nonexistent csv": (train + ["--dataset", str(tmp_path / "nonexistent.csv")], "no such file"),
        "unknown dataset": (train + ["--dataset", "mnist"], "unknown data set 'mnist'; use one of"),
        "csv without group column": (train + ["--dataset", str(csv)], "needs --data-option group_column=VALUE"),
        "unknown data option": (train + tiny_synthetic + ["--data-option", "foo=1"],
                                "--data-option foo is not an option of --dataset synthetic"),
        "data option without =": (train + tiny_synthetic + ["--data-option", "foo"], "expects KEY=VALUE"),
        "bogus backend": (train + tiny_synthetic + ["--backend", "bogus"], "invalid choice: 'bogus'"),
        "backend for another device": (train + tiny_synthetic + ["--backend", "cuda"], "--backend cuda cannot run"),
        "negative epochs": (["train", "--method", "fcmi", "--epochs", "-1"] + tiny_synthetic,
                            "--epochs must be a positive int"),
        "option of another method": (train + tiny_synthetic + ["--gamma", "1"], "--gamma does not apply"),
        "unknown lr schedule": (train + tiny_synthetic + ["--lr-schedule", "linear"],
                                "--lr-schedule must be one of ('cosine', 'constant')"),
        "lr schedule of another method": (["train", "--method", "dfc", "--epochs", "1"] + tiny_synthetic +
                                          ["--lr-schedule", "constant"], "--lr-schedule does not apply"),
        "missing method": (["train"] + tiny_synthetic, "required: --method"),
        "resume another method": (["train", "--method", "dfc", "--resume"] + TINY[:8],
                                  "was written by FCMITrainer, not DFCTrainer"),
        "evaluate fractional groups": (["evaluate", "--pred", os.path.join(run_dir, "labels.npy"),
                                        "--groups", str(fractional)], "non-integer values (0.5 at position 2"),
        "evaluate missing file": (["evaluate", "--pred", str(tmp_path / "none.npy"), "--groups", str(fractional)],
                                  "--pred: no such file"),
        "evaluate length mismatch": (["evaluate", "--pred", os.path.join(run_dir, "labels.npy"),
                                      "--groups", os.path.join(run_dir, "groups.npy"), "--labels", str(short)],
                                     "length mismatch"),
    }
    if not torch.cuda.is_available():
        cases["cuda without cuda"] = (train + tiny_synthetic + ["--device", "cuda"],
                                      "--device='cuda' but CUDA is not available")
    return cases


def test_user_errors_are_one_line_exit_2_before_any_work(tmp_path, run_dir):
    """Each case in its own `python -m fairkernels.cli` process (all started at once to keep the
    test short): exit code 2, exactly one stderr line, no traceback, and no output directory."""
    procs = {}
    for name, (args, expected) in _user_error_cases(tmp_path, run_dir).items():
        out = str(tmp_path / name.replace(" ", "_"))
        if args[0] == "train":
            args = args + ["--out", run_dir if "resume" in name else out, "--no-progress"]
        procs[name] = (subprocess.Popen([sys.executable, "-m", "fairkernels.cli"] + args, cwd=REPO, env=ENV,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), expected, out)
    for name, (proc, expected, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, stderr)
        assert "Traceback" not in stderr and stdout == "", (name, stderr)
        assert len(stderr.splitlines()) == 1 and expected in stderr, (name, stderr)
        assert not os.path.exists(out), name                                    # nothing was trained


def test_missing_matplotlib_and_a_warmup_longer_than_training(tmp_path):
    """matplotlib made unimportable: the results and metrics.json are still written and one line
    says how to get the figures. --epochs 1 under the default 20-epoch warm-up: one warning line."""
    out = str(tmp_path / "run")
    code = ("import sys; sys.modules['matplotlib'] = None; from fairkernels.cli import main; "
            f"sys.exit(main({['train', '--method', 'fcmi', '--epochs', '1', '--out', out] + TINY!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "fcmi" in proc.stdout and "wrote" in proc.stdout                      # the results table
    assert _metrics(out)["epochs_run"] == 1 and os.path.exists(os.path.join(out, "labels.npy"))
    assert not os.path.exists(os.path.join(out, "figures"))
    skipped = [line for line in proc.stderr.splitlines() if "figures skipped" in line]
    assert len(skipped) == 1 and "pip install matplotlib" in skipped[0]
    warned = [line for line in proc.stderr.splitlines() if "warning" in line.lower() and "warm" in line.lower()]
    assert len(warned) == 1, proc.stderr


def _train_cmd(out, *extra, epochs=25):
    return [sys.executable, "-m", "fairkernels.cli", "train", "--method", "fcmi", "--epochs", str(epochs),
            "--warmup", "2", "--out", out, "--no-figures"] + TINY + list(extra)


def _default_sigint():
    # A shell without job control starts background commands with SIGINT ignored, and a Python
    # started so keeps ignoring it (no KeyboardInterrupt): the child gets the default back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_and_wait_for_checkpoint(out, epochs):
    proc = subprocess.Popen(_train_cmd(out, epochs=epochs), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    path = ckpt.checkpoint_path(os.path.join(out, "checkpoints"))
    deadline = time.time() + 120
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    return proc, path


def test_ctrl_c_names_checkpoint_and_resume_command(tmp_path):
    out = str(tmp_path / "run")
    proc, path = _start_and_wait_for_checkpoint(out, epochs=500)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert f"saved in {path}" in last and last.endswith("--resume") and f"--out {out}" in last, last


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    killed_out = str(tmp_path / "killed")
    proc, path = _start_and_wait_for_checkpoint(killed_out, epochs=25)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    saved = ckpt.load(path)                      # intact: a complete, loadable checkpoint
    assert 0 <= saved["epoch"] < 24
    assert subprocess.run(_train_cmd(killed_out, "--resume"), cwd=REPO, env=ENV, capture_output=True).returncode == 0
    clean_out = str(tmp_path / "clean")
    assert subprocess.run(_train_cmd(clean_out), cwd=REPO, env=ENV, capture_output=True).returncode == 0
    resumed, clean = _metrics(killed_out), _metrics(clean_out)
    this_run = resumed["this_run"]
    assert this_run["epochs_run"] < 25 and this_run["resumed_at_epoch"] == 25 - this_run["epochs_run"]  # continued
    assert resumed["epochs_run"] == clean["epochs_run"] == 25                     # totals across the two runs
    earlier = sum(record["seconds"] for record in resumed["history"][:this_run["resumed_at_epoch"]])
    assert resumed["wall_seconds"] == pytest.approx(this_run["wall_seconds"] + earlier)
    for key in ("acc", "nmi", "bal", "mnce", "f_beta", "fwd_mean", "fwd_max"):
        assert resumed[key] == clean[key], key
    strip = lambda history: [{k: v for k, v in r.items() if k != "seconds"} for r in history]  # noqa: E731
    assert strip(resumed["history"]) == strip(clean["history"])
    np.testing.assert_array_equal(np.load(os.path.join(killed_out, "labels.npy")),
                                  np.load(os.path.join(clean_out, "labels.npy")))


def test_non_finite_loss_is_one_line_exit_1(monkeypatch, tmp_path, capsys):
    from fairkernels.train import FCMITrainer, NonFiniteLossError

    def diverge(self, X, groups, y=None):
        raise NonFiniteLossError("epoch 3: loss term 'fair' became non-finite; Lower the learning rate.")
    monkeypatch.setattr(FCMITrainer, "fit", diverge)
    assert main(["train", "--method", "fcmi", "--epochs", "1", "--out", str(tmp_path / "run")] + TINY) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "fairkernels train: epoch 3: loss term 'fair' became non-finite; Lower the learning rate."

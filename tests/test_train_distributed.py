"""Trainers under DistributedDataParallel: two gloo processes on CPU, each with half of every
global batch, must train FCMI exactly like one process with the same seed and global batch
(float64: same labels, same metrics, losses to 1e-6 relative; measured ~3e-8 after 4 epochs, as
Adam amplifies the rounding of the all-reduced sums; a missing world-size factor on the FCMI
gradient shows up as ~1e-1). One spawn trains both FCMI and a short
DFC (process start-up dominates the cost); the workers save their results and the assertions run
here. A last test launches the CLI with torch.distributed.run (torchrun)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fairkernels import data
from fairkernels.data.stream import BatchStream
from fairkernels.train import make_trainer
from fairkernels.train import checkpoint as ckpt
from fairkernels.train.parallel import GlobalBatchStream

WORLD = 2
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 600 rows, global batch 128: four full batches and a tail of 88 = 2 x 44 (the tail splits evenly,
# so no row is dropped and the two runs see the same rows).
FCMI = dict(n_clusters=3, epochs=4, warmup_epochs=1, beta=1.0, lr=3e-3, batch_size=128, width=0.05,
            backend="reference", kmeans_iter=10, kmeans_sample_size=400, dtype="float64", seed=5,
            progress=False, verbose=False)
DFC = dict(n_clusters=3, pretrain_epochs=1, finetune_epochs=1, epochs=1, update_interval=2, batch_size=128,
           width=0.05, backend="reference", kmeans_iter=10, dtype="float64", seed=5, progress=False, verbose=False)
METRICS = ("acc", "nmi", "bal", "mnce", "f_beta", "fwd_mean", "fwd_max")
LOSSES = ("rec", "clu", "fair", "loss")


def biased_data():
    ds = data.load("synthetic", n=600, dim=8, n_clusters=3, n_groups=2, bias=0.0, seed=1)
    X = ds.X + np.where(ds.groups[:, None] == 1, 8.0, 0.0).astype(np.float32)
    return (X - X.mean(0)) / X.std(0), ds.groups, ds.y


def summary(trainer):
    return dict(history=[{k: v for k, v in r.items() if k != "seconds"} for r in trainer.history],
                labels=trainer.labels_, centers=trainer.cluster_centers_,
                params={k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                world=trainer.world_size)


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    X, groups, y = biased_data()
    fcmi = make_trainer("fcmi", checkpoint_dir=os.path.join(out_dir, "ckpt"), **FCMI).fit(X, groups, y)
    dfc = make_trainer("dfc", **DFC).fit(X, groups, y)
    torch.save({"fcmi": summary(fcmi), "dfc": summary(dfc)}, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(worker, args=(free_port(), out_dir), nprocs=WORLD, join=True)
    results = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    return out_dir, results


@pytest.fixture(scope="module")
def single():
    assert "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] == "1"
    X, groups, y = biased_data()
    return summary(make_trainer("fcmi", **FCMI).fit(X, groups, y))


def test_two_processes_train_fcmi_like_one(ranks, single):
    _, results = ranks
    assert single["world"] == 1
    for result in results:
        got = result["fcmi"]
        assert got["world"] == WORLD
        assert [r["phase"] for r in got["history"]] == ["warmup"] + ["fcmi"] * 3
        for mine, theirs in zip(got["history"], single["history"]):
            assert set(mine) == set(theirs)
            for key in METRICS:        # same predictions -> identical integer tables -> same metrics
                assert mine[key] == pytest.approx(theirs[key], rel=1e-12, abs=1e-12), key
            for key in LOSSES:
                if key in theirs:
                    assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-12), key
        np.testing.assert_array_equal(got["labels"], single["labels"])
        np.testing.assert_allclose(got["centers"], single["centers"], rtol=1e-6, atol=1e-9)
        for name, value in single["params"].items():
            torch.testing.assert_close(got["params"][name], value, rtol=1e-6, atol=1e-7, msg=name)
    # The run is not trivially equal to its starting point: the model did learn.
    assert single["history"][-1]["acc"] > 0.5 and single["history"][-1]["rec"] < single["history"][0]["rec"]


def test_rank_zero_checkpoint_matches_the_run(ranks):
    out_dir, results = ranks
    saved = ckpt.load(ckpt.checkpoint_path(os.path.join(out_dir, "ckpt")))
    assert saved["epoch"] == FCMI["epochs"] - 1
    history = [{k: v for k, v in r.items() if k != "seconds"} for r in saved["history"]]
    assert history == results[0]["fcmi"]["history"]
    # BatchNorm modules were swapped for the global-batch ones without renaming any state.
    assert set(saved["model"]) == set(results[0]["fcmi"]["params"])


def test_dfc_runs_distributed_and_ranks_agree(ranks):
    _, results = ranks
    first, second = results[0]["dfc"], results[1]["dfc"]
    phases = [r["phase"] for r in first["history"]]
    assert phases == ["pretrain-0", "pretrain-1", "pretrain-2", "pretrain-3", "finetune", "cluster"]
    assert first["history"] == second["history"]
    np.testing.assert_array_equal(first["labels"], second["labels"])
    for name, value in first["params"].items():          # DDP / explicit averaging kept them in step
        torch.testing.assert_close(second["params"][name], value, rtol=0, atol=0, msg=name)
    assert all(np.isfinite(v) for r in first["history"] for k, v in r.items() if k != "phase")
    assert first["labels"].shape == (600,) and set(np.unique(first["labels"])) <= {0, 1, 2}


@pytest.mark.parametrize("num_rows", [600, 613])
def test_global_batches_split_into_rank_slices(num_rows):
    X = torch.arange(num_rows, dtype=torch.float64)[:, None]
    one = BatchStream(X, None, 128, seed=3, prefetch=0)
    shards = [GlobalBatchStream(X, None, 128, rank=r, world_size=WORLD, seed=3, device="cpu") for r in range(WORLD)]
    for stream in [one] + shards:
        stream.set_epoch(2)
    single_batches = [index for index, _, _ in one]
    rank_batches = [[index for index, _, _ in stream] for stream in shards]
    assert all(len(batches) == len(single_batches) for batches in rank_batches)
    for position, expected in enumerate(single_batches):
        parts = [batches[position] for batches in rank_batches]
        assert parts[0].numel() == parts[1].numel()
        union = torch.cat(parts)
        assert torch.unique(union).numel() == union.numel()
        # The tail that does not split evenly (613 - 4 x 128 = 101 rows) loses one row.
        assert set(union.tolist()) <= set(expected.tolist())
        assert expected.numel() - union.numel() == (expected.numel() % WORLD)
    with pytest.raises(ValueError, match="divisible"):
        from fairkernels.train.parallel import Parallel
        parallel = Parallel(False, torch.device("cpu"))
        parallel.world_size, parallel.process_group = 3, True
        parallel.batch_stream(X, None, 128, seed=0, device="cpu")


def test_distributed_true_without_torchrun_raises(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    X, groups, y = biased_data()
    with pytest.raises(ValueError, match="torchrun"):
        make_trainer("fcmi", distributed=True, **FCMI).fit(X, groups, y)
    with pytest.raises(ValueError, match="dtype"):
        make_trainer("fcmi", dtype="float16")
    with pytest.raises(ValueError, match="kmeans_sample_size"):
        make_trainer("fcmi", n_clusters=3, kmeans_sample_size=2)


def test_cli_under_torchrun(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "fairkernels.cli", "train", "--method", "fcmi",
               "--dataset", "synthetic", "--data-option", "n=300", "--data-option", "dim=6",
               "--epochs", "2", "--warmup", "1", "--batch-size", "64", "--width", "0.05", "--backend", "reference",
               "--kmeans-iter", "5", "--no-progress", "--no-figures", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["world_size"] == 2 and report["epochs_run"] == 2
    assert np.load(out / "labels.npy").shape == (300,)
    assert done.stdout.count("wrote") == 1          # rank 0 alone writes and prints

"""Trainers on small synthetic data: they learn, FCMI is fairer than AE + k-means, resume is
exact, and a non-finite loss stops training with a message naming the epoch and the term."""
import math
import os

import numpy as np
import pytest

from fairkernels import data, metrics
from fairkernels.train import NonFiniteLossError, make_trainer
from fairkernels.train import checkpoint as ckpt

FAST = dict(progress=False, verbose=False, width=0.05, batch_size=128, backend="reference", kmeans_iter=30)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def biased():
    # Groups shift every point by a large offset: an unconstrained clusterer splits by group.
    ds = data.load("synthetic", n=600, dim=8, n_clusters=3, n_groups=2, bias=0.0, seed=1)
    X = ds.X + np.where(ds.groups[:, None] == 1, 8.0, 0.0).astype(np.float32)
    return (X - X.mean(0)) / X.std(0), ds.groups, ds.y


def test_fcmi_learns_and_is_fairer_than_ae_kmeans(biased):
    X, groups, y = biased
    fcmi = make_trainer("fcmi", n_clusters=3, epochs=12, warmup_epochs=4, beta=1.0, lr=3e-3, **FAST)
    fcmi.fit(X, groups, y)
    aekm = make_trainer("ae-km", n_clusters=3, pretrain_epochs=1, finetune_epochs=8, **FAST).fit(X, groups, y)
    rec = [record["rec"] for record in fcmi.history]
    assert rec[-1] < rec[0]
    fair_scores = metrics.evaluate(y, fcmi.labels_, groups)
    base_scores = metrics.evaluate(y, aekm.labels_, groups)
    assert fair_scores["mnce"] > base_scores["mnce"] + 0.3
    assert fair_scores["acc"] > 0.5                      # chance is 1/3
    # Groups of 300 rows for 3 clusters: "auto" gives every group its own matched centers.
    assert fcmi.labels_.shape == (600,) and fcmi.cluster_centers_.shape == (2, 3, 3)
    np.testing.assert_array_equal(fcmi.predict(X, groups), fcmi.labels_)
    with pytest.raises(ValueError, match="groups is required: this FCMI model has per-group centers"):
        fcmi.predict(X)


@pytest.mark.parametrize("method", ["dfc", "dec"])
def test_dfc_and_dec_learn(method):
    ds = data.load("synthetic", n=500, dim=6, n_clusters=3, n_groups=2, bias=0.2, seed=2)
    X = (ds.X - ds.X.mean(0)) / ds.X.std(0)
    trainer = make_trainer(method, n_clusters=3, pretrain_epochs=1, finetune_epochs=4, epochs=3,
                           update_interval=5, **FAST).fit(X, ds.groups, ds.y)
    phases = [record["phase"] for record in trainer.history]
    assert phases == ["pretrain-0", "pretrain-1", "pretrain-2", "pretrain-3"] + ["finetune"] * 4 + ["cluster"] * 3
    finetune = [record["rec"] for record in trainer.history if record["phase"] == "finetune"]
    assert finetune[-1] < finetune[0]
    assert metrics.accuracy(ds.y, trainer.labels_) > 0.6
    cluster = [record for record in trainer.history if record["phase"] == "cluster"]
    if method == "dfc":
        assert all(np.isfinite(record["fair"]) for record in cluster)
    else:                                   # DEC (gamma 0) does not compute the fairoid term
        assert all("fair" not in record and np.isfinite(record["kl"]) for record in cluster)


def _run(method, tmp_path, epochs, resume, **extra):
    options = dict(FAST, checkpoint_dir=str(tmp_path), resume=resume, seed=3, n_clusters=3, **extra)
    if method == "fcmi":
        # One warm-up epoch, then FCMI epochs (epochs <= warmup_epochs would shorten the warm-up).
        options.update(epochs=epochs + 1, warmup_epochs=1)
    else:
        options.update(pretrain_epochs=1, finetune_epochs=1, epochs=epochs, update_interval=3)
    return make_trainer(method, **options)


@pytest.mark.parametrize("method", ["fcmi", "dfc"])
def test_resume_equals_uninterrupted(method, tmp_path, biased):
    X, groups, y = biased
    full = _run(method, tmp_path / "full", 2, False).fit(X, groups, y)
    first = _run(method, tmp_path / "split", 2, False)
    first_total = first.total_epochs
    # Stop one epoch early: same schedule, fewer epochs (resume must not need the same total).
    partial = _run(method, tmp_path / "split", 1, False).fit(X, groups, y)
    assert partial.total_epochs == first_total - 1
    resumed = _run(method, tmp_path / "split", 2, True).fit(X, groups, y)
    assert resumed.epochs_run == 1
    np.testing.assert_array_equal(resumed.labels_, full.labels_)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in full.history]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history] == strip
    saved = ckpt.load(ckpt.checkpoint_path(str(tmp_path / "split")))
    assert saved["epoch"] == full.total_epochs - 1


def test_non_finite_loss_stops_with_epoch_and_term(tmp_path, biased):
    X, groups, y = biased
    trainer = _run("fcmi", tmp_path, 3, False)
    original = trainer.batch_losses

    def poisoned(phase, index, x, g):
        loss, terms = original(phase, index, x, g)
        if phase == "fcmi":           # epoch 1 onwards: a NaN clustering term
            terms["clu"] = terms["clu"] * float("nan")
        return loss, terms

    trainer.batch_losses = poisoned
    with pytest.raises(NonFiniteLossError, match=r"epoch 1: loss term 'clu'.*last good checkpoint.*epoch 0"):
        trainer.fit(X, groups, y)
    assert ckpt.load(ckpt.checkpoint_path(str(tmp_path)))["epoch"] == 0


def test_bad_inputs():
    trainer = make_trainer("fcmi", n_clusters=2, epochs=1, **FAST)
    with pytest.raises(ValueError, match="groups"):
        trainer.fit(np.zeros((5, 3), np.float32), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="X contains NaN"):
        trainer.fit(np.full((5, 3), np.nan, np.float32), np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="n_clusters"):
        make_trainer("fcmi", n_clusters=0)
    with pytest.raises(ValueError, match="method"):
        make_trainer("kmeans")
    with pytest.raises(RuntimeError, match="not fitted"):
        trainer.predict(np.zeros((2, 3), np.float32))
    assert not os.path.exists("last.pt")


def test_epochs_not_above_warmup_shortens_the_warmup_with_a_warning(biased):
    X, groups, y = biased
    with pytest.warns(UserWarning, match="warm-up is shortened to 1 epoch"):
        trainer = make_trainer("fcmi", n_clusters=3, epochs=5, warmup_epochs=20, **FAST)
    trainer.fit(X, groups, y)
    assert [record["phase"] for record in trainer.history] == ["warmup"] + ["fcmi"] * 4
    assert trainer.history[-1]["fair"] > 0 or trainer.history[-1]["mnce"] > 0.5


def test_fcmi_learning_rate_decays_over_the_fcmi_epochs_only(biased):
    X, groups, y = biased
    trainer = make_trainer("fcmi", n_clusters=3, epochs=8, warmup_epochs=3, lr=3e-3, **FAST).fit(X, groups, y)
    rates = [record["lr"] for record in trainer.history]
    assert rates[:4] == [3e-3] * 4                       # the warm-up, then the first FCMI epoch at lr
    assert all(a > b for a, b in zip(rates[3:], rates[4:])) and 0 < rates[-1] < 3e-3 * 0.1
    assert rates[3:] == pytest.approx([3e-3 * (1 + math.cos(math.pi * t / 5)) / 2 for t in range(5)])
    constant = make_trainer("fcmi", n_clusters=3, epochs=8, warmup_epochs=3, lr=3e-3, lr_schedule="constant",
                            **FAST).fit(X, groups, y)
    assert [record["lr"] for record in constant.history] == [3e-3] * 8
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        make_trainer("fcmi", lr_schedule="linear")


@pytest.mark.parametrize("refresh", ["warm", "restart"])
def test_fcmi_center_refresh_modes_keep_clusters_fair(refresh, biased):
    X, groups, y = biased
    trainer = make_trainer("fcmi", n_clusters=3, epochs=10, warmup_epochs=3, beta=1.0, lr=3e-3,
                           center_refresh=refresh, **FAST).fit(X, groups, y)
    scores = metrics.evaluate(y, trainer.labels_, groups)
    assert scores["mnce"] > 0.8 and scores["acc"] > 0.5


def test_fcmi_conv_model_trains_end_to_end():
    # 8x8 "images": the conv autoencoder (strides 1-2-1-2) on the appearance data as 64 pixels.
    ds = data.load("appearance", n=600, dim=64, n_clusters=3, seed=0)
    trainer = make_trainer("fcmi", n_clusters=3, model="conv", epochs=8, warmup_epochs=3, beta=1.0, lr=3e-3,
                           **dict(FAST, width=0.5)).fit(ds.X, ds.groups, ds.y)
    rec = [record["rec"] for record in trainer.history]
    assert rec[-1] < rec[0]
    scores = metrics.evaluate(ds.y, trainer.labels_, ds.groups)
    assert scores["mnce"] > 0.8                      # AE + k-means on this data has MNCE ~0

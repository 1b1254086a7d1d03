"""DFC, DEC and AE + k-means trained end to end on small data, each against a stated metric
threshold: AE + k-means and DEC recover planted clusters; DFC is far fairer than DEC (and not
less accurate) when the group moves every point by an offset, the case the fairoid term is
built for; the reported crash (3 random groups on sklearn digits) trains to finite losses."""
import numpy as np
import pytest

from fairkernels import data, metrics
from fairkernels.train import DFCConfig, make_trainer

FAST = dict(progress=False, verbose=False, width=0.05, batch_size=128, backend="reference", kmeans_iter=30,
            n_clusters=3, seed=0, pretrain_epochs=2, finetune_epochs=10, epochs=10, update_interval=10)


pytestmark = pytest.mark.usefixtures("one_thread")


def _standardise(X):
    return ((X - X.mean(0)) / X.std(0)).astype(np.float32)


@pytest.fixture(scope="module")
def planted():
    ds = data.load("synthetic", n=600, dim=8, n_clusters=3, n_groups=2, bias=0.0, separation=6.0, seed=4)
    return _standardise(ds.X), ds.groups, ds.y


@pytest.fixture(scope="module")
def shifted():
    # Group 1 is group 0 moved by a large offset: an unconstrained clusterer splits by group.
    ds = data.load("synthetic", n=600, dim=8, n_clusters=3, n_groups=2, bias=0.0, seed=1)
    X = ds.X + np.where(ds.groups[:, None] == 1, 8.0, 0.0).astype(np.float32)
    return _standardise(X), ds.groups, ds.y


@pytest.mark.parametrize("method", ["ae-km", "dec"])
def test_ae_kmeans_and_dec_recover_planted_clusters(method, planted):
    X, groups, y = planted
    # Width 0.1 and batch 32: enough optimiser steps on 600 rows for the SDAE to fit them.
    trainer = make_trainer(method, **{**FAST, "width": 0.1, "batch_size": 32}).fit(X, groups, y)
    assert metrics.accuracy(y, trainer.labels_) > 0.9          # chance is 1/3
    assert metrics.nmi(y, trainer.labels_) > 0.7
    np.testing.assert_array_equal(trainer.predict(X), trainer.labels_)


def test_dfc_is_fairer_than_dec_when_groups_shift_the_data(shifted):
    # The paper's mechanism alone: shared centroids, the fairoid term does the mixing.
    X, groups, y = shifted
    dec = metrics.evaluate(y, make_trainer("dec", **FAST).fit(X, groups).labels_, groups)
    dfc_trainer = make_trainer("dfc", gamma=3.0, centers="shared", **FAST).fit(X, groups)
    dfc = metrics.evaluate(y, dfc_trainer.labels_, groups)
    assert dec["mnce"] < 0.1                                    # DEC splits by group
    assert dfc["mnce"] > 0.6 and dfc["bal"] > 0.3 and dfc["fwd_mean"] < 0.25
    assert dfc["acc"] >= dec["acc"] - 0.03 and dfc["acc"] > 0.45
    fair = [record["fair"] for record in dfc_trainer.history if record["phase"] == "cluster"]
    assert fair[-1] < fair[0]                                   # the fairoid loss is minimised


MATCHED = {**FAST, "width": 0.1, "finetune_epochs": 30}


def test_matched_dfc_pairs_the_groups_clusters(shifted):
    # The groups sit in separate regions of the input: "auto" gives DFC per-group centroids,
    # paired across groups, and keeps DEC the unconstrained baseline it is.
    X, groups, y = shifted
    dec = make_trainer("dec", **MATCHED).fit(X, groups)
    dfc = make_trainer("dfc", **MATCHED).fit(X, groups)
    assert dec.centers_info["mode"] == "shared" and dfc.centers_info["mode"] == "matched"
    assert dfc.centers_info["joint_input_mnce"] < 0.1 and dfc.gamma == 1.0 and dec.gamma == 0.0
    base, fair = (metrics.evaluate(y, trainer.labels_, groups) for trainer in (dec, dfc))
    assert base["mnce"] < 0.1                                   # DEC splits by group
    assert fair["acc"] > 0.9 and fair["bal"] > 0.7 and fair["mnce"] > 0.95 and fair["fwd_mean"] < 0.05
    assert dfc.cluster_centers_.shape == (2, 3, dfc.config.embedding_dim)
    np.testing.assert_array_equal(dfc.predict(X, groups), dfc.labels_)
    with pytest.raises(ValueError, match="groups is required: this DFC model has per-group centers"):
        dfc.predict(X)


def test_balanced_target_gives_every_group_the_whole_sets_shares(shifted):
    import torch
    X, groups, _ = shifted
    trainer = make_trainer("dfc", **{**MATCHED, "epochs": 1}).fit(X, groups)
    g = torch.as_tensor(groups)
    # A target whose groups disagree: group 1 puts most of its mass on cluster 0.
    target = torch.softmax(torch.randn(len(groups), 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
                           + 3.0 * (g[:, None] == 1) * torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), 1)
    balanced = trainer.balanced_target(target, g)
    shares = torch.stack([balanced[g == t].mean(0) for t in (0, 1)])
    torch.testing.assert_close(shares[0], shares[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(balanced.sum(1), torch.ones(len(groups), dtype=torch.float64))
    assert (balanced.argmax(1) == target.argmax(1)).double().mean() > 0.5   # a rescaling, not a new target


def test_dfc_keeps_shared_centroids_when_the_groups_mix(planted):
    X, groups, y = planted                                      # groups drawn independently of the clusters
    trainer = make_trainer("dfc", **{**FAST, "epochs": 1}).fit(X, groups)
    assert trainer.centers_info["mode"] == "shared" and trainer.gamma == 10.0
    assert trainer.cluster_centers_.shape == (3, trainer.config.embedding_dim)


def test_dfc_with_reconstruction_trains_the_decoder(shifted):
    X, groups, y = shifted
    trainer = make_trainer("dfc", gamma=3.0, rec_weight=1.0, **FAST)
    trainer.fit(X, groups)
    records = [r for r in trainer.history if r["phase"] == "cluster"]
    assert all(np.isfinite(r["rec"]) and np.isfinite(r["fair"]) for r in records)
    assert any(p is q for p in trainer.parameters("cluster") for q in trainer.model.decoder_layers.parameters())


def test_dfc_on_three_random_groups_of_digits_does_not_crash():
    # The reported crash: linalg.cholesky in the eq. 12 solve on a rank-deficient system.
    from sklearn.datasets import load_digits
    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    groups = np.random.RandomState(0).randint(0, 3, X.shape[0])
    trainer = make_trainer("dfc", n_clusters=10, width=0.05, epochs=2, pretrain_epochs=1, finetune_epochs=1,
                           progress=False, verbose=False, backend="reference", kmeans_iter=20).fit(X, groups)
    assert all(np.isfinite(r["fair"]) for r in trainer.history if r["phase"] == "cluster")
    assert trainer.labels_.shape == (X.shape[0],)


@pytest.mark.parametrize("field, value", [("centroids_from", "p"), ("rec_weight", -1.0), ("gamma", -0.1)])
def test_bad_dfc_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DFCConfig(**{field: value}).validate()


def test_target_refresh_auto_switches_to_lagged_on_large_sets():
    config = DFCConfig()
    limit = int(0.6 * config.batch_size * config.update_interval)
    assert config.target_mode(limit) == "interval" and config.target_mode(limit + 1) == "lagged"
    assert DFCConfig(target_refresh="batch").target_mode(10) == "batch"
    with pytest.raises(ValueError, match="target_refresh"):
        DFCConfig(target_refresh="sometimes").validate()


@pytest.mark.parametrize("mode", ["lagged", "batch"])
def test_dec_with_scalable_targets_recovers_planted_clusters(mode, planted):
    """The targets that need no whole-set encoding train DEC as well as DEC's own refresh here."""
    X, groups, y = planted
    trainer = make_trainer("dec", target_refresh=mode, **{**FAST, "width": 0.1, "batch_size": 32}).fit(X, groups, y)
    assert metrics.accuracy(y, trainer.labels_) > 0.9
    assert metrics.nmi(y, trainer.labels_) > 0.7
    assert "frequency" in trainer.state

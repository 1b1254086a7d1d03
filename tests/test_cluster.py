"""sklearn-style estimators: clone, get/set_params, fit_predict, predict, transform."""
import numpy as np
import pytest
import torch
from sklearn.base import clone

from fairkernels import data
from fairkernels.cluster import DFC, FCMI


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small():
    ds = data.load("synthetic", n=300, dim=5, n_clusters=3, n_groups=2, bias=0.3, seed=4)
    return (ds.X - ds.X.mean(0)) / ds.X.std(0), ds.groups


def test_clone_and_params():
    est = FCMI(4, beta=0.5, epochs=3, random_state=7)
    params = est.get_params()
    assert params["n_clusters"] == 4 and params["beta"] == 0.5 and params["random_state"] == 7
    copy = clone(est)
    assert copy is not est and copy.get_params() == params
    copy.set_params(beta=0.1)
    assert copy.beta == 0.1 and est.beta == 0.5
    assert clone(DFC(3, method="dec")).get_params()["method"] == "dec"


def test_fcmi_estimator_fit_predict(small):
    X, groups = small
    est = FCMI(3, epochs=3, warmup_epochs=1, width=0.05, batch_size=128, kmeans_iter=20, backend="reference")
    labels = est.fit_predict(X, groups)
    assert labels.shape == (300,) and labels.dtype == np.int64 and labels.max() < 3
    assert est.cluster_centers_.shape == (3, 3)      # the groups mix in the inputs: auto -> shared centers
    assert est.transform(X).shape == (300, 3)
    np.testing.assert_array_equal(est.predict(X), labels)
    np.testing.assert_array_equal(est.predict(X, groups), labels)     # groups are accepted and unused
    assert len(est.history_) == 3
    # Same seed, same result (CPU runs are deterministic).
    np.testing.assert_array_equal(clone(est).fit_predict(X, groups), labels)


def test_dfc_estimator_methods(small):
    X, groups = small
    for method in ("dfc", "ae-km"):
        est = DFC(3, method=method, pretrain_epochs=1, finetune_epochs=2, epochs=2, width=0.05, batch_size=128,
                  update_interval=2, kmeans_iter=20, backend="reference")
        labels = est.fit_predict(X, groups)
        assert labels.shape == (300,)
        np.testing.assert_array_equal(est.predict(X), labels)
        assert est.cluster_centers_.shape == (3, 3)


def test_estimator_errors(small):
    X, groups = small
    with pytest.raises(RuntimeError, match="not fitted"):
        FCMI(3).predict(X)
    with pytest.raises(ValueError, match="groups is required"):
        FCMI(3).fit(X, None)
    with pytest.raises(ValueError, match="method"):
        DFC(3, method="bogus").fit(X, groups)


@pytest.fixture(scope="module")
def fitted(small):
    X, groups = small
    est = FCMI(3, epochs=1, warmup_epochs=0, width=0.05, batch_size=128, kmeans_iter=5, backend="reference")
    return est.fit(X, groups)


@pytest.mark.parametrize("method", ["predict", "transform"])
def test_feature_count_mismatch_is_named(small, fitted, method):
    X, groups = small
    with pytest.raises(ValueError, match=r"^X has 2 features, but FCMI is expecting 5 features as input\.$"):
        getattr(fitted, method)(X[:, :2])
    with pytest.raises(ValueError, match="X has 7 features"):
        getattr(fitted, method)(torch.zeros(4, 7))
    extra = (groups[:4],) if method == "predict" else ()
    assert getattr(fitted, method)(X[:4].tolist(), *extra).shape[0] == 4      # lists are checked too, and pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("make", [lambda: FCMI(3, device="cuda"), lambda: DFC(3, device="cuda:0")])
def test_cuda_without_cuda_is_one_clear_error(small, make):
    X, groups = small
    with pytest.raises(ValueError, match=r"CUDA is not available: .*; use device='cpu'"):
        make().fit(X, groups)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_trainer_cuda_without_cuda_is_one_clear_error():
    from fairkernels.train import DFCConfig, DFCTrainer, FCMIConfig, FCMITrainer
    for trainer, config in ((FCMITrainer, FCMIConfig), (DFCTrainer, DFCConfig)):
        with pytest.raises(ValueError, match="CUDA is not available"):
            trainer(config(device="cuda"))


def test_device_check_names_bad_values():
    from fairkernels._device import check_device
    assert check_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "tpu:0", "cuda:x"):
        with pytest.raises(ValueError, match="device must be 'cpu', 'cuda'"):
            check_device(bad)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device"):
            check_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("estimator, method", [(FCMI, "fcmi"), (DFC, "dfc")])
def test_estimator_defaults_are_the_trainer_defaults(estimator, method):
    # One source of truth for the recipe: an estimator built with no arguments trains exactly
    # what make_trainer(method) would (random_state is the config's seed).
    from dataclasses import fields

    from fairkernels.train import config_for
    config = config_for(method)
    params = estimator().get_params()
    shared = {f.name for f in fields(config)} & set(params)
    assert len(shared) >= 10
    mismatched = {name: (params[name], getattr(config, name)) for name in shared
                  if params[name] != getattr(config, name) and name != "progress" and name != "verbose"}
    assert not mismatched
    assert params["random_state"] == config.seed

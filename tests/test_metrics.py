"""docs/math.md §5 metrics on hand-computed cases, edge cases and bad input."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from fairkernels import metrics


def _cluster_from_group_counts(group_counts, cluster=0):
    """pred/groups vectors of one cluster holding group_counts[t] points of group t."""
    groups = np.repeat(np.arange(len(group_counts)), group_counts)
    return np.full(groups.size, cluster), groups


def _entropy(p):
    p = np.asarray(p, dtype=float)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


# ----------------------------------------------------------------------------- accuracy / nmi

def test_accuracy_permutation_is_perfect():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([2, 2, 0, 0, 1, 1])
    assert metrics.accuracy(y, pred) == 1.0


def test_accuracy_hand_case():
    y = [0, 0, 0, 1, 1, 1]
    pred = [1, 1, 0, 0, 0, 0]
    # best map: cluster 1 -> 0 (2 hits), cluster 0 -> 1 (3 hits) = 5/6
    assert metrics.accuracy(y, pred) == pytest.approx(5 / 6)


def test_accuracy_more_clusters_than_labels():
    y = [0, 0, 0, 1, 1, 1]
    pred = [0, 0, 2, 1, 1, 3]
    # clusters 0 -> 0 and 1 -> 1 are the best two; clusters 2 and 3 stay unmapped
    assert metrics.accuracy(y, pred) == pytest.approx(4 / 6)


def test_accuracy_fewer_clusters_than_labels_and_sparse_ids():
    y = [5, 5, 7, 7, 9, 9]
    pred = [3, 3, 3, 3, 0, 0]
    assert metrics.accuracy(y, pred) == pytest.approx(4 / 6)


def test_accuracy_huge_label_ids_use_sort_path():
    y = [10**12, 10**12, 3]
    pred = [1, 1, 10**11]
    assert metrics.accuracy(y, pred) == 1.0


def test_nmi_equals_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    pred = rng.integers(0, 6, 200)
    expected = normalized_mutual_info_score(y, pred, average_method="arithmetic")
    assert metrics.nmi(y, pred) == pytest.approx(expected, abs=1e-12)
    assert metrics.nmi(y, y) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- balance / mnce

def test_fcmi_balance_counter_example():
    # FCMI paper: group counts 3, 4, 18, 20 and 3, 11, 11, 20 both have Bal = 3/20,
    # while MNCE tells them apart (the second is more even).
    pred_a, groups_a = _cluster_from_group_counts([3, 4, 18, 20])
    pred_b, groups_b = _cluster_from_group_counts([3, 11, 11, 20])
    assert metrics.balance(pred_a, groups_a) == pytest.approx(3 / 20)
    assert metrics.balance(pred_b, groups_b) == pytest.approx(3 / 20)
    # One cluster: H(G|C) = H(G), so MNCE = 1 for both; put each inside a two-cluster clustering
    # whose other cluster is perfectly mixed over the same groups to make H(G) shared.
    def two_clusters(counts):
        pred0, groups0 = _cluster_from_group_counts(counts, cluster=0)
        pred1, groups1 = _cluster_from_group_counts([30, 30, 30, 30], cluster=1)
        return np.concatenate([pred0, pred1]), np.concatenate([groups0, groups1])

    mnce_a = metrics.mnce(*two_clusters([3, 4, 18, 20]))
    mnce_b = metrics.mnce(*two_clusters([3, 11, 11, 20]))
    assert metrics.balance(*two_clusters([3, 4, 18, 20])) == metrics.balance(*two_clusters([3, 11, 11, 20]))
    expected_a = _entropy([3, 4, 18, 20]) / _entropy([33, 34, 48, 50])
    expected_b = _entropy([3, 11, 11, 20]) / _entropy([33, 41, 41, 50])
    assert mnce_a == pytest.approx(expected_a)
    assert mnce_b == pytest.approx(expected_b)
    assert mnce_b > mnce_a + 0.05


def test_balance_hand_case_min_over_clusters():
    pred = [0, 0, 0, 1, 1, 1, 1]
    groups = [0, 1, 1, 0, 0, 0, 1]
    # cluster 0: (1, 2) -> 1/2; cluster 1: (3, 1) -> 1/3
    assert metrics.balance(pred, groups) == pytest.approx(1 / 3)


def test_balance_zero_cell_uses_1e5():
    pred = [0, 0, 1, 1]
    groups = [0, 0, 0, 1]
    assert metrics.balance(pred, groups) == pytest.approx(1e-5 / 2)


def test_unobserved_group_ids_ignored_unless_num_groups_given():
    pred = [0, 0, 1, 1]
    groups = [0, 2, 0, 2]  # group 1 never occurs
    assert metrics.balance(pred, groups) == 1.0
    assert metrics.mnce(pred, groups) == pytest.approx(1.0)
    assert metrics.fwd(pred, groups) == (0.0, 0.0)
    assert metrics.balance(pred, groups, num_groups=3) == pytest.approx(1e-5)
    mean, worst = metrics.fwd(pred, groups, num_groups=3)
    assert mean == pytest.approx(0.5 * (1 / 6 + 1 / 3 + 1 / 6)) and worst == pytest.approx(mean)


def test_mnce_hand_case():
    pred = [0, 0, 0, 0, 1, 1]
    groups = [0, 0, 0, 1, 0, 1]
    # H(G) from (4, 2); clusters (3, 1) and (1, 1)
    expected = _entropy([3, 1]) / _entropy([4, 2])
    assert metrics.mnce(pred, groups) == pytest.approx(expected)


def test_mnce_one_group_and_fully_unfair():
    assert metrics.mnce([0, 1, 1], [0, 0, 0]) == 1.0
    assert metrics.mnce([0, 0, 1, 1], [0, 0, 1, 1]) == 0.0


def test_empty_cluster_ids_are_skipped():
    # clusters 1 and 3 are empty (ids skipped); only 0 and 2 count
    pred = [0, 0, 2, 2]
    groups = [0, 1, 0, 1]
    assert metrics.balance(pred, groups) == 1.0
    assert metrics.mnce(pred, groups) == pytest.approx(1.0)
    assert metrics.fwd(pred, groups) == (0.0, 0.0)


# ----------------------------------------------------------------------------- f_beta

def test_f_beta():
    assert metrics.f_beta(0.0, 0.0) == 0.0
    assert metrics.f_beta(0.5, 0.5) == pytest.approx(0.5)
    assert metrics.f_beta(0.6, 0.3) == pytest.approx(2 * 0.18 / 0.9)
    assert metrics.f_beta(0.6, 0.3, beta=2.0) == pytest.approx(5 * 0.18 / (4 * 0.6 + 0.3))
    with pytest.raises(ValueError, match="nmi_value"):
        metrics.f_beta(float("nan"), 0.3)
    with pytest.raises(ValueError, match="beta"):
        metrics.f_beta(0.5, 0.3, beta=0)


# ----------------------------------------------------------------------------- fwd

def test_fwd_discrete_and_ordinal_hand_case():
    # one cluster with h = (1/2, 0, 1/2) over T = 3, another with h = (1, 0, 0)
    pred = [0, 0, 1, 1]
    groups = [0, 2, 0, 0]
    # discrete: 1/2 * sum |h - 1/3|
    d0 = 0.5 * (1 / 6 + 1 / 3 + 1 / 6)
    d1 = 0.5 * (2 / 3 + 1 / 3 + 1 / 3)
    mean, worst = metrics.fwd(pred, groups, ground="discrete", num_groups=3)
    assert (mean, worst) == (pytest.approx((d0 + d1) / 2), pytest.approx(d1))
    # ordinal: CDFs h0 = (1/2, 1/2, 1), h1 = (1, 1, 1), u = (1/3, 2/3, 1)
    o0 = abs(1 / 2 - 1 / 3) + abs(1 / 2 - 2 / 3)
    o1 = abs(1 - 1 / 3) + abs(1 - 2 / 3)
    mean, worst = metrics.fwd(pred, groups, ground="ordinal", num_groups=3)
    assert (mean, worst) == (pytest.approx((o0 + o1) / 2), pytest.approx(o1))


def test_fwd_two_groups_is_calders_verwer_half():
    pred = [0, 0, 0, 0, 1, 1, 1]
    groups = [0, 1, 1, 1, 0, 0, 1]
    h1 = np.array([3 / 4, 1 / 3])
    expected = np.abs(h1 - 0.5)
    for ground in ("discrete", "ordinal"):
        mean, worst = metrics.fwd(pred, groups, ground=ground)
        assert mean == pytest.approx(expected.mean())
        assert worst == pytest.approx(expected.max())


def test_fwd_bad_ground():
    with pytest.raises(ValueError, match="ground"):
        metrics.fwd([0], [0], ground="euclid")


# ----------------------------------------------------------------------------- evaluate / inputs

def test_evaluate_keys_and_consistency():
    y = [0, 0, 1, 1, 1, 0]
    pred = [1, 1, 0, 0, 0, 0]
    groups = [0, 1, 0, 1, 1, 0]
    result = metrics.evaluate(y, pred, groups)
    assert set(result) == {"acc", "nmi", "bal", "mnce", "f_beta", "fwd_mean", "fwd_max"}
    assert result["acc"] == metrics.accuracy(y, pred)
    assert result["nmi"] == metrics.nmi(y, pred)
    assert result["bal"] == metrics.balance(pred, groups)
    assert result["mnce"] == metrics.mnce(pred, groups)
    assert result["f_beta"] == metrics.f_beta(result["nmi"], result["mnce"])
    assert (result["fwd_mean"], result["fwd_max"]) == metrics.fwd(pred, groups)
    assert set(metrics.evaluate(None, pred, groups)) == {"bal", "mnce", "fwd_mean", "fwd_max"}


def test_single_point():
    result = metrics.evaluate([0], [0], [0])
    assert result == {"acc": 1.0, "nmi": 1.0, "bal": 1.0, "mnce": 1.0, "f_beta": 1.0,
                      "fwd_mean": 0.0, "fwd_max": 0.0}


def test_accepts_lists_numpy_and_torch():
    y = [0, 1, 1, 0, 2]
    pred = [1, 0, 0, 1, 1]
    groups = [0, 1, 0, 1, 1]
    expected = metrics.evaluate(y, pred, groups)
    as_torch = metrics.evaluate(torch.tensor(y), torch.tensor(pred, dtype=torch.int32),
                                torch.tensor(groups))
    as_numpy = metrics.evaluate(np.array(y, dtype=np.uint8), np.array(pred), np.array(groups))
    assert as_torch == expected and as_numpy == expected


def test_never_nan_on_random_inputs():
    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 50):
        y = rng.integers(0, 3, n)
        pred = rng.integers(0, 5, n)
        groups = rng.integers(0, 4, n)
        for value in metrics.evaluate(y, pred, groups).values():
            assert math.isfinite(value) and 0.0 <= value <= 1.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="pred has length 3"):
        metrics.balance([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="y has length 2"):
        metrics.accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="y has length 2"):
        metrics.evaluate([0, 1], [0, 1, 1], [0, 0, 1])
    with pytest.raises(ValueError, match="empty"):
        metrics.mnce([], [])
    with pytest.raises(ValueError, match="groups must be >= 0"):
        metrics.fwd([0, 1], [0, -1])
    with pytest.raises(TypeError, match="pred"):
        metrics.nmi([0, 1], [0.0, 1.0])
    with pytest.raises(TypeError, match="groups"):
        metrics.balance([0, 1], torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="y must be 1-D"):
        metrics.accuracy([[0, 1]], [[0, 1]])
    with pytest.raises(ValueError, match="num_groups"):
        metrics.balance([0, 1], [0, 3], num_groups=2)


# ----------------------------------------------------------------------------- device-side counts

def test_contingency_matches_numpy_and_from_counts_helpers():
    rng = np.random.default_rng(2)
    pred = torch.from_numpy(rng.integers(0, 5, 300))
    groups = torch.from_numpy(rng.integers(0, 3, 300)).to(torch.int32)
    table = metrics.contingency(pred, groups, num_clusters=6, num_groups=3)
    assert table.shape == (6, 3) and table.dtype == torch.int64
    expected = np.zeros((6, 3), dtype=np.int64)
    np.add.at(expected, (pred.numpy(), groups.numpy()), 1)
    np.testing.assert_array_equal(table.numpy(), expected)
    assert metrics.balance_from_counts(table) == metrics.balance(pred, groups)
    assert metrics.mnce_from_counts(table) == pytest.approx(metrics.mnce(pred, groups))
    assert metrics.fwd_from_counts(table) == pytest.approx(metrics.fwd(pred, groups))
    y = torch.from_numpy(rng.integers(0, 4, 300))
    assert metrics.accuracy_from_counts(metrics.contingency(pred, y, 5, 4)) == \
        pytest.approx(metrics.accuracy(y, pred))


def test_contingency_bad_inputs():
    pred = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="length mismatch"):
        metrics.contingency(pred, torch.tensor([0, 1]), 3, 2)
    with pytest.raises(ValueError, match="num_groups"):
        metrics.contingency(pred, torch.tensor([0, 1, 2]), 3, 2)
    with pytest.raises(TypeError, match="groups"):
        metrics.contingency(pred, torch.tensor([0.0, 1.0, 1.0]), 3, 2)
    with pytest.raises(ValueError, match="num_clusters"):
        metrics.contingency(pred, torch.tensor([0, 1, 1]), 0, 2)

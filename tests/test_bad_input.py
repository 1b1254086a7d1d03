"""Every public function rejects malformed arguments with ValueError / TypeError (RuntimeError for
a backend that cannot run here) and a message naming the argument (docs/math.md §7).

One table row per malformed call: (id, callable, expected exception type, substring of the message).
"""
import math

import pytest
import torch

import fairkernels as fk
from fairkernels import metrics

N, K, T, D = 6, 3, 2, 4
torch.manual_seed(0)
LOGITS = torch.randn(N, K)
GROUPS = torch.tensor([0, 1, 0, 1, 0, 1])
H = torch.randn(N, D)
CENTERS = torch.randn(K, D)
PROBS = torch.softmax(LOGITS, dim=1)
JOINT = torch.rand(T, K) + 0.1
META_GROUPS = GROUPS.to("meta")
NAN_LOGITS = LOGITS.clone().index_put_((torch.tensor([2]), torch.tensor([1])), torch.tensor(math.nan))
INF_LOGITS = LOGITS.clone().index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(math.inf))
NEG_GROUPS = torch.tensor([0, 1, -1, 1, 0, 1])
Y = [0, 1, 1, 0, 2, 2]
PRED = [0, 0, 1, 1, 2, 2]
METRIC_GROUPS = [0, 1, 0, 1, 0, 1]


def _with(tensor, row, col, value):
    out = tensor.clone()
    out[row, col] = value
    return out


def _fcmi_family():
    cases = []
    for name, op in (("fcmi_terms", fk.fcmi_terms), ("fcmi_loss", fk.fcmi_loss)):
        cases += [
            (f"{name}-logits-rank1", lambda op=op: op(LOGITS[:, 0], GROUPS), ValueError, "logits"),
            (f"{name}-logits-rank3", lambda op=op: op(LOGITS[None], GROUPS), ValueError, "logits"),
            (f"{name}-logits-list", lambda op=op: op(LOGITS.tolist(), GROUPS), TypeError, "logits"),
            (f"{name}-int-logits", lambda op=op: op(LOGITS.long(), GROUPS), TypeError, "logits"),
            (f"{name}-float-groups", lambda op=op: op(LOGITS, GROUPS.float()), TypeError, "groups"),
            (f"{name}-groups-rank2", lambda op=op: op(LOGITS, GROUPS[:, None]), ValueError, "groups"),
            (f"{name}-length-mismatch", lambda op=op: op(LOGITS, GROUPS[:5]), ValueError, "groups"),
            (f"{name}-negative-groups", lambda op=op: op(LOGITS, NEG_GROUPS), ValueError, "groups"),
            (f"{name}-groups-out-of-range", lambda op=op: op(LOGITS, GROUPS, 1), ValueError, "num_groups"),
            (f"{name}-num-groups-zero", lambda op=op: op(LOGITS, GROUPS, 0), ValueError, "num_groups"),
            (f"{name}-num-groups-negative", lambda op=op: op(LOGITS, GROUPS, -3), ValueError, "num_groups"),
            (f"{name}-num-groups-inf", lambda op=op: op(LOGITS, GROUPS, math.inf), ValueError, "num_groups"),
            (f"{name}-num-groups-float", lambda op=op: op(LOGITS, GROUPS, 2.5), TypeError, "num_groups"),
            (f"{name}-nan-logits", lambda op=op: op(NAN_LOGITS, GROUPS), ValueError, "logits"),
            (f"{name}-inf-logits", lambda op=op: op(INF_LOGITS, GROUPS), ValueError, "logits"),
            (f"{name}-minus-inf-logits", lambda op=op: op(-INF_LOGITS, GROUPS), ValueError, "logits"),
            (f"{name}-nan-logits-reference", lambda op=op: op(NAN_LOGITS, GROUPS, backend="reference"), ValueError,
             "logits"),
            (f"{name}-negative-groups-reference", lambda op=op: op(LOGITS, NEG_GROUPS, 2, backend="reference"),
             ValueError, "groups must be >= 0"),
            (f"{name}-k0", lambda op=op: op(LOGITS[:, :0], GROUPS), ValueError, "logits"),
            (f"{name}-n0", lambda op=op: op(LOGITS[:0], GROUPS[:0]), ValueError, "logits"),
            (f"{name}-groups-on-meta", lambda op=op: op(LOGITS, META_GROUPS), ValueError, "groups"),
            (f"{name}-logits-on-meta", lambda op=op: op(LOGITS.to("meta"), GROUPS), ValueError, "groups"),
            (f"{name}-bad-backend", lambda op=op: op(LOGITS, GROUPS, backend="gpu"), ValueError, "backend"),
            (f"{name}-backend-not-str", lambda op=op: op(LOGITS, GROUPS, backend=None), ValueError, "backend"),
            (f"{name}-cuda-on-cpu", lambda op=op: op(LOGITS, GROUPS, backend="cuda"), RuntimeError, "backend"),
        ]
    cases += [
        ("fcmi_loss-alpha-nan", lambda: fk.fcmi_loss(LOGITS, GROUPS, alpha=math.nan), ValueError, "alpha"),
        ("fcmi_loss-alpha-str", lambda: fk.fcmi_loss(LOGITS, GROUPS, alpha="0.1"), TypeError, "alpha"),
        ("fcmi_loss-beta-inf", lambda: fk.fcmi_loss(LOGITS, GROUPS, beta=math.inf), ValueError, "beta"),
    ]
    for name, op in (("fcmi_terms_from_embeddings", fk.fcmi_terms_from_embeddings),
                     ("fcmi_loss_from_embeddings", fk.fcmi_loss_from_embeddings)):
        cases += [
            (f"{name}-h-rank1", lambda op=op: op(H[:, 0], CENTERS, GROUPS), ValueError, "h"),
            (f"{name}-int-h", lambda op=op: op(H.long(), CENTERS, GROUPS), TypeError, "h"),
            (f"{name}-centers-rank1", lambda op=op: op(H, CENTERS[0], GROUPS), ValueError, "centers"),
            (f"{name}-centers-columns", lambda op=op: op(H, CENTERS[:, :2], GROUPS), ValueError, "centers"),
            (f"{name}-centers-dtype", lambda op=op: op(H, CENTERS.double(), GROUPS), TypeError, "centers"),
            (f"{name}-centers-on-meta", lambda op=op: op(H, CENTERS.to("meta"), GROUPS), ValueError, "centers"),
            (f"{name}-groups-on-meta", lambda op=op: op(H, CENTERS, META_GROUPS), ValueError, "groups"),
            (f"{name}-float-groups", lambda op=op: op(H, CENTERS, GROUPS.double()), TypeError, "groups"),
            (f"{name}-length-mismatch", lambda op=op: op(H[:5], CENTERS, GROUPS), ValueError, "groups"),
            (f"{name}-negative-groups", lambda op=op: op(H, CENTERS, NEG_GROUPS), ValueError, "groups"),
            (f"{name}-groups-out-of-range", lambda op=op: op(H, CENTERS, GROUPS, 1), ValueError, "num_groups"),
            (f"{name}-k0", lambda op=op: op(H, CENTERS[:0], GROUPS), ValueError, "centers"),
            (f"{name}-n0", lambda op=op: op(H[:0], CENTERS, GROUPS[:0]), ValueError, "h"),
            (f"{name}-tau-zero", lambda op=op: op(H, CENTERS, GROUPS, tau=0.0), ValueError, "tau"),
            (f"{name}-tau-negative", lambda op=op: op(H, CENTERS, GROUPS, tau=-0.1), ValueError, "tau"),
            (f"{name}-tau-nan", lambda op=op: op(H, CENTERS, GROUPS, tau=math.nan), ValueError, "tau"),
            (f"{name}-nan-h", lambda op=op: op(_with(H, 1, 1, math.nan), CENTERS, GROUPS), ValueError, "h"),
            (f"{name}-inf-centers", lambda op=op: op(H, _with(CENTERS, 0, 2, -math.inf), GROUPS), ValueError,
             "centers"),
            (f"{name}-bad-backend", lambda op=op: op(H, CENTERS, GROUPS, backend="Triton"), ValueError, "backend"),
            (f"{name}-cuda-on-cpu", lambda op=op: op(H, CENTERS, GROUPS, backend="cuda"), RuntimeError, "backend"),
        ]
    cases.append(("fcmi_loss_from_embeddings-alpha-nan",
                  lambda: fk.fcmi_loss_from_embeddings(H, CENTERS, GROUPS, alpha=math.nan), ValueError, "alpha"))
    return cases


def _statistics_family():
    jh = fk.joint_histogram
    weights = torch.rand(N)
    return [
        ("joint_histogram-probs-rank1", lambda: jh(PROBS[:, 0], GROUPS), ValueError, "probs"),
        ("joint_histogram-int-probs", lambda: jh(PROBS.long(), GROUPS), TypeError, "probs"),
        ("joint_histogram-float-groups", lambda: jh(PROBS, GROUPS.float()), TypeError, "groups"),
        ("joint_histogram-length-mismatch", lambda: jh(PROBS[:4], GROUPS), ValueError, "groups"),
        ("joint_histogram-negative-groups", lambda: jh(PROBS, NEG_GROUPS), ValueError, "groups"),
        ("joint_histogram-groups-out-of-range", lambda: jh(PROBS, GROUPS, 1), ValueError, "num_groups"),
        ("joint_histogram-num-groups-zero", lambda: jh(PROBS, GROUPS, 0), ValueError, "num_groups"),
        ("joint_histogram-nan-probs", lambda: jh(_with(PROBS, 0, 0, math.nan), GROUPS), ValueError, "probs"),
        ("joint_histogram-negative-probs", lambda: jh(_with(PROBS, 3, 1, -0.5), GROUPS), ValueError, "probs"),
        ("joint_histogram-negative-probs-reference", lambda: jh(_with(PROBS, 3, 1, -0.5), GROUPS, backend="reference"),
         ValueError, "probs must be non-negative"),
        ("joint_histogram-k0", lambda: jh(PROBS[:, :0], GROUPS), ValueError, "probs"),
        ("joint_histogram-n0", lambda: jh(PROBS[:0], GROUPS[:0]), ValueError, "probs"),
        ("joint_histogram-groups-on-meta", lambda: jh(PROBS, META_GROUPS), ValueError, "groups"),
        ("joint_histogram-weights-length", lambda: jh(PROBS, GROUPS, weights=weights[:3]), ValueError, "weights"),
        ("joint_histogram-weights-rank2", lambda: jh(PROBS, GROUPS, weights=weights[:, None]), ValueError,
         "weights"),
        ("joint_histogram-int-weights", lambda: jh(PROBS, GROUPS, weights=GROUPS), TypeError, "weights"),
        ("joint_histogram-weights-on-meta", lambda: jh(PROBS, GROUPS, weights=weights.to("meta")), ValueError,
         "weights"),
        ("joint_histogram-nan-weights", lambda: jh(PROBS, GROUPS, weights=torch.full((N,), math.nan)),
         ValueError, "weights"),
        ("joint_histogram-bad-backend", lambda: jh(PROBS, GROUPS, backend="c++"), ValueError, "backend"),
        ("joint_histogram-cuda-on-cpu", lambda: jh(PROBS, GROUPS, backend="cuda"), RuntimeError, "backend"),
        ("mutual_information-rank1", lambda: fk.mutual_information(JOINT[0]), ValueError, "joint"),
        ("mutual_information-int", lambda: fk.mutual_information(JOINT.long()), TypeError, "joint"),
        ("mutual_information-negative", lambda: fk.mutual_information(JOINT - 1.0), ValueError, "joint"),
        ("mutual_information-zero-sum", lambda: fk.mutual_information(torch.zeros(T, K)), ValueError, "joint"),
        ("mutual_information-nan", lambda: fk.mutual_information(_with(JOINT, 0, 1, math.nan)), ValueError,
         "joint"),
        ("mutual_information-k0", lambda: fk.mutual_information(JOINT[:, :0]), ValueError, "joint"),
    ]


def _assign_family():
    cases = []
    for name, op, param in (("student_t_assign", fk.student_t_assign, "alpha"),
                            ("cosine_assign", fk.cosine_assign, "tau")):
        cases += [
            (f"{name}-x-rank1", lambda op=op: op(H[:, 0], CENTERS), ValueError, "must be 2-D"),
            (f"{name}-x-rank3", lambda op=op: op(H[None], CENTERS), ValueError, "must be 2-D"),
            (f"{name}-int-x", lambda op=op: op(H.long(), CENTERS), TypeError, "must have dtype"),
            (f"{name}-centers-rank1", lambda op=op: op(H, CENTERS[0]), ValueError, "centers"),
            (f"{name}-centers-columns", lambda op=op: op(H, CENTERS[:, :3]), ValueError, "centers"),
            (f"{name}-centers-dtype", lambda op=op: op(H, CENTERS.double()), TypeError, "centers"),
            (f"{name}-centers-on-meta", lambda op=op: op(H, CENTERS.to("meta")), ValueError, "centers"),
            (f"{name}-k0", lambda op=op: op(H, CENTERS[:0]), ValueError, "centers"),
            (f"{name}-n0", lambda op=op: op(H[:0], CENTERS), ValueError, "at least 1 row"),
            (f"{name}-nan-x", lambda op=op: op(_with(H, 0, 0, math.nan), CENTERS), ValueError, "NaN"),
            (f"{name}-inf-centers", lambda op=op: op(H, _with(CENTERS, 1, 1, math.inf)), ValueError, "centers"),
            (f"{name}-{param}-zero", lambda op=op, p=param: op(H, CENTERS, **{p: 0.0}), ValueError, param),
            (f"{name}-{param}-negative", lambda op=op, p=param: op(H, CENTERS, **{p: -1.0}), ValueError, param),
            (f"{name}-{param}-nan", lambda op=op, p=param: op(H, CENTERS, **{p: math.nan}), ValueError, param),
            (f"{name}-{param}-str", lambda op=op, p=param: op(H, CENTERS, **{p: "1"}), TypeError, param),
            (f"{name}-bad-backend", lambda op=op: op(H, CENTERS, backend="fast"), ValueError, "backend"),
            (f"{name}-cuda-on-cpu", lambda op=op: op(H, CENTERS, backend="cuda"), RuntimeError, "backend"),
        ]
    # the first argument is named z (Student-t) or h (cosine) in the message
    cases += [
        ("student_t_assign-z-named", lambda: fk.student_t_assign(H[:, 0], CENTERS), ValueError, "z"),
        ("cosine_assign-h-named", lambda: fk.cosine_assign(H.long(), CENTERS), TypeError, "h must"),
    ]
    return cases


def _dfc_family():
    q = PROBS
    z = H
    target = fk.dec_target(q)
    phi = torch.softmax(torch.randn(K, T), dim=1)
    return [
        ("dec_target-rank1", lambda: fk.dec_target(q[0]), ValueError, "q"),
        ("dec_target-int", lambda: fk.dec_target(q.long()), TypeError, "q"),
        ("dec_target-nan", lambda: fk.dec_target(_with(q, 0, 0, math.nan)), ValueError, "q"),
        ("dec_target-k0", lambda: fk.dec_target(q[:, :0]), ValueError, "q"),
        ("dec_target-n0", lambda: fk.dec_target(q[:0]), ValueError, "q"),
        ("dec_target-bad-backend", lambda: fk.dec_target(q, backend="numpy"), ValueError, "backend"),
        ("dec_target-cuda-on-cpu", lambda: fk.dec_target(q, backend="cuda"), RuntimeError, "backend"),
        ("kl_div-shape-mismatch", lambda: fk.kl_div(target[:, :2], q), ValueError, "target"),
        ("kl_div-target-on-meta", lambda: fk.kl_div(target.to("meta"), q), ValueError, "target"),
        ("kl_div-int-q", lambda: fk.kl_div(target, q.long()), TypeError, "q"),
        ("kl_div-nan-q", lambda: fk.kl_div(target, _with(q, 1, 1, math.nan)), ValueError, "q"),
        ("kl_div-inf-target", lambda: fk.kl_div(_with(target, 1, 1, math.inf), q), ValueError, "target"),
        ("kl_div-n0", lambda: fk.kl_div(target[:0], q[:0]), ValueError, "at least 1 row"),
        ("kl_div-bad-backend", lambda: fk.kl_div(target, q, backend=""), ValueError, "backend"),
        ("kl_div-cuda-on-cpu", lambda: fk.kl_div(target, q, backend="cuda"), RuntimeError, "backend"),
        ("batch_centroids-rows", lambda: fk.batch_centroids(q, z[:4]), ValueError, "z"),
        ("batch_centroids-ridge-zero", lambda: fk.batch_centroids(q, z, ridge=0.0), ValueError, "ridge"),
        ("batch_centroids-int-q", lambda: fk.batch_centroids(q.long(), z), TypeError, "q"),
        ("fairoids-length", lambda: fk.fairoids(z, GROUPS[:3]), ValueError, "groups"),
        ("fairoids-negative-groups", lambda: fk.fairoids(z, NEG_GROUPS), ValueError, "groups"),
        ("fairoids-previous-shape", lambda: fk.fairoids(z, GROUPS, 2, previous=torch.zeros(3, D)), ValueError,
         "previous"),
        ("fairness_matrix-columns", lambda: fk.fairness_matrix(CENTERS, torch.zeros(T, D + 1)), ValueError,
         "group_centroids"),
        ("fairness_matrix-alpha-zero", lambda: fk.fairness_matrix(CENTERS, torch.zeros(T, D), alpha=0.0),
         ValueError, "alpha"),
        ("fairoid_target-beta-zero", lambda: fk.fairoid_target(phi, beta=0.0), ValueError, "beta"),
        ("fairoid_target-rank1", lambda: fk.fairoid_target(phi[0]), ValueError, "phi"),
        ("fairoid_loss-shape", lambda: fk.fairoid_loss(phi[:, :1], phi), ValueError, "psi"),
        ("fairoid_term-rows", lambda: fk.fairoid_term(q, z[:5], GROUPS), ValueError, "z"),
        ("fairoid_term-groups-length", lambda: fk.fairoid_term(q, z, GROUPS[:5]), ValueError, "groups"),
        ("fairoid_term-beta-zero", lambda: fk.fairoid_term(q, z, GROUPS, beta=0.0), ValueError, "beta"),
        ("fairoid_term-ridge-zero", lambda: fk.fairoid_term(q, z, GROUPS, ridge=0.0), ValueError, "ridge"),
        ("fairoid_term-nan-weights", lambda: fk.fairoid_term(_with(q, 0, 0, math.nan), z, GROUPS), ValueError,
         "weights"),
        ("fairoid_term-previous-shape", lambda: fk.fairoid_term(q, z, GROUPS, 2, previous=torch.zeros(3, D)),
         ValueError, "previous"),
        ("fairoid_term-int-weights", lambda: fk.fairoid_term(q.long(), z, GROUPS), TypeError, "weights"),
        ("dfc_loss_from_embeddings-centers-1d", lambda: fk.dfc_loss_from_embeddings(z, CENTERS[0], GROUPS), ValueError,
         "centers"),
        ("dfc_loss_from_embeddings-centers-columns", lambda: fk.dfc_loss_from_embeddings(z, CENTERS[:, :2], GROUPS),
         ValueError, "centers"),
        ("dfc_loss_from_embeddings-per-group-count",
         lambda: fk.dfc_loss_from_embeddings(z, torch.randn(T + 1, K, D), GROUPS, T), ValueError, "num_groups"),
        ("dfc_loss_from_embeddings-int-centers", lambda: fk.dfc_loss_from_embeddings(z, CENTERS.long(), GROUPS),
         TypeError, "centers"),
        ("dfc_loss_from_embeddings-target-shape",
         lambda: fk.dfc_loss_from_embeddings(z, CENTERS, GROUPS, target=q[:, :2]), ValueError, "target"),
        ("dfc_loss_from_embeddings-nan-target",
         lambda: fk.dfc_loss_from_embeddings(z, CENTERS, GROUPS, target=_with(q, 1, 1, math.nan)), ValueError, "target"),
        ("dfc_loss_from_embeddings-nan-z", lambda: fk.dfc_loss_from_embeddings(_with(z, 0, 1, math.nan), CENTERS, GROUPS),
         ValueError, "z"),
        ("dfc_loss_from_embeddings-groups-range", lambda: fk.dfc_loss_from_embeddings(z, CENTERS, GROUPS, 1),
         ValueError, "num_groups"),
        ("dfc_loss_from_embeddings-groups-range-unchecked",
         lambda: fk.dfc_loss_from_embeddings(z, CENTERS, NEG_GROUPS, 2, target=q, check_inputs=False),
         (ValueError, RuntimeError), "groups"),
        ("dfc_loss_from_embeddings-alpha-zero", lambda: fk.dfc_loss_from_embeddings(z, CENTERS, GROUPS, alpha=0.0),
         ValueError, "alpha"),
        ("dfc_loss_from_embeddings-centroids-from",
         lambda: fk.dfc_loss_from_embeddings(z, CENTERS, GROUPS, centroids_from="p"), ValueError, "centroids_from"),
        ("dfc_loss_from_embeddings-previous-shape",
         lambda: fk.dfc_loss_from_embeddings(z, CENTERS, GROUPS, 2, previous_fairoids=torch.zeros(3, D)), ValueError,
         "previous_fairoids"),
        ("dfc_loss-z-rows", lambda: fk.dfc_loss(q, z[:5], GROUPS), ValueError, "z"),
        ("dfc_loss-groups-length", lambda: fk.dfc_loss(q, z, GROUPS[:5]), ValueError, "groups"),
        ("dfc_loss-groups-out-of-range", lambda: fk.dfc_loss(q, z, GROUPS, 1), ValueError, "num_groups"),
        ("dfc_loss-gamma-nan", lambda: fk.dfc_loss(q, z, GROUPS, gamma=math.nan), ValueError, "gamma"),
        ("dfc_loss-alpha-zero", lambda: fk.dfc_loss(q, z, GROUPS, alpha=0.0), ValueError, "alpha"),
        ("dfc_loss-beta-negative", lambda: fk.dfc_loss(q, z, GROUPS, beta=-1.0), ValueError, "beta"),
        ("dfc_loss-target-shape", lambda: fk.dfc_loss(q, z, GROUPS, target=target[:, :2]), ValueError, "target"),
        ("dfc_loss-previous-shape", lambda: fk.dfc_loss(q, z, GROUPS, previous_fairoids=torch.zeros(5, D)),
         ValueError, "previous"),
        ("dfc_loss-nan-q", lambda: fk.dfc_loss(_with(q, 0, 0, math.nan), z, GROUPS), ValueError, "q"),
        ("dfc_loss-bad-backend", lambda: fk.dfc_loss(q, z, GROUPS, backend="tpu"), ValueError, "backend"),
    ]


def _metrics_family():
    pred_t = torch.tensor(PRED)
    groups_t = torch.tensor(METRIC_GROUPS)
    return [
        ("accuracy-length", lambda: metrics.accuracy(Y, PRED[:5]), ValueError, "pred has length 5"),
        ("accuracy-float-pred", lambda: metrics.accuracy(Y, [0.5] * 6), TypeError, "pred"),
        ("accuracy-negative-y", lambda: metrics.accuracy([-1] + Y[1:], PRED), ValueError, "y"),
        ("accuracy-empty", lambda: metrics.accuracy([], []), ValueError, "y"),
        ("nmi-length", lambda: metrics.nmi(Y[:4], PRED), ValueError, "y has length 4"),
        ("balance-length", lambda: metrics.balance(PRED, METRIC_GROUPS[:5]), ValueError, "groups"),
        ("balance-groups-out-of-range", lambda: metrics.balance(PRED, METRIC_GROUPS, num_groups=1), ValueError,
         "num_groups"),
        ("mnce-length", lambda: metrics.mnce(PRED[:2], METRIC_GROUPS), ValueError, "pred"),
        ("fwd-length", lambda: metrics.fwd(PRED, METRIC_GROUPS[:1]), ValueError, "groups"),
        ("fwd-bad-ground", lambda: metrics.fwd(PRED, METRIC_GROUPS, ground="euclid"), ValueError, "ground"),
        ("f_beta-negative", lambda: metrics.f_beta(-0.1, 0.5), ValueError, "nmi_value"),
        ("f_beta-beta-zero", lambda: metrics.f_beta(0.1, 0.5, beta=0.0), ValueError, "beta"),
        ("evaluate-length", lambda: metrics.evaluate(Y[:5], PRED, METRIC_GROUPS), ValueError, "y"),
        ("evaluate-groups-length", lambda: metrics.evaluate(Y, PRED, METRIC_GROUPS[:5]), ValueError, "groups"),
        ("contingency-length", lambda: metrics.contingency(pred_t, groups_t[:4], 3, 2), ValueError, "groups"),
        ("contingency-float", lambda: metrics.contingency(pred_t.float(), groups_t, 3, 2), TypeError, "pred"),
        ("contingency-out-of-range", lambda: metrics.contingency(pred_t, groups_t, 2, 2), ValueError,
         "num_clusters"),
        ("contingency-device", lambda: metrics.contingency(pred_t, groups_t.to("meta"), 3, 2), ValueError,
         "groups"),
    ]


def _kmeans_family():
    return [
        ("kmeans-x-rank1", lambda: fk.kmeans(H[:, 0], 2), ValueError, "x"),
        ("kmeans-int-x", lambda: fk.kmeans(H.long(), 2), TypeError, "x"),
        ("kmeans-x-list", lambda: fk.kmeans(H.tolist(), 2), TypeError, "x"),
        ("kmeans-n0", lambda: fk.kmeans(H[:0], 2), ValueError, "x"),
        ("kmeans-nan-x", lambda: fk.kmeans(_with(H, 1, 1, math.nan), 2), ValueError, "x"),
        ("kmeans-k0", lambda: fk.kmeans(H, 0), ValueError, "n_clusters"),
        ("kmeans-k-too-large", lambda: fk.kmeans(H, N + 1), ValueError, "n_clusters"),
        ("kmeans-k-float", lambda: fk.kmeans(H, 2.5), TypeError, "n_clusters"),
        ("kmeans-bad-init", lambda: fk.kmeans(H, 2, init="forgy"), ValueError, "init"),
        ("kmeans-negative-tol", lambda: fk.kmeans(H, 2, tol=-1.0), ValueError, "tol"),
        ("kmeans-init-centers-shape", lambda: fk.kmeans(H, 2, init_centers=CENTERS), ValueError, "init_centers"),
        ("kmeans-bad-backend", lambda: fk.kmeans(H, 2, backend="gpu"), ValueError, "backend"),
        ("kmeans-unavailable-backend", lambda: fk.kmeans(H, 2, backend="cuda"), RuntimeError, "cuda"),
    ]


BAD_INPUTS = (_fcmi_family() + _statistics_family() + _assign_family() + _dfc_family() + _metrics_family()
              + _kmeans_family())


@pytest.mark.parametrize("call, error, fragment", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value), str(info.value)


def test_table_covers_every_public_function():
    """A new public op must get rows here: every function in fk.__all__ (not constants, classes or
    modules) is used."""
    covered = {case[0].split("-")[0] for case in BAD_INPUTS}
    public = {name for name in fk.__all__
              if callable(getattr(fk, name)) and not isinstance(getattr(fk, name), type)}
    assert public <= covered, sorted(public - covered)


def test_valid_input_passes_the_same_checks():
    """The table's fixtures are valid apart from the one defect each row introduces."""
    fk.fcmi_loss(LOGITS, GROUPS)
    fk.fcmi_loss_from_embeddings(H, CENTERS, GROUPS)
    fk.joint_histogram(PROBS, GROUPS, weights=torch.rand(N))
    fk.mutual_information(JOINT)
    fk.student_t_assign(H, CENTERS)
    fk.cosine_assign(H, CENTERS)
    fk.dfc_loss(PROBS, H, GROUPS)
    fk.dfc_loss_from_embeddings(H, CENTERS, GROUPS, target=PROBS)
    metrics.evaluate(Y, PRED, METRIC_GROUPS)

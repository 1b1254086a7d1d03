"""Property-based fuzzing of every op on every backend available here (hypothesis).

Each example draws a valid input, including the awkward ones: N = 1, K = 1, T = 1, groups absent
from the batch (num_groups > max + 1), empty clusters (logit columns at -1e4), one-hot and
uniform rows, |logits| up to 1e4, transposed / strided / expanded (stride-0) inputs, int32 and
int64 groups. Properties: outputs and gradients are finite, and agree with the float64
reference within the flash-attention rule err <= 2 err(reference in the same dtype) + atol.

Examples per test: $FAIRKERNELS_FUZZ_EXAMPLES (default 25, so CI stays fast); `make fuzz` sets
10000 and then the per-op totals are printed when the module finishes. Interpreted Triton
(TRITON_INTERPRET=1) gets tiny shapes and 1/TRITON_INTERPRETER_SHARE of the examples.
"""
from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fairkernels as fk
from fairkernels import _backend, reference
from tests.helpers import DEVICES, assert_close_to_reference, available_backends

EXAMPLES = int(os.environ.get("FAIRKERNELS_FUZZ_EXAMPLES", "25"))
REPORT_COUNTS = "FAIRKERNELS_FUZZ_EXAMPLES" in os.environ
# The interpreter runs each Triton program in numpy (about a second per example on a busy
# CPU): it gets an eighth of the examples, at least 3, and tiny shapes.
TRITON_INTERPRETER_SHARE = 8
EXAMPLE_COUNTS: collections.Counter = collections.Counter()
LARGE_LOGIT = 1e4
# (atol, rtol) added to the flash-attention rule, per dtype; plus a term for the rounding of
# inputs as large as 1e4 (ulp(1e4) in float32 is ~1e-3, which moves log-softmax by as much).
# rtol covers cancellation in gradients amplified by clamped norms (zero rows: 1 / 1e-12).
TOLERANCES = {torch.float32: (1e-6, 1e-4), torch.float64: (1e-12, 1e-7)}


def _cases(op: str):
    """(device, backend, dtypes) triples to fuzz `op` on: every available backend and dtype."""
    out = []
    for device in DEVICES:
        for backend in ("reference", "cpu", "triton", "cuda"):
            dtypes = [d for d in (torch.float32, torch.float64) if backend in available_backends(op, device, d)]
            if dtypes:
                out.append(pytest.param(device, backend, dtypes, id=f"{device}-{backend}"))
    return out


def _tiny(device: str, backend: str) -> bool:
    return backend == "triton" and device == "cpu" and _backend.triton_interpreted()


def fuzz(device: str, backend: str):
    examples = EXAMPLES
    if _tiny(device, backend):
        # $FAIRKERNELS_FUZZ_TRITON_EXAMPLES caps the interpreter's share in long runs (make fuzz)
        examples = int(os.environ.get("FAIRKERNELS_FUZZ_TRITON_EXAMPLES",
                                      max(3, EXAMPLES // TRITON_INTERPRETER_SHARE)))
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", autouse=True)
def _print_example_counts():
    yield
    if REPORT_COUNTS:
        print("\nfuzz examples run per op:")
        for op in sorted({op for op, _ in EXAMPLE_COUNTS}):
            per_backend = ", ".join(f"{b}={n}" for (o, b), n in sorted(EXAMPLE_COUNTS.items()) if o == op)
            total = sum(n for (o, _), n in EXAMPLE_COUNTS.items() if o == op)
            print(f"  {op:<28} {total:>7}  ({per_backend})")


# --------------------------------------------------------------------------- input strategies
class Draw:
    """Draws shapes and values for one example; numpy generates the bulk values from a drawn seed."""

    def __init__(self, data, device: str, backend: str, dtypes):
        self.data = data
        self.device = device
        self.tiny = _tiny(device, backend)
        self.dtype = data.draw(st.sampled_from(dtypes), label="dtype")
        self.rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))

    def size(self, label: str, small: int, large: int) -> int:
        return self.data.draw(st.integers(1, small if self.tiny else large), label=label)

    def choice(self, label: str, options):
        return self.data.draw(st.sampled_from(options), label=label)

    def logits(self, n: int, k: int) -> np.ndarray:
        style = self.choice("logits", ["normal", "huge", "one_hot", "uniform", "empty_clusters"])
        scale = self.choice("scale", [1e-3, 1.0, 30.0])
        values = self.rng.standard_normal((n, k)) * scale
        if style == "huge":
            values = self.rng.uniform(-LARGE_LOGIT, LARGE_LOGIT, (n, k))
        elif style == "one_hot":
            values = np.full((n, k), -LARGE_LOGIT)
            values[np.arange(n), self.rng.integers(0, k, n)] = self.rng.uniform(-10, 10, n)
        elif style == "uniform":
            values = np.repeat(self.rng.standard_normal((n, 1)) * scale, k, axis=1)
        elif style == "empty_clusters":
            empty = self.rng.random(k) < 0.5
            empty[self.rng.integers(0, k)] = False       # at least one live cluster
            values[:, empty] = -LARGE_LOGIT
        return values

    def probabilities(self, n: int, k: int) -> np.ndarray:
        """Non-negative rows summing to one: softmax rows, exact one-hot rows, exact uniform rows."""
        style = self.choice("probs", ["softmax", "one_hot", "uniform"])
        if style == "one_hot":
            values = np.zeros((n, k))
            values[np.arange(n), self.rng.integers(0, k, n)] = 1.0
            return values
        if style == "uniform":
            return np.full((n, k), 1.0 / k)
        logits = self.logits(n, k)
        logits -= logits.max(1, keepdims=True)
        weights = np.exp(logits)
        return weights / weights.sum(1, keepdims=True)

    def embeddings(self, n: int, d: int, allow_zero_rows: bool = True) -> np.ndarray:
        values = self.rng.standard_normal((n, d)) * self.choice("embedding_scale", [1e-3, 1.0, 100.0])
        if allow_zero_rows and self.choice("zero_row", [False, False, True]):
            values[self.rng.integers(0, n)] = 0.0          # a zero vector: norm clamped at 1e-12
        return values

    def tensor(self, values: np.ndarray, requires_grad: bool = False):
        """(leaf, make_view): the leaf holds the values in some memory layout (contiguous,
        transposed, strided or expanded) and make_view(leaf) is the N x K matrix with those values."""
        layout = self.choice("layout", ["contiguous", "transposed", "strided", "expanded"])
        if layout == "contiguous":
            base, view = values, (lambda leaf: leaf)
        elif layout == "transposed":
            base, view = values.T.copy(), (lambda leaf: leaf.t())
        elif layout == "strided":
            base = np.zeros((values.shape[0], 2 * values.shape[1]))
            base[:, ::2] = values
            view = (lambda leaf: leaf[:, ::2])
        else:
            rows = values.shape[0]
            base, view = values[:1].copy(), (lambda leaf: leaf.expand(rows, -1))
        leaf = torch.tensor(base, dtype=self.dtype, device=self.device).requires_grad_(requires_grad)
        return leaf, view

    def groups(self, n: int):
        """(groups tensor, num_groups argument, effective T): some groups may be absent."""
        num_groups = self.size("num_groups", 3, 5)
        present = self.rng.permutation(num_groups)[: self.data.draw(st.integers(1, num_groups), label="present")]
        values = self.rng.choice(present, n)
        dtype = self.choice("groups_dtype", [torch.int32, torch.int64])
        layout = self.choice("groups_layout", ["contiguous", "strided", "expanded"])
        if layout == "strided":
            base = torch.tensor(np.repeat(values, 2), dtype=dtype, device=self.device)
            groups = base[::2]
        elif layout == "expanded":
            groups = torch.tensor(values[:1], dtype=dtype, device=self.device).expand(n)
        else:
            groups = torch.tensor(values, dtype=dtype, device=self.device)
        pass_none = self.choice("num_groups_given", [True, True, False]) is False
        effective = int(groups.max()) + 1 if pass_none else num_groups
        return groups, (None if pass_none else num_groups), effective


# --------------------------------------------------------------------------- the property
def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _evaluate(fn, leaves, seeds):
    """Outputs of fn(*leaves), and the gradient of sum_j <seed_j, out_j> w.r.t. the leaves that
    require one (None where an output does not depend on a leaf)."""
    outs = _as_tuple(fn(*leaves))
    grad_leaves = [leaf for leaf in leaves if leaf.requires_grad]
    grads = []
    differentiable = [(o, s) for o, s in zip(outs, seeds) if o.requires_grad]
    if grad_leaves and differentiable:
        total = sum((o * s.to(device=o.device, dtype=o.dtype)).sum() for o, s in differentiable)
        grads = torch.autograd.grad(total, grad_leaves, allow_unused=True)
    return [o.detach() for o in outs], [g for g in grads if g is not None]


def check_against_reference(draw: Draw, fused, ref, leaves, seeds, input_scale: float = 1.0,
                            gradient_terms: float = 0.0, gradient_atol: float = 0.0):
    """fused(*leaves) vs ref on the same values in the same dtype and in float64: finite, and
    err(fused) <= 2 err(ref same dtype) + atol (both against float64) for outputs and gradients.

    gradient_terms: the size of the terms that cancel inside a gradient (e.g. the tangential
    projection of a normalisation, amplified by 1 / ||h||); their rounding is allowed for.
    gradient_atol: an absolute slack for gradients where docs/math.md itself departs from autograd."""
    leaves64 = [leaf.detach().double().requires_grad_(leaf.requires_grad) for leaf in leaves]
    leaves_same = [leaf.detach().clone().requires_grad_(leaf.requires_grad) for leaf in leaves]
    outs, grads = _evaluate(fused, leaves, seeds)
    outs_same, grads_same = _evaluate(ref, leaves_same, seeds)
    outs64, grads64 = _evaluate(ref, leaves64, seeds)
    assert len(outs) == len(outs64) and len(grads) == len(grads64)
    atol_base, rtol = TOLERANCES[draw.dtype]
    eps = torch.finfo(draw.dtype).eps
    for name, got, same, exact in ([("output", *t) for t in zip(outs, outs_same, outs64)]
                                   + [("gradient", *t) for t in zip(grads, grads_same, grads64)]):
        assert got.shape == exact.shape, (name, got.shape, exact.shape)
        assert torch.isfinite(got).all(), f"non-finite {name}: {got}"
        magnitude = exact.abs().max().item() if exact.numel() else 0.0
        atol = atol_base + magnitude * (rtol + 16 * eps * max(1.0, input_scale))
        if name == "gradient":
            atol += 64 * eps * gradient_terms + gradient_atol
        assert_close_to_reference(got, same, exact, atol)


def _normalisation_terms(tau: float, *matrices) -> float:
    """Size of the cancelling terms in a gradient through x / max(||x||, 1e-12) followed by
    logits / tau: (1 / smallest clamped row norm) * (1 / tau) * (1 + 1 / tau). A zero row's
    gradient is its tangential rounding noise times 1e12 in every implementation: only its
    finiteness is a real property there."""
    norms = torch.cat([m.detach().double().norm(dim=1) for m in matrices])
    smallest = norms.clamp_min(reference.NORM_EPS).min().item()
    return (1.0 / smallest) * (1.0 / tau) * (1.0 + 1.0 / tau)


def _eps_floor_slack(n: int, *weights: float) -> float:
    """docs/math.md §2.2/3: the fused FCMI gradient uses log(max(p, 1e-12)); autograd of the reference
    differs where a statistic p_tk is below 1e-12. There c_ik <= N p_tk, so each row's gradient
    moves by at most ~(1/e + 1) * 1e-12 * |weight|, and an expanded (stride-0) leaf sums n rows."""
    return 2.0 * n * reference.LOG_EPS * max([1.0] + [abs(w) for w in weights])


def _seed_like(draw: Draw, shape):
    return torch.tensor(draw.rng.standard_normal(shape), dtype=torch.float64)


def _count(op, backend):
    EXAMPLE_COUNTS[(op, backend)] += 1


# --------------------------------------------------------------------------- FCMI
@pytest.mark.parametrize("device, backend, dtypes", _cases("fcmi"))
@pytest.mark.parametrize("op", ["fcmi_terms", "fcmi_loss"])
def test_fuzz_fcmi(op, device, backend, dtypes):
    @fuzz(device, backend)
    @given(data=st.data())
    def run(data):
        draw = Draw(data, device, backend, dtypes)
        n, k = draw.size("n", 6, 40), draw.size("k", 4, 9)
        values = draw.logits(n, k)
        logits, view = draw.tensor(values, requires_grad=True)
        groups, num_groups, effective = draw.groups(n)
        if op == "fcmi_terms":
            seeds = [torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)]

            def fused(x):
                return fk.fcmi_terms(view(x), groups, num_groups, backend=backend)

            def ref(x):
                return reference.fcmi_terms(view(x), groups, effective)
        else:
            alpha = data.draw(st.floats(-1.0, 1.0), label="alpha")
            beta = data.draw(st.floats(-1.0, 1.0), label="beta")
            seeds = [torch.tensor(1.0, dtype=torch.float64)]

            def fused(x):
                return fk.fcmi_loss(view(x), groups, num_groups, alpha, beta, backend=backend)

            def ref(x):
                return reference.fcmi_loss(view(x), groups, effective, alpha, beta)
        weights = [float(s) for s in seeds] if op == "fcmi_terms" else [alpha, beta]
        check_against_reference(draw, fused, ref, [logits], seeds, input_scale=float(np.abs(values).max()),
                                gradient_atol=_eps_floor_slack(n, *weights))
        _count(op, backend)

    run()


@pytest.mark.parametrize("device, backend, dtypes", _cases("fcmi_embeddings"))
def test_fuzz_fcmi_loss_from_embeddings(device, backend, dtypes):
    @fuzz(device, backend)
    @given(data=st.data())
    def run(data):
        draw = Draw(data, device, backend, dtypes)
        n, k, d = draw.size("n", 6, 40), draw.size("k", 4, 9), draw.size("d", 4, 8)
        h, h_view = draw.tensor(draw.embeddings(n, d), requires_grad=True)
        centers, c_view = draw.tensor(draw.embeddings(k, d, allow_zero_rows=False),
                                      requires_grad=draw.choice("centers_grad", [True, False]))
        groups, num_groups, effective = draw.groups(n)
        tau = draw.choice("tau", [0.05, 0.1, 0.5, 1.0])
        alpha = data.draw(st.floats(0.0, 1.0), label="alpha")
        beta = data.draw(st.floats(0.0, 1.0), label="beta")

        def fused(hh, cc):
            return fk.fcmi_loss_from_embeddings(h_view(hh), c_view(cc), groups, num_groups, tau, alpha, beta,
                                                backend=backend)

        def ref(hh, cc):
            return reference.fcmi_loss_from_embeddings(h_view(hh), c_view(cc), groups, effective, tau, alpha, beta)

        check_against_reference(draw, fused, ref, [h, centers], [torch.tensor(1.0, dtype=torch.float64)],
                                input_scale=1.0 / tau,
                                gradient_terms=_normalisation_terms(tau, h_view(h), c_view(centers)),
                                gradient_atol=_eps_floor_slack(n, alpha, beta) / tau)
        _count("fcmi_loss_from_embeddings", backend)

    run()


# --------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("device, backend, dtypes", _cases("histogram"))
def test_fuzz_joint_histogram(device, backend, dtypes):
    @fuzz(device, backend)
    @given(data=st.data())
    def run(data):
        draw = Draw(data, device, backend, dtypes)
        n, k = draw.size("n", 6, 40), draw.size("k", 4, 9)
        probs, view = draw.tensor(draw.probabilities(n, k), requires_grad=True)
        groups, num_groups, effective = draw.groups(n)
        leaves = [probs]
        weights = None
        if draw.choice("weights", [False, True]):
            weights = torch.tensor(draw.rng.random(n), dtype=draw.dtype, device=device)
            weights.requires_grad_(draw.choice("weights_grad", [False, True]))
            leaves.append(weights)

        def fused(p, *w):
            return fk.joint_histogram(view(p), groups, num_groups, w[0] if w else None, backend=backend)

        def ref(p, *w):
            return reference.joint_histogram(view(p), groups, effective, w[0] if w else None)

        check_against_reference(draw, fused, ref, leaves, [_seed_like(draw, (effective, k))])
        _count("joint_histogram", backend)

    run()


@pytest.mark.parametrize("device", DEVICES)
def test_fuzz_mutual_information(device):
    """O(T K) op with one implementation: float32 against float64, zero rows/columns included."""
    @fuzz(device, "reference")
    @given(data=st.data())
    def run(data):
        draw = Draw(data, device, "reference", [torch.float32, torch.float64])
        t, k = draw.size("t", 4, 6), draw.size("k", 4, 9)
        counts = draw.rng.random((t, k)) * draw.choice("joint_scale", [1e-3, 1.0, 1e6])
        counts[draw.rng.random((t, k)) < draw.choice("zero_fraction", [0.0, 0.3, 0.7])] = 0.0
        counts[0, draw.rng.integers(0, k)] = 1.0    # sum J > 0, also when the layout repeats row 0
        joint, view = draw.tensor(counts, requires_grad=True)
        check_against_reference(draw, lambda j: fk.mutual_information(view(j)),
                                lambda j: reference.mutual_information(view(j)), [joint],
                                [torch.tensor(1.0, dtype=torch.float64)])
        _count("mutual_information", "reference")

    run()


# --------------------------------------------------------------------------- assignments
@pytest.mark.parametrize("device, backend, dtypes", _cases("student_t"))
def test_fuzz_student_t_assign(device, backend, dtypes):
    @fuzz(device, backend)
    @given(data=st.data())
    def run(data):
        draw = Draw(data, device, backend, dtypes)
        n, k, d = draw.size("n", 6, 40), draw.size("k", 4, 9), draw.size("d", 4, 8)
        z, z_view = draw.tensor(draw.embeddings(n, d), requires_grad=True)
        centers, c_view = draw.tensor(draw.embeddings(k, d), requires_grad=True)
        alpha = draw.choice("alpha", [0.1, 1.0, 10.0])
        scale = max(1.0, float(z.detach().abs().max()), float(centers.detach().abs().max())) ** 2
        check_against_reference(
            draw, lambda zz, cc: fk.student_t_assign(z_view(zz), c_view(cc), alpha, backend=backend),
            lambda zz, cc: reference.student_t_assign(z_view(zz), c_view(cc), alpha),
            # docs/math.md §1.1 expands ||z - mu||^2 = ||z||^2 + ||mu||^2 - 2 z.mu: terms of size scale^2 cancel
            [z, centers], [_seed_like(draw, (n, k))], input_scale=scale * scale)
        _count("student_t_assign", backend)

    run()


@pytest.mark.parametrize("device, backend, dtypes", _cases("cosine"))
def test_fuzz_cosine_assign(device, backend, dtypes):
    @fuzz(device, backend)
    @given(data=st.data())
    def run(data):
        draw = Draw(data, device, backend, dtypes)
        n, k, d = draw.size("n", 6, 40), draw.size("k", 4, 9), draw.size("d", 4, 8)
        h, h_view = draw.tensor(draw.embeddings(n, d), requires_grad=True)
        centers, c_view = draw.tensor(draw.embeddings(k, d, allow_zero_rows=False), requires_grad=True)
        tau = draw.choice("tau", [0.05, 0.1, 0.5, 1.0])
        seed = _seed_like(draw, (n, k))
        check_against_reference(
            draw, lambda hh, cc: fk.cosine_assign(h_view(hh), c_view(cc), tau, backend=backend),
            lambda hh, cc: reference.cosine_assign(h_view(hh), c_view(cc), tau),
            [h, centers], [seed], input_scale=1.0 / tau,
            gradient_terms=_normalisation_terms(tau, h_view(h), c_view(centers)) * seed.abs().max().item())
        _count("cosine_assign", backend)

    run()


# --------------------------------------------------------------------------- DFC
@pytest.mark.parametrize("device, backend, dtypes", _cases("dec_target"))
def test_fuzz_dec_target(device, backend, dtypes):
    @fuzz(device, backend)
    @given(data=st.data())
    def run(data):
        draw = Draw(data, device, backend, dtypes)
        n, k = draw.size("n", 6, 40), draw.size("k", 4, 9)
        q, view = draw.tensor(draw.probabilities(n, k))
        check_against_reference(draw, lambda qq: fk.dec_target(view(qq), backend=backend),
                                lambda qq: reference.dec_target(view(qq)), [q], [None])
        _count("dec_target", backend)

    run()


@pytest.mark.parametrize("device, backend, dtypes", _cases("kl_div"))
def test_fuzz_kl_div(device, backend, dtypes):
    @fuzz(device, backend)
    @given(data=st.data())
    def run(data):
        draw = Draw(data, device, backend, dtypes)
        n, k = draw.size("n", 6, 40), draw.size("k", 4, 9)
        q, q_view = draw.tensor(draw.probabilities(n, k), requires_grad=True)
        if draw.choice("target", ["dec", "other"]) == "dec":
            target_values = reference.dec_target(torch.tensor(draw.probabilities(n, k))).numpy()
        else:
            target_values = draw.probabilities(n, k)
        target, t_view = draw.tensor(target_values)
        check_against_reference(draw, lambda tt, qq: fk.kl_div(t_view(tt), q_view(qq), backend=backend),
                                lambda tt, qq: reference.kl_div(t_view(tt), q_view(qq)), [target, q],
                                [torch.tensor(1.0, dtype=torch.float64)])
        _count("kl_div", backend)

    run()

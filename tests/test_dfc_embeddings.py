"""fk.dfc_loss_from_embeddings, the DFC clustering loss of a batch from the embeddings: the
fused C++ kernel (backend "cpu") against the reference composition in float64 on fresh random
inputs (value, Q, fairoids and the gradients to z and the centroids), for shared and per-group
centroids, the eq. 12 centroids fitted to P and to Q, DEC (gamma 0) and absent groups;
gradcheck of the fused op; float32 against float64 (bad input: tests/test_bad_input.py)."""
import math

import pytest
import torch

import fairkernels as fk
from fairkernels import reference
from fairkernels.ops import torch_kernels

from helpers import fused_backends

CPU = "cpu" in fused_backends("dfc_embeddings")
needs_cpu = pytest.mark.skipif(not CPU, reason="the compiled extension is not available")


def _reference_loss(z, centers, groups, T, gamma, alpha, beta, target, previous, centroids_from):
    """The composition the op replaces, from the reference's ops only."""
    if centers.dim() == 3:
        q = torch.stack([reference.student_t_assign(z[i:i + 1], centers[groups[i]], alpha)[0]
                         for i in range(z.shape[0])])
    else:
        q = reference.student_t_assign(z, centers, alpha)
    l_cl = reference.kl_div(target, q)
    pi, present = reference.fairoids(z, groups, T, previous)
    centroids = reference.batch_centroids(q if centroids_from == "q" else target, z)
    phi = reference.fairness_matrix(centroids, pi, alpha, present)
    l_fr = reference.fairoid_loss(reference.fairoid_target(phi, beta, present=present), phi)
    return l_cl + gamma * l_fr, l_cl, l_fr, pi.detach(), q.detach()


def _inputs(seed, B, K, d, T, per_group, absent, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    z = (1.5 * torch.randn(B, d, generator=generator, dtype=dtype)).requires_grad_()
    shape = (T, K, d) if per_group else (K, d)
    centers = (1.5 * torch.randn(*shape, generator=generator, dtype=dtype)).requires_grad_()
    groups = torch.randint(0, T - 1 if absent else T, (B,), generator=generator)
    target = torch.softmax(2.0 * torch.randn(B, K, generator=generator, dtype=dtype), 1)
    previous = torch.randn(T, d, generator=generator, dtype=dtype) if absent else None
    return z, centers, groups, target, previous


@needs_cpu
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("per_group", [False, True])
@pytest.mark.parametrize("centroids_from", ["target", "q"])
@pytest.mark.parametrize("gamma, absent", [(1.0, False), (2.5, True), (0.0, False)])
def test_fused_matches_reference_float64(seed, per_group, centroids_from, gamma, absent):
    T, alpha, beta = 3, (1.0, 0.5, 2.0)[seed], (1000.0, 2.0, 10.0)[seed]
    z, centers, groups, target, previous = _inputs(seed, 41, 6, 5, T, per_group, absent)
    got = fk.dfc_loss_from_embeddings(z, centers, groups, T, gamma, alpha, beta, target, previous,
                                      centroids_from=centroids_from, backend="cpu")
    want = _reference_loss(z, centers, groups, T, gamma, alpha, beta, target, previous, centroids_from)
    for name, a, b in zip(("loss", "kl", "fair"), got[:3], want[:3]):
        if name == "fair" and gamma == 0.0:
            assert float(a) == 0.0          # DEC: the fairness term is not computed
            continue
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14, msg=name)
    torch.testing.assert_close(got[3], want[3], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[4], want[4], rtol=1e-12, atol=1e-14)
    mine = torch.autograd.grad(got[0], (z, centers))
    theirs = torch.autograd.grad(want[0], (z, centers))
    for name, a, b in zip(("z", "centers"), mine, theirs):
        assert float((a - b).abs().max()) <= 1e-10 * float(b.abs().max()) + 1e-15, name


@needs_cpu
@pytest.mark.parametrize("per_group", [False, True])
def test_kernel_matches_its_plain_torch_specification(per_group):
    """torch.ops.fairkernels.dfc_step against fairkernels/ops/torch_kernels.dfc_step, every output."""
    z, centers, groups, target, previous = _inputs(7, 33, 4, 3, 3, per_group, absent=True)
    args = (z.detach(), centers.detach(), groups, target, previous, 3, 1.0, 5.0, 1.5, 1e-6, True)
    for name, a, b in zip(STEP_OUTPUTS, torch.ops.fairkernels.dfc_step(*args), torch_kernels.dfc_step(*args)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14, msg=name)


STEP_OUTPUTS = ("loss", "l_cl", "l_fr", "q", "fairoids", "grad_z", "grad_centers")


@needs_cpu
@pytest.mark.parametrize("per_group", [False, True])
def test_kernel_reads_float32_and_strided_inputs_and_writes_their_dtypes(per_group):
    """The kernel converts its inputs itself (no Tensor::to): float32, transposed and sliced
    inputs give the float64 result rounded to float32, in float32 (the centres' gradient in the
    centres' dtype), and mixed float32 z with float64 centres works."""
    z, centers, groups, target, previous = _inputs(8, 29, 4, 3, 3, per_group, absent=True)
    args64 = (z.detach(), centers.detach(), groups, target, previous, 3, 1.0, 5.0, 1.5, 1e-6, False)
    want = torch.ops.fairkernels.dfc_step(*args64)
    z32 = z.detach().float().t().contiguous().t()                     # column-major: not contiguous
    assert not z32.is_contiguous()
    target32 = torch.cat([target, target], 1).float()[:, ::2]         # a strided slice
    target32.copy_(target)
    got = torch.ops.fairkernels.dfc_step(z32, centers.detach().float(), groups.int(), target32, previous.float(),
                                         3, 1.0, 5.0, 1.5, 1e-6, False)
    for name, a, b in zip(STEP_OUTPUTS, got, want):
        assert a.dtype == torch.float32 and a.is_contiguous(), name
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-5, msg=name)
    mixed = torch.ops.fairkernels.dfc_step(z32, centers.detach(), groups, target, previous, 3, 1.0, 5.0, 1.5, 1e-6,
                                           False)
    assert mixed[0].dtype == torch.float32 and mixed[6].dtype == torch.float64
    torch.testing.assert_close(mixed[6], want[6], rtol=1e-5, atol=1e-6)


@needs_cpu
@pytest.mark.parametrize("per_group", [False, True])
def test_gradcheck_of_the_kl_part(per_group):
    """gradcheck where it applies: with gamma = 0 (DEC) the loss is a plain function of z and
    the centroids. (The fairness term's target Psi is a constant of the step, which finite
    differences would move; its gradient is checked against the reference's autograd above.)"""
    z, centers, groups, target, _ = _inputs(3, 12, 3, 2, 2, per_group, absent=False)

    def loss(z_, centers_):
        return fk.dfc_loss_from_embeddings(z_, centers_, groups, 2, 0.0, 1.0, 4.0, target, backend="cpu")[0]
    assert torch.autograd.gradcheck(loss, (z, centers), eps=1e-6, atol=1e-8, rtol=1e-6)


@needs_cpu
@pytest.mark.parametrize("per_group", [False, True])
def test_float32_close_to_float64(per_group):
    z, centers, groups, target, previous = _inputs(5, 256, 10, 10, 2, per_group, absent=False)
    exact = fk.dfc_loss_from_embeddings(z, centers, groups, 2, 1.0, target=target, backend="cpu")
    single = fk.dfc_loss_from_embeddings(z.detach().float().requires_grad_(), centers.detach().float(), groups, 2, 1.0,
                                         target=target.float(), backend="cpu")
    assert single[0].dtype == torch.float32 and single[4].dtype == torch.float32
    torch.testing.assert_close(single[0].double(), exact[0].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(single[4].double(), exact[4], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_group", [False, True])
def test_backends_agree(per_group):
    """The composition used off the CPU kernel (auto elsewhere, and backend="reference")."""
    z, centers, groups, target, previous = _inputs(11, 30, 4, 3, 2, per_group, absent=False)
    outs = {backend: fk.dfc_loss_from_embeddings(z, centers, groups, 2, 1.0, target=target, backend=backend)
            for backend in ["reference"] + (["cpu"] if CPU else [])}
    want = outs["reference"]
    for backend, got in outs.items():
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=backend)
        for a, b in zip(torch.autograd.grad(got[0], (z, centers), retain_graph=True),
                        torch.autograd.grad(want[0], (z, centers), retain_graph=True)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13, msg=backend)


def test_target_none_uses_the_batch_dec_target():
    z, centers, groups, _, _ = _inputs(2, 25, 4, 3, 2, False, absent=False)
    q = reference.student_t_assign(z.detach(), centers.detach())
    got = fk.dfc_loss_from_embeddings(z, centers, groups, 2, 1.0)
    want = fk.dfc_loss_from_embeddings(z, centers, groups, 2, 1.0, target=reference.dec_target(q))
    torch.testing.assert_close(got[0], want[0])


@needs_cpu
def test_singular_and_non_finite_inputs():
    """Every row in one cluster makes P^T P singular: the ridge keeps the solve finite. NaN
    embeddings (unchecked) give a NaN loss, not an exception, as fairoid_term does."""
    z, centers, groups, _, _ = _inputs(4, 20, 5, 3, 2, False, absent=False)
    target = torch.zeros(20, 5, dtype=torch.float64)
    target[:, 2] = 1.0
    out = fk.dfc_loss_from_embeddings(z, centers, groups, 2, 1.0, target=target, backend="cpu")
    assert all(math.isfinite(float(v.detach())) for v in out[:3])
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out[0], (z, centers)))
    bad = z.detach().clone()
    bad[3, 1] = math.nan
    out = fk.dfc_loss_from_embeddings(bad, centers, groups, 2, 1.0, target=target, backend="cpu", check_inputs=False)
    assert math.isnan(float(out[0].detach()))


@needs_cpu
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_autograd_node_chain_rule_and_sparse_targets(alpha):
    """The C++ autograd node (csrc/cpu/dfc_loss.cpp) scales the kernel's gradients by the
    incoming one, works when only one input needs a gradient, and the alpha = 1 shortcut of the
    KL (one log per entry) agrees with the reference where the target has exact zeros."""
    z, centers, groups, target, _ = _inputs(11, 37, 5, 4, 2, False, absent=False)
    target = target.detach().clone()
    target[::3, 1:] = 0.0                     # one-hot rows, as a hard target gives
    target[::3, 0] = 1.0
    got = fk.dfc_loss_from_embeddings(z, centers, groups, 2, 1.5, alpha, 10.0, target, backend="cpu")
    want = _reference_loss(z, centers, groups, 2, 1.5, alpha, 10.0, target, None, "target")
    torch.testing.assert_close(got[0], want[0], rtol=1e-11, atol=1e-14)
    scaled = torch.autograd.grad(-2.5 * got[0], (z, centers))
    plain = torch.autograd.grad(want[0], (z, centers))
    for a, b in zip(scaled, plain):
        torch.testing.assert_close(a, -2.5 * b, rtol=1e-10, atol=1e-13)
    only_centers = fk.dfc_loss_from_embeddings(z.detach(), centers, groups, 2, 1.5, alpha, 10.0, target,
                                               backend="cpu")[0]
    (grad_centers,) = torch.autograd.grad(only_centers, centers)
    torch.testing.assert_close(grad_centers, plain[1], rtol=1e-10, atol=1e-13)
    assert not got[1].requires_grad and not got[2].requires_grad and not got[4].requires_grad


@needs_cpu
def test_autograd_node_hands_out_its_saved_gradients_on_a_unit_seed():
    """loss.backward() seeds the node with 1, and the node then returns its saved gradients
    without multiplying: they must reach z and the centroids unchanged, survive a second backward
    of a retained graph (nothing accumulates into them in place), and add into existing grads."""
    z, centers, groups, target, _ = _inputs(5, 41, 4, 3, 2, False, absent=False)
    want = torch.autograd.grad(_reference_loss(z, centers, groups, 2, 1.5, 1.0, 10.0, target, None, "target")[0],
                               (z, centers))
    loss = fk.dfc_loss_from_embeddings(z, centers, groups, 2, 1.5, 1.0, 10.0, target, backend="cpu")[0]
    loss.backward(retain_graph=True)
    first = (z.grad.clone(), centers.grad.clone())
    for a, b in zip(first, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    z.grad.zero_()                                    # were the grads the saved tensors, this
    centers.grad.zero_()                              # would zero the retained graph's gradients
    loss.backward(retain_graph=True)
    for grad, a in zip((z.grad, centers.grad), first):
        torch.testing.assert_close(grad, a, rtol=1e-12, atol=1e-15)
    loss.backward()                                   # into the grads of the call before
    for grad, a in zip((z.grad, centers.grad), first):
        torch.testing.assert_close(grad, 2 * a, rtol=1e-12, atol=1e-15)
    again = torch.autograd.grad(
        fk.dfc_loss_from_embeddings(z, centers, groups, 2, 1.5, 1.0, 10.0, target, backend="cpu")[0] * 1.0,
        (z, centers), grad_outputs=torch.ones(()))
    for a, b in zip(again, first):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)

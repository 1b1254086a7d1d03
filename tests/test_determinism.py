"""deterministic=True gives bitwise-identical forward values and gradients across runs (docs/math.md §7),
for every op and every backend available here; the cpu backend's FCMI and histogram kernels
are also bitwise identical across thread counts (csrc/cpu/common.h: fixed row chunks reduced in
chunk order). Ops that go through BLAS (assignments, the embedding FCMI) make no promise across
thread counts, so they are only checked at a fixed thread count."""
import pytest
import torch

import fairkernels as fk
from fairkernels import _backend
from tests.helpers import DEVICES, available_backends


def _shape(device, backend):
    """Tiny for the Triton interpreter; otherwise several of the cpu kernels' 2048-row chunks."""
    if backend == "triton" and device == "cpu" and _backend.triton_interpreted():
        return 48, 5, 3, 4
    return 5000, 7, 3, 6


def _inputs(device, backend, seed=0):
    n, k, t, d = _shape(device, backend)
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, k, generator=gen) * 3).to(device)
    groups = torch.randint(0, t, (n,), generator=gen).to(device)
    h = torch.randn(n, d, generator=gen).to(device)
    centers = torch.randn(k, d, generator=gen).to(device)
    weights = torch.rand(n, generator=gen).to(device)
    return dict(logits=logits, groups=groups, h=h, centers=centers, weights=weights, t=t)


def _leaf(x):
    return x.detach().clone().requires_grad_()


# op name -> (backend op name, run(backend, inputs) -> (outputs, leaves that get gradients))
def _run_fcmi_terms(backend, x):
    logits = _leaf(x["logits"])
    l_clu, l_fair = fk.fcmi_terms(logits, x["groups"], x["t"], backend=backend, deterministic=True)
    return [l_clu, l_fair], [logits], l_clu + 0.5 * l_fair


def _run_fcmi_loss(backend, x):
    logits = _leaf(x["logits"])
    loss = fk.fcmi_loss(logits, x["groups"], x["t"], backend=backend, deterministic=True)
    return [loss], [logits], loss


def _run_fcmi_embeddings(backend, x):
    h, centers = _leaf(x["h"]), _leaf(x["centers"])
    loss = fk.fcmi_loss_from_embeddings(h, centers, x["groups"], x["t"], backend=backend, deterministic=True)
    return [loss], [h, centers], loss


def _run_joint_histogram(backend, x):
    probs, weights = _leaf(torch.softmax(x["logits"], 1)), _leaf(x["weights"])
    joint = fk.joint_histogram(probs, x["groups"], x["t"], weights, backend=backend, deterministic=True)
    return [joint], [probs, weights], (joint * torch.arange(joint.numel(), device=joint.device).view_as(joint)).sum()


def _run_mutual_information(backend, x):
    joint = _leaf(fk.joint_histogram(torch.softmax(x["logits"], 1), x["groups"], x["t"], backend="reference"))
    info = fk.mutual_information(joint)
    return [info], [joint], info


def _run_student_t(backend, x):
    z, centers = _leaf(x["h"]), _leaf(x["centers"])
    q = fk.student_t_assign(z, centers, backend=backend)
    return [q], [z, centers], (q * q).sum()


def _run_cosine(backend, x):
    h, centers = _leaf(x["h"]), _leaf(x["centers"])
    c = fk.cosine_assign(h, centers, backend=backend)
    return [c], [h, centers], (c * c).sum()


def _run_dec_target(backend, x):
    return [fk.dec_target(torch.softmax(x["logits"], 1), backend=backend)], [], None


def _run_kl_div(backend, x):
    q = _leaf(torch.softmax(x["logits"], 1))
    loss = fk.kl_div(fk.dec_target(q.detach(), backend="reference"), q, backend=backend)
    return [loss], [q], loss


def _run_dfc_loss(backend, x):
    q, z = _leaf(torch.softmax(x["logits"], 1)), _leaf(x["h"])
    loss, l_cl, l_fr, fairoids = fk.dfc_loss(q, z, x["groups"], x["t"], backend=backend)
    return [loss, l_cl, l_fr, fairoids], [q, z], loss


OPS = {
    "fcmi_terms": ("fcmi", _run_fcmi_terms),
    "fcmi_loss": ("fcmi", _run_fcmi_loss),
    "fcmi_loss_from_embeddings": ("fcmi_embeddings", _run_fcmi_embeddings),
    "joint_histogram": ("histogram", _run_joint_histogram),
    "mutual_information": (None, _run_mutual_information),
    "student_t_assign": ("student_t", _run_student_t),
    "cosine_assign": ("cosine", _run_cosine),
    "dec_target": ("dec_target", _run_dec_target),
    "kl_div": ("kl_div", _run_kl_div),
    "dfc_loss": ("kl_div", _run_dfc_loss),
}


def _cases():
    out = []
    for op, (backend_op, _) in OPS.items():
        for device in DEVICES:
            backends = ["reference"] if backend_op is None else available_backends(backend_op, device, torch.float32)
            out += [pytest.param(op, device, b, id=f"{op}-{device}-{b}") for b in backends]
    return out


def _outputs_and_grads(op, backend, inputs):
    outputs, leaves, objective = OPS[op][1](backend, inputs)
    grads = list(torch.autograd.grad(objective, leaves)) if leaves else []
    return [o.detach() for o in outputs] + grads


def _assert_bitwise_equal(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(-1).view(torch.int8) if a.dtype.is_floating_point else a,
                           b.view(-1).view(torch.int8) if b.dtype.is_floating_point else b), \
            (a - b).abs().max().item()


@pytest.mark.parametrize("op, device, backend", _cases())
def test_two_runs_are_bitwise_equal(op, device, backend):
    inputs = _inputs(device, backend)
    first = _outputs_and_grads(op, backend, inputs)
    second = _outputs_and_grads(op, backend, inputs)
    assert all(torch.isfinite(x).all() for x in first)
    _assert_bitwise_equal(first, second)


THREAD_INVARIANT_OPS = ["fcmi_terms", "fcmi_loss", "joint_histogram"]


@pytest.mark.parametrize("op", THREAD_INVARIANT_OPS)
def test_cpu_backend_is_bitwise_equal_across_thread_counts(op):
    if "cpu" not in available_backends(OPS[op][0], "cpu", torch.float32):
        pytest.skip("the compiled cpu backend is not available")
    inputs = _inputs("cpu", "cpu")
    threads_before = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results[threads] = _outputs_and_grads(op, "cpu", inputs)
    finally:
        torch.set_num_threads(threads_before)
    _assert_bitwise_equal(results[1], results[2])
    _assert_bitwise_equal(results[1], results[3])

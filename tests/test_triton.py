"""Triton kernels (fairkernels/triton) against the plain-torch kernel interface and the reference.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py), where every program
instance costs about a millisecond: shapes are small and the `small_blocks` fixture shrinks the
tiles so that the K-tiled, multi-row-tile and multi-program paths all run. The GPU class at the
end holds the full sweep (fp16/bf16, N*K > 2^31, bitwise determinism, torch.compile)."""
from __future__ import annotations

import pytest
import torch

import fairkernels as fk
from fairkernels import _backend, reference
from fairkernels.ops import fcmi as fcmi_ops
from fairkernels.ops import torch_kernels as tk
from tests.helpers import assert_close_to_reference

pytestmark = pytest.mark.skipif(
    _backend.unavailable_reason("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                                torch.float32, "fcmi") is not None,
    reason="triton cannot run here (not installed, or no GPU and TRITON_INTERPRET unset)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [(torch.float32, 2e-5), (torch.float64, 1e-12)]


def _triton():
    from fairkernels import triton as fk_triton
    return fk_triton


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiles of 16 columns and 16 rows: K > 16 takes the online-logsumexp path, N > 16 several
    row tiles per program, and the 4 interpreter programs all get work."""
    from fairkernels.triton import _common
    monkeypatch.setattr(_common, "MAX_BLOCK_K", 16)
    monkeypatch.setattr(_common, "TILE_ELEMENTS", 256)


def _data(n, k, t, dtype, scale=3.0, group_dtype=torch.int64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, k, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
    groups = torch.randint(0, t, (n,), generator=gen).to(group_dtype).to(DEVICE)
    return logits, groups


def _gradcheck(fn, inputs):
    # fast_mode checks random projections of the Jacobian: few interpreted launches per input
    return torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _assert_stats_match(got, want, single_tile, atol):
    """(lse, joint, ent) against the interface's; lse is empty when the row fits one K tile
    (the backward recomputes it)."""
    assert got[0].numel() == (0 if single_tile else want[0].numel())
    pairs = list(zip(got, want)) if not single_tile else list(zip(got[1:], want[1:]))
    for a, b in pairs:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _max_err(a, b) <= atol * max(1.0, b.abs().max().item())


# --------------------------------------------------------------------------- fcmi from logits
@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("n,k,t", [(1, 1, 1), (37, 5, 3), (70, 40, 5)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_fcmi_kernels_match_interface(small_blocks, dtype, atol, n, k, t, deterministic):
    logits, groups = _data(n, k, t, dtype)
    lse, joint, ent = _triton().fcmi_fwd(logits, groups, t, deterministic)
    want = tk.fcmi_fwd(logits, groups, t)
    _assert_stats_match((lse, joint, ent), want, k <= 16, atol)
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(t, k, generator=gen, dtype=lse.dtype).to(DEVICE)
    coef = torch.tensor(0.37, dtype=lse.dtype, device=DEVICE)
    grad = _triton().fcmi_bwd(logits, groups, lse, table, coef, deterministic)
    want_grad = tk.fcmi_bwd(logits, groups, want[0], table, coef)
    assert grad.dtype == logits.dtype
    assert _max_err(grad, want_grad) <= atol


@pytest.mark.parametrize("group_dtype", [torch.int32, torch.int64])
def test_fcmi_large_num_groups_and_group_dtypes(group_dtype):
    # T = 300 spans many 16-group tiles; most groups are absent from any given row tile
    logits, groups = _data(64, 6, 300, torch.float32, group_dtype=group_dtype)
    for deterministic in (False, True):
        got = _triton().fcmi_fwd(logits, groups, 300, deterministic)
        _assert_stats_match(got, tk.fcmi_fwd(logits, groups, 300), True, 1e-5)


def test_fcmi_loss_public_op_matches_reference(small_blocks):
    logits, groups = _data(50, 20, 4, torch.float64)
    x = logits.clone().requires_grad_()
    loss = fk.fcmi_loss(x, groups, 4, backend="triton")
    loss.backward()
    xr = logits.clone().requires_grad_()
    ref = reference.fcmi_loss(xr, groups, 4)
    ref.backward()
    assert _max_err(loss, ref) <= 1e-12
    assert _max_err(x.grad, xr.grad) <= 1e-12


def test_fcmi_gradcheck_float64(small_blocks):
    logits, groups = _data(9, 18, 3, torch.float64, scale=1.0)
    x = logits.clone().requires_grad_()
    assert _gradcheck(lambda v: fk.fcmi_loss(v, groups, 3, backend="triton"), (x,))


def test_fcmi_extreme_logits_and_empty_clusters_stay_finite():
    logits, groups = _data(40, 6, 3, torch.float32)
    logits = torch.sign(logits) * 1e4
    logits[:, 2] = -1e4  # cluster 2 is empty
    x = logits.clone().requires_grad_()
    loss = fk.fcmi_loss(x, groups, 4, backend="triton")  # group 3 absent
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    xr = logits.double().requires_grad_()
    ref = reference.fcmi_loss(xr, groups, 4)
    ref.backward()
    xs = logits.clone().requires_grad_()
    ref_same = reference.fcmi_loss(xs, groups, 4)
    ref_same.backward()
    assert_close_to_reference(loss, ref_same, ref, atol=1e-5)
    assert_close_to_reference(x.grad, xs.grad, xr.grad, atol=1e-6)


def test_fcmi_deterministic_is_bitwise_repeatable(small_blocks):
    logits, groups = _data(90, 20, 5, torch.float32)
    runs = []
    for _ in range(2):
        x = logits.clone().requires_grad_()
        fk.fcmi_loss(x, groups, 5, backend="triton", deterministic=True).backward()
        runs.append((_triton().fcmi_fwd(logits, groups, 5, True), x.grad))
    (stats_a, grad_a), (stats_b, grad_b) = runs
    assert all(torch.equal(a, b) for a, b in zip(stats_a, stats_b))
    assert torch.equal(grad_a, grad_b)


# --------------------------------------------------------------------------- fcmi from embeddings
@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_fcmi_embedding_kernels_match_chunked_path(small_blocks, dtype, atol, deterministic):
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(45, 7, generator=gen, dtype=dtype).to(DEVICE)
    centers = torch.randn(21, 7, generator=gen, dtype=dtype).to(DEVICE)
    groups = torch.randint(0, 3, (45,), generator=gen).to(DEVICE)
    got = _triton().fcmi_emb_fwd(h, centers, groups, 3, 0.3, deterministic)
    want = fcmi_ops._chunked_emb_fwd(tk, h, centers, groups, 3, 0.3, deterministic)
    _assert_stats_match(got, want, False, 10 * atol)  # K = 21 > 16: K-tiled, lse saved
    table = torch.randn(3, 21, generator=gen, dtype=got[0].dtype).to(DEVICE)
    coef = torch.tensor(0.2, dtype=got[0].dtype, device=DEVICE)
    grads = _triton().fcmi_emb_bwd(h, centers, groups, got[0], table, coef, 0.3, deterministic)
    want_grads = fcmi_ops._chunked_emb_bwd(tk, h, centers, groups, want[0], table, coef, 0.3, deterministic)
    for a, b in zip(grads, want_grads):
        assert a.dtype == b.dtype and _max_err(a, b) <= 10 * atol


def test_fcmi_embeddings_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(8, 5, generator=gen, dtype=torch.float64).requires_grad_()
    centers = torch.randn(4, 5, generator=gen, dtype=torch.float64).requires_grad_()
    groups = torch.randint(0, 2, (8,), generator=gen)
    assert _gradcheck(
        lambda a, b: fk.fcmi_loss_from_embeddings(a, b, groups, 2, tau=0.5, backend="triton"), (h, centers))


def test_fcmi_embeddings_wide_features_fall_back_to_chunks(monkeypatch):
    from fairkernels.triton import _common
    monkeypatch.setattr(_common, "MAX_BLOCK_D", 16)
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(20, 24, generator=gen, dtype=torch.float64).requires_grad_()
    centers = torch.randn(3, 24, generator=gen, dtype=torch.float64)
    groups = torch.randint(0, 2, (20,), generator=gen)
    loss = fk.fcmi_loss_from_embeddings(h, centers, groups, 2, backend="triton")
    loss.backward()
    hr = h.detach().clone().requires_grad_()
    ref = reference.fcmi_loss_from_embeddings(hr, centers, groups, 2)
    ref.backward()
    assert _max_err(loss, ref) <= 1e-12 and _max_err(h.grad, hr.grad) <= 1e-12


# --------------------------------------------------------------------------- assignments
@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (40, 20, 9)])
@pytest.mark.parametrize("op", ["student_t", "cosine"])
def test_assign_kernels_match_interface(small_blocks, dtype, atol, n, k, d, op):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, d, generator=gen, dtype=dtype).to(DEVICE)
    centers = torch.randn(k, d, generator=gen, dtype=dtype).to(DEVICE)
    grad_q = torch.randn(n, k, generator=gen, dtype=dtype).to(DEVICE)
    param = 1.5 if op == "student_t" else 0.3
    fwd, bwd = getattr(_triton(), f"{op}_fwd"), getattr(_triton(), f"{op}_bwd")
    q = fwd(x, centers, param)
    q_want = getattr(tk, f"{op}_fwd")(x, centers, param)
    assert q.dtype == dtype and _max_err(q, q_want) <= atol
    grads = bwd(grad_q, q, x, centers, param)
    want = getattr(tk, f"{op}_bwd")(grad_q, q_want, x, centers, param)
    for a, b in zip(grads, want):
        assert a.dtype == b.dtype and a.shape == b.shape and _max_err(a, b) <= 10 * atol


def test_assign_gradcheck_float64(small_blocks):
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(6, 3, generator=gen, dtype=torch.float64).requires_grad_()
    centers = torch.randn(18, 3, generator=gen, dtype=torch.float64).requires_grad_()
    assert _gradcheck(lambda a, b: fk.student_t_assign(a, b, 2.0, backend="triton"), (z, centers))
    assert _gradcheck(lambda a, b: fk.cosine_assign(a, b, 0.5, backend="triton"), (z, centers))


def _offset_clusters(norm, n=24, k=5, d=6, seed=13):
    """Points and centres in tight clusters around a common offset of the given norm: the
    case where |z|^2 + |mu|^2 - 2 z.mu cancels in float32."""
    gen = torch.Generator().manual_seed(seed)
    offset = torch.randn(d, generator=gen, dtype=torch.float64)
    offset = offset / offset.norm() * norm
    centers = offset + 3.0 * torch.randn(k, d, generator=gen, dtype=torch.float64)
    z = centers[torch.randint(0, k, (n,), generator=gen)] + torch.randn(n, d, generator=gen, dtype=torch.float64)
    return z, centers


def _direct_student_t(z, centers, alpha):
    dist = ((z[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    return torch.softmax(-(alpha + 1.0) / 2.0 * torch.log1p(dist / alpha), dim=1)


@pytest.mark.parametrize("norm", [30.0, 300.0, 1000.0])
def test_student_t_float32_accuracy_far_from_the_origin(norm):
    """docs/math.md §1.1: float32 q within 1e-5 relative of float64 direct differences at norms <= 10^3,
    where the float32 expansion is off by far more from norm ~300 on."""
    z, centers = _offset_clusters(norm)
    want = _direct_student_t(z, centers, 1.0)
    q = _triton().student_t_fwd(z.float().to(DEVICE), centers.float().to(DEVICE), 1.0)
    assert _max_err(q, want) <= 1e-5 * want.abs().max().item()
    if norm >= 300:
        # the plain float32 expansion |z|^2 + |mu|^2 - 2 z.mu (what every backend did before
        # centring) must fail here, or the test would not be testing the centring
        zf, cf = z.float(), centers.float()
        dist = (zf.square().sum(1, keepdim=True) + cf.square().sum(1) - 2.0 * zf @ cf.t()).clamp_min(0)
        expansion = torch.softmax(-torch.log1p(dist), dim=1)
        assert _max_err(expansion, want) > 1e-4, "the data must be hard for the expansion"
    # the gradient uses centred values too: compare with float64 autograd
    gen = torch.Generator().manual_seed(14)
    grad_q = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    z64, c64 = z.clone().requires_grad_(), centers.clone().requires_grad_()
    _direct_student_t(z64, c64, 1.0).backward(grad_q)
    grad_z, grad_c = _triton().student_t_bwd(grad_q.float(), q, z.float(), centers.float(), 1.0)
    for got, exp in ((grad_z, z64.grad), (grad_c, c64.grad)):
        assert _max_err(got, exp) <= 1e-4 * max(1.0, exp.abs().max().item())


@pytest.mark.parametrize("dtype,atol", DTYPES)
def test_student_t_k_tiled_matches_interface(small_blocks, dtype, atol):
    """K = 40 > 16: the direct-difference distances and centre sums over several K tiles."""
    gen = torch.Generator().manual_seed(15)
    z = (torch.randn(30, 5, generator=gen, dtype=torch.float64) * 4).to(dtype).to(DEVICE)
    centers = (torch.randn(40, 5, generator=gen, dtype=torch.float64) * 4).to(dtype).to(DEVICE)
    grad_q = torch.randn(30, 40, generator=gen, dtype=dtype).to(DEVICE)
    q = _triton().student_t_fwd(z, centers, 2.0)
    assert _max_err(q, tk.student_t_fwd(z, centers, 2.0)) <= atol
    for a, b in zip(_triton().student_t_bwd(grad_q, q, z, centers, 2.0), tk.student_t_bwd(grad_q, q, z, centers, 2.0)):
        assert _max_err(a, b) <= 10 * atol * max(1.0, b.abs().max().item())


def test_deterministic_partials_are_bitwise_repeatable(small_blocks):
    """Private slots (deterministic=True) for the K-tiled joint and centre gradients."""
    gen = torch.Generator().manual_seed(16)
    h = torch.randn(70, 6, generator=gen).to(DEVICE)
    centers = torch.randn(21, 6, generator=gen).to(DEVICE)
    groups = torch.randint(0, 20, (70,), generator=gen).to(DEVICE)
    runs = []
    for _ in range(2):
        stats = _triton().fcmi_emb_fwd(h, centers, groups, 20, 0.2, True)
        table = torch.ones(20, 21, device=DEVICE)
        grads = _triton().fcmi_emb_bwd(h, centers, groups, stats[0], table, torch.tensor(0.3, device=DEVICE), 0.2,
                                       True)
        runs.append(stats + grads)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# --------------------------------------------------------------------------- histogram
@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("group_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("weighted", [False, True])
def test_histogram_kernels_match_interface(small_blocks, dtype, atol, group_dtype, weighted):
    gen = torch.Generator().manual_seed(7)
    probs = torch.rand(60, 19, generator=gen, dtype=dtype).to(DEVICE)
    groups = torch.randint(0, 20, (60,), generator=gen).to(group_dtype).to(DEVICE)
    weights = torch.rand(60, generator=gen, dtype=dtype).to(DEVICE) if weighted else None
    want = tk.histogram_fwd(probs, groups, weights, 20)
    for deterministic in (False, True):
        got = _triton().histogram_fwd(probs, groups, weights, 20, deterministic)
        assert got.dtype == want.dtype and _max_err(got, want) <= atol * 10
    grad_joint = torch.randn(20, 19, generator=gen, dtype=want.dtype).to(DEVICE)
    assert torch.equal(_triton().histogram_bwd(grad_joint, groups, weights),
                       tk.histogram_bwd(grad_joint, groups, weights))


def test_histogram_gradcheck_float64():
    gen = torch.Generator().manual_seed(8)
    probs = torch.rand(7, 3, generator=gen, dtype=torch.float64).requires_grad_()
    groups = torch.randint(0, 2, (7,), generator=gen)
    assert _gradcheck(lambda p: fk.joint_histogram(p, groups, 2, backend="triton"), (probs,))


# --------------------------------------------------------------------------- DFC
@pytest.mark.parametrize("dtype,atol", DTYPES)
def test_dec_target_and_kl_div_match_reference(small_blocks, dtype, atol):
    gen = torch.Generator().manual_seed(9)
    q = torch.softmax(torch.randn(50, 20, generator=gen, dtype=dtype), 1).to(DEVICE)
    q[:, 3] = 0.0  # an empty cluster and q entries below the clamp
    target = _triton().dec_target(q)
    assert target.dtype == dtype and _max_err(target, reference.dec_target(q)) <= atol
    qa = q.clone().requires_grad_()
    loss = fk.kl_div(target, qa, backend="triton")
    loss.backward()
    qr = q.clone().requires_grad_()
    ref = reference.kl_div(target, qr)
    ref.backward()
    assert loss.dtype == dtype and _max_err(loss, ref) <= atol
    assert torch.isfinite(qa.grad).all() and _max_err(qa.grad, qr.grad) <= atol


def test_kl_div_gradcheck_float64():
    gen = torch.Generator().manual_seed(10)
    q = torch.softmax(torch.randn(6, 4, generator=gen, dtype=torch.float64), 1)
    target = reference.dec_target(q)
    assert _gradcheck(lambda v: fk.kl_div(target, v, backend="triton"), (q.requires_grad_(),))


# --------------------------------------------------------------------------- k-means
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kmeans_assign_matches_interface(small_blocks, dtype):
    gen = torch.Generator().manual_seed(11)
    centers = torch.randn(37, 5, generator=gen, dtype=dtype) * 10
    labels_true = torch.randint(0, 37, (80,), generator=gen)
    x = centers[labels_true] + 0.01 * torch.randn(80, 5, generator=gen, dtype=dtype)
    labels, dist = _triton().kmeans_assign(x.to(DEVICE), centers.to(DEVICE))
    want_labels, want_dist = tk.kmeans_assign(x, centers)
    assert labels.dtype == torch.int64 and torch.equal(labels.cpu(), want_labels)
    assert torch.equal(labels.cpu(), labels_true)
    # Both compute |x|^2 - 2 x.c + |c|^2, whose rounding scales with |x|^2 + |c|^2 (~1e3 here),
    # not with the tiny distance: the bound is a few ulps of that (the summation order of the
    # interpreter's dot differs with the numpy it runs on).
    scale = (x.square().sum(1) + centers[labels_true].square().sum(1)).max().item()
    assert dist.dtype == want_dist.dtype
    assert _max_err(dist.cpu(), want_dist) <= 32 * torch.finfo(dtype).eps * scale


def test_kmeans_assign_ties_pick_the_lowest_index(small_blocks):
    centers = torch.zeros(20, 2)
    centers[17] = 5.0
    labels, dist = _triton().kmeans_assign(torch.zeros(3, 2, device=DEVICE), centers.to(DEVICE))
    assert labels.tolist() == [0, 0, 0] and dist.abs().max().item() == 0.0


# --------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_within_torch_error(dtype, atol):
    """err(triton) <= 2 err(reference in the same dtype) + atol, both against float64 (STYLE.md)."""
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(40, 10, generator=gen).mul(3).to(dtype).to(DEVICE)
    h = torch.randn(40, 8, generator=gen).to(dtype).to(DEVICE)
    centers = torch.randn(10, 8, generator=gen).to(dtype).to(DEVICE)
    groups = torch.randint(0, 3, (40,), generator=gen).to(DEVICE)
    x = logits.clone().requires_grad_()
    loss = fk.fcmi_loss(x, groups, 3, backend="triton")
    loss.backward()
    assert x.grad.dtype == dtype and loss.dtype == dtype
    x64 = logits.double().requires_grad_()
    ref64 = reference.fcmi_loss(x64, groups, 3)
    ref64.backward()
    # reference upcasts internally, so its same-dtype error is the rounding of its output
    assert_close_to_reference(loss, ref64.to(dtype), ref64, atol)
    assert_close_to_reference(x.grad, x64.grad.to(dtype), x64.grad, atol / 10)
    emb = fk.fcmi_loss_from_embeddings(h, centers, groups, 3, backend="triton")
    emb64 = reference.fcmi_loss_from_embeddings(h.double(), centers.double(), groups, 3)
    assert_close_to_reference(emb, emb64.to(dtype), emb64, atol)
    for op, param in (("student_t_assign", 1.0), ("cosine_assign", 0.3)):
        out = getattr(fk, op)(h, centers, param, backend="triton")
        out64 = getattr(reference, op)(h.double(), centers.double(), param)
        assert out.dtype == dtype
        assert_close_to_reference(out, out64.to(dtype), out64, atol)


# --------------------------------------------------------------------------- torch.library
def test_fake_impls_give_interface_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    ops = torch.ops.fairkernels
    with FakeTensorMode():
        logits = torch.empty(11, 5, dtype=torch.float16)
        groups = torch.zeros(11, dtype=torch.int32)
        lse, joint, ent = ops.triton_fcmi_fwd(logits, groups, 3, False)
        assert (lse.shape, joint.shape, ent.shape) == ((0,), (3, 5), ()) and joint.dtype == torch.float32
        assert ops.triton_fcmi_bwd(logits, groups, lse, joint, ent, False).dtype == torch.float16
        h, centers = torch.empty(11, 4, dtype=torch.float64), torch.empty(5, 4, dtype=torch.float64)
        lse, joint, ent = ops.triton_fcmi_emb_fwd(h, centers, groups, 3, 0.1, True)
        assert lse.dtype == torch.float64 and joint.shape == (3, 5)
        grad_h, grad_c = ops.triton_fcmi_emb_bwd(h, centers, groups, lse, joint, ent, 0.1, True)
        assert grad_h.shape == h.shape and grad_c.shape == centers.shape
        q = ops.triton_student_t_fwd(h, centers, 1.0)
        assert q.shape == (11, 5) and q.dtype == torch.float64
        assert ops.triton_cosine_bwd(q, q, h, centers, 0.1)[1].shape == (5, 4)
        assert ops.triton_histogram_fwd(q, groups, None, 3, False).shape == (3, 5)
        assert ops.triton_histogram_bwd(joint, groups, None).shape == (11, 5)
        assert ops.triton_kl_div_fwd(q, q).shape == () and ops.triton_dec_target(q).shape == q.shape
        labels, dist = ops.triton_kmeans_assign(h, centers)
        assert labels.dtype == torch.int64 and dist.shape == (11,)


def test_opcheck_schema_and_fake_tensor():
    logits, groups = _data(20, 4, 3, torch.float32)
    torch.library.opcheck(torch.ops.fairkernels.triton_fcmi_fwd.default, (logits, groups, 3, True),
                          test_utils=("test_schema", "test_faketensor"))


_AOT_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fairkernels.triton import fcmi

def compile_kernel(fn, ptrs, consts):
    sig = {a: "constexpr" if a in consts else ("*" + ptrs[a]) if a in ptrs
           else ("i64" if a.endswith("stride") else "i32") for a in fn.arg_names}
    triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))

for acc, dot, io, io_tl in (("fp32", tl.float32, "fp32", tl.float32), ("fp64", tl.float64, "fp64", tl.float64),
                            ("fp32", tl.bfloat16, "bf16", tl.float32)):
    compile_kernel(fcmi._fcmi_fwd_kernel, dict(X_ptr=io, G_ptr="i64", LSE_ptr=acc, JOINT_ptr=acc, ENT_ptr=acc),
                   dict(ACC=io_tl, BLOCK_N=32, BLOCK_K=64, BLOCK_T=16, SINGLE_K_TILE=False, ATOMIC=False))
    compile_kernel(fcmi._fcmi_emb_bwd_kernel, dict(H_ptr=io, U_ptr=io, G_ptr="i32", LSE_ptr=acc, TABLE_ptr=acc,
                   COEF_ptr=acc, PARAM_ptr=acc, GRAD_H_ptr=io, GRAD_U_ptr=acc),
                   dict(ACC=io_tl, DOT=dot, BLOCK_N=32, BLOCK_K=32, BLOCK_D=32, SINGLE_K_TILE=True, ATOMIC=True))
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels for real")
def test_kernels_compile_for_cuda_without_a_gpu():
    """The interpreter accepts code the GPU compiler rejects (int/tensor mixes, dot shapes, fp64
    dots): compile the two most involved kernels to PTX for sm_90 with the bundled ptxas."""
    import subprocess
    import sys
    from pathlib import Path
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    result = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env,
                            timeout=240)
    if result.returncode != 0 and "ptxas" in result.stderr and "No such file" in result.stderr:
        pytest.skip("triton's bundled ptxas is unavailable")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


# --------------------------------------------------------------------------- GPU sweep
def _flash_check(out, out_torch_same_dtype, out_fp64, atol):
    err = _max_err(out, out_fp64)
    err_torch = _max_err(out_torch_same_dtype, out_fp64)
    assert err <= 2 * err_torch + atol, (err, err_torch)


@pytest.mark.gpu
class TestGPU:
    @pytest.mark.parametrize("dtype,atol", [(torch.float16, 1e-3), (torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
    @pytest.mark.parametrize("n,k,t", [(1, 1, 1), (4097, 10, 2), (1000, 1000, 7), (3000, 4096, 1024)])
    def test_fcmi_sweep(self, dtype, atol, n, k, t):
        logits = (torch.randn(n, k, device="cuda") * 4).to(dtype)
        groups = torch.randint(0, t, (n,), device="cuda")
        for deterministic in (False, True):
            x = logits.clone().requires_grad_()
            loss = fk.fcmi_loss(x, groups, t, backend="triton", deterministic=deterministic)
            loss.backward()
            x64 = logits.double().requires_grad_()
            ref64 = reference.fcmi_loss(x64, groups, t)
            ref64.backward()
            xs = logits.clone().requires_grad_()
            ref_same = reference.fcmi_loss(xs, groups, t)
            ref_same.backward()
            _flash_check(loss, ref_same, ref64, atol)
            _flash_check(x.grad, xs.grad, x64.grad, atol / max(n, 1))

    @pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
    def test_embeddings_and_assign_sweep(self, dtype, atol):
        h = torch.randn(5000, 128, device="cuda").to(dtype)
        centers = torch.randn(300, 128, device="cuda").to(dtype)
        groups = torch.randint(0, 5, (5000,), device="cuda")
        loss = fk.fcmi_loss_from_embeddings(h, centers, groups, 5, backend="triton")
        ref64 = reference.fcmi_loss_from_embeddings(h.double(), centers.double(), groups, 5)
        ref_same = reference.fcmi_loss_from_embeddings(h, centers, groups, 5)
        _flash_check(loss, ref_same, ref64, atol)
        for op, param in (("student_t_assign", 1.0), ("cosine_assign", 0.1)):
            out = getattr(fk, op)(h, centers, param, backend="triton")
            ref64 = getattr(reference, op)(h.double(), centers.double(), param)
            ref_same = getattr(reference, op)(h.float(), centers.float(), param).to(dtype)
            _flash_check(out, ref_same, ref64, atol)

    def test_64bit_offsets(self):
        # N * K > 2^31: the row offset must be computed in int64
        n, k = (1 << 21) + 3, 1024
        logits = torch.randn(n, k, device="cuda", dtype=torch.float16)
        groups = torch.randint(0, 3, (n,), device="cuda")
        lse, joint, _ = _triton().fcmi_fwd(logits, groups, 3, False)
        tail = logits[-5:].float()
        assert torch.allclose(lse[-5:], torch.logsumexp(tail, 1), atol=1e-3)
        assert torch.allclose(joint.sum(), torch.tensor(float(n), device="cuda"), rtol=1e-4)
        grad = _triton().fcmi_bwd(logits, groups, lse, torch.zeros_like(joint),
                                  torch.tensor(1.0, device="cuda"), False)
        assert torch.isfinite(grad[-5:]).all() and grad[-1].abs().sum() > 0

    def test_deterministic_bitwise(self):
        logits = torch.randn(20000, 64, device="cuda")
        groups = torch.randint(0, 4, (20000,), device="cuda")
        h = torch.randn(20000, 32, device="cuda")
        centers = torch.randn(64, 32, device="cuda").requires_grad_()
        outs = []
        for _ in range(3):
            stats = _triton().fcmi_fwd(logits, groups, 4, True)
            centers.grad = None
            fk.fcmi_loss_from_embeddings(h, centers, groups, 4, backend="triton", deterministic=True).backward()
            outs.append((stats, centers.grad.clone()))
        for stats, grad in outs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(stats, outs[0][0]))
            assert torch.equal(grad, outs[0][1])

    def test_compile_fullgraph(self):
        model = torch.nn.Linear(16, 8).cuda()
        groups = torch.randint(0, 3, (256,), device="cuda")

        def step(x):
            return fk.fcmi_loss(model(x), groups, 3, backend="triton", check_inputs=False)

        compiled = torch.compile(step, fullgraph=True)
        x = torch.randn(256, 16, device="cuda")
        loss = compiled(x)
        loss.backward()
        assert torch.allclose(loss, step(x), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [200, 300, 600])
def test_fcmi_fake_lse_shape_matches_the_kernel(dtype, k):
    """The lse is empty exactly when the launcher puts the row in one K tile (float64 tiles are
    half as wide), and the fake must agree with the real op for torch.compile."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    logits, groups = _data(3, k, 2, dtype)
    real = _triton().fcmi_fwd(logits, groups, 2, False)[0].shape
    with FakeTensorMode():
        fake = torch.ops.fairkernels.triton_fcmi_fwd(torch.empty(3, k, dtype=dtype), torch.zeros(3, dtype=torch.int64),
                                                     2, False)[0].shape
    assert real == fake


def test_launches_set_maxnreg_from_the_register_budget():
    """8-warp launches get maxnreg = the block's budget (ptxas' occupancy target spilled without
    it); the FCMI loss from logits keeps its 128-register cap; 16-warp launches are left to ptxas."""
    from fairkernels.triton import _common as cm
    fk_triton = _triton()
    assert cm.register_budget(4) == 255 and cm.register_budget(8) == 255 and cm.register_budget(16) == 128
    seen = []
    cm.LAUNCH_HOOK = lambda kernel, grid, args, kwargs: seen.append((kernel.fn.__name__, dict(kwargs)))
    try:
        z = torch.randn(64, 10, device="meta")
        fk_triton.student_t_fwd._init_fn(z, torch.randn(100, 10, device="meta"), 1.0)
        fk_triton.fcmi_fwd._init_fn(torch.randn(64, 10, device="meta"), torch.zeros(64, dtype=torch.int64, device="meta"), 2)
    finally:
        cm.LAUNCH_HOOK = None
    for name, kwargs in seen:
        if name.startswith("_fcmi"):
            assert kwargs["maxnreg"] == (128 if kwargs["num_warps"] <= 8 else None), (name, kwargs)
        elif kwargs["num_warps"] == 8:
            assert kwargs["maxnreg"] == 255, (name, kwargs)
    assert seen


def test_fcmi_large_logits_keep_softmax_rows_normalised():
    """The fused forward shifts each row by its max before the logsumexp: at |logits| ~ 1e4 in
    float32 the joint's row sums (the group sizes the loss uses) stay exact to 1e-6."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(256, 7, generator=gen) * 1e4).to(DEVICE)
    groups = torch.randint(0, 3, (256,), generator=gen).to(DEVICE)
    _, joint, _ = _triton().fcmi_fwd(logits, groups, 3)
    counts = torch.bincount(groups, minlength=3).float()
    joint = joint.cpu()
    counts = counts.cpu()
    assert torch.allclose(joint.sum(1), counts, rtol=1e-6, atol=1e-4)

"""torch.compile(fullgraph=True) over the fused ops: the fake kernels (fairkernels/_fake.py) let
dynamo trace torch.ops.fairkernels.* as opaque ops, forward and backward, with no graph break."""
import pytest
import torch

import fairkernels
from fairkernels import reference
from tests.helpers import fused_backends

CPU_FUSED = "cpu" in fused_backends("fcmi", dtype=torch.float32)
pytestmark = pytest.mark.skipif(not CPU_FUSED, reason="needs the C++ kernels")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _value_and_grad(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward()
    return (out.detach(), *[x.grad for x in leaves])


def test_fcmi_loss_compiles_fullgraph():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, generator=gen)
    groups = torch.randint(0, 3, (64,), generator=gen)

    def loss_fn(x, g):
        return fairkernels.fcmi_loss(x, g, num_groups=3, backend="cpu")

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = _value_and_grad(lambda x: compiled(x, groups), logits)
    want = _value_and_grad(lambda x: reference.fcmi_loss(x, groups, 3), logits)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_assign_and_histogram_compile_fullgraph():
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(32, 6, generator=gen)
    centers = torch.randn(4, 6, generator=gen)
    groups = torch.randint(0, 2, (32,), generator=gen)

    def objective(a, b):
        q = fairkernels.student_t_assign(a, b, backend="cpu")
        c = fairkernels.cosine_assign(a, b, backend="cpu")
        joint = fairkernels.joint_histogram(q * c, groups, 2, backend="cpu")
        return fairkernels.mutual_information(joint)

    def objective_ref(a, b):
        q = reference.student_t_assign(a, b)
        c = reference.cosine_assign(a, b)
        return reference.mutual_information(reference.joint_histogram(q * c, groups, 2))

    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    got = _value_and_grad(compiled, h, centers)
    want = _value_and_grad(objective_ref, h, centers)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("centers_shape", [(4, 6), (2, 4, 6)], ids=["shared", "per-group"])
def test_dfc_loss_compiles_fullgraph(centers_shape):
    """The DFC step (one C++ op with a C++ autograd node) traces as one opaque op, forward and
    backward, and matches the reference composition."""
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(32, 6, generator=gen, dtype=torch.float64)
    centers = torch.randn(*centers_shape, generator=gen, dtype=torch.float64)
    groups = torch.randint(0, 2, (32,), generator=gen)
    target = torch.softmax(torch.randn(32, 4, generator=gen, dtype=torch.float64), 1)

    def loss_fn(a, b, backend):
        return fairkernels.dfc_loss_from_embeddings(a, b, groups, 2, 1.5, 1.0, 5.0, target, backend=backend)[0]

    compiled = torch.compile(lambda a, b: loss_fn(a, b, "cpu"), fullgraph=True, backend="aot_eager")
    got = _value_and_grad(compiled, z, centers)
    want = _value_and_grad(lambda a, b: loss_fn(a, b, "reference"), z, centers)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_fake_kernels_shapes_and_dtypes():
    """Every operator's fake kernel agrees with the real one on shapes and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(7, 3, dtype=torch.float64)
    g = torch.randint(0, 2, (7,), dtype=torch.int32)
    centers = torch.randn(4, 3, dtype=torch.float64)
    q = torch.softmax(torch.randn(7, 4, dtype=torch.float64), 1)
    ops = torch.ops.fairkernels
    calls = [
        lambda a, b, c, grp, p: ops.fcmi_fwd(a, grp, 3, False),
        lambda a, b, c, grp, p: ops.fcmi_bwd(a, grp, a[:, 0], torch.zeros(3, 3, dtype=a.dtype), a[0, 0], False),
        lambda a, b, c, grp, p: ops.fcmi_emb_fwd(a, c, grp, 3, 0.1, False),
        lambda a, b, c, grp, p: ops.fcmi_emb_bwd(a, c, grp, a[:, 0], torch.zeros(3, 4, dtype=a.dtype), a[0, 0], 0.1,
                                                 False),
        lambda a, b, c, grp, p: ops.histogram_fwd(p, grp, None, 3, False),
        lambda a, b, c, grp, p: ops.histogram_bwd(torch.ones(3, 4, dtype=a.dtype), grp, a[:, 0]),
        lambda a, b, c, grp, p: ops.student_t_fwd(a, c, 1.0),
        lambda a, b, c, grp, p: ops.student_t_bwd(p, p, a, c, 1.0),
        lambda a, b, c, grp, p: ops.cosine_fwd(a, c, 0.1),
        lambda a, b, c, grp, p: ops.cosine_bwd(p, p, a, c, 0.1),
        lambda a, b, c, grp, p: ops.kmeans_assign(a, c),
        lambda a, b, c, grp, p: ops.dfc_step(a, c, grp, p, None, 3, 1.0, 5.0, 1.0, 1e-6, False),
        lambda a, b, c, grp, p: ops.dfc_loss(a, c, grp, p, None, 3, 1.0, 5.0, 1.0, 1e-6, False),
        lambda a, b, c, grp, p: ops.group_offsets(p, grp, 3, 50, 1e-6),
        lambda a, b, c, grp, p: ops.dec_batch_target(p, grp, None, None, 0.9, True, 3, 50, 1e-6),
    ]
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (x, x, centers, g, q)]
        fake_outs = [call(*fakes) for call in calls]
    for call, fake_out in zip(calls, fake_outs):
        real_out = call(x, x, centers, g, q)
        real_out = real_out if isinstance(real_out, tuple) else (real_out,)
        fake_out = fake_out if isinstance(fake_out, tuple) else (fake_out,)
        for r, f in zip(real_out, fake_out):
            assert r.shape == f.shape and r.dtype == f.dtype


def _opcheck_calls(contiguous: bool):
    """(name, args) of every torch.ops.fairkernels operator on small float64 inputs; with
    contiguous=False each N x K / N x d input is a transposed or strided view of the same values."""
    gen = torch.Generator().manual_seed(2)

    def matrix(rows, cols):
        x = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
        return x if contiguous else x.t().contiguous().t()   # same values, column-major strides

    def strided(x):
        return x if contiguous else torch.stack([x, torch.zeros_like(x)], -1)[..., 0]

    n, k, t, d = 9, 4, 3, 5
    logits, h, centers = matrix(n, k), matrix(n, d), matrix(k, d)
    groups = strided(torch.randint(0, t, (n,), generator=gen))
    probs = torch.softmax(logits, 1)
    q = torch.softmax(matrix(n, k), 1)
    grad_q = matrix(n, k)
    lse = strided(torch.logsumexp(logits, 1))
    table = matrix(t, k)
    coef = torch.tensor(0.3, dtype=torch.float64)
    weights = strided(torch.rand(n, generator=gen, dtype=torch.float64))
    return [
        ("fcmi_fwd", (logits, groups, t, False)),
        ("fcmi_bwd", (logits, groups, lse, table, coef, False)),
        ("fcmi_emb_fwd", (h, centers, groups, t, 0.2, False)),
        ("fcmi_emb_bwd", (h, centers, groups, lse, table, coef, 0.2, False)),
        ("histogram_fwd", (probs, groups, weights, t, False)),
        ("histogram_fwd_checked", (probs, groups, weights, t, False)),
        ("histogram_bwd", (table, groups, weights)),
        ("student_t_fwd", (h, centers, 1.0)),
        ("student_t_bwd", (grad_q, q, h, centers, 1.0)),
        ("cosine_fwd", (h, centers, 0.1)),
        ("cosine_bwd", (grad_q, q, h, centers, 0.1)),
        ("kmeans_assign", (h, centers)),
        ("kmeans_step", (h, centers)),
        ("dfc_step", (h, centers, groups, q, matrix(t, d), t, 1.0, 5.0, 1.5, 1e-6, False)),
        ("dfc_step", (h, torch.randn(t, k, d, generator=gen, dtype=torch.float64), groups, q, None, t, 1.0, 5.0,
                      1.5, 1e-6, True)),
        ("dfc_loss", (h, centers, groups, q, matrix(t, d), t, 1.0, 5.0, 1.5, 1e-6, False)),
        ("dfc_loss", (h, torch.randn(t, k, d, generator=gen, dtype=torch.float64), groups, q, None, t, 2.0, 5.0,
                      0.0, 1e-6, True)),
        ("group_offsets", (logits, groups, t, 200, 1e-6)),
        ("dec_batch_target", (q, groups, None, None, 0.9, True, t, 200, 1e-6)),
        ("dec_batch_target", (q, groups, None, torch.randn(t, k, generator=gen, dtype=torch.float64), 0.9, True, t,
                              200, 1e-6)),
        ("dec_batch_target", (q, groups, strided(torch.rand(k, generator=gen, dtype=torch.float64)), None, 0.9, False,
                              t, 200, 1e-6)),
        ("dec_batch_targets", ([q, q[:3]], [groups, groups[:3]], None, None, 0.9, True, t, 200, 1e-6)),
        ("dec_batch_targets", ([q], [groups], strided(torch.rand(k, generator=gen, dtype=torch.float64)),
                               torch.randn(t, k, generator=gen, dtype=torch.float64), 0.9, False, t, 200, 1e-6)),
    ]


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_opcheck_every_operator(contiguous):
    """torch.library.opcheck (schema, fake kernel vs real op incl. strides, AOT dispatch) passes
    for every operator the extension registers, on contiguous and non-contiguous inputs."""
    calls = _opcheck_calls(contiguous)
    # the extension's operators (csrc/ops.cpp); fairkernels::triton_* are the Triton launchers'
    # own torch.library ops, checked with the Triton kernels
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("fairkernels::") and not name.startswith("fairkernels::triton_")}
    assert registered <= {name for name, _ in calls}, sorted(registered - {name for name, _ in calls})
    if not contiguous:
        assert not calls[0][1][0].is_contiguous() and not calls[0][1][1].is_contiguous()
    for name, args in calls:
        torch.library.opcheck(getattr(torch.ops.fairkernels, name).default, args)

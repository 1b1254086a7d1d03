"""The compiled extension: registration of every operator, and the loader's fallback when the
extension is unavailable (a warning, then reference results)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fairkernels import _backend

OPS = ("fcmi_fwd", "fcmi_bwd", "fcmi_emb_fwd", "fcmi_emb_bwd", "histogram_fwd", "histogram_bwd", "student_t_fwd", "student_t_bwd",
       "cosine_fwd", "cosine_bwd", "kmeans_assign")
HAS_EXTENSION = _backend.unavailable_reason("cpu", torch.device("cpu"), torch.float32, "fcmi") is None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not HAS_EXTENSION, reason="the extension is not built here")
@pytest.mark.parametrize("name", OPS)
def test_every_op_has_a_cpu_kernel(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fairkernels::{name}", "CPU")


def test_fallback_without_extension_warns_and_uses_reference():
    """FAIRKERNELS_NO_EXTENSION=1 hides the prebuilt _C and FAIRKERNELS_NO_JIT=1 forbids the JIT
    build: auto falls back to the reference (one RuntimeWarning), backend='cpu' raises."""
    script = textwrap.dedent("""
        import warnings, torch, fairkernels
        from fairkernels import reference
        logits = torch.randn(20, 4, dtype=torch.float64)
        groups = torch.randint(0, 3, (20,))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = fairkernels.fcmi_loss(logits, groups, 3)
            fairkernels.fcmi_loss(logits, groups, 3)
        runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(runtime) == 1 and "compiled kernels unavailable" in str(runtime[0].message), caught
        torch.testing.assert_close(loss, reference.fcmi_loss(logits, groups, 3))
        try:
            fairkernels.fcmi_loss(logits, groups, 3, backend="cpu")
        except RuntimeError as err:
            assert "could not be loaded or built" in str(err)
        else:
            raise AssertionError("backend='cpu' must raise without the extension")
        print("fallback ok")
    """)
    env = dict(os.environ, FAIRKERNELS_NO_EXTENSION="1", FAIRKERNELS_NO_JIT="1", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


OPENMP_SCRIPT = textwrap.dedent("""
    import os, re, sys, threading, torch
    import fairkernels as fk

    def runtimes():
        with open("/proc/self/maps") as maps:
            return {line.split()[-1] for line in maps if re.search(r"lib(g|i)?omp[^/]*[.]so", line)}

    def os_threads():
        return len(os.listdir("/proc/self/task"))

    def fused_calls():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(200_000, 10, generator=gen).requires_grad_()
        g = torch.randint(0, 3, (200_000,), generator=gen)
        fk.fcmi_loss(x, g, 3, backend="cpu").backward()
        h = torch.randn(50_000, 8, generator=gen).requires_grad_()
        c = torch.randn(10, 8, generator=gen)
        fk.fcmi_loss_from_embeddings(h, c, g[:50_000], 3, backend="cpu").backward()
        fk.joint_histogram(torch.softmax(x.detach(), 1), g, 3, backend="cpu")
        fk.student_t_assign(h, c, backend="cpu").sum().backward()
        fk.cosine_assign(h, c, backend="cpu").sum().backward()
        fk.kmeans(h.detach(), 10, n_iter=3, backend="cpu")

    def torch_calls():             # torch's own ops only: what torch itself does in a thread
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(200_000, 10, generator=gen).requires_grad_()
        (torch.softmax(x, 1) @ torch.randn(10, 10, generator=gen)).square().sum().backward()

    torch.set_num_threads(1)
    before = runtimes()            # torch's (fairkernels imports scikit-learn lazily)
    torch_gomp = {p for p in before if "/torch/lib/" in p}
    fused_calls()                  # loads the extension and any lazily imported module
    for target in (torch_calls, torch_calls):
        baseline = threading.Thread(target=target)
        baseline.start(); baseline.join()
    threads_before = os_threads()  # whatever torch's own ops leave behind; only kernels count now
    fused_calls()                  # in the main thread
    worker = threading.Thread(target=fused_calls)
    worker.start(); worker.join()  # a fresh thread: its OpenMP ICVs are not torch's
    after = runtimes()
    print("runtimes", sorted(before), sorted(after))
    print("threads", threads_before, os_threads())
    assert fk._extension.load()
    assert len(torch_gomp) == 1, before
    assert after == before, f"the extension mapped another OpenMP runtime: {sorted(after - before)}"
    assert os_threads() <= threads_before, "a kernel started threads beyond torch.set_num_threads(1)"
    print("openmp ok")
""")


@pytest.mark.skipif(not HAS_EXTENSION, reason="the extension is not built here")
@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not os.path.exists("/proc/self/maps"),
                    reason="needs Linux and >= 2 cores")
def test_kernels_share_torchs_openmp_runtime_and_thread_count():
    """The C++ kernels run on torch's own OpenMP runtime (no second libgomp/libomp/libiomp is
    mapped when the extension loads) and honour torch.set_num_threads, also when called from a
    thread that torch did not create (where a raw `omp parallel` would start a full team)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS=str(os.cpu_count()))
    result = subprocess.run([sys.executable, "-c", OPENMP_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "openmp ok" in result.stdout

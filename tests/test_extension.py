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

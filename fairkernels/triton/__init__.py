"""Triton kernels, one module per op family, exposing the kernel interface of
fairkernels/ops/torch_kernels.py (same names, signatures and output dtypes), plus the fused
embedding pair fcmi_emb_fwd/_bwd and the DFC kernels dec_target, kl_div_fwd/_bwd.

Every launcher is a torch.library custom op named fairkernels::triton_<name> with a fake
(meta) implementation, so torch.compile(fullgraph=True) treats each as one opaque op. The
launchers run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

from fairkernels.triton.assign import cosine_bwd, cosine_fwd, student_t_bwd, student_t_fwd
from fairkernels.triton.dfc import dec_target, kl_div_bwd, kl_div_fwd
from fairkernels.triton.fcmi import fcmi_bwd, fcmi_emb_bwd, fcmi_emb_fwd, fcmi_fwd
from fairkernels.triton.histogram import histogram_bwd, histogram_fwd
from fairkernels.triton.kmeans import kmeans_assign

# Ops with a Triton implementation; fairkernels._backend consults this before choosing Triton.
SUPPORTED: frozenset = frozenset({"fcmi", "fcmi_embeddings", "histogram", "student_t", "cosine",
                                  "dec_target", "kl_div", "kmeans_assign"})

__all__ = ["SUPPORTED", "supports", "fcmi_fwd", "fcmi_bwd", "fcmi_emb_fwd", "fcmi_emb_bwd",
           "histogram_fwd", "histogram_bwd", "student_t_fwd", "student_t_bwd", "cosine_fwd",
           "cosine_bwd", "kmeans_assign", "dec_target", "kl_div_fwd", "kl_div_bwd"]


def supports(op: str) -> bool:
    return op in SUPPORTED

"""fairkernels: fused kernels and trainers for deep fair clustering (FCMI, DFC).

    >>> import fairkernels as fk
    >>> loss = fk.fcmi_loss(logits, groups)      # fused alpha * L_clu + beta * L_fair
"""
__version__ = "0.1.0"

from fairkernels import metrics
from fairkernels._backend import BACKENDS
from fairkernels.kmeans import KMeansResult, kmeans
from fairkernels.ops import (batch_centroids, cosine_assign, dec_target, dfc_loss, dfc_loss_from_embeddings,
                             fairness_matrix,
                             fairoid_loss, fairoid_target, fairoid_term, fairoids, fcmi_loss, fcmi_loss_from_embeddings,
                             fcmi_terms, fcmi_terms_from_embeddings, joint_histogram, kl_div,
                             mutual_information, student_t_assign)

__all__ = [
    "BACKENDS", "KMeansResult", "__version__", "kmeans", "metrics", "batch_centroids", "cosine_assign", "dec_target", "dfc_loss",
    "dfc_loss_from_embeddings",
    "fairness_matrix", "fairoid_loss", "fairoid_target", "fairoid_term", "fairoids", "fcmi_loss",
    "fcmi_loss_from_embeddings", "fcmi_terms", "fcmi_terms_from_embeddings", "joint_histogram", "kl_div",
    "mutual_information", "student_t_assign",
]

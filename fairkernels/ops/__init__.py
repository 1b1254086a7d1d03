"""Public ops: validation, backend choice and autograd wiring, one module per op family."""
from fairkernels.ops.assign import cosine_assign, student_t_assign
from fairkernels.ops.dfc import (batch_centroids, dec_target, dfc_loss, fairness_matrix, fairoid_loss,
                                 fairoid_target, fairoids, kl_div)
from fairkernels.ops.dfc_embeddings import dfc_loss_from_embeddings
from fairkernels.ops.fairoid import fairoid_term
from fairkernels.ops.fcmi import fcmi_loss, fcmi_loss_from_embeddings, fcmi_terms, fcmi_terms_from_embeddings
from fairkernels.ops.histogram import joint_histogram, mutual_information

__all__ = [
    "batch_centroids", "cosine_assign", "dec_target", "dfc_loss", "dfc_loss_from_embeddings", "fairness_matrix", "fairoid_loss",
    "fairoid_target", "fairoid_term", "fairoids", "fcmi_loss", "fcmi_loss_from_embeddings", "fcmi_terms",
    "fcmi_terms_from_embeddings", "joint_histogram", "kl_div", "mutual_information", "student_t_assign",
]

// The one place where fairkernels' operators are declared (TORCH_LIBRARY) and their kernels
// registered per device. Schemas mirror fairkernels/ops/torch_kernels.py: same names, argument
// order and output dtypes ("acc": float64 for float64 input, float32 otherwise).
#include <torch/library.h>

#include "cpu/kernels.h"

TORCH_LIBRARY(fairkernels, m) {
  m.def("fcmi_fwd(Tensor logits, Tensor groups, int num_groups, bool deterministic) -> (Tensor lse, Tensor joint, Tensor ent_sum)");
  m.def("fcmi_bwd(Tensor logits, Tensor groups, Tensor lse, Tensor table, Tensor logc_coef, bool deterministic) -> Tensor");
  m.def("fcmi_emb_fwd(Tensor h, Tensor centers, Tensor groups, int num_groups, float tau, bool deterministic) -> (Tensor lse, Tensor joint, Tensor ent_sum)");
  m.def("fcmi_emb_bwd(Tensor h, Tensor centers, Tensor groups, Tensor lse, Tensor table, Tensor logc_coef, float tau, bool deterministic) -> (Tensor grad_h, Tensor grad_centers)");
  m.def("histogram_fwd(Tensor probs, Tensor groups, Tensor? weights, int num_groups, bool deterministic) -> Tensor");
  m.def("histogram_fwd_checked(Tensor probs, Tensor groups, Tensor? weights, int num_groups, bool deterministic) -> (Tensor joint, Tensor flags)");
  m.def("histogram_bwd(Tensor grad_joint, Tensor groups, Tensor? weights) -> Tensor");
  m.def("student_t_fwd(Tensor z, Tensor centers, float alpha) -> Tensor");
  m.def("student_t_bwd(Tensor grad_q, Tensor q, Tensor z, Tensor centers, float alpha) -> (Tensor, Tensor)");
  m.def("cosine_fwd(Tensor h, Tensor centers, float tau) -> Tensor");
  m.def("cosine_bwd(Tensor grad_c, Tensor c, Tensor h, Tensor centers, float tau) -> (Tensor, Tensor)");
  m.def("dfc_step(Tensor z, Tensor centers, Tensor groups, Tensor target, Tensor? previous, int num_groups, float alpha, float beta, float gamma, float ridge, bool weights_from_q) -> (Tensor loss, Tensor l_cl, Tensor l_fr, Tensor q, Tensor fairoids, Tensor grad_z, Tensor grad_centers)");
  m.def("dfc_loss(Tensor z, Tensor centers, Tensor groups, Tensor target, Tensor? previous, int num_groups, float alpha, float beta, float gamma, float ridge, bool weights_from_q) -> (Tensor loss, Tensor l_cl, Tensor l_fr, Tensor q, Tensor fairoids)");
  m.def("group_offsets(Tensor logits, Tensor groups, int num_groups, int max_iter, float tol) -> Tensor");
  m.def("dec_batch_target(Tensor q, Tensor groups, Tensor? running, Tensor? offsets, float momentum, bool balance, int num_groups, int max_iter, float tol) -> (Tensor target, Tensor frequency, Tensor offsets)");
  m.def("dec_batch_targets(Tensor[] q, Tensor[] groups, Tensor? running, Tensor? offsets, float momentum, bool balance, int num_groups, int max_iter, float tol) -> (Tensor target, Tensor frequency, Tensor offsets)");
  m.def("kmeans_assign(Tensor x, Tensor centers) -> (Tensor labels, Tensor min_sq_dist)");
  m.def("kmeans_step(Tensor x, Tensor centers) -> (Tensor labels, Tensor min_sq_dist, Tensor sums, Tensor counts)");
}

TORCH_LIBRARY_IMPL(fairkernels, CPU, m) {
  m.impl("fcmi_fwd", &fairkernels::cpu::fcmi_fwd);
  m.impl("fcmi_bwd", &fairkernels::cpu::fcmi_bwd);
  m.impl("fcmi_emb_fwd", &fairkernels::cpu::fcmi_emb_fwd);
  m.impl("fcmi_emb_bwd", &fairkernels::cpu::fcmi_emb_bwd);
  m.impl("histogram_fwd", &fairkernels::cpu::histogram_fwd);
  m.impl("histogram_fwd_checked", &fairkernels::cpu::histogram_fwd_checked);
  m.impl("histogram_bwd", &fairkernels::cpu::histogram_bwd);
  m.impl("student_t_fwd", &fairkernels::cpu::student_t_fwd);
  m.impl("student_t_bwd", &fairkernels::cpu::student_t_bwd);
  m.impl("cosine_fwd", &fairkernels::cpu::cosine_fwd);
  m.impl("cosine_bwd", &fairkernels::cpu::cosine_bwd);
  m.impl("dfc_step", &fairkernels::cpu::dfc_step);
  m.impl("group_offsets", &fairkernels::cpu::group_offsets);
  m.impl("dec_batch_target", &fairkernels::cpu::dec_batch_target);
  m.impl("dec_batch_targets", &fairkernels::cpu::dec_batch_targets);
  m.impl("kmeans_assign", &fairkernels::cpu::kmeans_assign);
  m.impl("kmeans_step", &fairkernels::cpu::kmeans_step);
}

// dfc_loss is dfc_step plus its autograd: the plain kernel for any device dfc_step has (CPU, and
// Meta/fake tensors through dfc_step's fake kernel), and a C++ autograd node.
TORCH_LIBRARY_IMPL(fairkernels, CompositeExplicitAutograd, m) {
  m.impl("dfc_loss", &fairkernels::cpu::dfc_loss);
}

TORCH_LIBRARY_IMPL(fairkernels, Autograd, m) {
  m.impl("dfc_loss", &fairkernels::cpu::dfc_loss_autograd);
}

// CUDA kernels (csrc/cuda/*.cu) register here, in a TORCH_LIBRARY_IMPL(fairkernels, CUDA, m)
// block guarded by FAIRKERNELS_WITH_CUDA, when the extension is built with them.

// Built as the Python module fairkernels._C (setup.py, or the JIT build): importing it runs the
// registrations above. TORCH_EXTENSION_NAME is defined only by torch's cpp_extension builds, so
// the CMake/libtorch build has no Python dependency.
#ifdef TORCH_EXTENSION_NAME
#include <Python.h>

#define FAIRKERNELS_CONCAT_(a, b) a##b
#define FAIRKERNELS_CONCAT(a, b) FAIRKERNELS_CONCAT_(a, b)
#define FAIRKERNELS_STR_(a) #a
#define FAIRKERNELS_STR(a) FAIRKERNELS_STR_(a)

static struct PyModuleDef fairkernels_module = {
    PyModuleDef_HEAD_INIT, FAIRKERNELS_STR(TORCH_EXTENSION_NAME),
    "fairkernels C++ kernels; importing registers torch.ops.fairkernels.*", -1, nullptr};

PyMODINIT_FUNC FAIRKERNELS_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&fairkernels_module); }
#endif

// fairkernels::dfc_loss, the DFC clustering loss of a batch with its autograd in C++:
// (loss, l_cl, l_fr, q, fairoids) of dfc_step, where loss = l_cl + gamma * l_fr in z's dtype.
//
// Why C++ autograd: dfc_step already returns both gradients, so the backward is two scalings.
// As a Python torch.autograd.Function the forward and backward bookkeeping cost about as much
// as the kernel itself at DFC's batch of 256 (README, Training speed); here it is one
// dispatcher call forward and one C++ node backward. dfc_step is called through the
// dispatcher, so fake tensors (torch.compile) reach its registered fake kernel.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include "kernels.h"

namespace fairkernels::cpu {
namespace {

DFCStepOutputs call_step(const at::Tensor& z, const at::Tensor& centers, const at::Tensor& groups,
                         const at::Tensor& target, const std::optional<at::Tensor>& previous, int64_t num_groups,
                         double alpha, double beta, double gamma, double ridge, bool weights_from_q) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fairkernels::dfc_step", "")
                       .typed<DFCStepOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double,
                                             double, double, double, bool)>();
  return op.call(z, centers, groups, target, previous, num_groups, alpha, beta, gamma, ridge, weights_from_q);
}

// A CPU scalar 1 that records no graph (the seed of loss.backward()); read without a dispatch.
// Not for a traced backward (torch.compile's fake or functional tensors hold no data).
bool is_plain_one(const at::Tensor& t) {
  const auto keys = t.key_set();
  if (!keys.has(c10::DispatchKey::CPU) || keys.has(c10::DispatchKey::Python) ||
      keys.has(c10::DispatchKey::Functionalize))
    return false;
  if (t.numel() != 1 || t.requires_grad() || !t.has_storage()) return false;
  if (t.scalar_type() == at::kFloat) return *t.const_data_ptr<float>() == 1.0f;
  if (t.scalar_type() == at::kDouble) return *t.const_data_ptr<double>() == 1.0;
  return false;
}

class DFCLossFunction : public torch::autograd::Function<DFCLossFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& z,
                                                const at::Tensor& centers, const at::Tensor& groups,
                                                const at::Tensor& target, const std::optional<at::Tensor>& previous,
                                                int64_t num_groups, double alpha, double beta, double gamma,
                                                double ridge, bool weights_from_q) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, l_cl, l_fr, q, fairoids, grad_z, grad_centers] =
        call_step(z, centers, groups, target, previous, num_groups, alpha, beta, gamma, ridge, weights_from_q);
    ctx->save_for_backward({grad_z, grad_centers});
    ctx->mark_non_differentiable({l_cl, l_fr, q, fairoids});
    return {loss, l_cl, l_fr, q, fairoids};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad_loss = grad_outputs[0];
    at::Tensor grad_z, grad_centers;
    if (grad_loss.defined()) {
      // loss.backward() seeds 1: the saved gradients are the answer. Two multiplications by 1
      // were two more ops (allocations and dispatches) in every narrow DFC step's backward.
      const bool unit = is_plain_one(grad_loss);
      grad_z = unit ? saved[0] : saved[0].mul(grad_loss);
      grad_centers = unit ? saved[1] : saved[1].mul(grad_loss);
    }
    return {grad_z, grad_centers, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

DFCLossOutputs dfc_loss(const at::Tensor& z, const at::Tensor& centers, const at::Tensor& groups,
                        const at::Tensor& target, const std::optional<at::Tensor>& previous, int64_t num_groups,
                        double alpha, double beta, double gamma, double ridge, bool weights_from_q) {
  auto [loss, l_cl, l_fr, q, fairoids, grad_z, grad_centers] =
      call_step(z, centers, groups, target, previous, num_groups, alpha, beta, gamma, ridge, weights_from_q);
  return {loss, l_cl, l_fr, q, fairoids};
}

DFCLossOutputs dfc_loss_autograd(const at::Tensor& z, const at::Tensor& centers, const at::Tensor& groups,
                                 const at::Tensor& target, const std::optional<at::Tensor>& previous,
                                 int64_t num_groups, double alpha, double beta, double gamma, double ridge,
                                 bool weights_from_q) {
  const auto out = DFCLossFunction::apply(z, centers, groups, target, previous, num_groups, alpha, beta, gamma, ridge,
                                          weights_from_q);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace fairkernels::cpu

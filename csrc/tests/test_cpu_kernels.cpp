// ctest of the CPU kernels through the dispatcher (torch.ops.fairkernels.* from C++), on cases
// small enough to check by hand.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <tuple>

namespace {

int failures = 0;

void expect_near(double got, double want, double tol, const char* what) {
  if (!(std::abs(got - want) <= tol)) {
    std::printf("FAIL %s: got %.9g, want %.9g\n", what, got, want);
    ++failures;
  }
}

// Two rows, two clusters, two groups. Row 0: logits (0, 0) -> c = (1/2, 1/2), group 0.
// Row 1: logits (log 3, 0) -> c = (3/4, 1/4), group 1.
void test_fcmi_fwd() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("fairkernels::fcmi_fwd", "")
                .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t, bool)>();
  const at::Tensor logits = torch::tensor({{0.0, 0.0}, {std::log(3.0), 0.0}}, torch::kFloat64);
  const at::Tensor groups = torch::tensor({0, 1}, torch::kInt32);
  auto [lse, joint, ent_sum] = op.call(logits, groups, 2, true);
  expect_near(lse[0].item<double>(), std::log(2.0), 1e-12, "fcmi lse[0]");
  expect_near(lse[1].item<double>(), std::log(4.0), 1e-12, "fcmi lse[1]");
  expect_near(joint[0][0].item<double>(), 0.5, 1e-12, "fcmi joint[0,0]");
  expect_near(joint[0][1].item<double>(), 0.5, 1e-12, "fcmi joint[0,1]");
  expect_near(joint[1][0].item<double>(), 0.75, 1e-12, "fcmi joint[1,0]");
  expect_near(joint[1][1].item<double>(), 0.25, 1e-12, "fcmi joint[1,1]");
  const double want_ent = 2 * 0.5 * std::log(0.5) + 0.75 * std::log(0.75) + 0.25 * std::log(0.25);
  expect_near(ent_sum.item<double>(), want_ent, 1e-12, "fcmi ent_sum");
  if (joint.scalar_type() != at::kDouble) {
    std::printf("FAIL fcmi joint dtype\n");
    ++failures;
  }
}

// J_tk = sum_{g_i = t} w_i P_ik with an absent group (t = 2).
void test_histogram_fwd() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("fairkernels::histogram_fwd", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, bool)>();
  const at::Tensor probs = torch::tensor({{1.0f, 2.0f}, {3.0f, 4.0f}, {5.0f, 6.0f}});
  const at::Tensor groups = torch::tensor({1, 0, 1}, torch::kInt64);
  const at::Tensor joint = op.call(probs, groups, std::nullopt, 3, false);
  const float want[3][2] = {{3, 4}, {6, 8}, {0, 0}};
  for (int t = 0; t < 3; ++t)
    for (int k = 0; k < 2; ++k) expect_near(joint[t][k].item<float>(), want[t][k], 0, "histogram joint");
  const at::Tensor weighted = op.call(probs, groups, torch::tensor({2.0f, 1.0f, 0.5f}), 3, false);
  expect_near(weighted[1][0].item<float>(), 2 * 1 + 0.5 * 5, 1e-6, "weighted histogram joint[1,0]");
}

}  // namespace

int main() {
  test_fcmi_fwd();
  test_histogram_fwd();
  if (failures == 0) std::printf("all CPU kernel checks passed\n");
  return failures == 0 ? 0 : 1;
}

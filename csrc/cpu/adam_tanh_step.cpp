// CPU Adam step in tanh space for Carlini-Wagner L2: the gradient of ||X' - X0||^2 - c * O
// w.r.t. w, the Adam update of w and its moments, and X' = (tanh(w) + 1) / 2 with its L1/L2/Linf
// distance to X0, in one pass.  The body lives in adam_tanh_step_kernel.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"
#include "isa.h"

namespace advfast {
namespace {

#define ADVFAST_KERNEL_BODY "adam_tanh_step_kernel.h"
#include "isa_copies.h"

at::Tensor adam_tanh_step_cpu(at::Tensor w, at::Tensor m, at::Tensor v, at::Tensor x,
                              const at::Tensor& grad, const at::Tensor& x0, const at::Tensor& c,
                              const at::Tensor& step, const std::optional<at::Tensor>& active,
                              double lr, double beta1, double beta2, double eps) {
  check_adam_tanh_args(w, m, v, x, grad, x0, c, step, active, lr, beta1, beta2, eps);
  const int64_t B = w.size(0);
  at::Tensor stats = at::zeros({B, kStepStats}, w.options());
  if (w.numel() == 0) return stats;
  AdamOperands op = adam_operands(w, m, v, x, grad, x0, c, step, active);
  ADVFAST_DISPATCH_FLOATS(grad.scalar_type(), "adam_tanh_step_cpu", [&] {
    ADVFAST_BEST(adam_tanh_step_kernel<scalar_t>)(
        op.w.data_ptr<float>(), op.m.data_ptr<float>(), op.v.data_ptr<float>(),
        op.x.data_ptr<float>(), op.grad.const_data_ptr<scalar_t>(),
        op.x0.const_data_ptr<float>(), op.c.const_data_ptr<float>(),
        op.step.const_data_ptr<int64_t>(), op.active_ptr(), B, w.numel() / B, lr,
        adam_config(beta1, beta2, eps), stats.data_ptr<float>());
  });
  op.write_back(w, m, v, x);
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(advfast, CPU, m) { m.impl("adam_tanh_step_", &adam_tanh_step_cpu); }

}  // namespace advfast

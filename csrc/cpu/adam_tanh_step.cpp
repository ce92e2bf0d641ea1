// CPU entry point of adam_tanh_step_: checks the arguments and the per-sample contents
// (checks.h), lays the operands out flat per sample, then runs the kernel copy for this CPU
// (kernels/adam_tanh_step.cpp).
#include <torch/library.h>

#include "../checks.h"
#include "kernels.h"

namespace advfast {
namespace {

at::Tensor adam_tanh_step_cpu(at::Tensor w, at::Tensor m, at::Tensor v, at::Tensor x,
                              const at::Tensor& grad, const at::Tensor& x0, const at::Tensor& c,
                              const at::Tensor& step, const std::optional<at::Tensor>& active,
                              double lr, double beta1, double beta2, double eps) {
  check_adam_tanh_args(w, m, v, x, grad, x0, c, step, active, lr, beta1, beta2, eps);
  const int64_t B = w.size(0);
  if (w.numel() == 0) return at::zeros({B, kStepStats}, w.options());
  // Every element is written by the kernel.
  at::Tensor stats = at::empty({B, kStepStats}, w.options());
  AdamOperands op = adam_operands(w, m, v, x, grad, x0, c, step, active);
  check_adam_tanh_contents_cpu(op.c, op.step, op.active_ptr());
  ADVFAST_CPU_KERNEL(adam_tanh_step_kernel)(AdamArgs{
      op.w.data_ptr<float>(), op.m.data_ptr<float>(), op.v.data_ptr<float>(),
      op.x.data_ptr<float>(), op.grad.const_data_ptr(), elem_of(grad.scalar_type()),
      op.x0.const_data_ptr<float>(), op.c.const_data_ptr<float>(),
      op.step.const_data_ptr<int64_t>(), op.active_ptr(), B, w.numel() / B, lr,
      adam_config(beta1, beta2, eps), stats.data_ptr<float>()});
  op.write_back(w, m, v, x);
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(advfast, CPU, m) { m.impl("adam_tanh_step_", &adam_tanh_step_cpu); }

}  // namespace advfast

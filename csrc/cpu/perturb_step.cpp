// CPU entry point of perturb_step_: checks the arguments (checks.h), lays the operands out flat
// per sample, then runs the kernel copy for this CPU (kernels/perturb_step.cpp).
#include <torch/library.h>

#include "../checks.h"
#include "kernels.h"

namespace advfast {
namespace {

at::Tensor perturb_step_cpu(at::Tensor x, const at::Tensor& grad, const at::Tensor& x0,
                            const std::optional<at::Tensor>& active, bool sign,
                            std::optional<double> alpha, std::optional<double> beta, double lo,
                            double hi, std::optional<double> eps, bool exact_l1) {
  check_perturb_step_args(x, grad, x0, active, alpha, beta, lo, hi, eps, exact_l1);
  const int64_t B = x.size(0);
  if (x.numel() == 0) return at::zeros({B, kStepStats}, x.options());
  // Every element is written by the kernel.
  at::Tensor stats = at::empty({B, kStepStats}, x.options());
  const StepOperands op = step_operands(x, grad, x0, active);
  ADVFAST_CPU_KERNEL(perturb_step_kernel)(StepArgs{
      op.x.data_ptr<float>(), op.grad.const_data_ptr(), elem_of(grad.scalar_type()),
      op.x0.const_data_ptr<float>(), op.active.defined() ? op.active.const_data_ptr<bool>() : nullptr,
      B, op.per_sample, sign, beta.has_value(), eps.has_value(), exact_l1,
      static_cast<float>(alpha.value_or(0.0)), static_cast<float>(beta.value_or(0.0)),
      static_cast<float>(lo), static_cast<float>(hi), static_cast<float>(eps.value_or(0.0)),
      stats.data_ptr<float>()});
  if (!op.x.is_same(x)) x.copy_(op.x);
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(advfast, CPU, m) { m.impl("perturb_step_", &perturb_step_cpu); }

}  // namespace advfast

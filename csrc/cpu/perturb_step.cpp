// CPU fused step: P = sign(grad) or grad -> per-sample scale -> box clip -> eps ball, plus the
// L1/L2/Linf of x - x0, in one pass over x and x0 (and a first pass over grad for sum|P| in the
// equal perturbation rule).  The body lives in perturb_step_kernel.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"
#include "isa.h"

namespace advfast {
namespace {

#define ADVFAST_KERNEL_BODY "perturb_step_kernel.h"
#include "isa_copies.h"

at::Tensor perturb_step_cpu(at::Tensor x, const at::Tensor& grad, const at::Tensor& x0,
                            const std::optional<at::Tensor>& active, bool sign,
                            std::optional<double> alpha, std::optional<double> beta, double lo,
                            double hi, std::optional<double> eps) {
  check_perturb_step_args(x, grad, x0, active, alpha, beta, lo, hi, eps);
  const int64_t B = x.size(0);
  at::Tensor stats = at::zeros({B, kStepStats}, x.options());
  if (x.numel() == 0) return stats;
  const StepOperands op = step_operands(x, grad, x0, active);
  const int64_t N = op.per_sample;
  const bool* active_ptr = op.active.defined() ? op.active.const_data_ptr<bool>() : nullptr;
  ADVFAST_DISPATCH_FLOATS(
      grad.scalar_type(), "perturb_step_cpu", [&] {
        auto run = [&](auto sign_tag) {
          constexpr bool SIGN = decltype(sign_tag)::value;
          ADVFAST_BEST(perturb_step_kernel<SIGN, scalar_t>)(
              op.x.data_ptr<float>(), op.grad.const_data_ptr<scalar_t>(),
              op.x0.const_data_ptr<float>(), active_ptr, B, N, beta.has_value(),
              static_cast<float>(alpha.value_or(0.0)), static_cast<float>(beta.value_or(0.0)),
              static_cast<float>(lo), static_cast<float>(hi), eps.has_value(),
              static_cast<float>(eps.value_or(0.0)), stats.data_ptr<float>());
        };
        if (sign) {
          run(std::true_type{});
        } else {
          run(std::false_type{});
        }
      });
  if (!op.x.is_same(x)) x.copy_(op.x);
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(advfast, CPU, m) { m.impl("perturb_step_", &perturb_step_cpu); }

std::string cpu_isa() { return cpu_isa_name(); }

}  // namespace advfast

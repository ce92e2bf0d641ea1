// CPU fused step: P = sign(grad) or grad -> per-sample scale -> box clip -> eps ball, plus the
// L1/L2/Linf of x - x0, in one pass over x and x0 (and a first pass over grad for sum|P| in the
// equal perturbation rule).  The body lives in perturb_step_kernel.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <string_view>
#include <vector>

#include "../checks.h"
#include "isa.h"

namespace advfast {
namespace {

// The kernel body, once per instruction set.  Each copy is auto-vectorised for its ISA.
namespace isa_default {
#include "perturb_step_kernel.h"
}  // namespace isa_default

#ifdef ADVFAST_X86_DISPATCH
#pragma GCC push_options
#pragma GCC target("avx2")
namespace isa_avx2 {
#include "perturb_step_kernel.h"
}  // namespace isa_avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2")
namespace isa_avx512 {
#include "perturb_step_kernel.h"
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

template <bool SIGN, typename g_t>
void perturb_step_best(float* x, const g_t* g, const float* x0, const bool* active, int64_t B,
                       int64_t N, bool equal_perturbation, float alpha, float beta, float lo,
                       float hi, bool use_eps, float eps, float* stats) {
  auto* kernel = &isa_default::perturb_step_kernel<SIGN, g_t>;
#ifdef ADVFAST_X86_DISPATCH
  const std::string_view isa = cpu_isa_name();
  if (isa == "avx512") kernel = &isa_avx512::perturb_step_kernel<SIGN, g_t>;
  if (isa == "avx2") kernel = &isa_avx2::perturb_step_kernel<SIGN, g_t>;
#endif
  kernel(x, g, x0, active, B, N, equal_perturbation, alpha, beta, lo, hi, use_eps, eps, stats);
}

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "perturb_step_cpu",
                                  [&] {
                                    auto run = [&](auto sign_tag) {
                                      perturb_step_best<decltype(sign_tag)::value>(
                                          op.x.data_ptr<float>(), op.grad.const_data_ptr<scalar_t>(),
                                          op.x0.const_data_ptr<float>(),
                                          op.active.defined() ? op.active.const_data_ptr<bool>() : nullptr, B,
                                          N, beta.has_value(),
                                          static_cast<float>(alpha.value_or(0.0)),
                                          static_cast<float>(beta.value_or(0.0)),
                                          static_cast<float>(lo), static_cast<float>(hi),
                                          eps.has_value(), static_cast<float>(eps.value_or(0.0)),
                                          stats.data_ptr<float>());
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

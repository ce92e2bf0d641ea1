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
  const bool shared = shares_flat_sample_layout({&w, &m, &v, &x, &grad, &x0});
  at::Tensor fw = flat(w, shared), fm = flat(m, shared), fv = flat(v, shared),
             fx = flat(x, shared);
  const at::Tensor fg = flat(grad, shared), fx0 = flat(x0, shared), fc = c.contiguous(),
                   ft = step.contiguous();
  const at::Tensor act = active.has_value() ? active->contiguous() : at::Tensor();
  const AdamConfig cfg{static_cast<float>(beta1), static_cast<float>(beta2),
                       static_cast<float>(eps)};
  ADVFAST_DISPATCH_FLOATS(grad.scalar_type(), "adam_tanh_step_cpu", [&] {
    ADVFAST_BEST(adam_tanh_step_kernel<scalar_t>)(
        fw.data_ptr<float>(), fm.data_ptr<float>(), fv.data_ptr<float>(), fx.data_ptr<float>(),
        fg.const_data_ptr<scalar_t>(), fx0.const_data_ptr<float>(), fc.const_data_ptr<float>(),
        ft.const_data_ptr<int64_t>(), act.defined() ? act.const_data_ptr<bool>() : nullptr, B,
        w.numel() / B, lr, cfg, stats.data_ptr<float>());
  });
  for (auto [out, used] : {std::pair{&w, &fw}, std::pair{&m, &fm}, std::pair{&v, &fv},
                           std::pair{&x, &fx}}) {
    if (!used->is_same(*out)) out->copy_(*used);
  }
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(advfast, CPU, m) { m.impl("adam_tanh_step_", &adam_tanh_step_cpu); }

}  // namespace advfast

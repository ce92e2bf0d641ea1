// CPU entry point of loss_head: checks the arguments (checks.h), then runs the kernel copy for
// this CPU (kernels/loss_head.cpp).
#include <torch/library.h>

#include "../checks.h"
#include "kernels.h"

namespace advfast {
namespace {

void check_indices_cpu(const at::Tensor& idx, int64_t M, const char* name) {
  const int64_t* p = idx.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < idx.numel(); ++b) {
    TORCH_CHECK_INDEX(p[b] >= 0 && p[b] < M, "advfast.loss_head: ", name, "[", b, "] = ", p[b],
                      " is outside [0, ", M, ")");
  }
}

std::tuple<at::Tensor, at::Tensor> loss_head_cpu(const at::Tensor& logits,
                                                 const at::Tensor& target,
                                                 const at::Tensor& source, c10::string_view loss,
                                                 double kappa, c10::string_view kappa_mode,
                                                 double threshold, c10::string_view ce_seed) {
  check_loss_head_args(logits, target, source, kappa, threshold);
  const Loss loss_code = parse_loss(loss);
  const CeSeed seed_mode = parse_ce_seed(ce_seed);
  const KappaMode mode = parse_kappa_mode(kappa_mode);
  auto [seed, stats] = empty_head_outputs(logits);
  if (logits.size(0) == 0) return {seed, stats};
  const at::Tensor t = target.contiguous();
  const at::Tensor s = source.contiguous();
  check_indices_cpu(t, logits.size(1), "target");
  check_indices_cpu(s, logits.size(1), "source");
  ADVFAST_CPU_KERNEL(loss_head_kernel)(HeadArgs{
      logits.const_data_ptr(), elem_of(logits.scalar_type()), logits.stride(0), logits.stride(1),
      logits.size(0), logits.size(1), t.const_data_ptr<int64_t>(), s.const_data_ptr<int64_t>(),
      seed.data_ptr<float>(), stats.data_ptr<float>(), loss_code, static_cast<float>(kappa),
      mode, static_cast<float>(threshold), seed_mode});
  return {seed, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(advfast, CPU, m) { m.impl("loss_head", &loss_head_cpu); }

}  // namespace advfast

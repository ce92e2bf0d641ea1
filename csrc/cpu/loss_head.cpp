// CPU loss head: per row, one reading pass (online softmax, argmax, runner-up c*), then the
// seed row; parallel over rows.  The body lives in loss_head_kernel.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../checks.h"
#include "isa.h"

namespace advfast {
namespace {

#define ADVFAST_KERNEL_BODY "loss_head_kernel.h"
#include "isa_copies.h"

void check_indices_cpu(const at::Tensor& idx, int64_t M, const char* name) {
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t b = 0; b < idx.numel(); ++b) {
    TORCH_CHECK_INDEX(p[b] >= 0 && p[b] < M, "advfast.loss_head: ", name, "[", b, "] = ", p[b],
                      " is outside [0, ", M, ")");
  }
}

std::tuple<at::Tensor, at::Tensor> loss_head_cpu(const at::Tensor& logits,
                                                 const at::Tensor& target,
                                                 const at::Tensor& source, c10::string_view loss,
                                                 double kappa, c10::string_view kappa_mode,
                                                 double threshold) {
  check_loss_head_args(logits, target, source, kappa, threshold);
  const Loss loss_code = parse_loss(loss);
  const KappaMode mode = parse_kappa_mode(kappa_mode);
  const int64_t B = logits.size(0);
  const int64_t M = logits.size(1);
  auto [seed, stats] = empty_head_outputs(logits);
  if (B == 0) return {seed, stats};
  const at::Tensor t = target.contiguous();
  const at::Tensor s = source.contiguous();
  check_indices_cpu(t, M, "target");
  check_indices_cpu(s, M, "source");
  ADVFAST_DISPATCH_FLOATS(logits.scalar_type(), "loss_head_cpu",
                                  [&] {
                                    ADVFAST_BEST(loss_head_rows<scalar_t>)(
                                        logits.const_data_ptr<scalar_t>(), logits.stride(0),
                                        logits.stride(1), t.const_data_ptr<int64_t>(),
                                        s.const_data_ptr<int64_t>(), seed.data_ptr<float>(),
                                        stats.data_ptr<float>(), B, M, loss_code,
                                        static_cast<float>(kappa), mode,
                                        static_cast<float>(threshold));
                                  });
  return {seed, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(advfast, CPU, m) { m.impl("loss_head", &loss_head_cpu); }

}  // namespace advfast

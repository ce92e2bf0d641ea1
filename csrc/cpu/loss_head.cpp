// CPU loss head: per row, one reading pass (online softmax, argmax, runner-up c*), then the
// seed row.  Parallel over rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"

namespace advfast {
namespace {

template <typename scalar_t>
void loss_head_rows(const scalar_t* logits, int64_t s0, int64_t s1, const int64_t* target,
                    const int64_t* source, float* seed, float* stats, int64_t B, int64_t M,
                    Loss loss, float kappa, KappaMode mode, float threshold) {
  const int64_t grain = std::max<int64_t>(1, 32768 / M);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* row = logits + b * s0;
      const int64_t c = target[b];
      OnlineSoftmax sm{kNegInf, 0.f};
      ArgMax best{kNegInf, -1};
      ArgMax runner_up{kNegInf, -1};
      for (int64_t i = 0; i < M; ++i) {
        const float v = static_cast<float>(row[i * s1]);
        sm = softmax_push(sm, v);
        best = argmax_push(best, v, i);
        if (i != c) runner_up = argmax_push(runner_up, v, i);
      }
      const float target_logit = static_cast<float>(row[c * s1]);
      const float source_logit = static_cast<float>(row[source[b] * s1]);
      float* st = stats + b * kHeadStats;
      write_head_stats(st, sm, best, runner_up, target_logit, source_logit, c, threshold);
      const float w = kappa_weight(st[7], kappa, mode);
      float* out = seed + b * M;
      for (int64_t i = 0; i < M; ++i) {
        out[i] = seed_of(loss, static_cast<float>(row[i * s1]), i, c, runner_up.index, w, sm);
      }
    }
  });
}

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
  check_loss_head_args(logits, target, source);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "loss_head_cpu",
                                  [&] {
                                    loss_head_rows<scalar_t>(
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

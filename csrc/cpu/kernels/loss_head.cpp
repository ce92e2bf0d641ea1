// CPU loss head, one translation unit compiled once per capability (kernels.h): per row, one
// reading pass keeps kLanes independent running states (maximum, argmax, runner-up c*) that
// the compiler vectorises; the lanes merge with ties going to the smaller index, so the result
// is torch.argmax's first maximum.  A second pass takes the softmax terms against that maximum
// into the seed row (one exp per logit, where an online softmax takes two and more to merge its
// lanes), a third finishes the seed.  Parallel over rows.
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>

#include "../kernels.h"
#include "../capability.h"
#include "../sample_chunks.h"

namespace advfast {
namespace ADVFAST_CPU_NS {
namespace {

// The row's maximum (NaN aside, as softmax_push keeps it), argmax and runner-up c*: kLanes
// independent running states, merged with ties going to the smaller index.  No exp here: the
// softmax terms are taken once, against the final maximum (softmax_terms).
template <typename scalar_t>
void reduce_row(const scalar_t* __restrict__ row, int64_t s1, int64_t M, int64_t c,
                float* max_out, ArgMax* best_out, ArgMax* runner_out) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float m[kLanes], bv[kLanes], rv[kLanes];
  int32_t bi[kLanes], ri[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    m[l] = bv[l] = rv[l] = kNegInf;
    bi[l] = ri[l] = -1;
  }
  for_each_lane(M, [&](int64_t i, int l) {
    const float v = static_cast<float>(row[i * s1]);
    m[l] = v > m[l] ? v : m[l];
    const int32_t idx = static_cast<int32_t>(i);
    // Bitwise, not short-circuit, operators: no branches in the lane loop.  A lane sees its
    // elements in increasing index, so a tie keeps the earlier one.
    const bool take = ranks_above(v, bv[l]) | (bi[l] < 0);
    bv[l] = take ? v : bv[l];
    bi[l] = take ? idx : bi[l];
    const bool take_r = (i != c) & (ranks_above(v, rv[l]) | (ri[l] < 0));
    rv[l] = take_r ? v : rv[l];
    ri[l] = take_r ? idx : ri[l];
  });
  float mx = kNegInf;
  ArgMax best{kNegInf, -1}, runner{kNegInf, -1};
  for (int l = 0; l < kLanes; ++l) {
    mx = m[l] > mx ? m[l] : mx;
    best = argmax_merge(best, ArgMax{bv[l], bi[l]});
    runner = argmax_merge(runner, ArgMax{rv[l], ri[l]});
  }
  *max_out = mx;
  *best_out = best;
  *runner_out = runner;
}

// The softmax terms exp(g_i - max) into out (the seed row, which write_seed finishes) and
// their sum: one exp per logit.
template <typename scalar_t>
OnlineSoftmax softmax_terms(const scalar_t* __restrict__ row, int64_t s1, int64_t M, float max,
                            float* __restrict__ out) {
  float acc[kLanes] = {};
  for_each_lane(M, [&](int64_t i, int l) {
    const float term = softmax_term(static_cast<float>(row[i * s1]), max);
    out[i] = term;
    acc[l] += term;
  });
  float sum = 0.f;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  return OnlineSoftmax{max, sum};
}

// CeSeed::EXACT's target element: the sum of the other classes' probabilities, from a seed row
// that holds -p_i everywhere (the target's own element is left out).
inline float others_sum(const float* __restrict__ out, int64_t M, int64_t c) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= M; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] -= (i + l == c) ? 0.f : out[i + l];
  }
  for (int l = 0; i < M; ++i, ++l) acc[l] -= i == c ? 0.f : out[i];
  float total = 0.f;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

// The seed row, one loop per loss so that each is a plain vectorisable loop.
template <typename scalar_t>
void write_seed(const scalar_t* __restrict__ row, int64_t s1, int64_t M, int64_t c,
                int64_t runner_up, Loss loss, float w, OnlineSoftmax sm, CeSeed ce_seed,
                float* __restrict__ out) {
  switch (loss) {
    case Loss::CE: {
      // seed_of's formula, with the one-hot term added at the target alone; out holds the
      // softmax terms (softmax_terms).
      const float inv = inverse_sum(sm);
      for (int64_t i = 0; i < M; ++i) out[i] = -out[i] * inv;
      out[c] = ce_seed == CeSeed::EXACT
                   ? others_sum(out, M, c)
                   : seed_of(loss, static_cast<float>(row[c * s1]), c, c, runner_up, w, sm);
      break;
    }
    case Loss::LOGIT:
    case Loss::M_LOGIT:
      for (int64_t i = 0; i < M; ++i) out[i] = 0.f;
      out[c] = seed_of(loss, 0.f, c, c, runner_up, w, sm);
      if (loss == Loss::M_LOGIT) out[runner_up] = seed_of(loss, 0.f, runner_up, c, runner_up, w, sm);
      break;
  }
}

template <typename scalar_t>
void loss_head_rows(const scalar_t* logits, const HeadArgs& a) {
  const int64_t s0 = a.s0, s1 = a.s1, M = a.M;
  const int64_t grain = std::max<int64_t>(1, 32768 / M);
  at::parallel_for(0, a.B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* row = logits + b * s0;
      const int64_t c = a.target[b];
      float max;
      ArgMax best, runner_up;
      reduce_row(row, s1, M, c, &max, &best, &runner_up);
      float* seed = a.seed + b * M;
      const OnlineSoftmax sm = softmax_terms(row, s1, M, max, seed);
      float* st = a.stats + b * kHeadStats;
      write_head_stats(st, sm, best, runner_up, static_cast<float>(row[c * s1]),
                       static_cast<float>(row[a.source[b] * s1]), c, a.threshold);
      write_seed(row, s1, M, c, runner_up.index, a.loss, kappa_weight(st[kMargin], a.kappa, a.mode),
                 sm, a.ce_seed, seed);
    }
  });
}

}  // namespace

void loss_head_kernel(const HeadArgs& a) {
  with_elem(a.elem, a.logits, [&](const auto* logits) { loss_head_rows(logits, a); });
}

}  // namespace ADVFAST_CPU_NS
}  // namespace advfast

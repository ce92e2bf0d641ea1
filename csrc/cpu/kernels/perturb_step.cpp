// CPU fused step, one translation unit compiled once per capability (kernels.h): P = sign(grad)
// or grad -> per-sample scale -> box clip -> eps ball, plus the L1/L2/Linf of x - x0, in one
// pass over x and x0 (and a first pass over grad for sum|P| in the equal perturbation rule).
// Work is split into fixed chunks of every sample (sample_chunks.h), so results do not depend
// on the thread count; lanes of partial sums let the compiler vectorise the reductions.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../kernels.h"
#include "../capability.h"
#include "../sample_chunks.h"

namespace advfast {
namespace ADVFAST_CPU_NS {
namespace {

template <bool SIGN, typename g_t>
inline float perturbation(g_t g) {
  return perturbation_of<SIGN>(static_cast<float>(g));
}

template <bool SIGN, typename g_t>
float abs_sum(const g_t* __restrict__ g, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += std::fabs(perturbation<SIGN>(g[i + l]));
  }
  for (int l = 0; i < n; ++i, ++l) acc[l] += std::fabs(perturbation<SIGN>(g[i]));
  float total = 0.f;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

// One chunk of the update.  DIVIDE is the rare denormal-sum path of step_scale; EPS the
// optional Linf ball; SUM_P whether sum|P| is still to be taken (the equal multiplier rule).
// All are template parameters so the hot loop has no branches.
template <bool SIGN, bool DIVIDE, bool EPS, bool SUM_P, typename g_t>
Partial update_chunk(float* __restrict__ x, const g_t* __restrict__ g,
                     const float* __restrict__ x0, int64_t n, StepScale st, float p_l1, float lo,
                     float hi, float eps) {
  Lanes acc;
  const float scale = st.scale;
  auto element = [&](int64_t i, int l) {
    const float p = perturbation<SIGN>(g[i]);
    const float step = DIVIDE ? scale * (p / p_l1) : scale * p;
    const float v = updated_value(x[i], step, x0[i], lo, hi, EPS, eps);
    x[i] = v;
    acc.add(l, SUM_P ? std::fabs(p) : 0.f, v - x0[i]);
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) element(i + l, l);
  }
  for (int l = 0; i < n; ++i, ++l) element(i, l);
  return acc.total();
}

template <bool SIGN, bool SUM_P, typename g_t>
Partial update_chunk_dispatch(float* x, const g_t* g, const float* x0, int64_t n, StepScale st,
                              float p_l1, float lo, float hi, bool use_eps, float eps) {
  if (st.divide_each) {
    return use_eps ? update_chunk<SIGN, true, true, SUM_P>(x, g, x0, n, st, p_l1, lo, hi, eps)
                   : update_chunk<SIGN, true, false, SUM_P>(x, g, x0, n, st, p_l1, lo, hi, eps);
  }
  return use_eps ? update_chunk<SIGN, false, true, SUM_P>(x, g, x0, n, st, p_l1, lo, hi, eps)
                 : update_chunk<SIGN, false, false, SUM_P>(x, g, x0, n, st, p_l1, lo, hi, eps);
}

template <bool SIGN, typename g_t>
void perturb_step_rows(const g_t* g, const StepArgs& a) {
  const int64_t B = a.B, N = a.N;
  float* x = a.x;
  const float* x0 = a.x0;
  const bool* active = a.active;
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  std::vector<Partial> partial(B * chunks);
  std::vector<float> p_l1(B, 0.f);
  if (a.equal_perturbation) {
    at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        int64_t b, begin, n;
        chunk_range(task, chunks, N, &b, &begin, &n);
        partial[task].v[kPL1] =
            (active == nullptr || active[b]) ? abs_sum<SIGN>(g + begin, n) : 0.f;
      }
    });
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t k = 0; k < chunks; ++k) p_l1[b] += partial[b * chunks + k].v[kPL1];
    }
  }
  update_chunks(B, N, chunks, active, x, x0, partial.data(), [&](int64_t b, int64_t begin,
                                                                 int64_t n) {
    const StepScale st = step_scale(a.equal_perturbation, a.alpha, a.beta, p_l1[b]);
    return a.equal_perturbation
               ? update_chunk_dispatch<SIGN, false>(x + begin, g + begin, x0 + begin, n, st,
                                                    p_l1[b], a.lo, a.hi, a.use_eps, a.eps)
               : update_chunk_dispatch<SIGN, true>(x + begin, g + begin, x0 + begin, n, st,
                                                   p_l1[b], a.lo, a.hi, a.use_eps, a.eps);
  });
  combine_chunks(partial.data(), B, chunks, a.stats);
  if (a.equal_perturbation) {
    for (int64_t b = 0; b < B; ++b) a.stats[b * kStepStats + kPL1] = p_l1[b];
  }
}

}  // namespace

void perturb_step_kernel(const StepArgs& a) {
  with_elem(a.elem, a.grad, [&](const auto* g) {
    if (a.sign) {
      perturb_step_rows<true>(g, a);
    } else {
      perturb_step_rows<false>(g, a);
    }
  });
}

}  // namespace ADVFAST_CPU_NS
}  // namespace advfast

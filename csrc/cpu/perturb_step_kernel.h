// Body of the CPU fused step, compiled once per instruction set: csrc/cpu/perturb_step.cpp
// includes this file inside one namespace per ISA under `#pragma GCC target`, and picks one at
// run time.  No include guard on purpose; it declares nothing outside its enclosing namespace.
//
// Work is split into fixed chunks of every sample (sample_chunks.h), so results do not depend
// on the thread count; lanes of partial sums let the compiler vectorise the reductions.

#include "sample_chunks.h"

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
void perturb_step_kernel(float* x, const g_t* g, const float* x0, const bool* active, int64_t B,
                         int64_t N, bool equal_perturbation, float alpha, float beta, float lo,
                         float hi, bool use_eps, float eps, float* stats) {
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  std::vector<Partial> partial(B * chunks);
  std::vector<float> p_l1(B, 0.f);
  if (equal_perturbation) {
    at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        int64_t b, begin, n;
        chunk_range(task, chunks, N, &b, &begin, &n);
        partial[task].v[0] = (active == nullptr || active[b]) ? abs_sum<SIGN>(g + begin, n) : 0.f;
      }
    });
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t k = 0; k < chunks; ++k) p_l1[b] += partial[b * chunks + k].v[0];
    }
  }
  update_chunks(B, N, chunks, active, x, x0, partial.data(), [&](int64_t b, int64_t begin,
                                                                 int64_t n) {
    const StepScale st = step_scale(equal_perturbation, alpha, beta, p_l1[b]);
    return equal_perturbation
               ? update_chunk_dispatch<SIGN, false>(x + begin, g + begin, x0 + begin, n, st,
                                                    p_l1[b], lo, hi, use_eps, eps)
               : update_chunk_dispatch<SIGN, true>(x + begin, g + begin, x0 + begin, n, st,
                                                   p_l1[b], lo, hi, use_eps, eps);
  });
  combine_chunks(partial.data(), B, chunks, stats);
  if (equal_perturbation) {
    for (int64_t b = 0; b < B; ++b) stats[b * kStepStats] = p_l1[b];
  }
}

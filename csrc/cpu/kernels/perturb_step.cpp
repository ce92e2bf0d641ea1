// CPU fused step, one translation unit compiled once per capability (kernels.h): P = sign(grad)
// or grad -> per-sample scale -> box clip -> eps ball, plus the L1/L2/Linf of x - x0 and the L1
// the step added, in one pass over x and x0 (and a first pass over grad for sum|P| in the
// equal perturbation rule, per sample just before its update where that idles no thread).
// exact_l1: the exact equal perturbation of advfast_math.h, read-only passes for Newton's method
// on the scale, then one update pass.
// Work is split into fixed chunks of every sample (sample_chunks.h), so results do not depend
// on the thread count; lanes of partial sums let the compiler vectorise the reductions.  The
// AVX512 copy runs float gradients through perturb_step_avx512.h's intrinsics instead: the same
// bits in fewer instructions.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../kernels.h"
#if defined(ADVFAST_X86_DISPATCH)
#include <immintrin.h>
#endif
#include "../capability.h"
#include "../sample_chunks.h"
#if ADVFAST_CPU_AVX512
#include "../perturb_step_avx512.h"
#endif

namespace advfast {
namespace ADVFAST_CPU_NS {
namespace {

template <bool SIGN, typename g_t>
inline float perturbation(g_t g) {
  return perturbation_of<SIGN>(static_cast<float>(g));
}

template <bool SIGN, typename g_t>
inline float abs_perturbation(g_t g) {
  const float v = static_cast<float>(g);
  return SIGN ? finite_sign_abs(v) : std::fabs(finite_or_zero(v));
}

template <bool SIGN, typename g_t>
float abs_sum(const g_t* __restrict__ g, int64_t n) {
#if ADVFAST_CPU_AVX512
  if constexpr (std::is_same_v<g_t, float>) return abs_sum_avx512<SIGN>(g, n);
#endif
  float acc[kSumLanes] = {};
  for_each_lane<kSumLanes>(n, [&](int64_t i, int l) { acc[l] += abs_perturbation<SIGN>(g[i]); });
  float total = 0.f;
  for (int l = 0; l < kSumLanes; ++l) total += acc[l];
  return total;
}

// One chunk of the update.  DIVIDE is the rare denormal-sum path of step_scale; EPS the
// optional Linf ball; SUM_P whether sum|P| is still to be taken (the equal multiplier rule).
// All are template parameters so the hot loop has no branches.
template <bool SIGN, bool DIVIDE, bool EPS, bool SUM_P, typename g_t>
Partial update_chunk(float* __restrict__ x, const g_t* __restrict__ g,
                     const float* __restrict__ x0, int64_t n, StepScale st, float p_l1, float lo,
                     float hi, float eps) {
#if ADVFAST_CPU_AVX512
  // (the rare divide-each scale stays on the generic loop)
  if constexpr (!DIVIDE && std::is_same_v<g_t, float>) {
    return update_avx512<SIGN, EPS, SUM_P>(x, g, x0, n, st.scale, lo, hi, eps);
  }
#endif
  Lanes acc;
  const float scale = st.scale;
  // With the sign every step is +-(scale * (1 / p_l1)) or +-scale: the same bits as
  // scale * (p / p_l1) and scale * p for p = +-1, with the magnitude out of the loop.
  const float magnitude = DIVIDE ? scale * (1.f / p_l1) : scale;
  auto element = [&](int64_t i, int l) {
    const float gv = static_cast<float>(g[i]);
    float step, p_abs = 0.f;
    if (SIGN) {
      step = signed_step(gv, magnitude);
      if (SUM_P) p_abs = finite_sign_abs(gv);
    } else {
      const float p = finite_or_zero(gv);
      step = DIVIDE ? scale * (p / p_l1) : scale * p;
      if (SUM_P) p_abs = std::fabs(p);
    }
    const float old = x[i];
    const float v = updated_value(old, step, x0[i], lo, hi, EPS, eps);
    x[i] = v;
    acc.add(l, p_abs, v - x0[i], std::fabs(v - old));
  };
  for_each_lane(n, element);
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

// One chunk of the step, [begin, begin + n), under its sample's sum|P| (read by the equal
// perturbation rule only).
template <bool SIGN, typename g_t>
Partial step_chunk(const g_t* g, const StepArgs& a, int64_t begin, int64_t n, float p_l1) {
  const StepScale st = step_scale(a.equal_perturbation, a.alpha, a.beta, p_l1);
  float* x = a.x + begin;
  const float* x0 = a.x0 + begin;
  return a.equal_perturbation
             ? update_chunk_dispatch<SIGN, false>(x, g + begin, x0, n, st, p_l1, a.lo, a.hi,
                                                  a.use_eps, a.eps)
             : update_chunk_dispatch<SIGN, true>(x, g + begin, x0, n, st, p_l1, a.lo, a.hi,
                                                 a.use_eps, a.eps);
}

// sum|P| of every active sample, chunk by chunk in parallel, then combined in order.
template <bool SIGN, typename g_t>
void sample_abs_sums(const g_t* g, const StepArgs& a, int64_t chunks, Partial* partial,
                     float* p_l1) {
  at::parallel_for(0, a.B * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      int64_t b, begin, n;
      chunk_range(task, chunks, a.N, &b, &begin, &n);
      partial[task].v[kPL1] =
          (a.active == nullptr || a.active[b]) ? abs_sum<SIGN>(g + begin, n) : 0.f;
    }
  });
  for (int64_t b = 0; b < a.B; ++b) {
    for (int64_t k = 0; k < chunks; ++k) p_l1[b] += partial[b * chunks + k].v[kPL1];
  }
}

// The equal perturbation rule one sample per task: its sum|P| chunk by chunk, then its update,
// back to back, so that the update reads the gradient from cache instead of a second time from
// memory.  The same operations on the same values, in the same order, as the two parallel passes.
template <bool SIGN, typename g_t>
void per_sample_steps(const g_t* g, const StepArgs& a, int64_t chunks, Partial* partial,
                      float* p_l1) {
  at::parallel_for(0, a.B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const bool active = a.active == nullptr || a.active[b];
      for (int64_t k = 0; active && k < chunks; ++k) {
        int64_t sample, begin, n;
        chunk_range(b * chunks + k, chunks, a.N, &sample, &begin, &n);
        p_l1[b] += abs_sum<SIGN>(g + begin, n);
      }
      for (int64_t k = 0; k < chunks; ++k) {
        int64_t sample, begin, n;
        chunk_range(b * chunks + k, chunks, a.N, &sample, &begin, &n);
        partial[b * chunks + k] = active ? step_chunk<SIGN>(g, a, begin, n, p_l1[b])
                                         : delta_chunk(a.x + begin, a.x0 + begin, n);
      }
    }
  });
}

template <bool SIGN, typename g_t>
void perturb_step_rows(const g_t* g, const StepArgs& a) {
  const int64_t chunks = (a.N + kChunk - 1) / kChunk;
  std::vector<Partial> partial(a.B * chunks);
  std::vector<float> p_l1(a.B, 0.f);
  // One task per sample when that leaves no thread idle (or a sample is a single chunk anyway).
  if (a.equal_perturbation && (chunks == 1 || a.B >= at::get_num_threads())) {
    per_sample_steps<SIGN>(g, a, chunks, partial.data(), p_l1.data());
  } else {
    if (a.equal_perturbation) sample_abs_sums<SIGN>(g, a, chunks, partial.data(), p_l1.data());
    update_chunks(a.B, a.N, chunks, a.active, a.x, a.x0, partial.data(),
                  [&](int64_t b, int64_t begin, int64_t n) {
                    return step_chunk<SIGN>(g, a, begin, n, p_l1[b]);
                  });
  }
  combine_chunks(partial.data(), a.B, chunks, a.stats);
  if (a.equal_perturbation) {
    for (int64_t b = 0; b < a.B; ++b) a.stats[b * kStepStats + kPL1] = p_l1[b];
  }
}

// ---- exact_l1 ------------------------------------------------------------------------------

// One evaluation of the exact rule's f(a) and slope over a chunk (advfast_math.h) and, on the
// first (a = 0), sum|P| and the total room.  Float lanes over short blocks, blocks summed in
// double: the Newton step is only as good as f.
struct ExactEval {
  double f = 0, slope = 0, p_l1 = 0, room = 0;
};

// The room of element i and its u in the rule's units: room_of spelled out in forms GCC
// vectorises (a comparison with a constant in the loop defeats it).  p = 0 has no room; only the
// first pass's total room needs that said, u = 0 adds nothing to f or its slope.
template <bool SIGN, bool DIVIDE, bool EPS, bool FIRST, typename g_t>
inline __attribute__((always_inline)) void exact_element(const float* __restrict__ x,
                                                         const g_t* __restrict__ g,
                                                         const float* __restrict__ x0,
                                                         int64_t i, float s, float lo, float hi,
                                                         float eps, float* q, float* u,
                                                         float* room) {
  const float p = perturbation<SIGN>(g[i]);
  *q = std::fabs(p);
  float lo_b = lo, hi_b = hi;
  if (EPS) {
    const float below = x0[i] - eps, above = x0[i] + eps;
    lo_b = below > lo ? below : lo;
    hi_b = above < hi ? above : hi;
  }
  const float xi = x[i];
  const float r = std::max(0.f, p > 0.f ? hi_b - xi : xi - lo_b);  // NaN -> 0
  *room = FIRST ? (*q > 0.f ? r : 0.f) : r;
  *u = DIVIDE ? *q / s : *q;
}

// Kept out of interprocedural optimisation: with the first pass's a = 0 folded in as a
// constant, GCC no longer vectorises the slope's select.
#if defined(__GNUC__) && !defined(__clang__)
#define ADVFAST_OPAQUE __attribute__((noipa))
#else
#define ADVFAST_OPAQUE __attribute__((noinline))
#endif

template <bool SIGN, bool DIVIDE, bool EPS, bool FIRST, typename g_t>
ADVFAST_OPAQUE void exact_eval_chunk(const float* __restrict__ x, const g_t* __restrict__ g,
                      const float* __restrict__ x0, int64_t n, ExactScale sc, float s, float lo,
                      float hi, float eps, ExactEval* out) {
  // Four vectors of partial sums per quantity: the adds' latency, not memory, bounds this loop
  // when a sample's rows are in cache.
  constexpr int kWide = 4 * kLanes;
  constexpr int64_t kBlock = 16 * kWide;
  const float a = sc.a;  // 0 on the first pass: the slope is then S
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    float fa[kWide] = {}, da[kWide] = {}, pa[kWide] = {}, ra[kWide] = {};
    int64_t i = start;
    for (; i + kWide <= end; i += kWide) {
      for (int l = 0; l < kWide; ++l) {
        float q, u, r;
        exact_element<SIGN, DIVIDE, EPS, FIRST>(x, g, x0, i + l, s, lo, hi, eps, &q, &u, &r);
        if (!FIRST) fa[l] += std::min(a * u, r);
        da[l] += a * u < r ? u : 0.f;
        if (FIRST) {
          pa[l] += q;
          ra[l] += r;
        }
      }
    }
    for (; i < end; ++i) {
      float q, u, r;
      exact_element<SIGN, DIVIDE, EPS, FIRST>(x, g, x0, i, s, lo, hi, eps, &q, &u, &r);
      fa[0] += std::min(a * u, r);
      da[0] += a * u < r ? u : 0.f;
      pa[0] += q;
      ra[0] += r;
    }
    for (int l = 0; l < kWide; ++l) {
      out->f += fa[l];
      out->slope += da[l];
      if (FIRST) {
        out->p_l1 += pa[l];
        out->room += ra[l];
      }
    }
  }
}

// f(a) and the rest over the chunks of sample b, in order (so independent of the threads).
template <bool SIGN, bool FIRST, typename g_t>
ExactEval exact_eval(const g_t* g, const StepArgs& a, int64_t b, int64_t chunks, ExactScale sc,
                     float s) {
  ExactEval out;
  for (int64_t k = 0; k < chunks; ++k) {
    int64_t sample, begin, n;
    chunk_range(b * chunks + k, chunks, a.N, &sample, &begin, &n);
    const float* x = a.x + begin;
    const float* x0 = a.x0 + begin;
    const g_t* gb = g + begin;
    if (sc.divide) {
      a.use_eps ? exact_eval_chunk<SIGN, true, true, FIRST>(x, gb, x0, n, sc, s, a.lo, a.hi, a.eps, &out)
                : exact_eval_chunk<SIGN, true, false, FIRST>(x, gb, x0, n, sc, s, a.lo, a.hi, a.eps, &out);
    } else {
      a.use_eps ? exact_eval_chunk<SIGN, false, true, FIRST>(x, gb, x0, n, sc, s, a.lo, a.hi, a.eps, &out)
                : exact_eval_chunk<SIGN, false, false, FIRST>(x, gb, x0, n, sc, s, a.lo, a.hi, a.eps, &out);
    }
  }
  return out;
}

// The scale of sample b for adding `beta` (Newton's method of advfast_math.h); sets its sum|P|
// and S.
template <bool SIGN, typename g_t>
ExactScale exact_scale(const g_t* g, const StepArgs& a, int64_t b, int64_t chunks, float beta,
                       float* p_l1, float* s) {
  const ExactEval first =
      exact_eval<SIGN, true>(g, a, b, chunks, ExactScale{0.f, false, false, false}, 0.f);
  *p_l1 = static_cast<float>(first.p_l1);
  *s = static_cast<float>(first.slope);
  ExactScale sc = exact_start(*s, static_cast<float>(first.room), beta);
  for (int pass = 0; !sc.all_room && pass < kExactPasses; ++pass) {
    const ExactEval e = exact_eval<SIGN, false>(g, a, b, chunks, sc, *s);
    if (!exact_newton(beta, static_cast<float>(e.f), static_cast<float>(e.slope), &sc)) break;
  }
  return sc;
}

// The update pass under the scale found: x, its delta norms and the L1 really added; with CHECK
// (a predicted scale) also f(a) from the rooms before the step, in the p_l1 slot (the exact rule
// sets p_l1 itself).
template <bool SIGN, bool ALL, bool DIVIDE, bool EPS, bool CHECK, typename g_t>
Partial exact_update_chunk(float* __restrict__ x, const g_t* __restrict__ g,
                           const float* __restrict__ x0, int64_t n, float a, float s, float lo,
                           float hi, float eps) {
  Lanes acc;
  auto element = [&](int64_t i, int l) {
    const float old = x[i];
    const float p = perturbation<SIGN>(g[i]);
    float f = 0.f;
    if (CHECK) {
      float q, u, r;
      exact_element<SIGN, DIVIDE, EPS, false>(x, g, x0, i, s, lo, hi, eps, &q, &u, &r);
      f = std::min(a * u, r);
    }
    const float v = updated_value(old, exact_step_of<ALL, DIVIDE>(a, p, s), x0[i], lo, hi, EPS,
                                  eps);
    x[i] = v;
    acc.add(l, f, v - x0[i], std::fabs(v - old));
  };
  for_each_lane(n, element);
  return acc.total();
}

template <bool SIGN, bool EPS, typename g_t>
Partial exact_update_dispatch(float* x, const g_t* g, const float* x0, int64_t n,
                              ExactScale sc, float s, const StepArgs& a) {
  const float lo = a.lo, hi = a.hi, eps = a.eps;
  if (sc.all_room) {
    return exact_update_chunk<SIGN, true, false, EPS, false>(x, g, x0, n, sc.a, s, lo, hi, eps);
  }
  if (sc.predicted) {
    return sc.divide
               ? exact_update_chunk<SIGN, false, true, EPS, true>(x, g, x0, n, sc.a, s, lo, hi, eps)
               : exact_update_chunk<SIGN, false, false, EPS, true>(x, g, x0, n, sc.a, s, lo, hi, eps);
  }
  return sc.divide
             ? exact_update_chunk<SIGN, false, true, EPS, false>(x, g, x0, n, sc.a, s, lo, hi, eps)
             : exact_update_chunk<SIGN, false, false, EPS, false>(x, g, x0, n, sc.a, s, lo, hi, eps);
}

// The rounds of sample b (advfast_math.h): partial[k] ends as the delta norms of its chunks;
// returns the L1 added and sets the sample's sum|P|.
template <bool SIGN, typename g_t>
float exact_sample(const g_t* g, const StepArgs& a, int64_t b, int64_t chunks, Partial* partial,
                   float* p_l1) {
  float remaining = a.beta, added = 0.f;
  for (int round = 0; round < kExactRounds; ++round) {
    float s = 0.f, moved = 0.f, f_at_a = 0.f;
    const ExactScale sc = exact_scale<SIGN>(g, a, b, chunks, remaining, p_l1, &s);
    for (int64_t k = 0; k < chunks; ++k) {
      int64_t sample, begin, n;
      chunk_range(b * chunks + k, chunks, a.N, &sample, &begin, &n);
      partial[k] = a.use_eps ? exact_update_dispatch<SIGN, true>(a.x + begin, g + begin,
                                                                 a.x0 + begin, n, sc, s, a)
                             : exact_update_dispatch<SIGN, false>(a.x + begin, g + begin,
                                                                  a.x0 + begin, n, sc, s, a);
      moved += partial[k].v[kStepL1];
      f_at_a += partial[k].v[kPL1];
      partial[k].v[kPL1] = 0.f;
    }
    added += moved;
    const bool again = exact_another_round(remaining, f_at_a, moved, a.beta, sc);
    remaining -= moved;
    if (!again) break;
  }
  return added;
}

// Each sample runs all its passes on one thread, back to back, so that its rows stay in cache.
template <bool SIGN, typename g_t>
void exact_rows(const g_t* g, const StepArgs& a) {
  const int64_t B = a.B, N = a.N;
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  std::vector<Partial> partial(B * chunks);
  std::vector<float> p_l1(B, 0.f), added(B, 0.f);
  const int64_t grain = std::max<int64_t>(1, kChunk / std::max<int64_t>(N, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      Partial* rows = partial.data() + b * chunks;
      if (a.active == nullptr || a.active[b]) {
        added[b] = exact_sample<SIGN>(g, a, b, chunks, rows, &p_l1[b]);
        continue;
      }
      for (int64_t k = 0; k < chunks; ++k) {
        int64_t sample, begin, n;
        chunk_range(b * chunks + k, chunks, N, &sample, &begin, &n);
        rows[k] = delta_chunk(a.x + begin, a.x0 + begin, n);
      }
    }
  });
  combine_chunks(partial.data(), B, chunks, a.stats);
  for (int64_t b = 0; b < B; ++b) {
    a.stats[b * kStepStats + kPL1] = p_l1[b];
    a.stats[b * kStepStats + kStepL1] = added[b];
  }
}

}  // namespace

void perturb_step_kernel(const StepArgs& a) {
  with_elem(a.elem, a.grad, [&](const auto* g) {
    if (a.exact_l1) {
      a.sign ? exact_rows<true>(g, a) : exact_rows<false>(g, a);
    } else if (a.sign) {
      perturb_step_rows<true>(g, a);
    } else {
      perturb_step_rows<false>(g, a);
    }
  });
}

}  // namespace ADVFAST_CPU_NS
}  // namespace advfast

// CPU fused step, one translation unit compiled once per capability (kernels.h): P = sign(grad)
// or grad -> per-sample scale -> box clip -> eps ball, plus the L1/L2/Linf of x - x0 and the L1
// the step added, in one pass over x and x0 (and a first pass over grad for sum|P| in the
// equal perturbation rule).  exact_l1: the exact equal perturbation of advfast_math.h, a first
// pass for sum|P| over the elements with room, then update passes until it has added beta.
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
    const float old = x[i];
    const float v = updated_value(old, step, x0[i], lo, hi, EPS, eps);
    x[i] = v;
    acc.add(l, SUM_P ? std::fabs(p) : 0.f, v - x0[i], std::fabs(v - old));
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

// ---- exact_l1 ------------------------------------------------------------------------------

// The exact rule's first pass on one chunk: sum|P| (the p_l1 column) and S, the sum |P| of the
// elements that have room (x0 is read only for the eps ball).
template <bool SIGN, bool EPS, typename g_t>
void room_sum_chunk(const float* __restrict__ x, const g_t* __restrict__ g,
                    const float* __restrict__ x0, int64_t n, float lo, float hi, float eps,
                    float* p_l1, float* s) {
  float pa[kLanes] = {}, sa[kLanes] = {};
  // room_of(x, p, ...) > 0, spelled out so that this loop vectorises: p = 0 weighs q = 0.
  auto element = [&](int64_t i, int l) {
    const float p = perturbation<SIGN>(g[i]);
    const float q = std::fabs(p);
    float lo_b = lo, hi_b = hi;
    if (EPS) {
      const float below = x0[i] - eps, above = x0[i] + eps;
      lo_b = below > lo ? below : lo;
      hi_b = above < hi ? above : hi;
    }
    const float r = p > 0.f ? hi_b - x[i] : x[i] - lo_b;
    pa[l] += q;
    sa[l] += r > 0.f ? q : 0.f;
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) element(i + l, l);
  }
  for (int l = 0; i < n; ++i, ++l) element(i, l);
  *p_l1 = *s = 0.f;
  for (int l = 0; l < kLanes; ++l) {
    *p_l1 += pa[l];
    *s += sa[l];
  }
}

// One exact pass over a chunk: its delta norms and added L1 (delta), the sum |P| of the
// elements with room left (s_next) and how many elements the pass saturated (newly).
struct ExactPartial {
  Partial delta;
  float s_next, newly;
};

template <bool SIGN, bool DIVIDE, bool EPS, typename g_t>
ExactPartial exact_chunk(float* __restrict__ x, const g_t* __restrict__ g,
                         const float* __restrict__ x0, int64_t n, StepScale st, float s,
                         float lo, float hi, float eps) {
  Lanes acc;
  float sn[kLanes] = {}, nw[kLanes] = {};
  auto element = [&](int64_t i, int l) {
    const float p = perturbation<SIGN>(g[i]);
    const float old = x[i], x0i = x0[i];
    const float room = room_of(old, p, x0i, lo, hi, EPS, eps);
    const float step = room > 0.f ? (DIVIDE ? st.scale * (p / s) : st.scale * p) : 0.f;
    const float v = updated_value(old, step, x0i, lo, hi, EPS, eps);
    x[i] = v;
    const float left = room_of(v, p, x0i, lo, hi, EPS, eps);
    sn[l] += left > 0.f ? std::fabs(p) : 0.f;
    nw[l] += (room > 0.f) & !(left > 0.f) ? 1.f : 0.f;
    acc.add(l, 0.f, v - x0i, std::fabs(v - old));
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) element(i + l, l);
  }
  for (int l = 0; i < n; ++i, ++l) element(i, l);
  ExactPartial out{acc.total(), 0.f, 0.f};
  for (int l = 0; l < kLanes; ++l) {
    out.s_next += sn[l];
    out.newly += nw[l];
  }
  return out;
}

template <bool SIGN, typename g_t>
ExactPartial exact_chunk_dispatch(float* x, const g_t* g, const float* x0, int64_t n,
                                  StepScale st, float s, const StepArgs& a) {
  if (st.divide_each) {
    return a.use_eps ? exact_chunk<SIGN, true, true>(x, g, x0, n, st, s, a.lo, a.hi, a.eps)
                     : exact_chunk<SIGN, true, false>(x, g, x0, n, st, s, a.lo, a.hi, a.eps);
  }
  return a.use_eps ? exact_chunk<SIGN, false, true>(x, g, x0, n, st, s, a.lo, a.hi, a.eps)
                   : exact_chunk<SIGN, false, false>(x, g, x0, n, st, s, a.lo, a.hi, a.eps);
}

// Per-sample state of the exact rule between passes.
struct ExactSample {
  float p_l1 = 0.f, s = 0.f, remaining = 0.f, step_l1 = 0.f;
  bool todo = false;
};

template <bool SIGN, typename g_t>
std::vector<ExactSample> exact_first_pass(const g_t* g, const StepArgs& a, int64_t chunks) {
  const int64_t B = a.B, N = a.N;
  std::vector<float> p_part(B * chunks, 0.f), s_part(B * chunks, 0.f);
  at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      int64_t b, begin, n;
      chunk_range(task, chunks, N, &b, &begin, &n);
      if (a.active != nullptr && !a.active[b]) continue;
      if (a.use_eps) {
        room_sum_chunk<SIGN, true>(a.x + begin, g + begin, a.x0 + begin, n, a.lo, a.hi, a.eps,
                                   &p_part[task], &s_part[task]);
      } else {
        room_sum_chunk<SIGN, false>(a.x + begin, g + begin, a.x0 + begin, n, a.lo, a.hi, a.eps,
                                    &p_part[task], &s_part[task]);
      }
    }
  });
  std::vector<ExactSample> out(B);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < chunks; ++k) {
      out[b].p_l1 += p_part[b * chunks + k];
      out[b].s += s_part[b * chunks + k];
    }
    out[b].remaining = a.beta;
    out[b].todo = a.active == nullptr || a.active[b];
  }
  return out;
}

template <bool SIGN, typename g_t>
void exact_rows(const g_t* g, const StepArgs& a) {
  const int64_t B = a.B, N = a.N;
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  std::vector<ExactSample> sample = exact_first_pass<SIGN>(g, a, chunks);
  std::vector<Partial> partial(B * chunks);
  std::vector<float> s_next(B * chunks), newly(B * chunks);
  for (int pass = 0; pass < kExactPasses; ++pass) {
    at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        int64_t b, begin, n;
        chunk_range(task, chunks, N, &b, &begin, &n);
        if (!sample[b].todo) {
          if (pass == 0) partial[task] = delta_chunk(a.x + begin, a.x0 + begin, n);
          continue;
        }
        const StepScale st = step_scale(true, 0.f, sample[b].remaining, sample[b].s);
        const ExactPartial e = exact_chunk_dispatch<SIGN>(a.x + begin, g + begin, a.x0 + begin,
                                                          n, st, sample[b].s, a);
        partial[task] = e.delta;
        s_next[task] = e.s_next;
        newly[task] = e.newly;
      }
    });
    bool any = false;
    for (int64_t b = 0; b < B; ++b) {
      ExactSample& e = sample[b];
      if (!e.todo) continue;
      float moved = 0.f, s = 0.f, saturated = 0.f;
      for (int64_t k = 0; k < chunks; ++k) {
        moved += partial[b * chunks + k].v[kStepL1];
        s += s_next[b * chunks + k];
        saturated += newly[b * chunks + k];
      }
      e.step_l1 += moved;
      e.remaining -= moved;
      e.s = s;
      e.todo = exact_continues(moved, saturated, e.remaining, s, a.beta);
      any = any || e.todo;
    }
    if (!any) break;
  }
  combine_chunks(partial.data(), B, chunks, a.stats);
  for (int64_t b = 0; b < B; ++b) {
    a.stats[b * kStepStats + kPL1] = sample[b].p_l1;
    a.stats[b * kStepStats + kStepL1] = sample[b].step_l1;
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

// Body of the CPU fused step, compiled once per instruction set: csrc/cpu/perturb_step.cpp
// includes this file inside one namespace per ISA under `#pragma GCC target`, and picks one at
// run time.  No include guard on purpose; it declares nothing outside its enclosing namespace.
//
// Work is split into fixed chunks of every sample, so results do not depend on the thread
// count; lanes of partial sums let the compiler vectorise the reductions.

constexpr int64_t kChunk = 1 << 15;
constexpr int kLanes = 16;

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

// Partial sums of one chunk: [p_l1, delta_l1, delta_l2^2, delta_linf].
struct Partial {
  float v[kStepStats];
};

// Lane-wise accumulators of the delta norms (and sum|P|), kept in registers by the compiler.
struct Lanes {
  float p[kLanes] = {}, l1[kLanes] = {}, l2[kLanes] = {}, linf[kLanes] = {};

  void add(int l, float p_abs, float d) {
    const float a = std::fabs(d);
    p[l] += p_abs;
    l1[l] += a;
    l2[l] += d * d;
    linf[l] = max_of(linf[l], a);
  }

  Partial total() const {
    Partial out{};
    for (int l = 0; l < kLanes; ++l) {
      out.v[0] += p[l];
      out.v[1] += l1[l];
      out.v[2] += l2[l];
      out.v[3] = max_of(out.v[3], linf[l]);
    }
    return out;
  }
};

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

Partial delta_chunk(const float* __restrict__ x, const float* __restrict__ x0, int64_t n) {
  Lanes acc;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc.add(l, 0.f, x[i + l] - x0[i + l]);
  }
  for (int l = 0; i < n; ++i, ++l) acc.add(l, 0.f, x[i] - x0[i]);
  return acc.total();
}

template <bool SIGN, typename g_t>
void perturb_step_kernel(float* x, const g_t* g, const float* x0, const bool* active, int64_t B,
                         int64_t N, bool equal_perturbation, float alpha, float beta, float lo,
                         float hi, bool use_eps, float eps, float* stats) {
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  std::vector<Partial> partial(B * chunks);
  auto chunk_range = [&](int64_t task, int64_t* b, int64_t* begin, int64_t* n) {
    *b = task / chunks;
    *begin = *b * N + (task % chunks) * kChunk;
    *n = std::min(kChunk, (*b + 1) * N - *begin);
  };
  std::vector<float> p_l1(B, 0.f);
  if (equal_perturbation) {
    at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        int64_t b, begin, n;
        chunk_range(task, &b, &begin, &n);
        partial[task].v[0] = (active == nullptr || active[b]) ? abs_sum<SIGN>(g + begin, n) : 0.f;
      }
    });
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t k = 0; k < chunks; ++k) p_l1[b] += partial[b * chunks + k].v[0];
    }
  }
  at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      int64_t b, begin, n;
      chunk_range(task, &b, &begin, &n);
      if (active != nullptr && !active[b]) {
        partial[task] = delta_chunk(x + begin, x0 + begin, n);
        continue;
      }
      const StepScale st = step_scale(equal_perturbation, alpha, beta, p_l1[b]);
      partial[task] =
          equal_perturbation
              ? update_chunk_dispatch<SIGN, false>(x + begin, g + begin, x0 + begin, n, st,
                                                   p_l1[b], lo, hi, use_eps, eps)
              : update_chunk_dispatch<SIGN, true>(x + begin, g + begin, x0 + begin, n, st,
                                                  p_l1[b], lo, hi, use_eps, eps);
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    float out[kStepStats] = {};
    for (int64_t k = 0; k < chunks; ++k) {
      const Partial& p = partial[b * chunks + k];
      out[0] += p.v[0];
      out[1] += p.v[1];
      out[2] += p.v[2];
      out[3] = max_of(out[3], p.v[3]);
    }
    float* st = stats + b * kStepStats;
    st[0] = equal_perturbation ? p_l1[b] : out[0];
    st[1] = out[1];
    st[2] = std::sqrt(out[2]);
    st[3] = linf_of(out[3], out[1]);
  }
}

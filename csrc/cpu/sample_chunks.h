// Per-sample chunked reductions shared by the CPU kernel bodies that update images in place
// (kernels/perturb_step.cpp, kernels/adam_tanh_step.cpp), in the namespace of the capability
// being compiled (capability.h, included before this).
//
// Every sample of N elements is cut into fixed chunks of kChunk (one task each), so results do
// not depend on the thread count; each chunk keeps kLanes partial sums that the compiler
// vectorises, and the chunks of a sample are combined in order.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "kernels.h"

namespace advfast {
namespace ADVFAST_CPU_NS {

// Sample b, first element and length of task `task` of a [B, N] buffer in chunks per sample.
inline void chunk_range(int64_t task, int64_t chunks, int64_t N, int64_t* b, int64_t* begin,
                        int64_t* n) {
  *b = task / chunks;
  *begin = *b * N + (task % chunks) * kChunk;
  *n = std::min(kChunk, (*b + 1) * N - *begin);
}

// Partial sums of one chunk, by StepStat column (kDeltaL2 holds the sum of squares).
struct Partial {
  float v[kStepStats];
};

// Lane-wise accumulators of the delta norms, sum|P| and the L1 the step added (|x_new - x_old|
// summed), kept in registers by the compiler.
struct Lanes {
  float p[kLanes] = {}, l1[kLanes] = {}, l2[kLanes] = {}, linf[kLanes] = {}, moved[kLanes] = {};

  void add(int l, float p_abs, float d, float moved_abs = 0.f) {
    const float a = std::fabs(d);
    p[l] += p_abs;
    l1[l] += a;
    l2[l] += d * d;
    linf[l] = max_of(linf[l], a);
    moved[l] += moved_abs;
  }

  Partial total() const {
    Partial out{};
    for (int l = 0; l < kLanes; ++l) {
      out.v[kPL1] += p[l];
      out.v[kDeltaL1] += l1[l];
      out.v[kDeltaL2] += l2[l];
      out.v[kDeltaLinf] = max_of(out.v[kDeltaLinf], linf[l]);
      out.v[kStepL1] += moved[l];
    }
    return out;
  }
};

// Calls element(i, lane) for i in [0, n): full rows of L lanes (lane = i's place in its row,
// the shape the compiler vectorises), then the tail on lanes 0, 1, ...
template <int L = kLanes, typename Element>
inline __attribute__((always_inline)) void for_each_lane(int64_t n, const Element& element) {
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int l = 0; l < L; ++l) element(i + l, l);
  }
  for (int l = 0; i < n; ++i, ++l) element(i, l);
}

// Lanes of a pass that only sums (sum|P|): four vectors of them, so that four adds are in
// flight; with one vector the adds' latency bounds the pass, not the loads.
constexpr int kSumLanes = 4 * kLanes;

inline Partial delta_chunk(const float* __restrict__ x, const float* __restrict__ x0, int64_t n) {
  Lanes acc;
  for_each_lane(n, [&](int64_t i, int l) { acc.add(l, 0.f, x[i] - x0[i]); });
  return acc.total();
}

// Runs update(b, begin, n) on the chunks of active samples and delta_chunk on the others, in
// parallel, into partial[task].
template <typename Update>
void update_chunks(int64_t B, int64_t N, int64_t chunks, const bool* active, const float* x,
                   const float* x0, Partial* partial, const Update& update) {
  at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      int64_t b, begin, n;
      chunk_range(task, chunks, N, &b, &begin, &n);
      partial[task] = (active != nullptr && !active[b]) ? delta_chunk(x + begin, x0 + begin, n)
                                                        : update(b, begin, n);
    }
  });
}

// stats[b] = [sum of p, sum |d|, sqrt(sum d^2), max |d|, sum |x_new - x_old|] of sample b's
// chunks (in order).
inline void combine_chunks(const Partial* partial, int64_t B, int64_t chunks, float* stats) {
  for (int64_t b = 0; b < B; ++b) {
    float out[kStepStats] = {};
    for (int64_t k = 0; k < chunks; ++k) {
      const Partial& p = partial[b * chunks + k];
      for (int s : {kPL1, kDeltaL1, kDeltaL2, kStepL1}) out[s] += p.v[s];
      out[kDeltaLinf] = max_of(out[kDeltaLinf], p.v[kDeltaLinf]);
    }
    float* st = stats + b * kStepStats;
    st[kPL1] = out[kPL1];
    st[kDeltaL1] = out[kDeltaL1];
    st[kDeltaL2] = std::sqrt(out[kDeltaL2]);
    st[kDeltaLinf] = linf_of(out[kDeltaLinf], out[kDeltaL1]);
    st[kStepL1] = out[kStepL1];
  }
}

}  // namespace ADVFAST_CPU_NS
}  // namespace advfast

// Body of the CPU Adam step in tanh space (Carlini-Wagner L2), compiled once per instruction set
// (see isa.h): included by csrc/cpu/adam_tanh_step.cpp inside one namespace per ISA.  No include
// guard on purpose.
//
// One pass per element reads w, m, v, x, grad and x0, and writes w, m, v and x; each chunk also
// reduces sum|dL/dw| and the norms of the new x - x0 (sample_chunks.h).

#include "sample_chunks.h"

template <typename g_t>
Partial adam_chunk(float* __restrict__ w, float* __restrict__ m, float* __restrict__ v,
                   float* __restrict__ x, const g_t* __restrict__ g,
                   const float* __restrict__ x0, int64_t n, float c, AdamConfig cfg,
                   AdamScalars sc) {
  Lanes acc;
  auto element = [&](int64_t i, int l) {
    const float gw = cw_grad_w(x[i], x0[i], static_cast<float>(g[i]), c, std::tanh(w[i]));
    float mi = m[i], vi = v[i];
    const float wi = adam_update(w[i], gw, &mi, &vi, cfg, sc.step_size, sc.bc2_sqrt);
    const float xi = tanh_image(std::tanh(wi));
    m[i] = mi;
    v[i] = vi;
    w[i] = wi;
    x[i] = xi;
    acc.add(l, std::fabs(gw), xi - x0[i]);
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) element(i + l, l);
  }
  for (int l = 0; i < n; ++i, ++l) element(i, l);
  return acc.total();
}

template <typename g_t>
void adam_tanh_step_kernel(float* w, float* m, float* v, float* x, const g_t* g, const float* x0,
                           const float* c, const int64_t* t, const bool* active, int64_t B,
                           int64_t N, double lr, AdamConfig cfg, float* stats) {
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  std::vector<Partial> partial(B * chunks);
  update_chunks(B, N, chunks, active, x, x0, partial.data(), [&](int64_t b, int64_t begin,
                                                                 int64_t n) {
    const AdamScalars sc = adam_scalars(lr, cfg.beta1, cfg.beta2, t[b]);
    return adam_chunk(w + begin, m + begin, v + begin, x + begin, g + begin, x0 + begin, n, c[b],
                      cfg, sc);
  });
  combine_chunks(partial.data(), B, chunks, stats);
}

// CPU Adam step in tanh space for Carlini-Wagner L2, one translation unit compiled once per
// capability (kernels.h): the gradient of ||X' - X0||^2 - c * O w.r.t. w, the Adam update of w
// and its moments, and X' = (tanh(w) + 1) / 2 with its L1/L2/Linf distance to X0 (X' and its
// slope from exp(-2 w), advfast_math.h, so that the loop vectorises), in one pass
// that reads w, m, v, x, grad and x0 and writes w, m, v and x; each chunk also reduces
// sum|dL/dw| and the norms of the new x - x0 (sample_chunks.h).
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

template <typename g_t>
Partial adam_chunk(float* __restrict__ w, float* __restrict__ m, float* __restrict__ v,
                   float* __restrict__ x, const g_t* __restrict__ g,
                   const float* __restrict__ x0, int64_t n, float c, AdamConfig cfg,
                   AdamScalars sc) {
  Lanes acc;
  auto element = [&](int64_t i, int l) {
    const float x_old = x[i];
    const float gw = cw_grad_w(x_old, x0[i], static_cast<float>(g[i]), c,
                               tanh_slope(exp_neg2(w[i])));
    float mi = m[i], vi = v[i];
    const float wi = adam_update(w[i], gw, &mi, &vi, cfg, sc.step_size, sc.bc2_sqrt);
    const float xi = tanh_image(exp_neg2(wi));
    m[i] = mi;
    v[i] = vi;
    w[i] = wi;
    x[i] = xi;
    acc.add(l, std::fabs(gw), xi - x0[i], std::fabs(xi - x_old));
  };
  for_each_lane(n, element);
  return acc.total();
}

template <typename g_t>
void adam_tanh_rows(const g_t* g, const AdamArgs& a) {
  const int64_t N = a.N;
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  std::vector<Partial> partial(a.B * chunks);
  update_chunks(a.B, N, chunks, a.active, a.x, a.x0, partial.data(), [&](int64_t b, int64_t begin,
                                                                          int64_t n) {
    const AdamScalars sc = adam_scalars(a.lr, a.cfg.beta1, a.cfg.beta2, a.step[b]);
    return adam_chunk(a.w + begin, a.m + begin, a.v + begin, a.x + begin, g + begin,
                      a.x0 + begin, n, a.c[b], a.cfg, sc);
  });
  combine_chunks(partial.data(), a.B, chunks, a.stats);
}

}  // namespace

void adam_tanh_step_kernel(const AdamArgs& a) {
  with_elem(a.elem, a.grad, [&](const auto* g) { adam_tanh_rows(g, a); });
}

}  // namespace ADVFAST_CPU_NS
}  // namespace advfast

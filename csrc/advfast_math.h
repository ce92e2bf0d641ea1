// Scalar math shared by the CPU and CUDA kernels: both backends evaluate the same per-element and
// per-row formulas (CUDA is compiled with --fmad=false, as the CPU with -ffp-contract=off, so no
// multiply-add is contracted).  They still differ in two places, by design: exp_of (a polynomial
// on the CPU, expf on the GPU) and the order of the reductions (lanes vs. a block tree).
//
// Non-finite input, decided once for every kernel and the reference (advfast/reference.py):
// * a non-finite gradient element (NaN, +-inf) contributes no step and nothing to sum|P|;
// * -inf logits are masked classes: probability exactly 0, as torch.softmax gives;
// * NaN is the largest value for argmax (torch.argmax) and max (torch.amax) alike.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "stats.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ADVFAST_HD __host__ __device__ __forceinline__
#else
#define ADVFAST_HD inline __attribute__((always_inline))
#endif

namespace advfast {

// Loss codes shared by the dispatcher and both backends (advfast.ops.LOSSES).  "ce-sign" is CE
// here: the head's seed is the same, and perturb_step_ takes the sign (parse_loss maps it).
enum class Loss : int64_t { CE = 0, LOGIT = 1, M_LOGIT = 2 };
enum class KappaMode : int64_t { CLAMP = 0, BALANCE = 1 };

ADVFAST_HD bool is_nan(float v) { return v != v; }

// The gradient element the step uses: v itself if finite, else 0 (it contributes nothing).
ADVFAST_HD float finite_or_zero(float v) { return fabsf(v) <= FLT_MAX ? v : 0.f; }

// sign(v) of a finite v, 0 for 0, NaN and +-inf (a non-finite element takes no step); written
// as two range tests so that it vectorises to mask operations.
ADVFAST_HD float finite_sign_of(float v) {
  return ((v > 0.f) & (v <= FLT_MAX) ? 1.f : 0.f) - ((v < 0.f) & (v >= -FLT_MAX) ? 1.f : 0.f);
}

// finite_sign_of(v) * magnitude, and |finite_sign_of(v)|, in fewer instructions: one range
// test on |v| and a copy of v's sign bit onto 1 (exact: the sign is +-1 or 0, so the product is
// +-magnitude or a zero of magnitude's sign, whatever magnitude's own sign).
ADVFAST_HD float signed_step(float v, float magnitude) {
  const float a = fabsf(v);
  return ((a > 0.f) & (a <= FLT_MAX) ? copysignf(1.f, v) : 0.f) * magnitude;
}
ADVFAST_HD float finite_sign_abs(float v) {
  const float a = fabsf(v);
  return (a > 0.f) & (a <= FLT_MAX) ? 1.f : 0.f;
}

// P_n's element from one gradient element: the element, or its sign (IFGS, Eq. 13).
template <bool SIGN>
ADVFAST_HD float perturbation_of(float g) {
  return SIGN ? finite_sign_of(g) : finite_or_zero(g);
}

// min(max(v, lo), hi) as torch.clamp computes it: lo > hi resolves to hi and NaN propagates.
// Written with comparisons so that the CPU compiler maps it to vector min/max instructions.
ADVFAST_HD float clamp_to(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// max(a, b) for the Linf reductions: one compare and a blend (vectorises to vmaxps).  It may
// drop a NaN, so the reductions restore torch.amax's NaN afterwards from the L1 sum of the
// same elements, which NaN always reaches (linf_of).
ADVFAST_HD float max_of(float a, float b) { return a > b ? a : b; }

// The Linf of a sample given its L1 sum: NaN when any element was NaN, as torch.amax.
ADVFAST_HD float linf_of(float linf, float l1) { return is_nan(l1) ? l1 : linf; }

// exp(x) for the kernels.  On the GPU, expf.  On the CPU, a Cephes-style polynomial (within
// 2 ulp of expf over the normal float range; 0 below it, where expf gives denormals; +inf above
// 88.3, 0.4 short of expf's overflow; NaN passes through) written without branches or calls,
// so the compiler vectorises the loops that use it.
ADVFAST_HD float exp_of(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  const float in = x;
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float n = floorf(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float out = in > 88.3f ? INFINITY : p * scale;
  return in < -87.3f ? 0.f : (is_nan(in) ? in : out);
#endif
}

// Running (max, sum of exp(v - max)) pair for a one-pass, max-subtracted softmax.
struct OnlineSoftmax {
  float max;
  float sum;
};

// exp(v - m) for a softmax term: 0 for a masked class (v = -inf), also when every value so far
// is -inf (then m = -inf too, and v - m would be NaN).
ADVFAST_HD float softmax_term(float v, float m) {
  return v == -INFINITY ? 0.f : exp_of(v - m);
}

// Branch-free, so CPU lanes vectorise: both terms are rescaled to the new maximum.  A NaN
// never becomes the maximum but makes the sum NaN, as it makes torch.softmax's row NaN.
ADVFAST_HD OnlineSoftmax softmax_push(OnlineSoftmax s, float v) {
  const float m = v > s.max ? v : s.max;
  const float kept = s.sum == 0.f ? 0.f : s.sum * exp_of(s.max - m);
  return OnlineSoftmax{m, kept + softmax_term(v, m)};
}

ADVFAST_HD OnlineSoftmax softmax_merge(OnlineSoftmax a, OnlineSoftmax b) {
  if (b.sum == 0.f) return a;
  if (a.sum == 0.f) return b;
  const float m = a.max > b.max ? a.max : b.max;
  return OnlineSoftmax{m, a.sum * exp_of(a.max - m) + b.sum * exp_of(b.max - m)};
}

// 1 / sum exp(g - max).  The sum is >= 1 (the maximum's own term) unless the row holds NaN or
// +inf or only -inf, where torch.softmax gives NaN, and so does this.
ADVFAST_HD float inverse_sum(OnlineSoftmax sm) { return sm.sum >= 1.f ? 1.f / sm.sum : NAN; }

// log of the row's softmax normaliser, log sum exp(g); finite exactly when the row is usable
// (no NaN or +inf logit, at least one finite logit).
ADVFAST_HD float log_sum_exp(OnlineSoftmax sm) { return sm.max + logf(sm.sum); }

// (value, index) argmax like torch.argmax: NaN above every number, ties resolved to the
// smallest index.  index < 0 marks "nothing seen yet".
struct ArgMax {
  float value;
  int64_t index;
};

// Whether v ranks strictly above a in the argmax order (NaN highest).
ADVFAST_HD bool ranks_above(float v, float a) { return (v > a) | (is_nan(v) & !is_nan(a)); }

ADVFAST_HD bool ranks_equal(float v, float a) { return (v == a) | (is_nan(v) & is_nan(a)); }

ADVFAST_HD ArgMax argmax_push(ArgMax a, float v, int64_t i) {
  if (a.index < 0 || ranks_above(v, a.value) || (ranks_equal(v, a.value) && i < a.index)) {
    return ArgMax{v, i};
  }
  return a;
}

ADVFAST_HD ArgMax argmax_merge(ArgMax a, ArgMax b) {
  if (b.index < 0) return a;
  return argmax_push(a, b.value, b.index);
}

// Kappa-balancing multiplier w of the M-logit seed (paper Eqs. 4, 15-16).
// clamp:   CW's max(., -kappa): w = 1 while margin < kappa, else 0.
// balance: the margin is held at kappa: w = 1 below, 0 at, -1 above.
ADVFAST_HD float kappa_weight(float margin, float kappa, KappaMode mode) {
  if (margin < kappa) return 1.f;
  if (mode == KappaMode::CLAMP) return 0.f;
  return margin > kappa ? -1.f : 0.f;
}

// Subspace D1/D2/D3 of Definition IV.1.
ADVFAST_HD float subspace_of(float max_prob, bool hit, float threshold) {
  if (max_prob < threshold) return 2.f;
  return hit ? 3.f : 1.f;
}

// Writes the kHeadStats HEAD_STATS of one row from its reductions.
ADVFAST_HD void write_head_stats(float* out, OnlineSoftmax sm, ArgMax best, ArgMax runner_up,
                                 float target_logit, float source_logit, int64_t target,
                                 float threshold) {
  const float inv = inverse_sum(sm);
  const bool hit = best.index == target;
  const float max_prob = inv;  // exp(max - max) / sum
  const float lse = log_sum_exp(sm);
  out[kPred] = static_cast<float>(best.index);
  out[kMaxProb] = max_prob;
  out[kTargetProb] = softmax_term(target_logit, sm.max) * inv;
  out[kTargetLogit] = target_logit;
  out[kSourceProb] = softmax_term(source_logit, sm.max) * inv;
  out[kSourceLogit] = source_logit;
  out[kRunnerUp] = static_cast<float>(runner_up.index);
  out[kMargin] = target_logit - runner_up.value;
  out[kSubspace] = subspace_of(max_prob, hit, threshold);
  out[kHit] = hit ? 1.f : 0.f;
  const bool finite = fabsf(lse) <= FLT_MAX;
  out[kTargetLogprob] = finite ? target_logit - lse : NAN;
  out[kFinite] = finite ? 1.f : 0.f;
}

// How loss_head computes CE's seed at the target, 1 - p_c: "exact" as the sum of the other
// classes' probabilities (no cancellation where p_c rounds to 1 in float32), "eager" as
// 1 - p_c in float32, as eager PyTorch's onehot - softmax.
enum class CeSeed : int64_t { EXACT = 0, EAGER = 1 };

// d(objective)/d(logit_i) for one element of the row, given the row's reductions.  (CE's target
// element under CeSeed::EXACT is the row's sum of the others' probabilities, see loss_head.)
ADVFAST_HD float seed_of(Loss loss, float logit, int64_t i, int64_t target, int64_t runner_up,
                         float w, OnlineSoftmax sm) {
  const float onehot_t = i == target ? 1.f : 0.f;
  switch (loss) {
    case Loss::CE:
      return onehot_t - softmax_term(logit, sm.max) * inverse_sum(sm);
    case Loss::LOGIT:
      return onehot_t;
    case Loss::M_LOGIT:
    default:
      return w * (onehot_t - (i == runner_up ? 1.f : 0.f));
  }
}

// Per-sample step scale: alpha for the equal multiplier rule; beta / sum|P| for the equal
// perturbation rule (Section V-B), with no step where sum|P| is 0.  A sum so small that
// beta / sum overflows is handled by the caller dividing per element (divide_each).
struct StepScale {
  float scale;
  bool divide_each;  // step = beta * (p / p_l1) instead of scale * p
};

ADVFAST_HD StepScale step_scale(bool equal_perturbation, float alpha, float beta, float p_l1) {
  if (!equal_perturbation) return StepScale{alpha, false};
  if (p_l1 == 0.f) return StepScale{0.f, false};
  const float s = beta / p_l1;
  // !(|s| <= FLT_MAX) is true for inf, and spelled so for host and device alike.
  return !(fabsf(s) <= FLT_MAX) ? StepScale{beta, true} : StepScale{s, false};
}

ADVFAST_HD float step_of(StepScale st, float p, float p_l1) {
  return st.divide_each ? st.scale * (p / p_l1) : st.scale * p;
}

// New value of one element: box clip, then the optional eps-ball around x0 (IFGS, Eq. 2).
ADVFAST_HD float updated_value(float x, float step, float x0, float lo, float hi, bool use_eps,
                               float eps) {
  float v = clamp_to(x + step, lo, hi);
  if (use_eps) {
    const float below = x0 - eps, above = x0 + eps;
    v = clamp_to(v, below > lo ? below : lo, above < hi ? above : hi);
  }
  return v;
}

// ---- Exact equal perturbation (perturb_step_'s exact_l1) ------------------------------------
// The per-sample scale a with f(a) = sum_i min(a u_i, room_i) = beta, u_i = |P_i| and room_i the
// distance from x_i to the bound it moves towards (the box, intersected with the eps ball), is
// found without a sort and without touching x: f is concave and piecewise linear, so Newton's
// method from a_0 = beta / S (S = sum u_i over the elements with room, f's slope at 0) stays
// below the root and reaches it once no breakpoint is left between.  A round is one read-only
// pass for S and the total room, read-only evaluations of f and its slope, and one update pass
// that steps x by a P with the usual clip and measures the L1 it really added.  The Newton step
// taken after a gap below kExactPredict of beta is not evaluated again (near the root one step
// nearly always lands on it): the update pass evaluates f there as it steps, and where f falls
// short by more than kExactCheck of beta another round adds what is missing (at most
// kExactRounds).  (f, not the measured L1, decides: float32's rounding of small moves, which
// no further round repairs, is reported in step_l1 and never starts one.)
// Where the total room is at most beta the step adds all of it; where beta / S overflows (a
// denormal S) u_i = |P_i| / S and a is in units of beta, as step_scale's divide_each.  Newton
// stops when what is left of beta is below kExactTolerance of it, when a step no longer moves a,
// or after kExactPasses evaluations.
constexpr int kExactPasses = 32;
constexpr int kExactRounds = 4;
constexpr float kExactTolerance = 1e-6f;
constexpr float kExactPredict = 1e-2f;
constexpr float kExactCheck = 2e-6f;

// The room of an element moving along p (> 0 up, < 0 down) before the bound updated_value
// clips it to; 0 for p = 0, for an element at or beyond its bound, and for a NaN x.
ADVFAST_HD float room_of(float x, float p, float x0, float lo, float hi, bool use_eps,
                         float eps) {
  float lo_b = lo, hi_b = hi;
  if (use_eps) {
    const float below = x0 - eps, above = x0 + eps;
    lo_b = below > lo ? below : lo;
    hi_b = above < hi ? above : hi;
  }
  const float r = p > 0.f ? hi_b - x : (p < 0.f ? x - lo_b : 0.f);
  return r > 0.f ? r : 0.f;
}

// One element's share of f(a) and of its right slope f'(a) (u in the rule's units, room >= 0).
ADVFAST_HD float exact_added(float a, float u, float room) {
  const float m = a * u;
  return room < m ? room : m;  // std::min(m, room), as the CPU loop spells it
}
ADVFAST_HD float exact_slope(float a, float u, float room) { return a * u < room ? u : 0.f; }

// The exact rule's scale for one sample.
struct ExactScale {
  float a;
  bool divide;     // u = |P| / S and step = a * (P / S): beta / S overflows
  bool all_room;   // the total room is at most beta: every element moves to its bound
  bool predicted;  // a is a Newton step not yet evaluated: the update pass checks it
};

// The start of Newton's method, from the first evaluation: S = f'(0) and the total room.
ADVFAST_HD ExactScale exact_start(float s, float room_total, float beta) {
  if (!(room_total > beta)) return ExactScale{0.f, false, true, false};
  const float a = beta / s;  // s > 0: an element with room has P != 0
  return !(fabsf(a) <= FLT_MAX) ? ExactScale{beta, true, false, false}
                                 : ExactScale{a, false, false, false};
}

// u of an element in the scale's units.
ADVFAST_HD float exact_unit(ExactScale sc, float p, float s) {
  return sc.divide ? fabsf(p) / s : fabsf(p);
}

// One Newton step a <- a + (beta - f(a)) / f'(a); false when the scale is final: a unchanged
// where the sample is done, the step taken where the gap was below kExactPredict of beta.
ADVFAST_HD bool exact_newton(float beta, float f, float slope, ExactScale* sc) {
  const float gap = beta - f;
  if (!(gap > kExactTolerance * beta) || !(slope > 0.f)) return false;
  const float next = sc->a + gap / slope;
  if (!(next > sc->a) || !(next <= FLT_MAX)) return false;
  sc->a = next;
  sc->predicted = !(gap > kExactPredict * beta);
  return !sc->predicted;
}

// Whether a sample goes on to another round after one that aimed at `remaining` of beta
// (`total` the whole of it) with a predicted scale at which f is `f_at_a`, and moved `moved`.
ADVFAST_HD bool exact_another_round(float remaining, float f_at_a, float moved, float total,
                                    ExactScale sc) {
  return sc.predicted && remaining - f_at_a > kExactCheck * total && moved > 0.f;
}

// The step of one element under the scale found (FLT_MAX towards the bound for all the room:
// the clip of updated_value then lands the element exactly on it); ALL and DIVIDE as the
// scale's flags, template parameters so that the CPU loop has no branches.
template <bool ALL, bool DIVIDE>
ADVFAST_HD float exact_step_of(float a, float p, float s) {
  if (ALL) return p > 0.f ? FLT_MAX : (p < 0.f ? -FLT_MAX : 0.f);
  return DIVIDE ? a * (p / s) : a * p;
}

ADVFAST_HD float exact_step(ExactScale sc, float p, float s) {
  if (sc.all_room) return exact_step_of<true, false>(sc.a, p, s);
  return sc.divide ? exact_step_of<false, true>(sc.a, p, s) : exact_step_of<false, false>(sc.a, p, s);
}

// ---- Carlini-Wagner L2 (Eqs. 3-4) in tanh space: X' = (tanh(w) + 1) / 2 -------------------

// X' = (tanh(w) + 1) / 2 and its slope dX'/dw = (1 - tanh(w)^2) / 2 from e = exp(-2 w):
// X' = 1 / (1 + e) and the slope 2 / (e + 2 + 1 / e).  Why not tanh: in float32 tanh(w) + 1
// cancels for w << 0 (X' = e^{2w} comes out 0 below w = -9) and 1 - tanh(w)^2 rounds to 0 for
// |w| > 8.7, which would freeze a saturated pixel; with these X' stays within 4 ulp of the
// float64 truth and the step within 1e-5 of it for |w| <= 40 (tests/test_adam_tanh_step.py).
// They need no call, so the CPU loop vectorises (two exp_of per element instead of two scalar
// tanhf).  Where e overflows or underflows, X' is 0 or 1 and the slope 0.
ADVFAST_HD float exp_neg2(float w) { return exp_of(-2.f * w); }
ADVFAST_HD float tanh_image(float e) { return 1.f / (1.f + e); }
ADVFAST_HD float tanh_slope(float e) { return 2.f / ((e + 2.f) + 1.f / e); }

// d/dw of CW's loss ||X' - X0||^2 - c * O, where g_obj = dO/dX' is the gradient of the head's
// objective (O = min(margin, kappa), so -O is CW's max(max_i g_i - g_t, -kappa)) and slope =
// dX'/dw (tanh_slope).
ADVFAST_HD float cw_grad_w(float x, float x0, float g_obj, float c, float slope) {
  const float dl_dx = 2.f * (x - x0) - c * finite_or_zero(g_obj);
  return dl_dx * slope;
}

// One Adam step on one element, in torch.optim.Adam's order of operations: m <- lerp(m, g,
// 1 - beta1), v <- beta2 v + (1 - beta2) g^2, w <- w - step_size * m / (sqrt(v) / bc2_sqrt + eps)
// with step_size = lr / (1 - beta1^t) and bc2_sqrt = sqrt(1 - beta2^t) (see adam_scalars).
struct AdamConfig {
  float beta1, beta2, eps;
};

ADVFAST_HD float adam_update(float w, float g, float* m, float* v, AdamConfig cfg, float step_size,
                             float bc2_sqrt) {
  *m = *m + (1.f - cfg.beta1) * (g - *m);
  *v = *v * cfg.beta2 + (1.f - cfg.beta2) * g * g;
  const float denom = sqrtf(*v) / bc2_sqrt + cfg.eps;
  return w - step_size * (*m / denom);
}

// A sample's Adam scalars at step t (>= 1), computed in double as torch.optim.Adam does on the
// host, then rounded to float.
struct AdamScalars {
  float step_size, bc2_sqrt;
};

ADVFAST_HD AdamScalars adam_scalars(double lr, double beta1, double beta2, int64_t t) {
  const double bc1 = 1.0 - pow(beta1, static_cast<double>(t));
  const double bc2 = 1.0 - pow(beta2, static_cast<double>(t));
  return AdamScalars{static_cast<float>(lr / bc1), static_cast<float>(sqrt(bc2))};
}

}  // namespace advfast

// AVX-512 form of perturb_step_'s update and of its sum|P| (Eq. 11: P = grad, or sign(grad) as
// IFGS and CE-sign take it, Eq. 13), for float gradients without the rare divide-each scale.
// P of 16 gradient elements is one vfixupimmps (the element, or +-1, where it is finite; +0
// for NaN and +-inf, as perturbation_of); with the sign, x + a * P is one fused multiply-add,
// exact because a * (+-1 or 0) is.  Everything else is the generic loop's operations in its
// order, lane for lane (the tail on lanes 0, 1, ... under a mask), so x and the statistics are
// the generic code's bit for bit.  Why: GCC vectorises perturbation_of into a mask from one or
// two comparisons, a select and a masked move, which with the five statistics made the loop
// compute-bound (20 vector operations per 16 elements with the sign, 13 here).
// Included by kernels/perturb_step.cpp (which includes immintrin.h with the other headers) after
// capability.h and sample_chunks.h, in the AVX512 copy only (ADVFAST_CPU_AVX512).
#pragma once

#include <cstdint>

namespace advfast {
namespace ADVFAST_CPU_NS {

// vfixupimmps's response per input class, a nibble each from the lowest: QNaN, SNaN, zero, +1,
// -inf, +inf, negative, positive.  Codes: 1 the element itself, 8 +0, 9 -1, 0xA +1.  Denormals
// are negative or positive unless MXCSR.DAZ makes them zero, as in the generic comparisons.
constexpr uint32_t kFiniteTable = 0x11881188u;  // the element where finite, else +0
constexpr uint32_t kSignTable = 0xA988A888u;    // finite_sign_of: +-1 where finite non-zero

template <bool SIGN>
inline __m512 perturbation16(__m512 g) {
  const uint32_t table = SIGN ? kSignTable : kFiniteTable;
  return _mm512_fixupimm_ps(_mm512_setzero_ps(), g,
                            _mm512_set1_epi32(static_cast<int>(table)), 0);
}

inline __m512 abs16(__m512 v) {
  return _mm512_and_ps(v, _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff)));
}

// acc + |p|; with the sign p * p is |p| (1 or 0) and the fused add exact.
template <bool SIGN>
inline __m512 add_abs16(__m512 acc, __m512 p) {
  return SIGN ? _mm512_fmadd_ps(p, p, acc) : _mm512_add_ps(acc, abs16(p));
}

// old + scale * p, rounded as the generic (scale * p) + old.
template <bool SIGN>
inline __m512 stepped16(__m512 old, __m512 p, __m512 scale) {
  return SIGN ? _mm512_fmadd_ps(p, scale, old) : _mm512_add_ps(old, _mm512_mul_ps(scale, p));
}

inline __mmask16 first_lanes(int64_t r) { return static_cast<__mmask16>((1u << r) - 1u); }

// abs_sum over [0, n) in its kSumLanes lanes and order: lane 16 j + l of a row is lane l of
// acc[j]; the tail fills lanes 0, 1, ... under masks (masked-off lanes load 0, which adds 0).
template <bool SIGN>
inline float abs_sum_avx512(const float* __restrict__ g, int64_t n) {
  constexpr int kVectors = kSumLanes / kLanes;
  static_assert(kVectors == 4 && kChunk < (1 << 24), "the sign's tree below");
  __m512 acc[kVectors];
  for (int j = 0; j < kVectors; ++j) acc[j] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
    for (int j = 0; j < kVectors; ++j) {
      acc[j] = add_abs16<SIGN>(acc[j], perturbation16<SIGN>(_mm512_loadu_ps(g + i + j * kLanes)));
    }
  }
  for (int j = 0; i < n; i += kLanes, ++j) {
    const __mmask16 k = n - i >= kLanes ? __mmask16{0xFFFF} : first_lanes(n - i);
    acc[j] = add_abs16<SIGN>(acc[j], perturbation16<SIGN>(_mm512_maskz_loadu_ps(k, g + i)));
  }
  if (SIGN) {
    // Every lane holds a whole count of 1s below 2^24 (a chunk's length), so any order of the
    // adds gives the same float: a tree here instead of the 64 dependent adds below.
    return _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
  }
  alignas(64) float lanes[kSumLanes];
  for (int j = 0; j < kVectors; ++j) _mm512_store_ps(lanes + j * kLanes, acc[j]);
  float total = 0.f;
  for (int l = 0; l < kSumLanes; ++l) total += lanes[l];
  return total;
}

// The statistics' lanes as vectors (Lanes' fields, one vector each).  No member initialisers:
// GCC would compile the implicit constructor outside the AVX-512 target.
struct StepLanes {
  __m512 p, l1, l2, linf, moved;

  Partial total() const {
    Lanes acc;
    _mm512_storeu_ps(acc.p, p);
    _mm512_storeu_ps(acc.l1, l1);
    _mm512_storeu_ps(acc.l2, l2);
    _mm512_storeu_ps(acc.linf, linf);
    _mm512_storeu_ps(acc.moved, moved);
    return acc.total();
  }
};

// 16 elements (TAIL: the lanes of k only) of update_chunk<DIVIDE = false>: the same clamps in
// the same operand order (vmaxps / vminps return their second operand on a NaN, as clamp_to's
// comparisons do).
template <bool SIGN, bool EPS, bool SUM_P, bool TAIL>
inline __attribute__((always_inline)) void update16(
    float* __restrict__ x, const float* __restrict__ g, const float* __restrict__ x0, __mmask16 k,
    __m512 scale, __m512 lo, __m512 hi, __m512 eps, StepLanes* acc) {
  const __m512 old = TAIL ? _mm512_maskz_loadu_ps(k, x) : _mm512_loadu_ps(x);
  const __m512 base = TAIL ? _mm512_maskz_loadu_ps(k, x0) : _mm512_loadu_ps(x0);
  const __m512 p = perturbation16<SIGN>(TAIL ? _mm512_maskz_loadu_ps(k, g) : _mm512_loadu_ps(g));
  __m512 v = _mm512_min_ps(hi, _mm512_max_ps(lo, stepped16<SIGN>(old, p, scale)));
  if (EPS) {
    const __m512 lo_b = _mm512_max_ps(_mm512_sub_ps(base, eps), lo);
    const __m512 hi_b = _mm512_min_ps(_mm512_add_ps(base, eps), hi);
    v = _mm512_min_ps(hi_b, _mm512_max_ps(lo_b, v));
  }
  if (TAIL) {
    _mm512_mask_storeu_ps(x, k, v);
  } else {
    _mm512_storeu_ps(x, v);
  }
  const __m512 d = _mm512_sub_ps(v, base);
  const __m512 a = abs16(d);
  const __m512 step = abs16(_mm512_sub_ps(v, old));
  if (SUM_P) acc->p = add_abs16<SIGN>(acc->p, p);  // masked-off lanes have p = 0
  if (TAIL) {
    acc->l1 = _mm512_mask_add_ps(acc->l1, k, acc->l1, a);
    acc->l2 = _mm512_mask_add_ps(acc->l2, k, acc->l2, _mm512_mul_ps(d, d));
    acc->linf = _mm512_mask_max_ps(acc->linf, k, acc->linf, a);
    acc->moved = _mm512_mask_add_ps(acc->moved, k, acc->moved, step);
  } else {
    acc->l1 = _mm512_add_ps(acc->l1, a);
    acc->l2 = _mm512_add_ps(acc->l2, _mm512_mul_ps(d, d));
    acc->linf = _mm512_max_ps(acc->linf, a);
    acc->moved = _mm512_add_ps(acc->moved, step);
  }
}

// update_chunk<DIVIDE = false> for float gradients and a finite scale.
template <bool SIGN, bool EPS, bool SUM_P>
Partial update_avx512(float* __restrict__ x, const float* __restrict__ g,
                      const float* __restrict__ x0, int64_t n, float scale, float lo, float hi,
                      float eps) {
  const __m512 vscale = _mm512_set1_ps(scale), vlo = _mm512_set1_ps(lo),
               vhi = _mm512_set1_ps(hi), veps = _mm512_set1_ps(eps);
  const __m512 zero = _mm512_setzero_ps();
  StepLanes acc{zero, zero, zero, zero, zero};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    update16<SIGN, EPS, SUM_P, false>(x + i, g + i, x0 + i, 0xFFFF, vscale, vlo, vhi, veps,
                                      &acc);
  }
  if (i < n) {
    update16<SIGN, EPS, SUM_P, true>(x + i, g + i, x0 + i, first_lanes(n - i), vscale, vlo, vhi,
                                     veps, &acc);
  }
  return acc.total();
}

}  // namespace ADVFAST_CPU_NS
}  // namespace advfast

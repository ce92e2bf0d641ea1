// The CPU kernels' interface.  Each body in csrc/cpu/kernels/ is one translation unit that
// setup.py compiles once per capability (DEFAULT, and on x86 AVX2 and AVX512), each copy in its
// own namespace advfast::cpu_<capability>; the entry points (csrc/cpu/*.cpp) check the
// arguments and call ADVFAST_CPU_KERNEL(name) (cpu_isa.h).  Raw pointers, no at::Tensor: the
// bodies include little more than ATen/Parallel.h, so they compile quickly three times.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../advfast_math.h"
#include "cpu_isa.h"

namespace advfast {

// The element type of the logits or of the gradient a kernel reads.
enum class Elem { F32, F16, BF16 };

inline Elem elem_of(c10::ScalarType t) {
  return t == c10::kHalf ? Elem::F16 : (t == c10::kBFloat16 ? Elem::BF16 : Elem::F32);
}

// Calls f with p as a pointer to its element type.
template <typename F>
void with_elem(Elem elem, const void* p, const F& f) {
  switch (elem) {
    case Elem::F16:
      return f(static_cast<const c10::Half*>(p));
    case Elem::BF16:
      return f(static_cast<const c10::BFloat16*>(p));
    default:
      return f(static_cast<const float*>(p));
  }
}

// Independent running states per loop: enough for the compiler to vectorise a reduction.
constexpr int kLanes = 16;
// Every sample is cut into chunks of kChunk elements, one task each, so results do not depend
// on the thread count.
constexpr int64_t kChunk = 1 << 15;

struct HeadArgs {
  const void* logits;  // [B, M] of `elem`, strides s0 and s1
  Elem elem;
  int64_t s0, s1, B, M;
  const int64_t *target, *source;  // [B], in [0, M)
  float *seed, *stats;             // [B, M] and [B, kHeadStats]
  Loss loss;
  float kappa;
  KappaMode mode;
  float threshold;
  CeSeed ce_seed;  // CE's target element: the others' probabilities summed, or 1 - p_c
};

struct StepArgs {
  float* x;          // [B, N] flat per sample, updated in place
  const void* grad;  // [B, N] of `elem`
  Elem elem;
  const float* x0;      // [B, N]
  const bool* active;   // [B] or null (all)
  int64_t B, N;
  bool sign, equal_perturbation, use_eps;
  bool exact_l1;  // equal perturbation only: add exactly beta in L1 where there is room
  float alpha, beta, lo, hi, eps;
  float* stats;  // [B, kStepStats]
};

struct AdamArgs {
  float *w, *m, *v, *x;  // [B, N] flat per sample, updated in place
  const void* grad;      // [B, N] of `elem`
  Elem elem;
  const float *x0, *c;  // [B, N] and [B]
  const int64_t* step;  // [B], >= 1
  const bool* active;   // [B] or null (all)
  int64_t B, N;
  double lr;
  AdamConfig cfg;
  float* stats;  // [B, kStepStats]
};

#define ADVFAST_DECLARE_CPU_KERNELS(CAPABILITY)   \
  namespace cpu_##CAPABILITY {                    \
  void loss_head_kernel(const HeadArgs& a);       \
  void perturb_step_kernel(const StepArgs& a);    \
  void adam_tanh_step_kernel(const AdamArgs& a);  \
  }

ADVFAST_DECLARE_CPU_KERNELS(DEFAULT)
#ifdef ADVFAST_X86_DISPATCH
ADVFAST_DECLARE_CPU_KERNELS(AVX2)
ADVFAST_DECLARE_CPU_KERNELS(AVX512)
#endif
#undef ADVFAST_DECLARE_CPU_KERNELS

}  // namespace advfast

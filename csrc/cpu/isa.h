// Run-time choice of the instruction set for the CPU kernels.  Each op's .cpp compiles its
// kernel body once per ISA (baseline, AVX2, AVX-512) through isa_copies.h and calls the copy
// ADVFAST_BEST picks.
#pragma once

#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string_view>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define ADVFAST_X86_DISPATCH 1
#endif

namespace advfast {

// The ISA the CPU kernels use: the best one this CPU supports ("avx512", "avx2" or "default"),
// capped by the environment variable ADVFAST_CPU_ISA (for tests and comparisons).
inline const char* cpu_isa_name() {
  static const char* isa = [] {
    const char* best = "default";
#ifdef ADVFAST_X86_DISPATCH
    if (__builtin_cpu_supports("avx2")) best = "avx2";
    if (best == std::string_view("avx2") && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")) {
      best = "avx512";
    }
#endif
    const char* cap = std::getenv("ADVFAST_CPU_ISA");
    if (cap == nullptr) return best;
    const std::string_view order[] = {"default", "avx2", "avx512"};
    int cap_rank = -1, best_rank = 0;
    for (int r = 0; r < 3; ++r) {
      if (order[r] == cap) cap_rank = r;
      if (order[r] == best) best_rank = r;
    }
    TORCH_CHECK_VALUE(cap_rank >= 0, "ADVFAST_CPU_ISA must be default, avx2 or avx512, got ", cap);
    return order[std::min(cap_rank, best_rank)].data();
  }();
  return isa;
}

// The copy of a kernel function for the running CPU, given one pointer per ISA.
template <typename Fn>
Fn pick_isa(Fn baseline, [[maybe_unused]] Fn avx2, [[maybe_unused]] Fn avx512) {
  const std::string_view isa = cpu_isa_name();
  if (isa == "avx512") return avx512;
  if (isa == "avx2") return avx2;
  return baseline;
}

}  // namespace advfast

// ADVFAST_BEST(name) is &isa_<best>::name, for a function compiled through isa_copies.h.
#ifdef ADVFAST_X86_DISPATCH
#define ADVFAST_BEST(...) \
  ::advfast::pick_isa(&isa_default::__VA_ARGS__, &isa_avx2::__VA_ARGS__, &isa_avx512::__VA_ARGS__)
#else
#define ADVFAST_BEST(...) (&isa_default::__VA_ARGS__)
#endif

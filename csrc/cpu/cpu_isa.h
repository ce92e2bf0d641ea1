// Run-time choice of the CPU capability: the kernel bodies in csrc/cpu/kernels/ are compiled
// once per capability (setup.py), and each entry point calls the copy the running CPU supports.
#pragma once

#include <string>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define ADVFAST_X86_DISPATCH 1
#endif

namespace advfast {

// "avx512", "avx2" or "default": the best this CPU supports, capped by the environment
// variable ADVFAST_CPU_ISA (for tests and comparisons).  Decided once per process.
const char* cpu_isa_name();

// torch.ops.advfast.cpu_isa().
std::string cpu_isa();

enum class CpuCapability { DEFAULT, AVX2, AVX512 };

CpuCapability cpu_capability();

// The copy of a kernel for the chosen capability, given one pointer per capability.
template <typename Fn>
Fn* pick_capability(Fn* baseline, [[maybe_unused]] Fn* avx2, [[maybe_unused]] Fn* avx512) {
  switch (cpu_capability()) {
    case CpuCapability::AVX512:
      return avx512;
    case CpuCapability::AVX2:
      return avx2;
    default:
      return baseline;
  }
}

}  // namespace advfast

// ADVFAST_CPU_KERNEL(name): advfast::cpu_<capability>::name for the running CPU.
#ifdef ADVFAST_X86_DISPATCH
#define ADVFAST_CPU_KERNEL(name) \
  ::advfast::pick_capability(&cpu_DEFAULT::name, &cpu_AVX2::name, &cpu_AVX512::name)
#else
#define ADVFAST_CPU_KERNEL(name) (&cpu_DEFAULT::name)
#endif

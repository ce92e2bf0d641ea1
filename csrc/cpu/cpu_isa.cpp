// The CPU capability the kernels run with (see cpu_isa.h).
#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string_view>

namespace advfast {
namespace {

constexpr const char* kNames[] = {"default", "avx2", "avx512"};  // CpuCapability order

CpuCapability best_supported() {
#ifdef ADVFAST_X86_DISPATCH
  if (!__builtin_cpu_supports("avx2")) return CpuCapability::DEFAULT;
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return avx512 ? CpuCapability::AVX512 : CpuCapability::AVX2;
#else
  return CpuCapability::DEFAULT;
#endif
}

CpuCapability chosen() {
  const CpuCapability best = best_supported();
  const char* cap = std::getenv("ADVFAST_CPU_ISA");
  if (cap == nullptr) return best;
  int rank = -1;
  for (int r = 0; r < 3; ++r) {
    if (std::string_view(kNames[r]) == cap) rank = r;
  }
  TORCH_CHECK_VALUE(rank >= 0, "ADVFAST_CPU_ISA must be default, avx2 or avx512, got ", cap);
  return static_cast<CpuCapability>(std::min(rank, static_cast<int>(best)));
}

}  // namespace

CpuCapability cpu_capability() {
  static const CpuCapability capability = chosen();
  return capability;
}

const char* cpu_isa_name() { return kNames[static_cast<int>(cpu_capability())]; }

std::string cpu_isa() { return cpu_isa_name(); }

}  // namespace advfast

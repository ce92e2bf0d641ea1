// Compiles the kernel body named by ADVFAST_KERNEL_BODY once per instruction set, in the
// namespaces isa_default / isa_avx2 / isa_avx512 (see isa.h), each auto-vectorised for its ISA.
// No include guard on purpose: each op's .cpp includes it once, for its own body.
#ifndef ADVFAST_KERNEL_BODY
#error "define ADVFAST_KERNEL_BODY before including isa_copies.h"
#endif

namespace isa_default {
#include ADVFAST_KERNEL_BODY
}  // namespace isa_default

#ifdef ADVFAST_X86_DISPATCH
#pragma GCC push_options
#pragma GCC target("avx2")
namespace isa_avx2 {
#include ADVFAST_KERNEL_BODY
}  // namespace isa_avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2")
namespace isa_avx512 {
#include ADVFAST_KERNEL_BODY
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

#undef ADVFAST_KERNEL_BODY

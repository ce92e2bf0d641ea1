// Included last by every kernel body in csrc/cpu/kernels/: from here on the code is compiled
// for the capability setup.py names with ADVFAST_CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) and
// the matching ADVFAST_CPU_TARGET (a `#pragma GCC target` string, none for DEFAULT), inside
// namespace advfast::cpu_<capability>.  The target starts after the headers on purpose: inline
// functions of the standard library and ATen stay compiled for the baseline, so the linker
// cannot pick an AVX copy of one for code that runs on a CPU without AVX.
// No include guard on purpose: it opens the target region of the file that includes it.
#ifndef ADVFAST_CPU_CAPABILITY
#error "compile the kernel bodies through setup.py, which defines ADVFAST_CPU_CAPABILITY"
#endif

#define ADVFAST_CAT_(a, b) a##b
#define ADVFAST_CAT(a, b) ADVFAST_CAT_(a, b)
// The namespace of this copy: cpu_DEFAULT, cpu_AVX2 or cpu_AVX512.
#define ADVFAST_CPU_NS ADVFAST_CAT(cpu_, ADVFAST_CPU_CAPABILITY)

// ADVFAST_CPU_AVX512 is 1 in the AVX512 copy, for its hand-written intrinsics (GCC does not
// define __AVX512F__ under `#pragma GCC target` in C++).
#define ADVFAST_CPU_IS_AVX512 1
#if ADVFAST_CAT(ADVFAST_CPU_IS_, ADVFAST_CPU_CAPABILITY)
#define ADVFAST_CPU_AVX512 1
#else
#define ADVFAST_CPU_AVX512 0
#endif

#ifdef ADVFAST_CPU_TARGET
#define ADVFAST_PRAGMA_(x) _Pragma(#x)
#define ADVFAST_PRAGMA(x) ADVFAST_PRAGMA_(x)
ADVFAST_PRAGMA(GCC target(ADVFAST_CPU_TARGET))
#endif

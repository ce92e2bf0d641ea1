// CUDA fused step, mirroring csrc/cpu/perturb_step.cpp: every sample is cut into fixed chunks,
// one block per chunk.  (1) equal perturbation only: sum|P| per chunk, then per sample; (2)
// update the chunk and reduce its delta norms; (3) combine the chunks of each sample into stats.  Fixed chunking and
// ordered combination keep the result deterministic (no atomics).  exact_l1 (advfast_math.h):
// one block per sample runs each round's read-only evaluations of Newton's method on the scale
// and its update pass, with block reductions in between, then the delta norms of the final x.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "reduce.cuh"

namespace advfast {
namespace {

template <bool SIGN, typename g_t>
__device__ __forceinline__ float perturbation(g_t g) {
  return perturbation_of<SIGN>(static_cast<float>(g));
}

// partial: [B * chunks, 4] = p_l1, delta_l1, delta_l2^2, delta_linf of each chunk.
template <bool SIGN, typename g_t>
__global__ void abs_sum_kernel(const g_t* __restrict__ g, const bool* __restrict__ active,
                               int64_t N, int64_t chunks, float* __restrict__ partial) {
  __shared__ float smem[kThreads / kWarp];
  const ChunkRange r = chunk_range(N, chunks);
  if (active != nullptr && !active[r.sample]) {
    if (threadIdx.x == 0) chunk_partial(partial)[kPL1] = 0.f;
    return;
  }
  float acc = 0.f;
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += blockDim.x) {
    acc += fabsf(perturbation<SIGN>(g[i]));
  }
  acc = block_reduce(acc, Sum{}, smem);
  if (threadIdx.x == 0) chunk_partial(partial)[kPL1] = acc;
}

template <bool SIGN, typename g_t>
__global__ void update_kernel(float* __restrict__ x, const g_t* __restrict__ g,
                              const float* __restrict__ x0, const bool* __restrict__ active,
                              int64_t N, int64_t chunks, const float* __restrict__ sample_p_l1,
                              float alpha, float beta, float lo, float hi, bool use_eps,
                              float eps, float* __restrict__ partial) {
  __shared__ float smem[kThreads / kWarp];
  const ChunkRange r = chunk_range(N, chunks);
  const bool stepping = active == nullptr || active[r.sample];
  // Equal perturbation: the sample's sum|P| from sample_p_l1_kernel; else null (alpha rule).
  const bool equal_perturbation = sample_p_l1 != nullptr;
  const float p_l1 = equal_perturbation ? sample_p_l1[r.sample] : 0.f;
  const StepScale st = step_scale(equal_perturbation, alpha, beta, p_l1);
  ThreadSums sums;
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += blockDim.x) {
    float v = x[i];
    const float v0 = x0[i];
    float p_abs = 0.f, moved = 0.f;
    if (stepping) {
      const float p = perturbation<SIGN>(g[i]);
      const float old = v;
      v = updated_value(v, step_of(st, p, p_l1), v0, lo, hi, use_eps, eps);
      x[i] = v;
      p_abs = fabsf(p);
      moved = fabsf(v - old);
    }
    sums.add(p_abs, v - v0, moved);
  }
  // Equal perturbation: the chunk's sum|P| is already in place (abs_sum_kernel); the block
  // reduction is not done twice.
  write_chunk_partial(sums, smem, partial, equal_perturbation);
}

// One evaluation of the exact rule's f(a) and slope over a sample's elements [begin, end)
// (advfast_math.h); every thread of the block gets the sums.
template <bool SIGN, typename g_t>
__device__ float2 exact_eval(const float* __restrict__ x, const g_t* __restrict__ g,
                             const float* __restrict__ x0, int64_t begin, int64_t end,
                             ExactScale sc, float s, float lo, float hi, bool use_eps, float eps,
                             float* smem) {
  float f = 0.f, slope = 0.f;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float p = perturbation<SIGN>(g[i]);
    const float room = room_of(x[i], p, x0[i], lo, hi, use_eps, eps);
    const float u = exact_unit(sc, p, s);
    f += exact_added(sc.a, u, room);
    slope += exact_slope(sc.a, u, room);
  }
  const float total = block_reduce(f, Sum{}, smem);
  return make_float2(total, block_reduce(slope, Sum{}, smem));
}

// The exact rule's scale for the sample [begin, end): the first evaluation (sum|P|, S and the
// total room), then Newton's method; every thread takes the same steps.
template <bool SIGN, typename g_t>
__device__ ExactScale exact_scale(const float* __restrict__ x, const g_t* __restrict__ g,
                                  const float* __restrict__ x0, int64_t begin, int64_t end,
                                  float beta, float lo, float hi, bool use_eps, float eps,
                                  float* smem, float* p_l1, float* s) {
  float pa = 0.f, sa = 0.f, ra = 0.f;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float p = perturbation<SIGN>(g[i]);
    const float room = room_of(x[i], p, x0[i], lo, hi, use_eps, eps);
    pa += fabsf(p);
    sa += room > 0.f ? fabsf(p) : 0.f;
    ra += room;
  }
  *p_l1 = block_reduce(pa, Sum{}, smem);
  *s = block_reduce(sa, Sum{}, smem);
  ExactScale sc = exact_start(*s, block_reduce(ra, Sum{}, smem), beta);
  for (int pass = 0; !sc.all_room && pass < kExactPasses; ++pass) {
    const float2 e = exact_eval<SIGN>(x, g, x0, begin, end, sc, *s, lo, hi, use_eps, eps, smem);
    if (!exact_newton(beta, e.x, e.y, &sc)) break;
  }
  return sc;
}

// The rounds of the exact rule for the sample [begin, end) (advfast_math.h): returns the L1
// added; every thread gets it.
template <bool SIGN, typename g_t>
__device__ float exact_rounds(float* __restrict__ x, const g_t* __restrict__ g,
                              const float* __restrict__ x0, int64_t begin, int64_t end,
                              float beta, float lo, float hi, bool use_eps, float eps,
                              float* smem, float* p_l1) {
  float remaining = beta, added = 0.f;
  for (int round = 0; round < kExactRounds; ++round) {
    float s = 0.f, moved = 0.f, f_at_a = 0.f;
    const ExactScale sc = exact_scale<SIGN>(x, g, x0, begin, end, remaining, lo, hi, use_eps,
                                            eps, smem, p_l1, &s);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const float old = x[i], p = perturbation<SIGN>(g[i]);
      if (sc.predicted) {
        f_at_a += exact_added(sc.a, exact_unit(sc, p, s),
                              room_of(old, p, x0[i], lo, hi, use_eps, eps));
      }
      const float v = updated_value(old, exact_step(sc, p, s), x0[i], lo, hi, use_eps, eps);
      x[i] = v;
      moved += fabsf(v - old);
    }
    moved = block_reduce(moved, Sum{}, smem);
    f_at_a = block_reduce(f_at_a, Sum{}, smem);
    added += moved;
    const bool again = exact_another_round(remaining, f_at_a, moved, beta, sc);
    remaining -= moved;
    if (!again) break;
  }
  return added;
}

// exact_l1: one block per sample; writes the sample's stats row.
template <bool SIGN, typename g_t>
__global__ void exact_kernel(float* __restrict__ x, const g_t* __restrict__ g,
                             const float* __restrict__ x0, const bool* __restrict__ active,
                             int64_t N, float beta, float lo, float hi, bool use_eps, float eps,
                             float* __restrict__ stats) {
  __shared__ float smem[kThreads / kWarp];
  const int64_t b = blockIdx.x;
  const int64_t begin = b * N, end = begin + N;
  float p_l1 = 0.f, step_l1 = 0.f;
  if (active == nullptr || active[b]) {
    step_l1 = exact_rounds<SIGN>(x, g, x0, begin, end, beta, lo, hi, use_eps, eps, smem, &p_l1);
  }
  ThreadSums sums;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) sums.add(0.f, x[i] - x0[i]);
  const float l1 = block_reduce(sums.l1, Sum{}, smem);
  const float l2 = block_reduce(sums.l2, Sum{}, smem);
  const float linf = block_reduce(sums.linf, Max{}, smem);
  if (threadIdx.x == 0) {
    float* st = stats + b * kStepStats;
    st[kPL1] = p_l1;
    st[kDeltaL1] = l1;
    st[kDeltaL2] = sqrtf(l2);
    st[kDeltaLinf] = linf_of(linf, l1);
    st[kStepL1] = step_l1;
  }
}

at::Tensor perturb_step_cuda(at::Tensor x, const at::Tensor& grad, const at::Tensor& x0,
                             const std::optional<at::Tensor>& active, bool sign,
                             std::optional<double> alpha, std::optional<double> beta, double lo,
                             double hi, std::optional<double> eps, bool exact_l1) {
  check_perturb_step_args(x, grad, x0, active, alpha, beta, lo, hi, eps, exact_l1);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0);
  if (x.numel() == 0) return at::zeros({B, kStepStats}, x.options());
  // Every element is written by launch_combine_chunks (and every partial row by the kernels).
  at::Tensor stats = at::empty({B, kStepStats}, x.options());
  const StepOperands op = step_operands(x, grad, x0, active);
  const int64_t N = op.per_sample;
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  const int64_t blocks = B * chunks;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "advfast.perturb_step_: input too large");
  at::Tensor partial = at::empty({blocks, kStepStats}, x.options());
  const bool equal_perturbation = beta.has_value();
  at::Tensor p_l1 = equal_perturbation ? at::empty({B}, x.options()) : at::Tensor();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ADVFAST_DISPATCH_FLOATS(
      grad.scalar_type(), "perturb_step_cuda", [&] {
        auto run = [&](auto sign_tag) {
          constexpr bool SIGN = decltype(sign_tag)::value;
          const bool* act_ptr = op.active.defined() ? op.active.const_data_ptr<bool>() : nullptr;
          const auto grid = static_cast<unsigned int>(blocks);
          if (exact_l1) {
            exact_kernel<SIGN, scalar_t><<<static_cast<unsigned int>(B), kThreads, 0, stream>>>(
                op.x.data_ptr<float>(), op.grad.const_data_ptr<scalar_t>(),
                op.x0.const_data_ptr<float>(), act_ptr, N, static_cast<float>(*beta),
                static_cast<float>(lo), static_cast<float>(hi), eps.has_value(),
                static_cast<float>(eps.value_or(0.0)), stats.data_ptr<float>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            return;
          }
          if (equal_perturbation) {
            abs_sum_kernel<SIGN, scalar_t><<<grid, kThreads, 0, stream>>>(
                op.grad.const_data_ptr<scalar_t>(), act_ptr, N, chunks, partial.data_ptr<float>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            launch_sample_p_l1(partial, B, chunks, p_l1, stream);
          }
          update_kernel<SIGN, scalar_t><<<grid, kThreads, 0, stream>>>(
              op.x.data_ptr<float>(), op.grad.const_data_ptr<scalar_t>(), op.x0.const_data_ptr<float>(),
              act_ptr, N, chunks, equal_perturbation ? p_l1.const_data_ptr<float>() : nullptr,
              static_cast<float>(alpha.value_or(0.0)),
              static_cast<float>(beta.value_or(0.0)), static_cast<float>(lo),
              static_cast<float>(hi), eps.has_value(), static_cast<float>(eps.value_or(0.0)),
              partial.data_ptr<float>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (sign) {
          run(std::true_type{});
        } else {
          run(std::false_type{});
        }
      });
  if (!exact_l1) launch_combine_chunks(partial, B, chunks, stats, stream);
  if (!op.x.is_same(x)) x.copy_(op.x);
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(advfast, CUDA, m) { m.impl("perturb_step_", &perturb_step_cuda); }

}  // namespace advfast

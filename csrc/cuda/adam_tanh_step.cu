// CUDA Adam step in tanh space for Carlini-Wagner L2, mirroring csrc/cpu/adam_tanh_step.cpp:
// one block per chunk of a sample updates w, m, v and x = (tanh(w) + 1) / 2 and reduces
// sum|dL/dw| and the norms of x - x0; the chunks of each sample are then combined in order.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "reduce.cuh"

namespace advfast {
namespace {

template <typename g_t>
__global__ void adam_tanh_kernel(float* __restrict__ w, float* __restrict__ m,
                                 float* __restrict__ v, float* __restrict__ x,
                                 const g_t* __restrict__ g, const float* __restrict__ x0,
                                 const float* __restrict__ c, const int64_t* __restrict__ t,
                                 const bool* __restrict__ active, int64_t N, int64_t chunks,
                                 double lr, AdamConfig cfg, float* __restrict__ partial) {
  __shared__ float smem[kThreads / kWarp];
  __shared__ AdamScalars scalars;
  const ChunkRange r = chunk_range(N, chunks);
  const float cs = c[r.sample];
  const int64_t ts = t[r.sample];
  // The CPU entry point refuses step < 1 and a non-finite c; here that would need a host sync,
  // so such a sample is left as it is (not stepped, p_l1 = 0) rather than made NaN.
  const bool stepping = (active == nullptr || active[r.sample]) && ts >= 1 && isfinite(cs);
  if (threadIdx.x == 0 && stepping) scalars = adam_scalars(lr, cfg.beta1, cfg.beta2, ts);
  __syncthreads();
  ThreadSums sums;
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += blockDim.x) {
    float xi = x[i];
    const float x0i = x0[i];
    float gw_abs = 0.f, moved = 0.f;
    if (stepping) {
      const float gw = cw_grad_w(xi, x0i, static_cast<float>(g[i]), cs,
                                 tanh_slope(exp_neg2(w[i])));
      float mi = m[i], vi = v[i];
      const float wi = adam_update(w[i], gw, &mi, &vi, cfg, scalars.step_size,
                                   scalars.bc2_sqrt);
      const float x_old = xi;
      xi = tanh_image(exp_neg2(wi));
      moved = fabsf(xi - x_old);
      m[i] = mi;
      v[i] = vi;
      w[i] = wi;
      x[i] = xi;
      gw_abs = fabsf(gw);
    }
    sums.add(gw_abs, xi - x0i, moved);
  }
  write_chunk_partial(sums, smem, partial);
}

at::Tensor adam_tanh_step_cuda(at::Tensor w, at::Tensor m, at::Tensor v, at::Tensor x,
                               const at::Tensor& grad, const at::Tensor& x0, const at::Tensor& c,
                               const at::Tensor& step, const std::optional<at::Tensor>& active,
                               double lr, double beta1, double beta2, double eps) {
  check_adam_tanh_args(w, m, v, x, grad, x0, c, step, active, lr, beta1, beta2, eps);
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t B = w.size(0);
  if (w.numel() == 0) return at::zeros({B, kStepStats}, w.options());
  // Every element is written by launch_combine_chunks (and every partial row by the kernel).
  at::Tensor stats = at::empty({B, kStepStats}, w.options());
  AdamOperands op = adam_operands(w, m, v, x, grad, x0, c, step, active);
  const int64_t N = w.numel() / B;
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  const int64_t blocks = B * chunks;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "advfast.adam_tanh_step_: input too large");
  at::Tensor partial = at::empty({blocks, kStepStats}, w.options());
  const AdamConfig cfg = adam_config(beta1, beta2, eps);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ADVFAST_DISPATCH_FLOATS(grad.scalar_type(), "adam_tanh_step_cuda", [&] {
    adam_tanh_kernel<scalar_t><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        op.w.data_ptr<float>(), op.m.data_ptr<float>(), op.v.data_ptr<float>(),
        op.x.data_ptr<float>(), op.grad.const_data_ptr<scalar_t>(),
        op.x0.const_data_ptr<float>(), op.c.const_data_ptr<float>(),
        op.step.const_data_ptr<int64_t>(), op.active_ptr(), N, chunks, lr, cfg,
        partial.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  launch_combine_chunks(partial, B, chunks, stats, stream);
  op.write_back(w, m, v, x);
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(advfast, CUDA, m) { m.impl("adam_tanh_step_", &adam_tanh_step_cuda); }

}  // namespace advfast

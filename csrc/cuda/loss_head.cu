// CUDA loss head: one block per row.  Each thread reduces a strided slice of the row (online
// softmax, argmax, runner-up c*), the block merges the slices, then writes the seed row.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"

namespace advfast {
namespace {

constexpr int kThreads = 256;

struct RowState {
  OnlineSoftmax sm;
  ArgMax best;
  ArgMax runner_up;
};

__device__ __forceinline__ RowState merge(RowState a, const RowState& b) {
  a.sm = softmax_merge(a.sm, b.sm);
  a.best = argmax_merge(a.best, b.best);
  a.runner_up = argmax_merge(a.runner_up, b.runner_up);
  return a;
}

template <typename scalar_t>
__global__ void loss_head_kernel(const scalar_t* __restrict__ logits, int64_t s0, int64_t s1,
                                 const int64_t* __restrict__ target,
                                 const int64_t* __restrict__ source, float* __restrict__ seed,
                                 float* __restrict__ stats, int64_t M, Loss loss, float kappa,
                                 KappaMode mode, float threshold, CeSeed ce_seed) {
  __shared__ RowState partial[kThreads];
  __shared__ float others[kThreads];
  __shared__ float weight;
  const int64_t b = blockIdx.x;
  const scalar_t* row = logits + b * s0;
  const int64_t c = target[b];
  const int64_t src = source[b];
  float* st = stats + b * kHeadStats;
  // As PyTorch's own losses: an index out of range is a device-side assert (the CPU kernel
  // raises IndexError; the Python wrapper checks before either runs).
  CUDA_KERNEL_ASSERT(c >= 0 && c < M && "advfast.loss_head: target index out of range");
  CUDA_KERNEL_ASSERT(src >= 0 && src < M && "advfast.loss_head: source index out of range");
  if (c < 0 || c >= M || src < 0 || src >= M) return;  // where asserts are compiled out
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  RowState s{{kNegInf, 0.f}, {kNegInf, -1}, {kNegInf, -1}};
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
    const float v = static_cast<float>(row[i * s1]);
    s.sm = softmax_push(s.sm, v);
    s.best = argmax_push(s.best, v, i);
    if (i != c) s.runner_up = argmax_push(s.runner_up, v, i);
  }
  partial[threadIdx.x] = s;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      partial[threadIdx.x] = merge(partial[threadIdx.x], partial[threadIdx.x + stride]);
    }
    __syncthreads();
  }
  const RowState row_state = partial[0];
  if (threadIdx.x == 0) {
    write_head_stats(st, row_state.sm, row_state.best, row_state.runner_up,
                     static_cast<float>(row[c * s1]), static_cast<float>(row[src * s1]), c,
                     threshold);
    weight = kappa_weight(st[kMargin], kappa, mode);
  }
  __syncthreads();
  float other = 0.f;  // this thread's share of the sum of the others' probabilities
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
    const float v = seed_of(loss, static_cast<float>(row[i * s1]), i, c,
                            row_state.runner_up.index, weight, row_state.sm);
    seed[b * M + i] = v;
    other -= i == c ? 0.f : v;
  }
  if (loss != Loss::CE || ce_seed != CeSeed::EXACT) return;  // uniform over the block
  others[threadIdx.x] = other;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) others[threadIdx.x] += others[threadIdx.x + stride];
    __syncthreads();
  }
  // CeSeed::EXACT: 1 - p_c as the others' probabilities summed (no cancellation).
  if (threadIdx.x == 0) seed[b * M + c] = others[0];
}

std::tuple<at::Tensor, at::Tensor> loss_head_cuda(const at::Tensor& logits,
                                                  const at::Tensor& target,
                                                  const at::Tensor& source, c10::string_view loss,
                                                  double kappa, c10::string_view kappa_mode,
                                                  double threshold, c10::string_view ce_seed) {
  check_loss_head_args(logits, target, source, kappa, threshold);
  const Loss loss_code = parse_loss(loss);
  const CeSeed seed_mode = parse_ce_seed(ce_seed);
  const KappaMode mode = parse_kappa_mode(kappa_mode);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0);
  const int64_t M = logits.size(1);
  auto [seed, stats] = empty_head_outputs(logits);
  if (B == 0) return {seed, stats};
  const at::Tensor t = target.contiguous();
  const at::Tensor s = source.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ADVFAST_DISPATCH_FLOATS(
      logits.scalar_type(), "loss_head_cuda", [&] {
        loss_head_kernel<scalar_t><<<static_cast<unsigned int>(B), kThreads, 0, stream>>>(
            logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1),
            t.const_data_ptr<int64_t>(), s.const_data_ptr<int64_t>(), seed.data_ptr<float>(),
            stats.data_ptr<float>(), M, loss_code, static_cast<float>(kappa), mode,
            static_cast<float>(threshold), seed_mode);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {seed, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(advfast, CUDA, m) { m.impl("loss_head", &loss_head_cuda); }

}  // namespace advfast

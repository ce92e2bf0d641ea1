// Block-wide reductions used by the advfast CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "../advfast_math.h"

namespace advfast {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
// Every sample of N elements is cut into chunks of kChunk, one block each (no atomics: the
// chunks of a sample are combined in order, so results are deterministic).
constexpr int64_t kChunk = kThreads * 16;

struct Sum {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct Max {  // may drop a NaN: combine_chunks_kernel restores it with linf_of
  __device__ float operator()(float a, float b) const { return max_of(a, b); }
};

struct ChunkRange {
  int64_t sample;
  int64_t begin;
  int64_t end;
};

// This block's chunk of a [B, N] buffer cut in `chunks` chunks per sample.
__device__ __forceinline__ ChunkRange chunk_range(int64_t N, int64_t chunks) {
  const int64_t task = blockIdx.x;
  const int64_t b = task / chunks;
  const int64_t begin = b * N + (task % chunks) * kChunk;
  return ChunkRange{b, begin, min(begin + kChunk, (b + 1) * N)};
}

// Combines one value per thread with `op`; every thread of the block gets the result.
// `smem` must hold blockDim.x / 32 elements; blockDim.x must be a multiple of 32.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* smem) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
  }
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? smem[lane] : smem[0];
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const T other = __shfl_down_sync(0xffffffffu, v, offset);
      if (lane + offset < warps) v = op(v, other);
    }
    if (lane == 0) smem[0] = v;
  }
  __syncthreads();
  return smem[0];
}

// One thread's running sums over its elements of a chunk: sum p, and the norms of d = x - x0.
struct ThreadSums {
  float p = 0.f, l1 = 0.f, l2 = 0.f, linf = 0.f;

  __device__ __forceinline__ void add(float p_abs, float d) {
    p += p_abs;
    l1 += fabsf(d);
    l2 += d * d;
    linf = max_of(linf, fabsf(d));
  }
};

// Reduces the block's per-thread sums and writes them as this chunk's row of partial
// [tasks, 4]: sum p (unless keep_p: the column already holds it and other blocks read it),
// sum |d|, sum d^2, max |d|.
__device__ __forceinline__ void write_chunk_partial(ThreadSums t, float* smem, float* partial,
                                                    bool keep_p = false) {
  const float l1 = block_reduce(t.l1, Sum{}, smem);
  const float l2 = block_reduce(t.l2, Sum{}, smem);
  const float linf = block_reduce(t.linf, Max{}, smem);
  const float p = keep_p ? 0.f : block_reduce(t.p, Sum{}, smem);
  if (threadIdx.x == 0) {
    float* out = partial + blockIdx.x * kStepStats;
    if (!keep_p) out[0] = p;
    out[1] = l1;
    out[2] = l2;
    out[3] = linf;
  }
}

// stats[b] = [sum p, sum |d|, sqrt(sum d^2), max |d|] over sample b's chunks, in order.
// (static: every .cu that includes this header gets its own copy of the kernel.)
static __global__ void combine_chunks_kernel(const float* __restrict__ partial, int64_t B,
                                      int64_t chunks, float* __restrict__ stats) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  float out[kStepStats] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t k = 0; k < chunks; ++k) {
    const float* p = partial + (b * chunks + k) * kStepStats;
    out[0] += p[0];
    out[1] += p[1];
    out[2] += p[2];
    out[3] = max_of(out[3], p[3]);
  }
  float* st = stats + b * kStepStats;
  st[0] = out[0];
  st[1] = out[1];
  st[2] = sqrtf(out[2]);
  st[3] = linf_of(out[3], out[1]);
}

inline void launch_combine_chunks(const at::Tensor& partial, int64_t B, int64_t chunks,
                                  const at::Tensor& stats, cudaStream_t stream) {
  combine_chunks_kernel<<<static_cast<unsigned int>((B + kThreads - 1) / kThreads), kThreads, 0,
                          stream>>>(partial.const_data_ptr<float>(), B, chunks,
                                    stats.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace advfast

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

// One thread's running sums over its elements of a chunk: sum p, the norms of d = x - x0 and
// the L1 the step added (sum |x_new - x_old|).
struct ThreadSums {
  float p = 0.f, l1 = 0.f, l2 = 0.f, linf = 0.f, moved = 0.f;

  __device__ __forceinline__ void add(float p_abs, float d, float moved_abs = 0.f) {
    p += p_abs;
    l1 += fabsf(d);
    l2 += d * d;
    linf = max_of(linf, fabsf(d));
    moved += moved_abs;
  }
};

// This block's row of partial [B * chunks, kStepStats] (64-bit: blocks * kStepStats may not fit
// in the 32-bit product of blockIdx.x).
__device__ __forceinline__ float* chunk_partial(float* partial) {
  return partial + static_cast<int64_t>(blockIdx.x) * kStepStats;
}

// Reduces the block's per-thread sums and writes them as this chunk's row of partial:
// sum p (unless keep_p: the column already holds it), sum |d|, sum d^2, max |d|, sum moved.
__device__ __forceinline__ void write_chunk_partial(ThreadSums t, float* smem, float* partial,
                                                    bool keep_p = false) {
  const float l1 = block_reduce(t.l1, Sum{}, smem);
  const float l2 = block_reduce(t.l2, Sum{}, smem);
  const float linf = block_reduce(t.linf, Max{}, smem);
  const float moved = block_reduce(t.moved, Sum{}, smem);
  const float p = keep_p ? 0.f : block_reduce(t.p, Sum{}, smem);
  if (threadIdx.x == 0) {
    float* out = chunk_partial(partial);
    if (!keep_p) out[kPL1] = p;
    out[kDeltaL1] = l1;
    out[kDeltaL2] = l2;
    out[kDeltaLinf] = linf;
    out[kStepL1] = moved;
  }
}

// The index of this thread's sample when one thread handles one sample; -1 past the batch.
__device__ __forceinline__ int64_t sample_of_thread(int64_t B) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  return b < B ? b : -1;
}

// p_l1[b] = sum over sample b's chunks of partial[., kPL1], in chunk order (deterministic).
// Run once per sample between the sum|P| pass and the update, so that no block of the update
// re-sums the chunks of its sample.  (static: each .cu that includes this has its own copy.)
static __global__ void sample_p_l1_kernel(const float* __restrict__ partial, int64_t B,
                                          int64_t chunks, float* __restrict__ p_l1) {
  const int64_t b = sample_of_thread(B);
  if (b < 0) return;
  float total = 0.f;
  for (int64_t k = 0; k < chunks; ++k) total += partial[(b * chunks + k) * kStepStats + kPL1];
  p_l1[b] = total;
}

// stats[b] = [sum p, sum |d|, sqrt(sum d^2), max |d|, sum moved] over sample b's chunks, in
// order.
static __global__ void combine_chunks_kernel(const float* __restrict__ partial, int64_t B,
                                             int64_t chunks, float* __restrict__ stats) {
  const int64_t b = sample_of_thread(B);
  if (b < 0) return;
  float out[kStepStats] = {};
  for (int64_t k = 0; k < chunks; ++k) {
    const float* p = partial + (b * chunks + k) * kStepStats;
    out[kPL1] += p[kPL1];
    out[kDeltaL1] += p[kDeltaL1];
    out[kDeltaL2] += p[kDeltaL2];
    out[kDeltaLinf] = max_of(out[kDeltaLinf], p[kDeltaLinf]);
    out[kStepL1] += p[kStepL1];
  }
  float* st = stats + b * kStepStats;
  st[kPL1] = out[kPL1];
  st[kDeltaL1] = out[kDeltaL1];
  st[kDeltaL2] = sqrtf(out[kDeltaL2]);
  st[kDeltaLinf] = linf_of(out[kDeltaLinf], out[kDeltaL1]);
  st[kStepL1] = out[kStepL1];
}

inline unsigned int per_sample_blocks(int64_t B) {
  return static_cast<unsigned int>((B + kThreads - 1) / kThreads);
}

// p_l1 [B] from the sum|P| column of partial (see sample_p_l1_kernel).
inline void launch_sample_p_l1(const at::Tensor& partial, int64_t B, int64_t chunks,
                               const at::Tensor& p_l1, cudaStream_t stream) {
  sample_p_l1_kernel<<<per_sample_blocks(B), kThreads, 0, stream>>>(
      partial.const_data_ptr<float>(), B, chunks, p_l1.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline void launch_combine_chunks(const at::Tensor& partial, int64_t B, int64_t chunks,
                                  const at::Tensor& stats, cudaStream_t stream) {
  combine_chunks_kernel<<<per_sample_blocks(B), kThreads, 0, stream>>>(
      partial.const_data_ptr<float>(), B, chunks, stats.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace advfast

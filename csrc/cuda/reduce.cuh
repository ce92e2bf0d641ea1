// Block-wide reductions used by the advfast CUDA kernels.
#pragma once

#include <cuda_runtime.h>

namespace advfast {

constexpr int kWarp = 32;

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

}  // namespace advfast

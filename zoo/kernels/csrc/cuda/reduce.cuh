// Block-wide reductions for the zoo CUDA kernels (blockDim.x a multiple of 32, <= 1024).
#pragma once

#include <cuda_runtime.h>

#include <cmath>

namespace zoo::cuda {

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Sum (or max) over the block; every thread gets the result. `shared` holds >= 32 values.
template <typename T, bool kMax>
__device__ T block_reduce(T v, T* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const T identity = kMax ? -INFINITY : T(0);
  T w = lane < warps ? shared[lane] : identity;
  w = kMax ? warp_max(w) : warp_sum(w);
  return w;
}

}  // namespace zoo::cuda

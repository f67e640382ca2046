// Shared helpers for the zoo kernels (host and device).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define ZOO_HD __host__ __device__ __forceinline__
#else
#define ZOO_HD inline
#endif

namespace zoo {

// SplitMix64 output number `index` of the stream `seed`: a counter-based generator, so every
// element draws its own noise independently of threads/blocks, identically on CPU and CUDA and
// in the pure-PyTorch reference (zoo/kernels/reference.py).
ZOO_HD uint64_t splitmix64(uint64_t seed, uint64_t index) {
  uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Uniform float in [2^-24, 1 - 2^-24]: the top 23 bits centred in their bucket, so every value
// (and 1 - u) is exact in float32 and never 0 or 1; log(-log(u)) is always finite.
ZOO_HD float uniform_open(uint64_t seed, uint64_t index) {
  return (static_cast<float>(splitmix64(seed, index) >> 41) + 0.5f) * 1.1920928955078125e-07f;
}

// Tile occupancy codes for masked attention.
constexpr int8_t kTileEmpty = 0;    // no allowed key: the tile is skipped
constexpr int8_t kTilePartial = 1;  // some allowed: apply the mask element-wise
constexpr int8_t kTileFull = 2;     // all allowed (or dense): no mask work

}  // namespace zoo

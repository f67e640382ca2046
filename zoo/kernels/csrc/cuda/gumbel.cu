// Fused Gumbel-Softmax / Gumbel-sigmoid, CUDA. The counter-based noise (common.h) is cheap to
// recompute, so each pass over a row regenerates it instead of storing it: one block per row,
// passes for max, sum, and the normalised write (+ argmax for hard samples).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common.h"
#include "reduce.cuh"

namespace zoo::cuda {
namespace {

constexpr int kThreads = 256;

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t perturbed(const scalar_t* z, int64_t c, uint64_t seed,
                                           uint64_t base, acc_t inv_tau) {
  const acc_t u = static_cast<acc_t>(zoo::uniform_open(seed, base + c));
  return (static_cast<acc_t>(z[c]) - log(-log(u))) * inv_tau;
}

template <typename scalar_t, typename acc_t>
__global__ void gumbel_softmax_kernel(const scalar_t* __restrict__ logits, int64_t K,
                                      acc_t inv_tau, bool hard, uint64_t seed,
                                      scalar_t* __restrict__ soft, scalar_t* __restrict__ out) {
  __shared__ acc_t shared[32];
  __shared__ acc_t best_val[32];
  __shared__ int64_t best_idx[32];
  const int64_t r = blockIdx.x;
  const scalar_t* z = logits + r * K;
  const uint64_t base = static_cast<uint64_t>(r * K);
  acc_t m = -INFINITY;
  for (int64_t c = threadIdx.x; c < K; c += blockDim.x) m = max(m, perturbed<acc_t>(z, c, seed, base, inv_tau));
  m = block_reduce<acc_t, true>(m, shared);
  acc_t s = 0;
  for (int64_t c = threadIdx.x; c < K; c += blockDim.x) s += exp(perturbed<acc_t>(z, c, seed, base, inv_tau) - m);
  s = block_reduce<acc_t, false>(s, shared);
  const acc_t inv_s = acc_t(1) / s;
  acc_t bv = -INFINITY;
  int64_t bi = 0;
  for (int64_t c = threadIdx.x; c < K; c += blockDim.x) {
    const acc_t p = exp(perturbed<acc_t>(z, c, seed, base, inv_tau) - m) * inv_s;
    soft[r * K + c] = static_cast<scalar_t>(p);
    if (p > bv) { bv = p; bi = c; }  // per thread: first maximum (c increases)
  }
  if (!hard) return;
  // block argmax, first maximum wins (as torch.argmax)
  for (int off = 16; off > 0; off >>= 1) {
    const acc_t ov = __shfl_xor_sync(0xffffffffu, bv, off);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, off);
    if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  if (lane == 0) { best_val[warp] = bv; best_idx[warp] = bi; }
  __syncthreads();
  if (warp == 0) {
    bv = lane < warps ? best_val[lane] : -INFINITY;
    bi = lane < warps ? best_idx[lane] : K;
    for (int off = 16; off > 0; off >>= 1) {
      const acc_t ov = __shfl_xor_sync(0xffffffffu, bv, off);
      const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, off);
      if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    if (lane == 0) best_idx[0] = bi;
  }
  __syncthreads();
  const int64_t best = best_idx[0];
  for (int64_t c = threadIdx.x; c < K; c += blockDim.x) out[r * K + c] = scalar_t(c == best ? 1 : 0);
}

template <typename scalar_t, typename acc_t>
__global__ void gumbel_softmax_backward_kernel(const scalar_t* __restrict__ grad,
                                               const scalar_t* __restrict__ soft, int64_t K,
                                               acc_t inv_tau, scalar_t* __restrict__ dz) {
  __shared__ acc_t shared[32];
  const int64_t r = blockIdx.x;
  acc_t dot = 0;
  for (int64_t c = threadIdx.x; c < K; c += blockDim.x)
    dot += static_cast<acc_t>(soft[r * K + c]) * static_cast<acc_t>(grad[r * K + c]);
  dot = block_reduce<acc_t, false>(dot, shared);
  for (int64_t c = threadIdx.x; c < K; c += blockDim.x) {
    const acc_t s = static_cast<acc_t>(soft[r * K + c]);
    dz[r * K + c] = static_cast<scalar_t>(s * (static_cast<acc_t>(grad[r * K + c]) - dot) * inv_tau);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void gumbel_sigmoid_kernel(const scalar_t* __restrict__ logits, int64_t n,
                                      acc_t inv_tau, bool hard, uint64_t seed,
                                      scalar_t* __restrict__ soft, scalar_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t u = static_cast<acc_t>(zoo::uniform_open(seed, i));
    const acc_t x = (static_cast<acc_t>(logits[i]) + log(u) - log(acc_t(1) - u)) * inv_tau;
    const acc_t e = exp(-fabs(x));
    const acc_t s = x >= 0 ? acc_t(1) / (acc_t(1) + e) : e / (acc_t(1) + e);
    soft[i] = static_cast<scalar_t>(s);
    if (hard) out[i] = scalar_t(s > acc_t(0.5) ? 1 : 0);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void gumbel_sigmoid_backward_kernel(const scalar_t* __restrict__ grad,
                                               const scalar_t* __restrict__ soft, int64_t n,
                                               acc_t inv_tau, scalar_t* __restrict__ dz) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t s = static_cast<acc_t>(soft[i]);
    dz[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[i]) * s * (acc_t(1) - s) * inv_tau);
  }
}

void check_tau(double tau) {
  TORCH_CHECK(tau > 0 && std::isfinite(tau), "tau must be a positive finite number, got ", tau);
}

int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

std::tuple<at::Tensor, at::Tensor> gumbel_softmax_cuda(const at::Tensor& logits_, double tau,
                                                       bool hard, int64_t seed) {
  check_tau(tau);
  c10::cuda::CUDAGuard guard(logits_.device());
  auto logits = logits_.contiguous();
  const int64_t K = logits.size(-1);
  const int64_t rows = K == 0 ? 0 : logits.numel() / K;
  auto soft = at::empty_like(logits);
  auto out = hard ? at::empty_like(logits) : at::empty({0}, logits.options());
  if (rows == 0) return {out, soft};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "gumbel_softmax_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gumbel_softmax_kernel<scalar_t, acc_t><<<rows, kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), K, static_cast<acc_t>(1.0 / tau), hard,
        static_cast<uint64_t>(seed), soft.data_ptr<scalar_t>(),
        hard ? out.data_ptr<scalar_t>() : nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, soft};
}

at::Tensor gumbel_softmax_backward_cuda(const at::Tensor& grad_, const at::Tensor& soft_, double tau) {
  check_tau(tau);
  c10::cuda::CUDAGuard guard(soft_.device());
  auto soft = soft_.contiguous();
  auto grad = grad_.to(soft.scalar_type()).contiguous();
  const int64_t K = soft.size(-1);
  const int64_t rows = K == 0 ? 0 : soft.numel() / K;
  auto dz = at::empty_like(soft);
  if (rows == 0) return dz;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, soft.scalar_type(), "gumbel_softmax_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gumbel_softmax_backward_kernel<scalar_t, acc_t><<<rows, kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), soft.data_ptr<scalar_t>(), K, static_cast<acc_t>(1.0 / tau),
        dz.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dz;
}

std::tuple<at::Tensor, at::Tensor> gumbel_sigmoid_cuda(const at::Tensor& logits_, double tau,
                                                       bool hard, int64_t seed) {
  check_tau(tau);
  c10::cuda::CUDAGuard guard(logits_.device());
  auto logits = logits_.contiguous();
  const int64_t n = logits.numel();
  auto soft = at::empty_like(logits);
  auto out = hard ? at::empty_like(logits) : at::empty({0}, logits.options());
  if (n == 0) return {out, soft};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "gumbel_sigmoid_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gumbel_sigmoid_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), n, static_cast<acc_t>(1.0 / tau), hard,
        static_cast<uint64_t>(seed), soft.data_ptr<scalar_t>(),
        hard ? out.data_ptr<scalar_t>() : nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, soft};
}

at::Tensor gumbel_sigmoid_backward_cuda(const at::Tensor& grad_, const at::Tensor& soft_, double tau) {
  check_tau(tau);
  c10::cuda::CUDAGuard guard(soft_.device());
  auto soft = soft_.contiguous();
  auto grad = grad_.to(soft.scalar_type()).contiguous();
  const int64_t n = soft.numel();
  auto dz = at::empty_like(soft);
  if (n == 0) return dz;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, soft.scalar_type(), "gumbel_sigmoid_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gumbel_sigmoid_backward_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), soft.data_ptr<scalar_t>(), n, static_cast<acc_t>(1.0 / tau),
        dz.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dz;
}

}  // namespace
}  // namespace zoo::cuda

TORCH_LIBRARY_IMPL(zoo, CUDA, m) {
  m.impl("gumbel_softmax", &zoo::cuda::gumbel_softmax_cuda);
  m.impl("gumbel_softmax_backward", &zoo::cuda::gumbel_softmax_backward_cuda);
  m.impl("gumbel_sigmoid", &zoo::cuda::gumbel_sigmoid_cuda);
  m.impl("gumbel_sigmoid_backward", &zoo::cuda::gumbel_sigmoid_backward_cuda);
}

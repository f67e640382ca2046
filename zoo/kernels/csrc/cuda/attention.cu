// Flash-style masked attention, CUDA. One thread per query row (forward, dQ) or key row
// (dK/dV); key/value (or query/dO) tiles are staged in shared memory and streamed with an
// online softmax, so no [Lq, Lk] matrix exists. The keep mask's tile map (ops.cpp,
// tile_occupancy) lets whole blocks skip tiles the mask removes; fully kept tiles skip the
// per-element mask reads. Rows with no allowed key give zeros and lse = -inf.
// Head dims up to 128 (64 for double).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "../ops.h"

namespace zoo::cuda {
namespace {

constexpr int kBQ = 64;   // query rows per forward/dQ block (= occupancy tile rows)
constexpr int kBK = 32;   // keys per tile (= occupancy tile columns, threads per dK/dV block)
constexpr int kSub = 16;  // query rows staged at once by the dK/dV kernel

struct MaskView {
  const bool* data;  // nullptr = dense
  int64_t s0, s1, s2, s3;
  const int8_t* occ;
  int64_t Bm, Hm, nq, nk;

  __device__ __forceinline__ int8_t tile(int64_t b, int64_t h, int64_t qb, int64_t kb) const {
    if (data == nullptr) return kTileFull;
    return occ[(((Bm == 1 ? 0 : b) * Hm + (Hm == 1 ? 0 : h)) * nq + qb) * nk + kb];
  }
  __device__ __forceinline__ bool keep(int8_t code, int64_t b, int64_t h, int64_t i, int64_t j) const {
    return code == kTileFull || data[b * s0 + h * s1 + i * s2 + j * s3];
  }
};

struct Dims {
  int64_t B, H, Lq, Lk, D, Dv, nq, nk;
};

// Stage keys/values k0 .. k0 + kBK of head bh in shared memory (zeros past Lk).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_kv_tile(const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                                             const Dims& dims, int64_t bh, int64_t k0, acc_t* Ks, acc_t* Vs) {
  for (int64_t idx = threadIdx.x; idx < kBK * dims.D; idx += blockDim.x) {
    const int64_t j = idx / dims.D, d = idx % dims.D;
    Ks[idx] = k0 + j < dims.Lk ? static_cast<acc_t>(k[(bh * dims.Lk + k0 + j) * dims.D + d]) : acc_t(0);
  }
  for (int64_t idx = threadIdx.x; idx < kBK * dims.Dv; idx += blockDim.x) {
    const int64_t j = idx / dims.Dv, d = idx % dims.Dv;
    Vs[idx] = k0 + j < dims.Lk ? static_cast<acc_t>(v[(bh * dims.Lk + k0 + j) * dims.Dv + d]) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t, int DMAX>
__global__ void attn_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                    const scalar_t* __restrict__ v, MaskView mask, Dims dims,
                                    acc_t scale, scalar_t* __restrict__ out, acc_t* __restrict__ lse) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* Ks = reinterpret_cast<acc_t*>(smem_raw);  // [kBK][D]
  acc_t* Vs = Ks + kBK * dims.D;                   // [kBK][Dv]
  const int64_t bh = blockIdx.y, b = bh / dims.H, h = bh % dims.H, qb = blockIdx.x;
  const int64_t i = qb * kBQ + threadIdx.x;
  const bool valid = i < dims.Lq;
  acc_t qr[DMAX], o[DMAX];
  for (int d = 0; d < dims.D; ++d) qr[d] = valid ? static_cast<acc_t>(q[(bh * dims.Lq + i) * dims.D + d]) * scale : acc_t(0);
  for (int d = 0; d < dims.Dv; ++d) o[d] = 0;
  acc_t m = -INFINITY, l = 0;
  for (int64_t kb = 0; kb < dims.nk; ++kb) {
    const int8_t code = mask.tile(b, h, qb, kb);
    if (code == kTileEmpty) continue;  // uniform across the block
    const int64_t k0 = kb * kBK;
    __syncthreads();
    load_kv_tile(k, v, dims, bh, k0, Ks, Vs);
    __syncthreads();
    if (!valid) continue;
    acc_t s[kBK];
    acc_t tmax = -INFINITY;
    for (int j = 0; j < kBK; ++j) {
      const int64_t kj = k0 + j;
      if (kj < dims.Lk && mask.keep(code, b, h, i, kj)) {
        acc_t dot = 0;
        for (int d = 0; d < dims.D; ++d) dot += qr[d] * Ks[j * dims.D + d];
        s[j] = dot;
        tmax = max(tmax, dot);
      } else {
        s[j] = -INFINITY;
      }
    }
    const acc_t mnew = max(m, tmax);
    if (mnew == -INFINITY) continue;
    const acc_t alpha = exp(m - mnew);
    l *= alpha;
    for (int d = 0; d < dims.Dv; ++d) o[d] *= alpha;
    for (int j = 0; j < kBK; ++j) {
      if (s[j] == -INFINITY) continue;
      const acc_t p = exp(s[j] - mnew);
      l += p;
      for (int d = 0; d < dims.Dv; ++d) o[d] += p * Vs[j * dims.Dv + d];
    }
    m = mnew;
  }
  if (!valid) return;
  const acc_t inv = l > 0 ? acc_t(1) / l : acc_t(0);
  for (int d = 0; d < dims.Dv; ++d) out[(bh * dims.Lq + i) * dims.Dv + d] = static_cast<scalar_t>(o[d] * inv);
  lse[bh * dims.Lq + i] = l > 0 ? m + log(l) : -INFINITY;
}

// D_i = <dO_i, O_i>
template <typename scalar_t, typename acc_t>
__global__ void attn_row_dot_kernel(const scalar_t* __restrict__ dout, const scalar_t* __restrict__ out,
                                    int64_t rows, int64_t Dv, acc_t* __restrict__ drow) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  acc_t acc = 0;
  for (int64_t d = 0; d < Dv; ++d) acc += static_cast<acc_t>(dout[r * Dv + d]) * static_cast<acc_t>(out[r * Dv + d]);
  drow[r] = acc;
}

template <typename scalar_t, typename acc_t, int DMAX>
__global__ void attn_dq_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                               const scalar_t* __restrict__ v, const scalar_t* __restrict__ dout,
                               const acc_t* __restrict__ lse, const acc_t* __restrict__ drow,
                               MaskView mask, Dims dims, acc_t scale, scalar_t* __restrict__ dq) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* Ks = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* Vs = Ks + kBK * dims.D;
  const int64_t bh = blockIdx.y, b = bh / dims.H, h = bh % dims.H, qb = blockIdx.x;
  const int64_t i = qb * kBQ + threadIdx.x;
  const bool valid = i < dims.Lq;
  const int64_t row = bh * dims.Lq + i;
  acc_t qr[DMAX], dor[DMAX], g[DMAX];
  for (int d = 0; d < dims.D; ++d) {
    qr[d] = valid ? static_cast<acc_t>(q[row * dims.D + d]) * scale : acc_t(0);
    g[d] = 0;
  }
  for (int d = 0; d < dims.Dv; ++d) dor[d] = valid ? static_cast<acc_t>(dout[row * dims.Dv + d]) : acc_t(0);
  const acc_t li = valid ? lse[row] : acc_t(-INFINITY);
  const acc_t di = valid ? drow[row] : acc_t(0);
  for (int64_t kb = 0; kb < dims.nk; ++kb) {
    const int8_t code = mask.tile(b, h, qb, kb);
    if (code == kTileEmpty) continue;
    const int64_t k0 = kb * kBK;
    __syncthreads();
    load_kv_tile(k, v, dims, bh, k0, Ks, Vs);
    __syncthreads();
    if (!valid || li == -INFINITY) continue;
    for (int j = 0; j < kBK; ++j) {
      const int64_t kj = k0 + j;
      if (kj >= dims.Lk || !mask.keep(code, b, h, i, kj)) continue;
      acc_t s = 0, dp = 0;
      for (int d = 0; d < dims.D; ++d) s += qr[d] * Ks[j * dims.D + d];
      for (int d = 0; d < dims.Dv; ++d) dp += dor[d] * Vs[j * dims.Dv + d];
      const acc_t ds = exp(s - li) * (dp - di);
      for (int d = 0; d < dims.D; ++d) g[d] += ds * Ks[j * dims.D + d];
    }
  }
  if (!valid) return;
  for (int d = 0; d < dims.D; ++d) dq[row * dims.D + d] = static_cast<scalar_t>(g[d] * scale);
}

template <typename scalar_t, typename acc_t, int DMAX>
__global__ void attn_dkv_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                const scalar_t* __restrict__ v, const scalar_t* __restrict__ dout,
                                const acc_t* __restrict__ lse, const acc_t* __restrict__ drow,
                                MaskView mask, Dims dims, acc_t scale, scalar_t* __restrict__ dk,
                                scalar_t* __restrict__ dv) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* Qs = reinterpret_cast<acc_t*>(smem_raw);  // [kSub][D], scaled
  acc_t* dOs = Qs + kSub * dims.D;                 // [kSub][Dv]
  acc_t* Ls = dOs + kSub * dims.Dv;                // [kSub]
  acc_t* Ds = Ls + kSub;                           // [kSub]
  const int64_t bh = blockIdx.y, b = bh / dims.H, h = bh % dims.H, kb = blockIdx.x;
  const int64_t j = kb * kBK + threadIdx.x;
  const bool valid = j < dims.Lk;
  acc_t kr[DMAX], vr[DMAX], gk[DMAX], gv[DMAX];
  for (int d = 0; d < dims.D; ++d) {
    kr[d] = valid ? static_cast<acc_t>(k[(bh * dims.Lk + j) * dims.D + d]) : acc_t(0);
    gk[d] = 0;
  }
  for (int d = 0; d < dims.Dv; ++d) {
    vr[d] = valid ? static_cast<acc_t>(v[(bh * dims.Lk + j) * dims.Dv + d]) : acc_t(0);
    gv[d] = 0;
  }
  for (int64_t qb = 0; qb < dims.nq; ++qb) {
    const int8_t code = mask.tile(b, h, qb, kb);
    if (code == kTileEmpty) continue;
    const int64_t i_end = (qb + 1) * kBQ < dims.Lq ? (qb + 1) * kBQ : dims.Lq;
    for (int64_t i0 = qb * kBQ; i0 < i_end; i0 += kSub) {
      __syncthreads();
      for (int64_t idx = threadIdx.x; idx < kSub * dims.D; idx += blockDim.x) {
        const int64_t r = idx / dims.D, d = idx % dims.D;
        Qs[idx] = i0 + r < dims.Lq ? static_cast<acc_t>(q[(bh * dims.Lq + i0 + r) * dims.D + d]) * scale : acc_t(0);
      }
      for (int64_t idx = threadIdx.x; idx < kSub * dims.Dv; idx += blockDim.x) {
        const int64_t r = idx / dims.Dv, d = idx % dims.Dv;
        dOs[idx] = i0 + r < dims.Lq ? static_cast<acc_t>(dout[(bh * dims.Lq + i0 + r) * dims.Dv + d]) : acc_t(0);
      }
      for (int64_t r = threadIdx.x; r < kSub; r += blockDim.x) {
        Ls[r] = i0 + r < dims.Lq ? lse[bh * dims.Lq + i0 + r] : acc_t(-INFINITY);
        Ds[r] = i0 + r < dims.Lq ? drow[bh * dims.Lq + i0 + r] : acc_t(0);
      }
      __syncthreads();
      if (!valid) continue;
      for (int r = 0; r < kSub; ++r) {
        const int64_t i = i0 + r;
        if (i >= dims.Lq || Ls[r] == -INFINITY || !mask.keep(code, b, h, i, j)) continue;
        acc_t s = 0, dp = 0;
        for (int d = 0; d < dims.D; ++d) s += Qs[r * dims.D + d] * kr[d];
        for (int d = 0; d < dims.Dv; ++d) dp += dOs[r * dims.Dv + d] * vr[d];
        const acc_t p = exp(s - Ls[r]);
        const acc_t ds = p * (dp - Ds[r]);
        for (int d = 0; d < dims.Dv; ++d) gv[d] += p * dOs[r * dims.Dv + d];
        for (int d = 0; d < dims.D; ++d) gk[d] += ds * Qs[r * dims.D + d];
      }
    }
  }
  if (!valid) return;
  for (int d = 0; d < dims.D; ++d) dk[(bh * dims.Lk + j) * dims.D + d] = static_cast<scalar_t>(gk[d]);
  for (int d = 0; d < dims.Dv; ++d) dv[(bh * dims.Lk + j) * dims.Dv + d] = static_cast<scalar_t>(gv[d]);
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct Prepared {
  Dims dims;
  MaskView mask;
  at::Tensor mask_holder, occ;
};

Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& keep_mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be [B, H, L, D]");
  Prepared p;
  p.dims = {q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), v.size(3), 0, 0};
  p.dims.nq = (p.dims.Lq + kBQ - 1) / kBQ;
  p.dims.nk = (p.dims.Lk + kBK - 1) / kBK;
  const int64_t dmax = q.scalar_type() == at::kDouble ? 64 : 128;
  TORCH_CHECK(p.dims.D <= dmax && p.dims.Dv <= dmax, "masked_attention on CUDA supports head dims up to ",
              dmax, " for ", q.scalar_type(), ", got D=", p.dims.D, " Dv=", p.dims.Dv);
  p.mask = {nullptr, 0, 0, 0, 0, nullptr, 1, 1, p.dims.nq, p.dims.nk};
  if (keep_mask.has_value()) {
    TORCH_CHECK(keep_mask->scalar_type() == at::kBool, "keep_mask must be bool (True = keep)");
    p.mask_holder = keep_mask->expand({p.dims.B, p.dims.H, p.dims.Lq, p.dims.Lk});
    p.occ = zoo::tile_occupancy(p.mask_holder, kBQ, kBK);
    auto& mh = p.mask_holder;
    p.mask = {mh.data_ptr<bool>(),
              mh.size(0) == 1 ? 0 : mh.stride(0), mh.size(1) == 1 ? 0 : mh.stride(1),
              mh.size(2) == 1 ? 0 : mh.stride(2), mh.size(3) == 1 ? 0 : mh.stride(3),
              p.occ.data_ptr<int8_t>(), p.occ.size(0), p.occ.size(1), p.dims.nq, p.dims.nk};
  }
  return p;
}

#define ZOO_DISPATCH_DMAX(D, ...)        \
  if ((D) <= 64) {                       \
    constexpr int DMAX = 64;             \
    __VA_ARGS__();                       \
  } else {                               \
    constexpr int DMAX = 128;            \
    __VA_ARGS__();                       \
  }

std::tuple<at::Tensor, at::Tensor> masked_attention_cuda(const at::Tensor& q_, const at::Tensor& k_,
                                                         const at::Tensor& v_,
                                                         const std::optional<at::Tensor>& keep_mask,
                                                         double scale) {
  c10::cuda::CUDAGuard guard(q_.device());
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  Prepared p = prepare(q, k, v, keep_mask);
  const Dims& d = p.dims;
  auto out = at::empty({d.B, d.H, d.Lq, d.Dv}, q.options());
  auto lse = at::empty({d.B, d.H, d.Lq}, q.options().dtype(acc_dtype(q.scalar_type())));
  if (d.B * d.H * d.Lq == 0) return {out, lse};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(d.nq, d.B * d.H);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "masked_attention_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = sizeof(acc_t) * kBK * (d.D + d.Dv);
    ZOO_DISPATCH_DMAX(std::max(d.D, d.Dv), [&] {
      attn_forward_kernel<scalar_t, acc_t, DMAX><<<grid, kBQ, smem, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), p.mask, d,
          static_cast<acc_t>(scale), out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const std::optional<at::Tensor>& keep_mask, const at::Tensor& out_, const at::Tensor& lse_,
    double scale) {
  c10::cuda::CUDAGuard guard(q_.device());
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  Prepared p = prepare(q, k, v, keep_mask);
  const Dims& d = p.dims;
  auto out = out_.to(q.scalar_type()).contiguous();
  auto dout = grad_out.to(q.scalar_type()).contiguous();
  const auto acc = acc_dtype(q.scalar_type());
  auto lse = lse_.to(acc).contiguous();
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (d.B * d.H == 0 || d.Lq == 0 || d.Lk == 0) {
    dq.zero_(); dk.zero_(); dv.zero_();
    return {dq, dk, dv};
  }
  auto drow = at::empty({d.B, d.H, d.Lq}, q.options().dtype(acc));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "masked_attention_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t rows = d.B * d.H * d.Lq;
    attn_row_dot_kernel<scalar_t, acc_t><<<(rows + 255) / 256, 256, 0, stream>>>(
        dout.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, d.Dv, drow.data_ptr<acc_t>());
    const size_t smem_q = sizeof(acc_t) * kBK * (d.D + d.Dv);
    const size_t smem_kv = sizeof(acc_t) * (kSub * (d.D + d.Dv) + 2 * kSub);
    ZOO_DISPATCH_DMAX(std::max(d.D, d.Dv), [&] {
      attn_dq_kernel<scalar_t, acc_t, DMAX><<<dim3(d.nq, d.B * d.H), kBQ, smem_q, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
          dout.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), drow.data_ptr<acc_t>(), p.mask, d,
          static_cast<acc_t>(scale), dq.data_ptr<scalar_t>());
      attn_dkv_kernel<scalar_t, acc_t, DMAX><<<dim3(d.nk, d.B * d.H), kBK, smem_kv, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
          dout.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), drow.data_ptr<acc_t>(), p.mask, d,
          static_cast<acc_t>(scale), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv};
}

}  // namespace
}  // namespace zoo::cuda

TORCH_LIBRARY_IMPL(zoo, CUDA, m) {
  m.impl("masked_attention", &zoo::cuda::masked_attention_cuda);
  m.impl("masked_attention_backward", &zoo::cuda::masked_attention_backward_cuda);
}

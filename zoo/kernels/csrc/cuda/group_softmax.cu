// GroupSoftmax cross-entropy, CUDA: one block per row; block reductions for the row max, the
// group max and the two exp-sums. Same formulas as cpu/group_softmax.cpp.
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

template <typename scalar_t, typename acc_t>
__global__ void gsce_forward_kernel(const scalar_t* __restrict__ logits,
                                    const int64_t* __restrict__ target,
                                    const int64_t* __restrict__ table,
                                    const int64_t* __restrict__ row_group, int64_t C, int64_t G,
                                    int64_t ignore_index, acc_t* loss, acc_t* lse, acc_t* lse_g) {
  __shared__ acc_t shared[32];
  const int64_t n = blockIdx.x;
  const int64_t y = target[n];
  if (y == ignore_index) {
    if (threadIdx.x == 0) loss[n] = lse[n] = lse_g[n] = acc_t(0);
    return;
  }
  const int64_t r = row_group[n];
  CUDA_KERNEL_ASSERT(y >= 0 && y < C && r >= 0 && r < G);
  const scalar_t* z = logits + n * C;
  const int64_t* trow = table + r * C;
  const int64_t gy = trow[y];
  acc_t m = -INFINITY, mg = -INFINITY;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const acc_t x = static_cast<acc_t>(z[c]);
    m = max(m, x);
    if (trow[c] == gy) mg = max(mg, x);
  }
  m = block_reduce<acc_t, true>(m, shared);
  mg = block_reduce<acc_t, true>(mg, shared);
  if (m == -INFINITY || mg == -INFINITY) {
    if (threadIdx.x == 0) {
      lse[n] = m;
      lse_g[n] = mg;
      loss[n] = m - mg;
    }
    return;
  }
  acc_t s = 0, sg = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const acc_t x = static_cast<acc_t>(z[c]);
    s += exp(x - m);
    if (trow[c] == gy) sg += exp(x - mg);
  }
  s = block_reduce<acc_t, false>(s, shared);
  sg = block_reduce<acc_t, false>(sg, shared);
  if (threadIdx.x == 0) {
    const acc_t l = m + log(s), lg = mg + log(sg);
    lse[n] = l;
    lse_g[n] = lg;
    loss[n] = l - lg;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void gsce_backward_kernel(const acc_t* __restrict__ grad_loss,
                                     const scalar_t* __restrict__ logits,
                                     const int64_t* __restrict__ target,
                                     const int64_t* __restrict__ table,
                                     const int64_t* __restrict__ row_group,
                                     const acc_t* __restrict__ lse, const acc_t* __restrict__ lse_g,
                                     int64_t C, int64_t ignore_index, scalar_t* grad) {
  const int64_t n = blockIdx.x;
  const int64_t y = target[n];
  scalar_t* g = grad + n * C;
  const acc_t go = grad_loss[n];
  if (y == ignore_index || go == acc_t(0)) {
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) g[c] = scalar_t(0);
    return;
  }
  const scalar_t* z = logits + n * C;
  const int64_t* trow = table + row_group[n] * C;
  const int64_t gy = trow[y];
  const acc_t l = lse[n], lg = lse_g[n];
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const acc_t x = static_cast<acc_t>(z[c]);
    acc_t v = exp(x - l);
    if (trow[c] == gy) v -= exp(min(x - lg, acc_t(0)));
    g[c] = static_cast<scalar_t>(go * v);
  }
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct Inputs {
  at::Tensor logits, target, table, row_group;
  int64_t N, C, G;
};

Inputs prepare(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& group_table,
               const at::Tensor& row_group) {
  TORCH_CHECK(logits.dim() == 2, "logits must be [N, C]");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "target must be [N]");
  TORCH_CHECK(row_group.dim() == 1 && row_group.size(0) == logits.size(0), "row_group must be [N]");
  TORCH_CHECK(group_table.dim() == 2 && group_table.size(1) == logits.size(1),
              "group_table must be [G, C]");
  return {logits.contiguous(), target.to(at::kLong).contiguous(),
          group_table.to(at::kLong).contiguous(), row_group.to(at::kLong).contiguous(),
          logits.size(0), logits.size(1), group_table.size(0)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_softmax_ce_cuda(
    const at::Tensor& logits_, const at::Tensor& target_, const at::Tensor& group_table_,
    const at::Tensor& row_group_, int64_t ignore_index) {
  c10::cuda::CUDAGuard guard(logits_.device());
  const Inputs in = prepare(logits_, target_, group_table_, row_group_);
  const int64_t N = in.N, C = in.C, G = in.G;
  const at::Tensor &logits = in.logits, &target = in.target, &table = in.table, &row_group = in.row_group;
  auto opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  auto loss = at::empty({N}, opts), lse = at::empty({N}, opts), lse_g = at::empty({N}, opts);
  if (N == 0) return {loss, lse, lse_g};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "gsce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gsce_forward_kernel<scalar_t, acc_t><<<N, kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), target.data_ptr<int64_t>(), table.data_ptr<int64_t>(),
        row_group.data_ptr<int64_t>(), C, G, ignore_index, loss.data_ptr<acc_t>(),
        lse.data_ptr<acc_t>(), lse_g.data_ptr<acc_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, lse, lse_g};
}

at::Tensor group_softmax_ce_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits_,
                                          const at::Tensor& target_, const at::Tensor& group_table_,
                                          const at::Tensor& row_group_, const at::Tensor& lse_,
                                          const at::Tensor& lse_g_, int64_t ignore_index) {
  c10::cuda::CUDAGuard guard(logits_.device());
  const Inputs in = prepare(logits_, target_, group_table_, row_group_);
  const int64_t N = in.N, C = in.C;
  const at::Tensor &logits = in.logits, &target = in.target, &table = in.table, &row_group = in.row_group;
  const auto acc = acc_dtype(logits.scalar_type());
  auto go = grad_loss.to(acc).expand({N}).contiguous();
  auto lse = lse_.to(acc).contiguous(), lse_g = lse_g_.to(acc).contiguous();
  auto grad = at::empty_like(logits);
  if (N == 0 || C == 0) return grad;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "gsce_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gsce_backward_kernel<scalar_t, acc_t><<<N, kThreads, 0, stream>>>(
        go.data_ptr<acc_t>(), logits.data_ptr<scalar_t>(), target.data_ptr<int64_t>(),
        table.data_ptr<int64_t>(), row_group.data_ptr<int64_t>(), lse.data_ptr<acc_t>(),
        lse_g.data_ptr<acc_t>(), C, ignore_index, grad.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

}  // namespace
}  // namespace zoo::cuda

TORCH_LIBRARY_IMPL(zoo, CUDA, m) {
  m.impl("group_softmax_ce", &zoo::cuda::group_softmax_ce_cuda);
  m.impl("group_softmax_ce_backward", &zoo::cuda::group_softmax_ce_backward_cuda);
}

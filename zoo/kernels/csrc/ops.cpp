// Operator schemas of the zoo kernel library (torch.ops.zoo.*) and device-independent helpers.
// CPU kernels: cpu/*.cpp (TORCH_LIBRARY_IMPL(zoo, CPU)); CUDA kernels: cuda/*.cu.
// Autograd and fake (meta) implementations are registered from Python (zoo/kernels/_ops.py);
// the backward ops below are compiled kernels too.
#ifdef ZOO_FORCE_BUILD_ERROR
#error "build failure forced with -DZOO_FORCE_BUILD_ERROR (used by the fallback test)"
#endif

#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"

namespace zoo {

at::Tensor tile_occupancy(const at::Tensor& keep_mask, int64_t tile_q, int64_t tile_k) {
  // keep_mask: bool [B, H, Lq, Lk], broadcast dims with stride 0. Returns int8
  // [Bm, Hm, ceil(Lq/tile_q), ceil(Lk/tile_k)] where Bm/Hm are 1 for broadcast dims.
  TORCH_CHECK(keep_mask.dim() == 4 && keep_mask.scalar_type() == at::kBool,
              "keep_mask must be a 4-d bool tensor");
  at::Tensor m = keep_mask;
  if (m.size(0) > 1 && m.stride(0) == 0) m = m.narrow(0, 0, 1);
  if (m.size(1) > 1 && m.stride(1) == 0) m = m.narrow(1, 0, 1);
  const int64_t Bm = m.size(0), Hm = m.size(1), Lq = m.size(2), Lk = m.size(3);
  const int64_t nq = (Lq + tile_q - 1) / tile_q, nk = (Lk + tile_k - 1) / tile_k;
  const std::vector<int64_t> pad = {0, nk * tile_k - Lk, 0, nq * tile_q - Lq};
  auto m8 = m.to(at::kByte);
  // padding counts as "not allowed" for any() and as "allowed" for all()
  auto any = at::constant_pad_nd(m8, pad, 0).view({Bm, Hm, nq, tile_q, nk, tile_k}).amax({3, 5});
  auto all = at::constant_pad_nd(m8, pad, 1).view({Bm, Hm, nq, tile_q, nk, tile_k}).amin({3, 5});
  return (any + all).to(at::kChar).contiguous();
}

}  // namespace zoo

TORCH_LIBRARY(zoo, m) {
  m.def(
      "group_softmax_ce(Tensor logits, Tensor target, Tensor group_table, Tensor row_group, "
      "int ignore_index) -> (Tensor, Tensor, Tensor)");
  m.def(
      "group_softmax_ce_backward(Tensor grad_loss, Tensor logits, Tensor target, "
      "Tensor group_table, Tensor row_group, Tensor lse, Tensor lse_group, int ignore_index) "
      "-> Tensor");
  m.def("gumbel_softmax(Tensor logits, float tau, bool hard, int seed) -> (Tensor, Tensor)");
  m.def("gumbel_softmax_backward(Tensor grad, Tensor soft, float tau) -> Tensor");
  m.def("gumbel_sigmoid(Tensor logits, float tau, bool hard, int seed) -> (Tensor, Tensor)");
  m.def("gumbel_sigmoid_backward(Tensor grad, Tensor soft, float tau) -> Tensor");
  m.def(
      "masked_attention(Tensor q, Tensor k, Tensor v, Tensor? keep_mask, float scale) "
      "-> (Tensor, Tensor)");
  m.def(
      "masked_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor? keep_mask, Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
}

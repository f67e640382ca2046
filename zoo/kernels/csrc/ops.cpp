// Device-independent helpers of the zoo kernel library. The op schemas (torch.ops.zoo.*), their
// fake kernels and autograd are defined in Python (zoo/kernels/_ops.py), so the Triton (CUDA)
// kernels work without this library; the CPU kernels in cpu/*.cpp register with
// TORCH_LIBRARY_IMPL(zoo, CPU).
#ifdef ZOO_FORCE_BUILD_ERROR
#error "build failure forced with -DZOO_FORCE_BUILD_ERROR (used by the fallback test)"
#endif

#include <ATen/ATen.h>

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

#pragma once
#include <ATen/ATen.h>

#include "common.h"

namespace zoo {
// int8 tile map of a bool keep mask (kTileEmpty / kTilePartial / kTileFull per tile).
at::Tensor tile_occupancy(const at::Tensor& keep_mask, int64_t tile_q, int64_t tile_k);
}  // namespace zoo

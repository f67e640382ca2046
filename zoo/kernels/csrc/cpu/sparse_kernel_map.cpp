// Kernel map of a sparse 3-D convolution, CPU (reference.sparse_kernel_map defines the result).
//
// The input sites go into a hash table (sparse_hash.h), filled in parallel. Submanifold: the
// outputs are the inputs. Strided: every output site some input reaches goes into a hash set,
// also in parallel; the set's keys are collected and radix-sorted, which gives the reference's
// order (ascending key) whatever order the threads inserted in. Then every (output, tap) looks
// its input site up, outputs in parallel, each writing its own row of nbr: the result depends on
// the inputs alone, not on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "sparse_hash.h"

namespace zoo::cpu {
namespace {

using sparse::KeyTable;

struct Geometry {
  std::array<int64_t, 3> shape, ks, st, pad, dil;
};

std::array<int64_t, 3> triple(const char* name, at::IntArrayRef v, int64_t lo) {
  TORCH_CHECK(v.size() == 3, "sparse_kernel_map: ", name, " must have 3 values (z, y, x), got ",
              v);
  for (int64_t x : v) {
    TORCH_CHECK(x >= lo, "sparse_kernel_map: ", name, " must be >= ", lo, ", got ", v);
  }
  return {v[0], v[1], v[2]};
}

inline int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

// The largest number of taps t in [0, k) with (r - t * d) divisible by s, over every r: how many
// outputs one input can reach along an axis.
int64_t reach_per_axis(int64_t k, int64_t s, int64_t d) {
  int64_t best = 0;
  for (int64_t r = 0; r < s; ++r) {
    int64_t n = 0;
    for (int64_t t = 0; t < k; ++t) n += ((r - t * d) % s + s) % s == 0;
    best = std::max(best, n);
  }
  return best;
}

// Sorts non-negative keys ascending: LSD radix, 11 bits a pass, as many passes as the largest
// key has bits.
void radix_sort(std::vector<int64_t>& keys) {
  const int64_t n = static_cast<int64_t>(keys.size());
  if (n < 2) return;
  const int64_t top = *std::max_element(keys.begin(), keys.end());
  const int bits = 64 - __builtin_clzll(static_cast<uint64_t>(top) | 1);
  constexpr int kDigit = 11;
  constexpr int64_t kBuckets = int64_t{1} << kDigit;
  std::vector<int64_t> tmp(n);
  std::vector<int64_t> count(kBuckets);
  for (int shift = 0; shift < bits; shift += kDigit) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t k : keys) ++count[(k >> shift) & (kBuckets - 1)];
    int64_t sum = 0;
    for (auto& c : count) {
      const int64_t here = c;
      c = sum;
      sum += here;
    }
    for (int64_t k : keys) tmp[count[(k >> shift) & (kBuckets - 1)]++] = k;
    keys.swap(tmp);
  }
}

// The input sites, checked (inside the grid, unique), in a table key -> row.
void fill_inputs(KeyTable& table, const int32_t* c, int64_t n, const Geometry& g) {
  const int64_t D = g.shape[0], H = g.shape[1], W = g.shape[2];
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int32_t* r = c + 4 * i;
      TORCH_CHECK(r[0] >= 0 && r[1] >= 0 && r[1] < D && r[2] >= 0 && r[2] < H && r[3] >= 0 &&
                      r[3] < W,
                  "sparse_kernel_map: coordinate row ", i, " (batch, z, y, x) = (", r[0], ", ",
                  r[1], ", ", r[2], ", ", r[3], ") is outside the spatial shape [", D, ", ", H,
                  ", ", W, "]");
      const int64_t key = ((int64_t{r[0]} * D + r[1]) * H + r[2]) * W + r[3];
      TORCH_CHECK(table.insert(key, static_cast<int32_t>(i)),
                  "sparse_kernel_map: coordinate row ", i, " (batch, z, y, x) = (", r[0], ", ",
                  r[1], ", ", r[2], ", ", r[3], ") repeats an earlier row: sites must be unique");
    }
  });
}

// The output sites of a strided convolution, sorted by key, as int32 [M, 4].
at::Tensor strided_outputs(const int32_t* c, int64_t n, const Geometry& g,
                           const std::array<int64_t, 3>& out_shape) {
  int64_t reach = 1;
  for (int a = 0; a < 3; ++a) reach *= reach_per_axis(g.ks[a], g.st[a], g.dil[a]);
  KeyTable set(std::max<int64_t>(1, n * reach));
  const int64_t OD = out_shape[0], OH = out_shape[1], OW = out_shape[2];
  at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
    // per axis, the output indices this input reaches
    std::array<std::vector<int64_t>, 3> reached;
    for (auto& v : reached) v.reserve(16);
    for (int64_t i = begin; i < end; ++i) {
      const int32_t* r = c + 4 * i;
      bool any = true;
      for (int a = 0; a < 3; ++a) {
        reached[a].clear();
        for (int64_t t = 0; t < g.ks[a]; ++t) {
          const int64_t q = r[a + 1] + g.pad[a] - t * g.dil[a];  // = out * stride
          if (q < 0 || q % g.st[a] != 0) continue;
          const int64_t o = q / g.st[a];
          if (o < out_shape[a]) reached[a].push_back(o);
        }
        any = any && !reached[a].empty();
      }
      if (!any) continue;
      const int64_t base = int64_t{r[0]} * OD;
      for (int64_t z : reached[0]) {
        for (int64_t y : reached[1]) {
          const int64_t row = ((base + z) * OH + y) * OW;
          for (int64_t x : reached[2]) set.insert(row + x, 0);
        }
      }
    }
  });

  // the keys, collected block by block in slot order, then sorted
  constexpr int64_t kBlock = int64_t{1} << 14;
  const int64_t slots = set.slots(), blocks = (slots + kBlock - 1) / kBlock;
  std::vector<int64_t> counts(blocks + 1, 0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t n_here = 0;
      for (int64_t j = b * kBlock, e = std::min(slots, j + kBlock); j < e; ++j) {
        n_here += set.key_at(j) != KeyTable::kEmpty;
      }
      counts[b + 1] = n_here;
    }
  });
  for (int64_t b = 0; b < blocks; ++b) counts[b + 1] += counts[b];
  std::vector<int64_t> keys(counts[blocks]);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t w = counts[b];
      for (int64_t j = b * kBlock, e = std::min(slots, j + kBlock); j < e; ++j) {
        const int64_t key = set.key_at(j);
        if (key != KeyTable::kEmpty) keys[w++] = key;
      }
    }
  });
  radix_sort(keys);

  const int64_t m = static_cast<int64_t>(keys.size());
  at::Tensor out = at::empty({m, 4}, at::kInt);
  int32_t* o = out.data_ptr<int32_t>();
  at::parallel_for(0, m, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t key = keys[i];
      o[4 * i + 3] = static_cast<int32_t>(key % OW);
      key /= OW;
      o[4 * i + 2] = static_cast<int32_t>(key % OH);
      key /= OH;
      o[4 * i + 1] = static_cast<int32_t>(key % OD);
      o[4 * i + 0] = static_cast<int32_t>(key / OD);
    }
  });
  return out;
}

// nbr[o, k]: the input row at out[o] * stride - padding + tap_k * dilation, or -1.
void lookup(const KeyTable& table, const int32_t* out, int64_t m, const Geometry& g,
            int32_t* nbr) {
  const int64_t D = g.shape[0], H = g.shape[1], W = g.shape[2];
  const int64_t kz = g.ks[0], ky = g.ks[1], kx = g.ks[2], K = kz * ky * kx;
  // Calls fn(k, key) for every tap k of output o whose site is inside the grid, and
  // outside(k0, k1) for runs of taps that are not.
  auto taps = [&](int64_t o, auto&& fn, auto&& outside) {
    const int32_t* r = out + 4 * o;
    const int64_t z0 = r[1] * g.st[0] - g.pad[0], y0 = r[2] * g.st[1] - g.pad[1],
                  x0 = r[3] * g.st[2] - g.pad[2];
    const int64_t bD = int64_t{r[0]} * D;
    int64_t k = 0;
    for (int64_t tz = 0; tz < kz; ++tz) {
      const int64_t z = z0 + tz * g.dil[0];
      for (int64_t ty = 0; ty < ky; ++ty, k += kx) {
        const int64_t y = y0 + ty * g.dil[1];
        if (z < 0 || z >= D || y < 0 || y >= H) {
          outside(k, k + kx);
          continue;
        }
        const int64_t line = ((bD + z) * H + y) * W;
        for (int64_t tx = 0; tx < kx; ++tx) {
          const int64_t x = x0 + tx * g.dil[2];
          if (x >= 0 && x < W) {
            fn(k + tx, line + x);
          } else {
            outside(k + tx, k + tx + 1);
          }
        }
      }
    }
  };
  // The outputs come in the inputs' order, which need not be spatial: each output's lookups
  // miss the cache. Prefetching the slots of the output kAhead places on overlaps those misses.
  constexpr int64_t kAhead = 8;
  auto prefetch = [&](int64_t o) {
    int64_t last = -1;
    taps(
        o,
        [&](int64_t, int64_t key) {
          if ((key >> 2) != last) table.prefetch(key);  // a group of four shares a line
          last = key >> 2;
        },
        [](int64_t, int64_t) {});
  };
  at::parallel_for(0, m, 512, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < std::min(end, begin + kAhead); ++o) prefetch(o);
    for (int64_t o = begin; o < end; ++o) {
      if (o + kAhead < end) prefetch(o + kAhead);
      int32_t* row = nbr + o * K;
      taps(
          o, [&](int64_t k, int64_t key) { row[k] = table.find(key); },
          [&](int64_t k0, int64_t k1) { std::fill(row + k0, row + k1, -1); });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sparse_kernel_map_cpu(
    const at::Tensor& coords, at::IntArrayRef spatial_shape, at::IntArrayRef kernel_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool subm) {
  TORCH_CHECK(coords.dim() == 2 && coords.size(1) == 4 && coords.scalar_type() == at::kInt,
              "sparse_kernel_map: coords must be an int32 [N, 4] tensor (batch, z, y, x), got ",
              coords.sizes(), " ", coords.scalar_type());
  Geometry g{triple("spatial_shape", spatial_shape, 1), triple("kernel_size", kernel_size, 1),
             triple("stride", stride, 1), triple("padding", padding, 0),
             triple("dilation", dilation, 1)};
  const at::Tensor in = coords.contiguous();
  const int64_t n = in.size(0);
  const int64_t K = g.ks[0] * g.ks[1] * g.ks[2];
  const int32_t* c = in.data_ptr<int32_t>();

  std::array<int64_t, 3> out_shape = g.shape;
  if (!subm) {
    for (int a = 0; a < 3; ++a) {
      out_shape[a] = std::max<int64_t>(
          0, floor_div(g.shape[a] + 2 * g.pad[a] - g.dil[a] * (g.ks[a] - 1) - 1, g.st[a]) + 1);
    }
  }
  if (n > 0) {
    // keys are int64: (max batch + 1) * D * H * W must fit, for the input grid and the output's
    const int64_t top = in.select(1, 0).max().item<int32_t>();
    for (const auto& s : {g.shape, out_shape}) {
      const double sites = double(top + 1) * double(s[0]) * double(s[1]) * double(s[2]);
      TORCH_CHECK(sites < 9.0e18, "sparse_kernel_map: ", top + 1, " samples of a ", s[0], "x",
                  s[1], "x", s[2], " grid have too many sites for int64 keys");
    }
  }

  KeyTable table(n);
  fill_inputs(table, c, n, g);
  at::Tensor out;
  if (subm) {
    out = in.clone();
  } else if (n == 0 || out_shape[0] * out_shape[1] * out_shape[2] == 0) {
    out = at::empty({0, 4}, at::kInt);
  } else {
    out = strided_outputs(c, n, g, out_shape);
  }
  const int64_t m = out.size(0);
  at::Tensor nbr = at::empty({m, K}, at::kInt);
  if (m > 0 && K > 0) lookup(table, out.data_ptr<int32_t>(), m, g, nbr.data_ptr<int32_t>());
  return {out, nbr};
}

}  // namespace
}  // namespace zoo::cpu

TORCH_LIBRARY_IMPL(zoo, CPU, m) { m.impl("sparse_kernel_map", &zoo::cpu::sparse_kernel_map_cpu); }

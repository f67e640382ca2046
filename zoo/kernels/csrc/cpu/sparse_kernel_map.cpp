// Kernel map of a sparse 3-D convolution, CPU (reference.sparse_kernel_map defines the result).
//
// The input sites go into a hash table (sparse_hash.h), filled in parallel. Submanifold: the
// outputs are the inputs. Strided: the output sites every input reaches are listed, radix-sorted
// and deduplicated, which gives the reference's order (ascending key). Then every (output, tap)
// looks its input site up, outputs in parallel. Each entry of nbr is written once, by one
// thread: the result depends on the inputs alone, not on the thread count.
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

// The output sites of a strided convolution, sorted by key, as int32 [M, 4]: every (input, tap)
// that lands on the output grid gives a candidate key; the candidates are sorted and the repeats
// dropped. (A hash set would need sizing for all the candidates, up to K per input, and its
// keys sorted anyway.)
at::Tensor strided_outputs(const int32_t* c, int64_t n, const Geometry& g,
                           const std::array<int64_t, 3>& out_shape) {
  const int64_t OD = out_shape[0], OH = out_shape[1], OW = out_shape[2];
  // per axis, the output indices input row r reaches
  auto reach = [&](const int32_t* r, std::array<std::vector<int64_t>, 3>& reached) {
    int64_t count = 1;
    for (int a = 0; a < 3; ++a) {
      reached[a].clear();
      // out * stride = c + pad - t * dilation for a tap t in [0, k): out runs over
      // [ceil((c + pad - (k - 1) * dilation) / stride), floor((c + pad) / stride)] (two
      // divisions an axis rather than one a tap), keeping the outs a whole number of
      // dilations away
      const int64_t q = r[a + 1] + g.pad[a], st = g.st[a], dil = g.dil[a];
      const int64_t lo = std::max<int64_t>(0, -floor_div(-(q - (g.ks[a] - 1) * dil), st));
      const int64_t hi = std::min(floor_div(q, st), out_shape[a] - 1);
      for (int64_t o = lo; o <= hi; ++o) {
        if (dil == 1 || (q - o * st) % dil == 0) reached[a].push_back(o);
      }
      count *= static_cast<int64_t>(reached[a].size());
    }
    return count;
  };
  // blocks of inputs: count their candidates, then write them at their offsets
  constexpr int64_t kBlock = 4096;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<int64_t> offset(blocks + 1, 0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::array<std::vector<int64_t>, 3> reached;
    for (int64_t b = b0; b < b1; ++b) {
      int64_t count = 0;
      for (int64_t i = b * kBlock, e = std::min(n, i + kBlock); i < e; ++i) {
        count += reach(c + 4 * i, reached);
      }
      offset[b + 1] = count;
    }
  });
  for (int64_t b = 0; b < blocks; ++b) offset[b + 1] += offset[b];
  std::vector<int64_t> keys(offset[blocks]);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::array<std::vector<int64_t>, 3> reached;
    for (int64_t b = b0; b < b1; ++b) {
      int64_t w = offset[b];
      for (int64_t i = b * kBlock, e = std::min(n, i + kBlock); i < e; ++i) {
        const int32_t* r = c + 4 * i;
        if (reach(r, reached) == 0) continue;
        const int64_t base = int64_t{r[0]} * OD;
        for (int64_t z : reached[0]) {
          for (int64_t y : reached[1]) {
            const int64_t line = ((base + z) * OH + y) * OW;
            for (int64_t x : reached[2]) keys[w++] = line + x;
          }
        }
      }
    }
  });
  radix_sort(keys);
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());

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
//
// `symmetric`: the outputs are the inputs and the kernel is centred on them (submanifold). Then
// nbr[o, k] = i exactly when nbr[i, K - 1 - k] = o (the mirrored tap), and nbr[o, K / 2] = o:
// only the taps before the centre are looked up, each hit also filling its mirror, which halves
// the lookups. Every entry is still written once, by one thread: the result does not depend on
// the thread count.
void lookup(const KeyTable& table, const int32_t* out, int64_t m, const Geometry& g,
            bool symmetric, int32_t* nbr) {
  const int64_t D = g.shape[0], H = g.shape[1], W = g.shape[2];
  const int64_t kz = g.ks[0], ky = g.ks[1], kx = g.ks[2], K = kz * ky * kx;
  const int64_t centre = K / 2, k_end = symmetric ? centre : K;
  // Calls fn(k, key) for every tap k < k_end of output o whose site is inside the grid, and
  // outside(k0, k1) for runs of taps that are not.
  auto taps = [&](int64_t o, auto&& fn, auto&& outside) {
    const int32_t* r = out + 4 * o;
    const int64_t z0 = r[1] * g.st[0] - g.pad[0], y0 = r[2] * g.st[1] - g.pad[1],
                  x0 = r[3] * g.st[2] - g.pad[2];
    const int64_t bD = int64_t{r[0]} * D;
    int64_t k = 0;
    for (int64_t tz = 0; tz < kz && k < k_end; ++tz) {
      const int64_t z = z0 + tz * g.dil[0];
      for (int64_t ty = 0; ty < ky && k < k_end; ++ty, k += kx) {
        const int64_t y = y0 + ty * g.dil[1];
        const int64_t n = std::min(kx, k_end - k);
        if (z < 0 || z >= D || y < 0 || y >= H) {
          outside(k, k + n);
          continue;
        }
        const int64_t line = ((bD + z) * H + y) * W;
        for (int64_t tx = 0; tx < n; ++tx) {
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
  if (symmetric) {
    at::parallel_for(0, m * K, 1 << 16, [&](int64_t b, int64_t e) {
      std::fill(nbr + b, nbr + e, -1);
    });
  }
  at::parallel_for(0, m, 512, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < std::min(end, begin + kAhead); ++o) prefetch(o);
    for (int64_t o = begin; o < end; ++o) {
      if (o + kAhead < end) prefetch(o + kAhead);
      int32_t* row = nbr + o * K;
      if (symmetric) {
        row[centre] = static_cast<int32_t>(o);
        taps(
            o,
            [&](int64_t k, int64_t key) {
              const int32_t i = table.find(key);
              if (i >= 0) {
                row[k] = i;
                nbr[int64_t{i} * K + (K - 1 - k)] = static_cast<int32_t>(o);
              }
            },
            [](int64_t, int64_t) {});
      } else {
        taps(
            o, [&](int64_t k, int64_t key) { row[k] = table.find(key); },
            [&](int64_t k0, int64_t k1) { std::fill(row + k0, row + k1, -1); });
      }
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
  bool symmetric = subm;
  for (int a = 0; a < 3; ++a) {
    symmetric = symmetric && g.st[a] == 1 && g.ks[a] % 2 == 1 && 2 * g.pad[a] == (g.ks[a] - 1) * g.dil[a];
  }
  if (m > 0 && K > 0) {
    lookup(table, out.data_ptr<int32_t>(), m, g, symmetric, nbr.data_ptr<int32_t>());
  }
  return {out, nbr};
}

}  // namespace
}  // namespace zoo::cpu

TORCH_LIBRARY_IMPL(zoo, CPU, m) { m.impl("sparse_kernel_map", &zoo::cpu::sparse_kernel_map_cpu); }

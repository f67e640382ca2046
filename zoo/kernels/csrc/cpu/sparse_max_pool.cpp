// Sparse 3-D max-pooling over a kernel map, CPU (reference.sparse_max_pool defines the result).
//
// Forward: outputs in parallel, each taking the channel-wise max over its taps in tap order with
// a strict comparison (so ties and NaNs behave as in the reference: the first valid tap seeds the
// max, a later tap replaces it only when greater).
// Backward: grad_in[nbr[o, arg[o, c]], c] += grad_out[o, c]. To avoid atomics it is a gather:
// the inverse map inv[i, k] = o (nbr[o, k] = i; unique in a kernel map) lets each input row sum
// its own gradient over its taps in tap order, rows in parallel. A map that sends an input to one
// tap twice has no such inverse; it is summed serially, outputs in order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "vec_utils.h"

namespace zoo::cpu {
namespace {

void check_nbr(const at::Tensor& nbr, const char* op) {
  TORCH_CHECK(nbr.dim() == 2 && nbr.scalar_type() == at::kInt, op,
              ": nbr must be an int32 [M, K] tensor, got ", nbr.sizes(), " ", nbr.scalar_type());
}

inline void check_row(int32_t i, int64_t n_in, int64_t o, int64_t k, const char* op) {
  TORCH_CHECK(i >= -1 && i < n_in, op, ": nbr[", o, ", ", k, "] = ", i, " is outside [-1, ",
              n_in, ") for ", n_in, " input rows");
}

template <typename acc_t, typename scalar_t>
inline const acc_t* row_as(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

template <typename scalar_t>
void max_pool_rows(const scalar_t* f, int64_t n_in, const int32_t* nbr, int64_t M, int64_t K,
                   int64_t C, scalar_t* out, int32_t* arg) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = VecT<acc_t>;
  constexpr int64_t VS = Vec::size();
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(C, 1));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    // the tap index rides along in the value type, so it blends with the same mask
    std::vector<acc_t> best(C), tap(C), buf(C);
    for (int64_t o = begin; o < end; ++o) {
      const int32_t* row = nbr + o * K;
      int64_t k = 0;
      for (; k < K; ++k) {
        check_row(row[k], n_in, o, k, "sparse_max_pool");
        if (row[k] >= 0) break;
      }
      scalar_t* y = out + o * C;
      int32_t* a = arg + o * C;
      if (k == K) {
        std::fill(y, y + C, scalar_t(0));
        std::fill(a, a + C, -1);
        continue;
      }
      const acc_t* first = row_as(f + int64_t{row[k]} * C, C, buf.data());
      std::copy(first, first + C, best.data());
      std::fill(tap.begin(), tap.end(), acc_t(k));
      for (++k; k < K; ++k) {
        const int32_t i = row[k];
        check_row(i, n_in, o, k, "sparse_max_pool");
        if (i < 0) continue;
        const acc_t* v = row_as(f + int64_t{i} * C, C, buf.data());
        const Vec vk(static_cast<acc_t>(k));
        int64_t c = 0;
        for (; c + VS <= C; c += VS) {
          const Vec x = Vec::loadu(v + c), b = Vec::loadu(best.data() + c);
          const Vec greater = x > b;
          Vec::blendv(b, x, greater).store(best.data() + c);
          Vec::blendv(Vec::loadu(tap.data() + c), vk, greater).store(tap.data() + c);
        }
        for (; c < C; ++c) {
          if (v[c] > best[c]) {
            best[c] = v[c];
            tap[c] = static_cast<acc_t>(k);
          }
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        y[c] = static_cast<scalar_t>(best[c]);
        a[c] = static_cast<int32_t>(tap[c]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sparse_max_pool_cpu(const at::Tensor& features_in,
                                                       const at::Tensor& nbr_in) {
  TORCH_CHECK(features_in.dim() == 2 && at::isFloatingType(features_in.scalar_type()),
              "sparse_max_pool: features must be a floating [N, C] tensor, got ",
              features_in.sizes(), " ", features_in.scalar_type());
  check_nbr(nbr_in, "sparse_max_pool");
  const at::Tensor features = features_in.contiguous(), nbr = nbr_in.contiguous();
  const int64_t N = features.size(0), C = features.size(1), M = nbr.size(0), K = nbr.size(1);
  at::Tensor out = at::empty({M, C}, features.options());
  at::Tensor arg = at::empty({M, C}, nbr.options());
  if (M == 0) return {out, arg};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, features.scalar_type(), "sparse_max_pool_cpu", [&] {
        max_pool_rows<scalar_t>(features.data_ptr<scalar_t>(), N, nbr.data_ptr<int32_t>(), M, K,
                                C, out.data_ptr<scalar_t>(), arg.data_ptr<int32_t>());
      });
  return {out, arg};
}

at::Tensor sparse_max_pool_backward_cpu(const at::Tensor& grad_out_in,
                                        const at::Tensor& features, const at::Tensor& arg_in,
                                        const at::Tensor& nbr_in) {
  check_nbr(nbr_in, "sparse_max_pool_backward");
  TORCH_CHECK(features.dim() == 2 && at::isFloatingType(features.scalar_type()),
              "sparse_max_pool_backward: features must be a floating [N, C] tensor, got ",
              features.sizes(), " ", features.scalar_type());
  const int64_t N = features.size(0), C = features.size(1);
  const int64_t M = nbr_in.size(0), K = nbr_in.size(1);
  TORCH_CHECK(grad_out_in.dim() == 2 && grad_out_in.size(0) == M && grad_out_in.size(1) == C,
              "sparse_max_pool_backward: grad_out must be [M=", M, ", C=", C, "], got ",
              grad_out_in.sizes());
  TORCH_CHECK(arg_in.sizes() == grad_out_in.sizes() && arg_in.scalar_type() == at::kInt,
              "sparse_max_pool_backward: arg must be an int32 [M=", M, ", C=", C,
              "] tensor, got ", arg_in.sizes(), " ", arg_in.scalar_type());
  const at::Tensor nbr = nbr_in.contiguous(), arg = arg_in.contiguous();
  const at::Tensor grad_out = grad_out_in.to(features.scalar_type()).contiguous();
  at::Tensor grad_in = at::empty({N, C}, features.options());
  if (N == 0 || C == 0) return grad_in;

  // inv[i, k] = o; a second output claiming the same slot means the map has no inverse
  std::vector<int32_t> inv(N * K, -1);
  std::atomic<bool> repeated{false};
  const int32_t* p = nbr.data_ptr<int32_t>();
  at::parallel_for(0, M, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t k = 0; k < K; ++k) {
        const int32_t i = p[o * K + k];
        check_row(i, N, o, k, "sparse_max_pool_backward");
        if (i < 0) continue;
        int32_t expected = -1;
        if (!__atomic_compare_exchange_n(&inv[i * K + k], &expected, static_cast<int32_t>(o),
                                         false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
          repeated.store(true, std::memory_order_relaxed);
        }
      }
    }
  });

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, features.scalar_type(), "sparse_max_pool_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* go = grad_out.data_ptr<scalar_t>();
        const int32_t* am = arg.data_ptr<int32_t>();
        scalar_t* gi = grad_in.data_ptr<scalar_t>();
        if (repeated.load()) {
          std::vector<acc_t> acc(N * C, acc_t(0));
          for (int64_t o = 0; o < M; ++o) {
            for (int64_t k = 0; k < K; ++k) {
              const int32_t i = p[o * K + k];
              if (i < 0) continue;
              for (int64_t c = 0; c < C; ++c) {
                if (am[o * C + c] == k) acc[i * C + c] += static_cast<acc_t>(go[o * C + c]);
              }
            }
          }
          for (int64_t j = 0; j < N * C; ++j) gi[j] = static_cast<scalar_t>(acc[j]);
          return;
        }
        const int64_t grain = std::max<int64_t>(1, 8192 / C);
        at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
          std::vector<acc_t> acc(C);
          for (int64_t i = begin; i < end; ++i) {
            std::fill(acc.begin(), acc.end(), acc_t(0));
            for (int64_t k = 0; k < K; ++k) {
              const int32_t o = inv[i * K + k];
              if (o < 0) continue;
              const int32_t* a = am + int64_t{o} * C;
              const scalar_t* g = go + int64_t{o} * C;
              for (int64_t c = 0; c < C; ++c) {
                acc[c] += a[c] == k ? static_cast<acc_t>(g[c]) : acc_t(0);
              }
            }
            for (int64_t c = 0; c < C; ++c) gi[i * C + c] = static_cast<scalar_t>(acc[c]);
          }
        });
      });
  return grad_in;
}

}  // namespace
}  // namespace zoo::cpu

TORCH_LIBRARY_IMPL(zoo, CPU, m) {
  m.impl("sparse_max_pool", &zoo::cpu::sparse_max_pool_cpu);
  m.impl("sparse_max_pool_backward", &zoo::cpu::sparse_max_pool_backward_cpu);
}

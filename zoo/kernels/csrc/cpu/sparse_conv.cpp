// Sparse 3-D convolution over a kernel map, CPU: gather, GEMM, scatter, tap by tap.
//
// The map's (input, output) pairs are grouped by tap once per call (a counting sort, outputs
// ascending within a tap). Each tap's pairs are cut into chunks of a fixed number of rows (a
// function of the channel counts only); a chunk gathers its source rows into a buffer, multiplies
// it by the tap's weight with one GEMM (MKL's, exported by torch's x86 wheels) and adds the
// product into its destination rows. Taps run one after another and, within a tap, the chunks
// in parallel: a tap sends each output (forward) and, in a kernel map, each input (the feature
// gradient) at most once, so the chunks' rows never overlap. Every destination row thus sums its
// taps in tap order, each term computed from the same chunk whatever the thread count: the result
// repeats bit for bit, with any number of threads.
//
// The weight gradient dW[k] = F[inputs]^T G[outputs] is summed per tap over "spans" of a fixed
// number of pairs (each span a GEMM per chunk accumulating into its own partial sum), the spans
// in parallel, and each tap's partial sums are then added in span order.
//
// float16/bfloat16 compute in float32: rows are converted as they are gathered, and the float
// accumulators rounded once at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "vec_utils.h"

namespace zoo::cpu {
namespace {

// The pairs (in[j], out[j]) of tap k are j in [offset[k], offset[k + 1]).
struct TapPairs {
  std::vector<int64_t> offset;
  std::unique_ptr<int32_t[]> in, out;
};

constexpr int64_t kMapBlock = 4096;  // rows of nbr a counting-sort block covers

TapPairs tap_pairs(const at::Tensor& nbr, int64_t n_in, const char* op) {
  const int64_t M = nbr.size(0), K = nbr.size(1);
  const int32_t* p = nbr.data_ptr<int32_t>();
  const int64_t blocks = (M + kMapBlock - 1) / kMapBlock;
  std::vector<int64_t> counts(blocks * K, 0);  // [block, tap]
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* cnt = counts.data() + b * K;
      for (int64_t o = b * kMapBlock, e = std::min(M, o + kMapBlock); o < e; ++o) {
        for (int64_t k = 0; k < K; ++k) {
          const int32_t i = p[o * K + k];
          TORCH_CHECK(i >= -1 && i < n_in, op, ": nbr[", o, ", ", k, "] = ", i,
                      " is outside [-1, ", n_in, ") for ", n_in, " input rows");
          cnt[k] += i >= 0;
        }
      }
    }
  });
  TapPairs t;
  t.offset.assign(K + 1, 0);
  int64_t total = 0;
  for (int64_t k = 0; k < K; ++k) {  // starts: tap-major, blocks in order within a tap
    t.offset[k] = total;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t here = counts[b * K + k];
      counts[b * K + k] = total;
      total += here;
    }
  }
  t.offset[K] = total;
  t.in.reset(new int32_t[std::max<int64_t>(total, 1)]);
  t.out.reset(new int32_t[std::max<int64_t>(total, 1)]);
  int32_t* in = t.in.get();
  int32_t* out = t.out.get();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* pos = counts.data() + b * K;
      for (int64_t o = b * kMapBlock, e = std::min(M, o + kMapBlock); o < e; ++o) {
        for (int64_t k = 0; k < K; ++k) {
          const int32_t i = p[o * K + k];
          if (i >= 0) {
            in[pos[k]] = i;
            out[pos[k]++] = static_cast<int32_t>(o);
          }
        }
      }
    }
  });
  return t;
}

// Rows of a GEMM chunk: about 64 KiB of the wider operand, from the channel counts alone.
int64_t chunk_rows(int64_t c_a, int64_t c_b) {
  return std::clamp<int64_t>(16384 / std::max<int64_t>({c_a, c_b, 1}), 16, 256);
}

// dst[r, :] = src[r, :] as acc_t.
template <typename acc_t, typename scalar_t>
inline void load_row(const scalar_t* src, int64_t n, acc_t* dst) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// Random rows are fetched this many rows ahead of their use.
constexpr int64_t kAhead = 8;

template <typename T>
inline void prefetch_row(const T* base, int64_t c, int64_t row) {
  const char* p = reinterpret_cast<const char*>(base + row * c);
  const int64_t bytes = c * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
}

template <typename T>
inline void add_row(const T* src, int64_t n, T* dst) {
  using Vec = VecT<T>;
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    (Vec::loadu(dst + c) + Vec::loadu(src + c)).store(dst + c);
  }
  for (; c < n; ++c) dst[c] += src[c];
}

// BLAS (LP64 Fortran symbols): torch's x86 wheels link MKL into libtorch_cpu and export these.
// Weak, so the library still loads where they are missing, and uses its own loops there.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's C entry point (the lowercase name is the Fortran one, taking a pointer)
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
}

// The loops below stand in for BLAS where it is missing; -DZOO_KERNELS_NO_BLAS (in
// ZOO_KERNELS_EXTRA_CFLAGS) uses them everywhere, to test them.
#ifdef ZOO_KERNELS_NO_BLAS
constexpr bool kUseBlas = false;
#else
constexpr bool kUseBlas = true;
#endif

// Column-major C[m, n] = A B + beta C (ta, tb: 'N' or 'T'), or false when there is no BLAS.
inline bool blas(char ta, char tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (!kUseBlas || sgemm_ == nullptr) return false;
  const int im = m, in = n, ik = k, ia = lda, ib = ldb, ic = ldc;
  const float one = 1;
  sgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ia, b, &ib, &beta, c, &ic);
  return true;
}
inline bool blas(char ta, char tb, int64_t m, int64_t n, int64_t k, const double* a, int64_t lda,
                 const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (!kUseBlas || dgemm_ == nullptr) return false;
  const int im = m, in = n, ik = k, ia = lda, ib = ldb, ic = ldc;
  const double one = 1;
  dgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ia, b, &ib, &beta, c, &ic);
  return true;
}

// MKL threads a GEMM called outside a parallel region (a tap with one chunk, one torch thread)
// and may then split its reduction: one thread per call keeps every sum in the same order.
struct SequentialBlas {
  int before = 0;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) before = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(before);
  }
};

template <typename T>
inline void axpy(T a, const T* x, int64_t n, T* y) {
  using Vec = VecT<T>;
  const Vec va(a);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    at::vec::fmadd(va, Vec::loadu(x + c), Vec::loadu(y + c)).store(y + c);
  }
  for (; c < n; ++c) y[c] += a * x[c];
}

// Row-major y[m, n] = x[m, k] @ w[k, n].
template <typename T>
void gemm_nn(int64_t m, int64_t n, int64_t k, const T* x, const T* w, T* y) {
  // column-major, the same memory reads y^T = w^T x^T
  if (blas('N', 'N', n, m, k, w, n, x, k, T(0), y, n)) return;
  for (int64_t r = 0; r < m; ++r) {
    std::fill(y + r * n, y + (r + 1) * n, T(0));
    for (int64_t c = 0; c < k; ++c) axpy(x[r * k + c], w + c * n, n, y + r * n);
  }
}

// Row-major p[k, n] = x[m, k]^T @ y[m, n] (+ p when `accumulate`).
template <typename T>
void gemm_tn(int64_t m, int64_t k, int64_t n, const T* x, const T* y, bool accumulate, T* p) {
  // column-major: p^T = y^T x
  if (blas('N', 'T', n, k, m, y, n, x, k, T(accumulate ? 1 : 0), p, n)) return;
  if (!accumulate) std::fill(p, p + k * n, T(0));
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t c = 0; c < k; ++c) axpy(x[r * k + c], y + r * n, n, p + c * n);
  }
}

// dst[scatter[j]] += src[gather[j]] @ W_k (weight [K, c_src, c_dst]) over the pairs j of every
// tap k, taps in order. `serial[k]` runs tap k's chunks in order on one thread (a tap that sends
// some row to `dst` twice).
template <typename scalar_t, typename acc_t>
void gather_gemm_scatter(const scalar_t* src, int64_t c_src, const acc_t* weight,
                         int64_t c_dst, const TapPairs& pairs,
                         const int32_t* gather, const int32_t* scatter, acc_t* dst,
                         const std::vector<char>& serial) {
  const int64_t K = static_cast<int64_t>(pairs.offset.size()) - 1;
  const int64_t rows = chunk_rows(c_src, c_dst);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t first = pairs.offset[k], n = pairs.offset[k + 1] - first;
    if (n == 0) continue;
    const acc_t* w = weight + k * c_src * c_dst;
    const int64_t chunks = (n + rows - 1) / rows;
    auto body = [&](int64_t c0, int64_t c1) {
      std::vector<acc_t> x(rows * c_src), y(rows * c_dst);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t j0 = first + c * rows, m = std::min(rows, first + n - j0);
        for (int64_t r = 0; r < m; ++r) {
          if (r + kAhead < m) prefetch_row(src, c_src, gather[j0 + r + kAhead]);
          load_row(src + int64_t{gather[j0 + r]} * c_src, c_src, x.data() + r * c_src);
        }
        gemm_nn(m, c_dst, c_src, x.data(), w, y.data());
        for (int64_t r = 0; r < m; ++r) {
          if (r + kAhead < m) prefetch_row(dst, c_dst, scatter[j0 + r + kAhead]);
          add_row(y.data() + r * c_dst, c_dst, dst + int64_t{scatter[j0 + r]} * c_dst);
        }
      }
    };
    if (serial[k]) {
      body(0, chunks);
    } else {
      at::parallel_for(0, chunks, 1, body);
    }
  }
}

// The taps whose pairs send some input row twice (never, in a kernel map): their feature
// gradient chunks would race.
std::vector<char> repeated_inputs(const TapPairs& pairs, int64_t n_in) {
  const int64_t K = static_cast<int64_t>(pairs.offset.size()) - 1;
  std::vector<char> repeated(K, 0);
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    std::vector<int32_t> stamp(n_in, -1);
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t j = pairs.offset[k]; j < pairs.offset[k + 1]; ++j) {
        const int32_t i = pairs.in[j];
        if (stamp[i] == k) {
          repeated[k] = 1;
          break;
        }
        stamp[i] = static_cast<int32_t>(k);
      }
    }
  });
  return repeated;
}

// dW[k] = sum over tap k's pairs of F[in]^T G[out].
template <typename scalar_t, typename acc_t>
void weight_grad(const scalar_t* f, int64_t c_in, const scalar_t* g, int64_t c_out,
                 const TapPairs& pairs, acc_t* dw) {
  const int64_t K = static_cast<int64_t>(pairs.offset.size()) - 1;
  const int64_t rows = chunk_rows(c_in, c_out);
  const int64_t total = pairs.offset[K], block = c_in * c_out;
  // a span: 32 chunks, more where the partial sums would pass 64 MiB (data-dependent, never
  // thread-dependent)
  const int64_t budget = (int64_t{64} << 20) / static_cast<int64_t>(sizeof(acc_t));
  int64_t span = rows * 32;
  if ((total / span + K) * block > budget) {
    span = rows * ((total * block / budget + rows - 1) / rows + 1);
  }
  struct Span {
    int64_t tap, begin, end;
  };
  std::vector<Span> spans;
  std::vector<int64_t> first_span(K + 1);
  for (int64_t k = 0; k < K; ++k) {
    first_span[k] = static_cast<int64_t>(spans.size());
    for (int64_t b = pairs.offset[k]; b < pairs.offset[k + 1]; b += span) {
      spans.push_back({k, b, std::min(b + span, pairs.offset[k + 1])});
    }
  }
  first_span[K] = static_cast<int64_t>(spans.size());
  const int64_t n_spans = first_span[K];
  std::vector<acc_t> partial(std::max<int64_t>(n_spans, 1) * block);

  at::parallel_for(0, n_spans, 1, [&](int64_t s0, int64_t s1) {
    std::vector<acc_t> x(rows * c_in), y(rows * c_out);
    for (int64_t s = s0; s < s1; ++s) {
      acc_t* part = partial.data() + s * block;
      for (int64_t j0 = spans[s].begin; j0 < spans[s].end; j0 += rows) {
        const int64_t m = std::min(rows, spans[s].end - j0);
        for (int64_t r = 0; r < m; ++r) {
          if (r + kAhead < m) {
            prefetch_row(f, c_in, pairs.in[j0 + r + kAhead]);
            prefetch_row(g, c_out, pairs.out[j0 + r + kAhead]);
          }
          load_row(f + int64_t{pairs.in[j0 + r]} * c_in, c_in, x.data() + r * c_in);
          load_row(g + int64_t{pairs.out[j0 + r]} * c_out, c_out, y.data() + r * c_out);
        }
        gemm_tn(m, c_in, c_out, x.data(), y.data(), j0 != spans[s].begin, part);
      }
    }
  });
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      acc_t* out = dw + k * block;
      std::fill(out, out + block, acc_t(0));
      for (int64_t s = first_span[k]; s < first_span[k + 1]; ++s) {
        add_row(partial.data() + s * block, block, out);
      }
    }
  });
}

void check_inputs(const at::Tensor& features, const at::Tensor& weight, const at::Tensor& nbr,
                  const char* op) {
  TORCH_CHECK(features.dim() == 2 && at::isFloatingType(features.scalar_type()), op,
              ": features must be a floating [N, C_in] tensor, got ", features.sizes(), " ",
              features.scalar_type());
  TORCH_CHECK(weight.dim() == 3 && weight.size(1) == features.size(1) &&
                  weight.scalar_type() == features.scalar_type(),
              op, ": weight must be a [K, C_in=", features.size(1), ", C_out] ",
              features.scalar_type(), " tensor, got ", weight.sizes(), " ",
              weight.scalar_type());
  TORCH_CHECK(nbr.dim() == 2 && nbr.size(1) == weight.size(0) && nbr.scalar_type() == at::kInt,
              op, ": nbr must be an int32 [M, K=", weight.size(0), "] tensor, got ", nbr.sizes(),
              " ", nbr.scalar_type());
}

// An accumulator for `like`'s values: the tensor itself when it computes in its own type.
at::Tensor acc_zeros(at::IntArrayRef shape, const at::Tensor& like) {
  const auto dtype = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::zeros(shape, like.options().dtype(dtype));
}

at::Tensor sparse_conv_cpu(const at::Tensor& features_in, const at::Tensor& weight_in,
                           const at::Tensor& nbr_in) {
  check_inputs(features_in, weight_in, nbr_in, "sparse_conv");
  const at::Tensor features = features_in.contiguous(), nbr = nbr_in.contiguous();
  const int64_t N = features.size(0), c_in = features.size(1), c_out = weight_in.size(2);
  const int64_t M = nbr.size(0), K = nbr.size(1);
  at::Tensor out = acc_zeros({M, c_out}, features);
  const TapPairs pairs = tap_pairs(nbr, N, "sparse_conv");
  if (pairs.offset[K] > 0 && c_in > 0 && c_out > 0) {
    const at::Tensor weight = weight_in.to(out.scalar_type()).contiguous();
    const std::vector<char> parallel(K, 0);
    const SequentialBlas sequential;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, features.scalar_type(), "sparse_conv_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          gather_gemm_scatter<scalar_t, acc_t>(
              features.data_ptr<scalar_t>(), c_in, weight.data_ptr<acc_t>(), c_out, pairs,
              pairs.in.get(), pairs.out.get(), out.data_ptr<acc_t>(), parallel);
        });
  }
  return out.to(features.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> sparse_conv_backward_cpu(const at::Tensor& grad_out_in,
                                                            const at::Tensor& features_in,
                                                            const at::Tensor& weight_in,
                                                            const at::Tensor& nbr_in) {
  check_inputs(features_in, weight_in, nbr_in, "sparse_conv_backward");
  const int64_t N = features_in.size(0), c_in = features_in.size(1), c_out = weight_in.size(2);
  const int64_t M = nbr_in.size(0), K = nbr_in.size(1);
  TORCH_CHECK(grad_out_in.dim() == 2 && grad_out_in.size(0) == M && grad_out_in.size(1) == c_out &&
                  grad_out_in.scalar_type() == features_in.scalar_type(),
              "sparse_conv_backward: grad_out must be a [M=", M, ", C_out=", c_out, "] ",
              features_in.scalar_type(), " tensor, got ", grad_out_in.sizes(), " ",
              grad_out_in.scalar_type());
  const at::Tensor features = features_in.contiguous(), nbr = nbr_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  at::Tensor grad_features = acc_zeros({N, c_in}, features);
  at::Tensor grad_weight = acc_zeros({K, c_in, c_out}, features);
  const TapPairs pairs = tap_pairs(nbr, N, "sparse_conv_backward");
  if (pairs.offset[K] > 0 && c_in > 0 && c_out > 0) {
    // [K, C_out, C_in]: the feature gradient is the convolution with each tap's W^T
    const at::Tensor weight_t =
        weight_in.to(grad_features.scalar_type()).transpose(1, 2).contiguous();
    const std::vector<char> repeated = repeated_inputs(pairs, N);
    const SequentialBlas sequential;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, features.scalar_type(), "sparse_conv_backward_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          gather_gemm_scatter<scalar_t, acc_t>(
              grad_out.data_ptr<scalar_t>(), c_out, weight_t.data_ptr<acc_t>(), c_in, pairs,
              pairs.out.get(), pairs.in.get(), grad_features.data_ptr<acc_t>(), repeated);
          weight_grad<scalar_t, acc_t>(features.data_ptr<scalar_t>(), c_in,
                                       grad_out.data_ptr<scalar_t>(), c_out, pairs,
                                       grad_weight.data_ptr<acc_t>());
        });
  }
  return {grad_features.to(features.scalar_type()), grad_weight.to(features.scalar_type())};
}

}  // namespace
}  // namespace zoo::cpu

TORCH_LIBRARY_IMPL(zoo, CPU, m) {
  m.impl("sparse_conv", &zoo::cpu::sparse_conv_cpu);
  m.impl("sparse_conv_backward", &zoo::cpu::sparse_conv_backward_cpu);
}

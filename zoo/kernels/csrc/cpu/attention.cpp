// Flash-style masked attention, CPU.
//
// Forward: for each (batch, head, block of kBQ queries) stream over the keys with an online
// softmax (running max m, running sum l, rescaled accumulator), so no [Lq, Lk] matrix exists;
// memory is O(L * D) per head. Key tiles (kBK keys) the keep mask removes entirely are skipped
// (tile_occupancy); a run of up to kMaxChunk consecutive non-empty tiles is one QK^T GEMM, one
// softmax pass and one PV GEMM. Inside a run, each slab of kSlab query rows computes only the
// span from the first to the last block of kBlock keys that keeps an entry (a band's edge tiles
// are mostly empty); partial tiles apply the mask element-wise, full tiles skip it. Rows with no
// allowed key give zeros and lse = -inf. Backward recomputes P = exp(S - lse) (FlashAttention-2
// style) with D_i = <dO_i, O_i>, per key tile over its run of non-empty query tiles, with the
// same per-slab spans; heads run in parallel so dQ, dK and dV accumulate without atomics, in a
// fixed order (deterministic). The matrix products use a register-blocked at::vec micro-kernel
// (8 x 3 vectors with AVX-512, 6 x 2 with AVX2); K^T is packed once per head with register
// transposes, V, dO and K are read in place when they are float rows of whole vectors; the packed
// K^T rows are one cache line longer than the keys, so that 64 of them 4 KiB apart (L = 1024) do
// not share a handful of L1 sets. Which 16-key blocks each slab keeps is found once per call
// (fill_kept), and threads claim work items (heads, query tiles) as they finish their last
// (parallel_claim), so a thread the OS preempts does not hold back its fixed half of the items.
//
// soft_masked_attention (the DAM mask search) shares the forward: P_ij ~ w_ij exp(S_ij) with a
// float weight w, multiplied in after the exponential. Its backward also differentiates w, and w
// is usually broadcast over the batch, so it runs over (batch, head, key tile) work items with
// per-thread dQ and dW accumulators that are summed at the end: no [B, H, Lq, Lk] tensor.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "../ops.h"
#include "vec_utils.h"

namespace zoo::cpu {
namespace {

constexpr int64_t kBQ = 64;  // query rows per tile
constexpr int64_t kBK = 64;  // keys per tile
constexpr int kMR = 6;       // rows of C per micro-kernel call (6 x 2 vectors: AVX2's 16 registers)

// vectors of C per row: 6 x 4 accumulators with 512-bit vectors (24 of 32 registers), 6 x 2
// with 256-bit (12 of 16), leaving room for the B vectors and the broadcast A value
template <typename T>
constexpr int nv_max() {
  return VecT<T>::size() * sizeof(T) >= 64 ? 4 : 2;
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
// a cache-line prefetch the compiler keeps (GCC dropped __builtin_prefetch in the kernels here)
inline void prefetch(const char* p) {
#if defined(__GNUC__) && defined(__x86_64__)
  asm volatile("prefetcht0 %0" : : "m"(*p));
#else
  __builtin_prefetch(p);
#endif
}
at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// C[mr x nv*VS] (+)= A(m, k) * B[k, :], A(m, k) = a[m * sm + k * sk] (so A may be transposed),
// B row-major with leading dimension ldb.
template <typename T, int MR, int NV>
inline void micro_kernel(int64_t K, const T* a, int64_t sm, int64_t sk, const T* b,
                         int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  using Vec = VecT<T>;
  constexpr int64_t VS = Vec::size();
  Vec acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = accumulate ? Vec::loadu(c + i * ldc + j * VS) : Vec(T(0));
  for (int64_t k = 0; k < K; ++k) {
    Vec bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = Vec::loadu(b + k * ldb + j * VS);
    for (int i = 0; i < MR; ++i) {
      const Vec av(a[i * sm + k * sk]);
      for (int j = 0; j < NV; ++j) acc[i][j] = at::vec::fmadd(av, bv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j].store(c + i * ldc + j * VS);
}

template <typename T, int MR>
inline void micro_dispatch_nv(int nv, int64_t K, const T* a, int64_t sm, int64_t sk, const T* b,
                              int64_t ldb, T* c, int64_t ldc, bool acc) {
  switch (nv) {
    case 1: micro_kernel<T, MR, 1>(K, a, sm, sk, b, ldb, c, ldc, acc); break;
    case 2: micro_kernel<T, MR, 2>(K, a, sm, sk, b, ldb, c, ldc, acc); break;
    case 3:
      if constexpr (nv_max<T>() >= 3) micro_kernel<T, MR, 3>(K, a, sm, sk, b, ldb, c, ldc, acc);
      break;
    default:
      if constexpr (nv_max<T>() >= 4 && MR <= kMR) micro_kernel<T, MR, 4>(K, a, sm, sk, b, ldb, c, ldc, acc);
      break;
  }
}

template <typename T, int MR>
inline void micro_call(int mr, int nv, int64_t K, const T* a, int64_t sm, int64_t sk, const T* b,
                       int64_t ldb, T* c, int64_t ldc, bool acc) {
  if constexpr (MR > 1) {
    if (mr < MR) return micro_call<T, MR - 1>(mr, nv, K, a, sm, sk, b, ldb, c, ldc, acc);
  }
  micro_dispatch_nv<T, MR>(nv, K, a, sm, sk, b, ldb, c, ldc, acc);
}

// C[M x N] (+)= A[M x K] B[K x N]; N must be a multiple of the vector size (buffers are padded).
// Blocks of MR rows x NV vectors: 8 x 3 with 512-bit vectors (24 of 32 registers; a slab of 16
// rows is two blocks), 6 x 2 with 256-bit ones (12 of 16 registers).
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* a, int64_t sm, int64_t sk, const T* b,
          int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  constexpr int64_t VS = VecT<T>::size();
  constexpr bool wide = nv_max<T>() >= 4;
  constexpr int MR = wide ? 8 : kMR;
  constexpr int NV = wide ? 3 : nv_max<T>();
  for (int64_t m0 = 0; m0 < M; m0 += MR) {
    const int mr = static_cast<int>(std::min<int64_t>(MR, M - m0));
    for (int64_t n0 = 0; n0 < N;) {
      // 4 vectors left: 2 + 2 rather than 3 + a load-bound 1
      const int64_t left = (N - n0) / VS;
      const int nv = static_cast<int>(left == 4 ? 2 : std::min<int64_t>(NV, left));
      micro_call<T, MR>(mr, nv, K, a + m0 * sm, sm, sk, b + n0, ldb, c + m0 * ldc + n0, ldc,
                        accumulate);
      n0 += nv * VS;
    }
  }
}

struct Problem {
  int64_t B, H, Lq, Lk, D, Dv, nq, nk;
  double scale;
  const bool* mask = nullptr;  // [B, H, Lq, Lk] via strides (0 for broadcast dims)
  int64_t ms[4] = {0, 0, 0, 0};
  at::Tensor occ;  // int8 [Bm, Hm, nq, nk]
  const int8_t* occ_p = nullptr;
  int64_t Bm = 1, Hm = 1;
  // per slab of kSlab query rows and key tile, the bits of kept_blocks: [Bm, Hm, nslab, nk],
  // filled once per call by fill_kept (a mask broadcast over batch and heads is scanned once,
  // not once per head)
  std::vector<uint32_t> kept;
  int64_t nslab = 0;
  at::Tensor weight_holder;  // soft mask w in the compute type, [B, H, Lq, Lk] via strides
  const void* weight = nullptr;
  int64_t ws[4] = {0, 0, 0, 0};

  int8_t occupancy(int64_t b, int64_t h, int64_t qb, int64_t kb) const {
    if (!mask) return kTileFull;
    return occ_p[(((Bm == 1 ? 0 : b) * Hm + (Hm == 1 ? 0 : h)) * nq + qb) * nk + kb];
  }
  // kept_blocks of the kSlab query rows from q0 (a multiple of kSlab) and the key tile kb
  uint32_t kept_bits(int64_t b, int64_t h, int64_t q0, int64_t kb) const;
  const bool* mask_row(int64_t b, int64_t h, int64_t i) const {
    return mask + b * ms[0] + h * ms[1] + i * ms[2];
  }
  template <typename T>
  const T* weight_row(int64_t b, int64_t h, int64_t i) const {
    return static_cast<const T*>(weight) + b * ws[0] + h * ws[1] + i * ws[2];
  }
};

int64_t broadcast_stride(const at::Tensor& t, int d) { return t.size(d) == 1 ? 0 : t.stride(d); }

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& keep_mask,
                     const std::optional<at::Tensor>& tile_map, double scale,
                     at::Tensor& mask_holder, const std::optional<at::Tensor>& weight = {}) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "masked_attention: q, k, v must be [B, H, L, D]");
  Problem p;
  p.B = q.size(0); p.H = q.size(1); p.Lq = q.size(2); p.D = q.size(3);
  p.Lk = k.size(2); p.Dv = v.size(3);
  TORCH_CHECK(k.size(0) == p.B && k.size(1) == p.H && k.size(3) == p.D,
              "k must be [B, H, Lk, D] matching q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.size(0) == p.B && v.size(1) == p.H && v.size(2) == p.Lk,
              "v must be [B, H, Lk, Dv] matching k ", k.sizes(), ", got ", v.sizes());
  p.nq = (p.Lq + kBQ - 1) / kBQ;
  p.nk = (p.Lk + kBK - 1) / kBK;
  p.scale = scale;
  if (keep_mask.has_value()) {
    TORCH_CHECK(keep_mask->scalar_type() == at::kBool, "keep_mask must be bool (True = keep)");
    mask_holder = keep_mask->expand({p.B, p.H, p.Lq, p.Lk});
    p.mask = mask_holder.data_ptr<bool>();
    for (int d = 0; d < 4; ++d) p.ms[d] = broadcast_stride(mask_holder, d);
    if (tile_map.has_value()) {  // computed once per mask and cached by zoo.kernels._tiles
      p.occ = tile_map->to(at::kChar).contiguous();
      TORCH_CHECK(p.occ.dim() == 4 && p.occ.size(2) == p.nq && p.occ.size(3) == p.nk,
                  "tile_map must be [Bm, Hm, ", p.nq, ", ", p.nk, "], got ", p.occ.sizes());
    } else {
      p.occ = tile_occupancy(mask_holder, kBQ, kBK);
    }
    p.occ_p = p.occ.data_ptr<int8_t>();
    p.Bm = p.occ.size(0);
    p.Hm = p.occ.size(1);
  }
  if (weight.has_value()) {
    auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    auto w = weight->to(acc);
    while (w.dim() < 4) w = w.unsqueeze(0);
    p.weight_holder = w.expand({p.B, p.H, p.Lq, p.Lk});
    p.weight = p.weight_holder.data_ptr();
    for (int d = 0; d < 4; ++d) p.ws[d] = broadcast_stride(p.weight_holder, d);
  }
  return p;
}

// S[i, j] (i < bq, j < bk) = -inf where the mask forbids (q0 + i, k0 + j); S has leading
// dimension ld. Only partial tiles need it: full tiles keep everything.
template <typename T>
inline void mask_tile(const Problem& p, int64_t b, int64_t h, int64_t q0, int64_t bq, int64_t k0,
                      int64_t bk, T* S, int64_t ld) {
  constexpr T kNegInf = neg_inf<T>();
  for (int64_t i = 0; i < bq; ++i) {
    T* s = S + i * ld;
    const bool* mrow = p.mask_row(b, h, q0 + i);
    if (p.ms[3] == 1) {  // contiguous keys
      const bool* mk = mrow + k0;
      int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<T, float>) {  // 16 mask bytes -> a k-mask -> masked move
        const __m512 ninf = _mm512_set1_ps(kNegInf);
        for (; j + 16 <= bk; j += 16) {
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(mk + j));
          const __mmask16 keep = _mm_test_epi8_mask(bytes, bytes);
          _mm512_storeu_ps(s + j, _mm512_mask_mov_ps(ninf, keep, _mm512_loadu_ps(s + j)));
        }
      }
#elif defined(CPU_CAPABILITY_AVX2)
      if constexpr (std::is_same_v<T, float>) {  // 8 mask bytes -> a lane mask -> blend
        const __m256 ninf = _mm256_set1_ps(kNegInf);
        for (; j + 8 <= bk; j += 8) {
          const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mk + j));
          const __m256i lanes = _mm256_cvtepu8_epi32(bytes);
          const __m256 keep =
              _mm256_castsi256_ps(_mm256_cmpgt_epi32(lanes, _mm256_setzero_si256()));
          _mm256_storeu_ps(s + j, _mm256_blendv_ps(ninf, _mm256_loadu_ps(s + j), keep));
        }
      }
#endif
      for (; j < bk; ++j) s[j] = mk[j] ? s[j] : kNegInf;
    } else {
      for (int64_t j = 0; j < bk; ++j) {
        if (!mrow[(k0 + j) * p.ms[3]]) s[j] = kNegInf;
      }
    }
  }
}

// S[i, j] = -inf where the mask forbids (i, j) or j is padding (bk <= j < bkp); ld = bkp.
template <typename T>
inline void apply_mask(const Problem& p, int8_t occ, int64_t b, int64_t h, int64_t q0,
                       int64_t bq, int64_t k0, int64_t bk, int64_t bkp, T* S) {
  if (occ == kTilePartial) mask_tile(p, b, h, q0, bq, k0, bk, S, bkp);
  if (bk < bkp)
    for (int64_t i = 0; i < bq; ++i) std::fill(S + i * bkp + bk, S + (i + 1) * bkp, neg_inf<T>());
}

// dst[r * ldd + c] = src[r * lds + c] * mul (c < n; dst's columns n..ldd-1 are left alone)
template <typename T, typename scalar_t>
inline void copy_rows(int64_t rows, int64_t n, const scalar_t* src, int64_t lds, T* dst,
                      int64_t ldd, T mul) {
  using Vec = VecT<T>;
  constexpr int64_t VS = Vec::size();
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * lds;
    T* d = dst + r * ldd;
    int64_t c = 0;
    if constexpr (std::is_same_v<scalar_t, T>) {
      const Vec vm(mul);
      for (; c + VS <= n; c += VS) (Vec::loadu(s + c) * vm).store(d + c);
    }
    for (; c < n; ++c) d[c] = static_cast<T>(s[c]) * mul;
  }
}

// dst [cols x ldd] = src[rows x lds]^T for rows x cols (16 x 16 blocks for locality)
template <typename T, typename scalar_t>
inline void transpose_into(int64_t rows, int64_t cols, const scalar_t* src, int64_t lds, T* dst,
                           int64_t ldd) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<T, float>) {
    for (int64_t r0 = 0; r0 < rows; r0 += 256)  // 16 x 16 register transposes
      at::vec::transpose_mxn<float>(src + r0 * lds, lds, dst + r0, ldd,
                                    static_cast<int>(std::min<int64_t>(256, rows - r0)),
                                    static_cast<int>(cols));
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<T, float>) {
    const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
    for (int64_t r0 = 0; r0 < r8; r0 += 8)  // 8 x 8 register transposes, then the edges
      for (int64_t c0 = 0; c0 < c8; c0 += 8)
        at::vec::transpose_mxn<float, 8, 8>(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = r < r8 ? c8 : 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
    return;
  }
#endif
  for (int64_t r0 = 0; r0 < rows; r0 += 16)
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t r1 = std::min(rows, r0 + 16), c1 = std::min(cols, c0 + 16);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ldd + r] = static_cast<T>(src[r * lds + c]);
    }
}

// dst[0, n) = src[0, n) * mul; streaming stores for float rows of whole 64-byte lines (results
// written once and not read again here: no need to read their cache lines first)
template <typename T, typename scalar_t>
inline void store_scaled(const T* src, int64_t n, scalar_t* dst, T mul) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<T, float>) {
    if (n % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
      const __m512 vm = _mm512_set1_ps(mul);
      for (int64_t d = 0; d < n; d += 16)
        _mm512_stream_ps(dst + d, _mm512_mul_ps(_mm512_loadu_ps(src + d), vm));
      return;
    }
  }
#endif
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<scalar_t>(src[d] * mul);
}

// up to this many consecutive non-empty key tiles are handled by one GEMM + one softmax pass
constexpr int64_t kMaxChunk = 4;
// inside a tile the kernels work on slabs of kSlab query rows, and per slab only on the span from
// the first to the last block of kBlock keys that keeps an entry (a band's edge tiles are mostly
// empty); zoo.kernels._tiles.computed_fraction counts the same area
constexpr int64_t kSlab = 16;
constexpr int64_t kBlock = 16;
constexpr int64_t kBlocksPerTile = kBK / kBlock;
static_assert(kBK % kBlock == 0 && kBQ % kSlab == 0, "slabs and blocks must divide the tiles");

// bit c: the mask keeps an entry of rows [q0, q0 + rows) x keys [k0 + c kBlock, ...) of the tile
// at k0 (bk keys); every block of a full tile
inline uint32_t kept_blocks(const Problem& p, int8_t occ, int64_t b, int64_t h, int64_t q0,
                            int64_t rows, int64_t k0, int64_t bk) {
  const int64_t nblocks = (bk + kBlock - 1) / kBlock;
  if (occ == kTileEmpty) return 0;
  if (occ == kTileFull) return (1u << nblocks) - 1;
  uint32_t bits = 0;
  for (int64_t c = 0; c < nblocks; ++c) {
    const int64_t j0 = k0 + c * kBlock, n = std::min(kBlock, k0 + bk - j0);
    for (int64_t i = 0; i < rows && !(bits >> c & 1); ++i) {
      const bool* mrow = p.mask_row(b, h, q0 + i);
      if (p.ms[3] == 1 && n == kBlock) {
        uint64_t w[2];
        std::memcpy(w, mrow + j0, sizeof(w));
        if (w[0] | w[1]) bits |= 1u << c;
      } else {
        for (int64_t j = 0; j < n; ++j)
          if (mrow[(j0 + j) * p.ms[3]]) {
            bits |= 1u << c;
            break;
          }
      }
    }
  }
  return bits;
}

// A thread's items of [0, n): next(t) gives the next one, taking a new chunk of `chunk`
// consecutive items from the shared counter when the last is done (false when none is left).
class Claims {
 public:
  Claims(std::atomic<int64_t>& counter, int64_t n, int64_t chunk)
      : counter_(counter), n_(n), chunk_(chunk) {}
  bool next(int64_t& t) {
    if (cur_ + 1 < end_) {
      t = ++cur_;
      return true;
    }
    cur_ = counter_.fetch_add(chunk_, std::memory_order_relaxed);
    if (cur_ >= n_) return false;
    end_ = std::min(n_, cur_ + chunk_);
    t = cur_;
    return true;
  }
  int64_t chunk_end() const { return end_; }  // the end of the chunk the last item is in

 private:
  std::atomic<int64_t>& counter_;
  int64_t n_, chunk_, cur_ = 0, end_ = 0;
};

// Runs fn(claims) once on each intra-op thread, which takes its items with claims.next(t):
// threads take chunks as they finish their last, so one the OS preempts (a machine shared with
// other work) does not hold the call back with a fixed half of the items. Each item computes the
// same outputs whichever thread runs it, so the results do not depend on the schedule (the
// shared counter only hands out item numbers).
template <typename F>
void parallel_claim(int64_t n, int64_t chunk, const F& fn) {
  std::atomic<int64_t> counter{0};
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), (n + chunk - 1) / chunk);
  at::parallel_for(0, std::max<int64_t>(nthreads, 1), 1, [&](int64_t, int64_t) {
    Claims claims(counter, n, chunk);
    fn(claims);
  });
}

uint32_t Problem::kept_bits(int64_t b, int64_t h, int64_t q0, int64_t kb) const {
  if (!mask) return (1u << (std::min(kBK, Lk - kb * kBK) + kBlock - 1) / kBlock) - 1;
  return kept[(((Bm == 1 ? 0 : b) * Hm + (Hm == 1 ? 0 : h)) * nslab + q0 / kSlab) * nk + kb];
}

void fill_kept(Problem& p) {
  if (!p.mask) return;
  p.nslab = (p.Lq + kSlab - 1) / kSlab;
  p.kept.assign(p.Bm * p.Hm * p.nslab * p.nk, 0);
  constexpr int64_t per_tile = kBQ / kSlab;
  // items of at least ~1 MB of mask each: a mask broadcast over batch and heads is scanned inline
  // (another parallel region costs more than the scan on a loaded machine)
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(kBQ * p.Lk, 1));
  at::parallel_for(0, p.Bm * p.Hm * p.nq, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t qb = t % p.nq, bm = t / p.nq / p.Hm, hm = t / p.nq % p.Hm;
      for (int64_t kb = 0; kb < p.nk; ++kb) {
        const int8_t occ = p.occ_p[((bm * p.Hm + hm) * p.nq + qb) * p.nk + kb];
        const int64_t k0 = kb * kBK, bk = std::min(kBK, p.Lk - k0);
        for (int64_t s = qb * per_tile; s < std::min(p.nslab, (qb + 1) * per_tile); ++s) {
          const int64_t rows = std::min(kSlab, p.Lq - s * kSlab);
          p.kept[((bm * p.Hm + hm) * p.nslab + s) * p.nk + kb] =
              kept_blocks(p, occ, bm, hm, s * kSlab, rows, k0, bk);
        }
      }
    }
  });
}

template <typename scalar_t, typename T = at::opmath_type<scalar_t>>
void attention_forward(const Problem& p, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                       scalar_t* out, T* lse) {
  using Vec = VecT<T>;
  constexpr int64_t VS = Vec::size();
  constexpr T kNegInf = neg_inf<T>();
  static_assert(kBK % 16 == 0, "key tiles must hold whole vectors");
  const int64_t Dp = round_up(std::max<int64_t>(p.D, 1), VS);
  const int64_t Dvp = round_up(std::max<int64_t>(p.Dv, 1), VS);
  // leading dimension of the packed K^T (V^T): one cache line more than the padded length, so
  // its rows (4 KiB apart for L = 1024) do not all fall in the same L1 sets
  const int64_t Lkp = round_up(std::max<int64_t>(p.Lk, 1), VS) + 64 / sizeof(T);
  const T scale = static_cast<T>(p.scale);
  // V is read in place when it already is the GEMM's B operand (acc type, rows of whole vectors)
  const bool v_direct = std::is_same_v<scalar_t, T> && p.Dv == Dvp;
  const int64_t ldv = v_direct ? p.Dv : Dvp;
  // a head's query tiles per claim (a thread packs K^T once per head it works on), fewer when
  // there are few heads
  const int64_t nitems = p.B * p.H * p.nq;
  const int64_t chunk = std::max<int64_t>(
      1, std::min<int64_t>(p.nq, nitems / (8 * std::max<int64_t>(at::get_num_threads(), 1))));
  parallel_claim(nitems, chunk, [&](Claims& items) {
    // the head's K^T [Dp x Lkp] (padding zero) and, unless read in place, V [Lk x Dvp]; a tile
    // is packed on first use and reused by the head's later query tiles (items run in order)
    std::vector<T> Kt(Dp * Lkp), Vn(v_direct ? 0 : p.nk * kBK * Dvp, T(0));
    std::vector<char> packed(p.nk, 0);
    int64_t packed_bh = -1;
    std::vector<T> Qs(kBQ * Dp, T(0)), S(kBQ * kMaxChunk * kBK), O(kBQ * Dvp), m(kBQ), l(kBQ);
    for (int64_t t; items.next(t);) {
      const int64_t qb = t % p.nq, bh = t / p.nq, b = bh / p.H, h = bh % p.H;
      const int64_t q0 = qb * kBQ, bq = std::min(kBQ, p.Lq - q0);
      const scalar_t* kh = k + bh * p.Lk * p.D;
      const scalar_t* vh = v + bh * p.Lk * p.Dv;
      if (bh != packed_bh) {
        std::fill(packed.begin(), packed.end(), 0);
        packed_bh = bh;
      }
      copy_rows<T>(bq, p.D, q + (bh * p.Lq + q0) * p.D, p.D, Qs.data(), Dp, scale);
      // the next item's query rows and its last non-empty key tile (for a band, the tile it does
      // not share with this item) are prefetched a row at a time during this item's softmax,
      // so their first use does not wait for memory
      const char *pf_q = nullptr, *pf_k = nullptr, *pf_v = nullptr;
      int64_t pf_qrows = 0, pf_krows = 0;
      if (t + 1 < items.chunk_end()) {
        const int64_t qn = (t + 1) % p.nq, bhn = (t + 1) / p.nq;
        pf_q = reinterpret_cast<const char*>(q + (bhn * p.Lq + qn * kBQ) * p.D);
        pf_qrows = std::min(kBQ, p.Lq - qn * kBQ);
        for (int64_t kb = p.nk - 1; kb >= 0; --kb) {
          if (p.occupancy(bhn / p.H, bhn % p.H, qn, kb) == kTileEmpty) continue;
          pf_k = reinterpret_cast<const char*>(k + (bhn * p.Lk + kb * kBK) * p.D);
          pf_v = reinterpret_cast<const char*>(v + (bhn * p.Lk + kb * kBK) * p.Dv);
          pf_krows = std::min(kBK, p.Lk - kb * kBK);
          break;
        }
      }
      const int64_t qrow_bytes = p.D * sizeof(scalar_t), vrow_bytes = p.Dv * sizeof(scalar_t);
      auto prefetch_row = [&](int64_t i) {
        if (i < pf_qrows)
          for (int64_t c = 0; c < qrow_bytes; c += 64) prefetch(pf_q + i * qrow_bytes + c);
        if (i < pf_krows) {
          for (int64_t c = 0; c < qrow_bytes; c += 64) prefetch(pf_k + i * qrow_bytes + c);
          for (int64_t c = 0; c < vrow_bytes; c += 64) prefetch(pf_v + i * vrow_bytes + c);
        }
      };
      std::fill(O.begin(), O.end(), T(0));
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), T(0));
      for (int64_t kb0 = 0; kb0 < p.nk;) {
        if (p.occupancy(b, h, qb, kb0) == kTileEmpty) {
          ++kb0;
          continue;
        }
        int64_t kb1 = kb0 + 1;  // a run of non-empty tiles [kb0, kb1)
        while (kb1 < p.nk && kb1 - kb0 < kMaxChunk && p.occupancy(b, h, qb, kb1) != kTileEmpty)
          ++kb1;
        const int64_t k0 = kb0 * kBK, nk_real = std::min(kb1 * kBK, p.Lk) - k0;
        const int64_t ncols = round_up(nk_real, VS);
        for (int64_t kb = kb0; kb < kb1; ++kb) {
          if (packed[kb]) continue;
          const int64_t t0 = kb * kBK, tn = std::min(kBK, p.Lk - t0);
          transpose_into<T>(tn, p.D, kh + t0 * p.D, p.D, Kt.data() + t0, Lkp);
          if (!v_direct) copy_rows<T>(tn, p.Dv, vh + t0 * p.Dv, p.Dv, Vn.data() + t0 * Dvp, Dvp, T(1));
          packed[kb] = 1;
        }
        // per slab of rows, the span [lo, hi) of the run's columns that can keep an entry
        for (int64_t r0 = 0; r0 < bq; r0 += kSlab) {
          const int64_t rows = std::min(kSlab, bq - r0);
          int64_t lo = -1, hi = 0;
          for (int64_t kb = kb0; kb < kb1; ++kb) {
            const int64_t t0 = kb * kBK;
            const uint32_t bits = p.kept_bits(b, h, q0 + r0, kb);
            if (!bits) continue;
            if (lo < 0) lo = t0 - k0 + __builtin_ctz(bits) * kBlock;
            hi = t0 - k0 + (32 - __builtin_clz(bits)) * kBlock;
          }
          if (lo < 0) continue;  // nothing kept: these rows are unchanged by the run
          hi = std::min(hi, ncols);
          const int64_t hi_real = std::min(hi, nk_real), span = hi - lo;
          T* Sr = S.data() + r0 * ncols + lo;
          // S = (scale Q) K^T on the span, leading dimension ncols
          gemm(rows, span, Dp, Qs.data() + r0 * Dp, Dp, 1, Kt.data() + k0 + lo, Lkp, Sr, ncols,
               false);
          for (int64_t kb = kb0; kb < kb1; ++kb) {
            if (p.occupancy(b, h, qb, kb) != kTilePartial) continue;
            const int64_t a = std::max(kb * kBK, k0 + lo), e = std::min((kb + 1) * kBK, k0 + hi_real);
            if (a < e) mask_tile(p, b, h, q0 + r0, rows, a, e - a, Sr + (a - k0 - lo), ncols);
          }
          for (int64_t i = r0; i < r0 + rows; ++i) {  // online softmax update; S becomes P
            T* s = S.data() + i * ncols + lo;
            prefetch_row(i);
            std::fill(s + (hi_real - lo), s + span, kNegInf);
            Vec vmax(kNegInf);
            for (int64_t j = 0; j < span; j += VS) vmax = at::vec::maximum(vmax, Vec::loadu(s + j));
            const T mnew = std::max(m[i], hmax<T>(vmax));
            if (mnew == kNegInf) {  // nothing allowed yet in this row
              std::fill(s, s + span, T(0));
              continue;
            }
            const Vec vm(mnew);
            Vec vsum(T(0));
            if (p.weight) {  // soft mask: P ~ w exp(S)
              for (int64_t j = 0; j < span; j += VS) vexp(Vec::loadu(s + j) - vm).store(s + j);
              const T* w = p.weight_row<T>(b, h, q0 + i) + (k0 + lo) * p.ws[3];
              for (int64_t j = 0; j < hi_real - lo; ++j) s[j] *= w[j * p.ws[3]];
              for (int64_t j = 0; j < span; j += VS) vsum = vsum + Vec::loadu(s + j);
            } else {
              for (int64_t j = 0; j < span; j += VS) {
                const Vec e = vexp(Vec::loadu(s + j) - vm);
                e.store(s + j);
                vsum = vsum + e;
              }
            }
            const T alpha = m[i] == mnew ? T(1) : std::exp(m[i] - mnew);  // 0 when m was -inf
            l[i] = l[i] * alpha + hsum<T>(vsum);
            m[i] = mnew;
            if (alpha != T(1)) {
              T* o = O.data() + i * Dvp;
              const Vec va(alpha);
              for (int64_t d = 0; d < Dvp; d += VS) (Vec::loadu(o + d) * va).store(o + d);
            }
          }
          // O += P V over the span's real keys
          const T* Vp = v_direct ? reinterpret_cast<const T*>(vh) + k0 * ldv : Vn.data() + k0 * ldv;
          gemm(rows, Dvp, hi_real - lo, Sr, ncols, 1, Vp + lo * ldv, ldv, O.data() + r0 * Dvp,
               Dvp, true);
        }
        kb0 = kb1;
      }
      scalar_t* oh = out + (bh * p.Lq + q0) * p.Dv;
      T* lh = lse + bh * p.Lq + q0;
      for (int64_t i = 0; i < bq; ++i) {
        const T inv = l[i] > T(0) ? T(1) / l[i] : T(0);
        T* o = O.data() + i * Dvp;
        const Vec vi(inv);
#if defined(CPU_CAPABILITY_AVX512)
        // streaming stores: the output is not read again here, so skip reading its lines first
        if constexpr (std::is_same_v<scalar_t, float>) {
          float* dst = oh + i * p.Dv;
          if (p.Dv % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
            for (int64_t d = 0; d < p.Dv; d += 16)
              _mm512_stream_ps(dst + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), _mm512_set1_ps(inv)));
            lh[i] = l[i] > T(0) ? m[i] + std::log(l[i]) : kNegInf;
            continue;
          }
        }
#endif
        for (int64_t d = 0; d < Dvp; d += VS) (Vec::loadu(o + d) * vi).store(o + d);
        store_from_acc(o, p.Dv, oh + i * p.Dv);
        lh[i] = l[i] > T(0) ? m[i] + std::log(l[i]) : kNegInf;
      }
    }
#if defined(CPU_CAPABILITY_AVX512)
    _mm_sfence();  // order the streaming stores before the caller reads the output
#endif
  });
}

// Backward, FlashAttention-2 style, per (batch, head) so dQ accumulates without atomics: for each
// key tile, the run of non-empty query tiles (up to kMaxChunk of them) is one set of GEMMs.
//   P = exp(S - lse), dV += P^T dO, dP = dO V^T, dS = P (dP - Delta), dK += dS^T (scale Q),
//   dQ += dS K (times scale at the end)
template <typename scalar_t, typename T = at::opmath_type<scalar_t>>
void attention_backward(const Problem& p, const scalar_t* q, const scalar_t* k,
                        const scalar_t* v, const scalar_t* out, const scalar_t* dout,
                        const T* lse, scalar_t* dq, scalar_t* dk, scalar_t* dv) {
  using Vec = VecT<T>;
  constexpr int64_t VS = Vec::size();
  constexpr T kNegInf = neg_inf<T>();
  const int64_t BKp = round_up(kBK, VS);
  const int64_t Dp = round_up(std::max<int64_t>(p.D, 1), VS);
  const int64_t Dvp = round_up(std::max<int64_t>(p.Dv, 1), VS);
  // leading dimension of the packed K^T (V^T): one cache line more than the padded length, so
  // its rows (4 KiB apart for L = 1024) do not all fall in the same L1 sets
  const int64_t Lkp = round_up(std::max<int64_t>(p.Lk, 1), VS) + 64 / sizeof(T);
  const T scale = static_cast<T>(p.scale);
  const bool dO_direct = std::is_same_v<scalar_t, T> && p.Dv == Dvp;
  const bool k_direct = std::is_same_v<scalar_t, T> && p.D == Dp;
  // Q read in place, the scale applied to S inside the exponential and to dK at the end (only for
  // scale > 0: a masked -inf must stay -inf once scaled)
  const bool q_direct = std::is_same_v<scalar_t, T> && p.D == Dp && scale > T(0);
  const int64_t ldq = q_direct ? p.D : Dp;
  const T s_mul = q_direct ? scale : T(1), dk_mul = q_direct ? scale : T(1);
  const int64_t ldo = dO_direct ? p.Dv : Dvp, ldk = k_direct ? p.D : Dp;
  const int64_t kMaxRows = kMaxChunk * kBQ;
  parallel_claim(p.B * p.H, 1, [&](Claims& items) {
    std::vector<T> Qs(q_direct ? 0 : p.Lq * Dp, T(0)), dOn(dO_direct ? 0 : p.Lq * Dvp, T(0)), Drow(p.Lq),
        dQ(p.Lq * Dp), Kt(Dp * Lkp, T(0)), Kn(k_direct ? 0 : p.Lk * Dp, T(0)),
        Vt(Dvp * Lkp, T(0)), dK(BKp * Dp), dV(BKp * Dvp), P(kMaxRows * BKp), dS(kMaxRows * BKp);
    for (int64_t bh; items.next(bh);) {
      const int64_t b = bh / p.H, h = bh % p.H;
      const scalar_t* kh = k + bh * p.Lk * p.D;
      const scalar_t* vh = v + bh * p.Lk * p.Dv;
      const scalar_t* oh = out + bh * p.Lq * p.Dv;
      const scalar_t* doh = dout + bh * p.Lq * p.Dv;
      const T* lh = lse + bh * p.Lq;
      if (!q_direct) copy_rows<T>(p.Lq, p.D, q + bh * p.Lq * p.D, p.D, Qs.data(), Dp, scale);
      const T* Qh = q_direct ? reinterpret_cast<const T*>(q + bh * p.Lq * p.D) : Qs.data();
      if (!dO_direct) copy_rows<T>(p.Lq, p.Dv, doh, p.Dv, dOn.data(), Dvp, T(1));
      const T* dO = dO_direct ? reinterpret_cast<const T*>(doh) : dOn.data();
      for (int64_t i = 0; i < p.Lq; ++i) {
        int64_t d = 0;
        T acc = T(0);
        if constexpr (std::is_same_v<scalar_t, T>) {  // vector partial sums
          Vec vacc(T(0));
          for (; d + VS <= p.Dv; d += VS)
            vacc = at::vec::fmadd(Vec::loadu(doh + i * p.Dv + d), Vec::loadu(oh + i * p.Dv + d), vacc);
          acc = hsum<T>(vacc);
        }
        for (; d < p.Dv; ++d)
          acc += static_cast<T>(doh[i * p.Dv + d]) * static_cast<T>(oh[i * p.Dv + d]);
        Drow[i] = acc;
      }
      transpose_into<T>(p.Lk, p.D, kh, p.D, Kt.data(), Lkp);
      transpose_into<T>(p.Lk, p.Dv, vh, p.Dv, Vt.data(), Lkp);
      if (!k_direct) copy_rows<T>(p.Lk, p.D, kh, p.D, Kn.data(), Dp, T(1));
      const T* Kr = k_direct ? reinterpret_cast<const T*>(kh) : Kn.data();
      std::fill(dQ.begin(), dQ.end(), T(0));
      for (int64_t kb = 0; kb < p.nk; ++kb) {
        const int64_t k0 = kb * kBK, bk = std::min(kBK, p.Lk - k0), bkp = round_up(bk, VS);
        std::fill(dK.begin(), dK.begin() + bkp * Dp, T(0));
        std::fill(dV.begin(), dV.begin() + bkp * Dvp, T(0));
        for (int64_t qb0 = 0; qb0 < p.nq;) {
          if (p.occupancy(b, h, qb0, kb) == kTileEmpty) {
            ++qb0;
            continue;
          }
          int64_t qb1 = qb0 + 1;  // a run of non-empty query tiles [qb0, qb1)
          while (qb1 < p.nq && qb1 - qb0 < kMaxChunk && p.occupancy(b, h, qb1, kb) != kTileEmpty)
            ++qb1;
          const int64_t q0 = qb0 * kBQ, rows = std::min(qb1 * kBQ, p.Lq) - q0;
          const T* Qb = Qh + q0 * ldq;
          const T* dOb = dO + q0 * ldo;
          // per slab of rows, only the span [lo, hi) of the tile's key blocks that keep an entry;
          // P and dS are zero elsewhere. rlo/rhi: the rows (from q0) each key block has spans in
          int64_t rlo[kBlocksPerTile], rhi[kBlocksPerTile];
          std::fill(rlo, rlo + kBlocksPerTile, rows);
          std::fill(rhi, rhi + kBlocksPerTile, int64_t(0));
          for (int64_t r0 = 0; r0 < rows; r0 += kSlab) {
            const int64_t nr = std::min(kSlab, rows - r0);
            const int8_t occ = p.occupancy(b, h, (q0 + r0) / kBQ, kb);
            const uint32_t bits = p.kept_bits(b, h, q0 + r0, kb);
            T* Pr = P.data() + r0 * bkp;
            T* dSr = dS.data() + r0 * bkp;
            if (!bits) {
              std::fill(Pr, Pr + nr * bkp, T(0));
              std::fill(dSr, dSr + nr * bkp, T(0));
              continue;
            }
            const int64_t lo = __builtin_ctz(bits) * kBlock;
            const int64_t hi = std::min<int64_t>((32 - __builtin_clz(bits)) * kBlock, bkp);
            const int64_t hi_real = std::min(hi, bk), span = hi - lo;
            gemm(nr, span, Dp, Qb + r0 * ldq, ldq, 1, Kt.data() + k0 + lo, Lkp, Pr + lo, bkp,
                 false);
            if (occ == kTilePartial) mask_tile(p, b, h, q0 + r0, nr, k0 + lo, hi_real - lo, Pr + lo, bkp);
            gemm(nr, span, Dvp, dOb + r0 * ldo, ldo, 1, Vt.data() + k0 + lo, Lkp, dSr + lo, bkp,
                 false);
            for (int64_t i = 0; i < nr; ++i) {
              T* pr = Pr + i * bkp;
              T* ds = dSr + i * bkp;
              std::fill(pr, pr + lo, T(0));
              std::fill(ds, ds + lo, T(0));
              std::fill(pr + hi_real, pr + bkp, T(0));
              std::fill(ds + hi_real, ds + bkp, T(0));
              const T li = lh[q0 + r0 + i];
              if (li == kNegInf) {
                std::fill(pr + lo, pr + hi_real, T(0));
                std::fill(ds + lo, ds + hi_real, T(0));
                continue;
              }
              const Vec vl(li), vd(Drow[q0 + r0 + i]), vs(s_mul);
              int64_t j = lo;
              for (; j + VS <= hi_real; j += VS) {
                const Vec e = vexp(at::vec::fmsub(Vec::loadu(pr + j), vs, vl));
                e.store(pr + j);
                (e * (Vec::loadu(ds + j) - vd)).store(ds + j);
              }
              for (; j < hi_real; ++j) {
                const T e = std::exp(pr[j] * s_mul - li);
                pr[j] = e;
                ds[j] = e * (ds[j] - Drow[q0 + r0 + i]);
              }
            }
            gemm(nr, Dp, hi_real - lo, dSr + lo, bkp, 1, Kr + (k0 + lo) * ldk, ldk,
                 dQ.data() + (q0 + r0) * Dp, Dp, true);
            for (int64_t c = lo / kBlock; c * kBlock < hi; ++c) {
              rlo[c] = std::min(rlo[c], r0);
              rhi[c] = std::max(rhi[c], r0 + nr);
            }
          }
          // dV += P^T dO and dK += dS^T (scale Q), a key block at a time over its rows
          for (int64_t c = 0; c < kBlocksPerTile && c * kBlock < bkp; ++c) {
            if (rlo[c] >= rhi[c]) continue;
            const int64_t j0 = c * kBlock, nj = std::min(kBlock, bkp - j0), nrow = rhi[c] - rlo[c];
            gemm(nj, Dvp, nrow, P.data() + rlo[c] * bkp + j0, 1, bkp, dOb + rlo[c] * ldo, ldo,
                 dV.data() + j0 * Dvp, Dvp, true);
            gemm(nj, Dp, nrow, dS.data() + rlo[c] * bkp + j0, 1, bkp, Qb + rlo[c] * ldq, ldq,
                 dK.data() + j0 * Dp, Dp, true);
          }
          qb0 = qb1;
        }
        scalar_t* dkh = dk + (bh * p.Lk + k0) * p.D;
        scalar_t* dvh = dv + (bh * p.Lk + k0) * p.Dv;
        for (int64_t j = 0; j < bk; ++j) {
          store_scaled(dK.data() + j * Dp, p.D, dkh + j * p.D, dk_mul);
          store_scaled(dV.data() + j * Dvp, p.Dv, dvh + j * p.Dv, T(1));
        }
      }
      scalar_t* dqh = dq + bh * p.Lq * p.D;
      for (int64_t i = 0; i < p.Lq; ++i) store_scaled(dQ.data() + i * Dp, p.D, dqh + i * p.D, scale);
    }
#if defined(CPU_CAPABILITY_AVX512)
    _mm_sfence();  // order the streaming stores before the caller reads the gradients
#endif
  });
}

// Backward of soft_masked_attention: work items (b, h, key tile); dK and dV of an item are its
// own, dQ and dW (reduced over the dims w broadcasts along) go to per-thread accumulators.
//   E = exp(S - lse), dP = dO V^T, dW = E (dP - Delta), dS = w dW, P = w E
//   dV += P^T dO, dK += dS^T (scale Q), dQ += dS K (times scale at the end)
template <typename scalar_t, typename T = at::opmath_type<scalar_t>>
void soft_attention_backward(const Problem& p, const scalar_t* q, const scalar_t* k,
                             const scalar_t* v, const scalar_t* out, const scalar_t* dout,
                             const T* lse, scalar_t* dq, scalar_t* dk, scalar_t* dv, T* dw_all,
                             const int64_t* dws, int64_t dw_numel, int nthreads) {
  using Vec = VecT<T>;
  constexpr int64_t VS = Vec::size();
  constexpr T kNegInf = neg_inf<T>();
  const int64_t BKp = round_up(kBK, VS);
  const int64_t Dp = round_up(std::max<int64_t>(p.D, 1), VS);
  const int64_t Dvp = round_up(std::max<int64_t>(p.Dv, 1), VS);
  const T scale = static_cast<T>(p.scale);
  const int64_t BH = p.B * p.H;
  // scaled Q, dO (padded) and Delta_i = <dO_i, O_i>, shared read-only by all items
  std::vector<T> Qs(BH * p.Lq * Dp, T(0)), dO(BH * p.Lq * Dvp, T(0)), Delta(BH * p.Lq);
  at::parallel_for(0, BH * p.Lq, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t d = 0; d < p.D; ++d) Qs[r * Dp + d] = static_cast<T>(q[r * p.D + d]) * scale;
      T acc = T(0);
      for (int64_t d = 0; d < p.Dv; ++d) {
        const T g = static_cast<T>(dout[r * p.Dv + d]);
        dO[r * Dvp + d] = g;
        acc += g * static_cast<T>(out[r * p.Dv + d]);
      }
      Delta[r] = acc;
    }
  });
  std::vector<T> dQ_all(static_cast<size_t>(nthreads) * BH * p.Lq * Dp, T(0));
  at::parallel_for(0, BH * p.nk, 1, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    T* dQ = dQ_all.data() + static_cast<size_t>(tid) * BH * p.Lq * Dp;
    T* dW = dw_all + static_cast<size_t>(tid) * dw_numel;
    std::vector<T> Kt(Dp * BKp), Kn(BKp * Dp), Vt(Dvp * BKp), dK(BKp * Dp), dV(BKp * Dvp),
        P(kBQ * BKp), dS(kBQ * BKp);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t kb = t % p.nk, bh = t / p.nk, b = bh / p.H, h = bh % p.H;
      const int64_t k0 = kb * kBK, bk = std::min(kBK, p.Lk - k0), bkp = round_up(bk, VS);
      const scalar_t* kh = k + bh * p.Lk * p.D;
      const scalar_t* vh = v + bh * p.Lk * p.Dv;
      std::fill(Kt.begin(), Kt.begin() + Dp * bkp, T(0));
      std::fill(Kn.begin(), Kn.begin() + bkp * Dp, T(0));
      std::fill(Vt.begin(), Vt.begin() + Dvp * bkp, T(0));
      for (int64_t j = 0; j < bk; ++j) {
        for (int64_t d = 0; d < p.D; ++d) {
          const T x = static_cast<T>(kh[(k0 + j) * p.D + d]);
          Kt[d * bkp + j] = x;
          Kn[j * Dp + d] = x;
        }
        for (int64_t d = 0; d < p.Dv; ++d) Vt[d * bkp + j] = static_cast<T>(vh[(k0 + j) * p.Dv + d]);
      }
      std::fill(dK.begin(), dK.begin() + bkp * Dp, T(0));
      std::fill(dV.begin(), dV.begin() + bkp * Dvp, T(0));
      T* dWbh = dW + b * dws[0] + h * dws[1];
      for (int64_t qb = 0; qb < p.nq; ++qb) {
        const int8_t occ = p.occupancy(b, h, qb, kb);
        if (occ == kTileEmpty) continue;
        const int64_t q0 = qb * kBQ, bq = std::min(kBQ, p.Lq - q0);
        const T* Qb = Qs.data() + (bh * p.Lq + q0) * Dp;
        const T* dOb = dO.data() + (bh * p.Lq + q0) * Dvp;
        gemm(bq, bkp, Dp, Qb, Dp, 1, Kt.data(), bkp, P.data(), bkp, false);
        apply_mask(p, occ, b, h, q0, bq, k0, bk, bkp, P.data());
        gemm(bq, bkp, Dvp, dOb, Dvp, 1, Vt.data(), bkp, dS.data(), bkp, false);
        for (int64_t i = 0; i < bq; ++i) {
          T* pr = P.data() + i * bkp;
          T* ds = dS.data() + i * bkp;
          const T li = lse[bh * p.Lq + q0 + i];
          if (li == kNegInf) {  // all weights zero: no gradient
            std::fill(pr, pr + bkp, T(0));
            std::fill(ds, ds + bkp, T(0));
            continue;
          }
          const Vec vl(li), vd(Delta[bh * p.Lq + q0 + i]);
          for (int64_t j = 0; j < bkp; j += VS) {  // pr <- E, ds <- E (dP - Delta) = dW
            const Vec e = vexp(Vec::loadu(pr + j) - vl);
            e.store(pr + j);
            (e * (Vec::loadu(ds + j) - vd)).store(ds + j);
          }
          const T* w = p.weight_row<T>(b, h, q0 + i) + k0 * p.ws[3];
          T* dwr = dWbh + (q0 + i) * dws[2] + k0 * dws[3];
          for (int64_t j = 0; j < bk; ++j) {
            const T wj = w[j * p.ws[3]];
            dwr[j * dws[3]] += ds[j];
            ds[j] *= wj;
            pr[j] *= wj;
          }
        }
        gemm(bkp, Dvp, bq, P.data(), 1, bkp, dOb, Dvp, dV.data(), Dvp, true);
        gemm(bkp, Dp, bq, dS.data(), 1, bkp, Qb, Dp, dK.data(), Dp, true);
        gemm(bq, Dp, bkp, dS.data(), bkp, 1, Kn.data(), Dp, dQ + (bh * p.Lq + q0) * Dp, Dp, true);
      }
      scalar_t* dkh = dk + (bh * p.Lk + k0) * p.D;
      scalar_t* dvh = dv + (bh * p.Lk + k0) * p.Dv;
      for (int64_t j = 0; j < bk; ++j) {
        for (int64_t d = 0; d < p.D; ++d) dkh[j * p.D + d] = static_cast<scalar_t>(dK[j * Dp + d]);
        for (int64_t d = 0; d < p.Dv; ++d) dvh[j * p.Dv + d] = static_cast<scalar_t>(dV[j * Dvp + d]);
      }
    }
  });
  at::parallel_for(0, BH * p.Lq, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t d = 0; d < p.D; ++d) {
        T acc = T(0);
        for (int th = 0; th < nthreads; ++th)
          acc += dQ_all[(static_cast<size_t>(th) * BH + r / p.Lq) * p.Lq * Dp + (r % p.Lq) * Dp + d];
        dq[r * p.D + d] = static_cast<scalar_t>(acc * scale);
      }
  });
}

at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous();
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const std::optional<at::Tensor>& keep_mask, const std::optional<at::Tensor>& tile_map,
    double scale, const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(q_.scalar_type() == k_.scalar_type() && q_.scalar_type() == v_.scalar_type(),
              "q, k, v must have one dtype");
  at::Tensor mask_holder;
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  Problem p = make_problem(q, k, v, keep_mask, tile_map, scale, mask_holder, weight);
  fill_kept(p);
  auto out = at::empty({p.B, p.H, p.Lq, p.Dv}, q.options());
  auto lse = at::empty({p.B, p.H, p.Lq}, q.options().dtype(acc_dtype(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "masked_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    attention_forward<scalar_t>(p, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                lse.data_ptr<acc_t>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> masked_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& keep_mask, const std::optional<at::Tensor>& tile_map,
    double scale) {
  return attention_forward_cpu(q, k, v, keep_mask, tile_map, scale, std::nullopt);
}

std::tuple<at::Tensor, at::Tensor> soft_masked_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
    const std::optional<at::Tensor>& keep_mask, const std::optional<at::Tensor>& tile_map,
    double scale) {
  TORCH_CHECK(at::isFloatingType(mask.scalar_type()), "mask must be a float tensor");
  return attention_forward_cpu(q, k, v, keep_mask, tile_map, scale, mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const std::optional<at::Tensor>& keep_mask, const std::optional<at::Tensor>& tile_map,
    const at::Tensor& out_, const at::Tensor& lse_, double scale) {
  at::Tensor mask_holder;
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  Problem p = make_problem(q, k, v, keep_mask, tile_map, scale, mask_holder);
  fill_kept(p);
  auto out = contiguous_as(out_, q.scalar_type());
  auto dout = contiguous_as(grad_out, q.scalar_type());
  auto lse = contiguous_as(lse_, acc_dtype(q.scalar_type()));
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "masked_attention_backward_cpu", [&] {
    attention_backward<scalar_t>(p, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                 v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                 dout.data_ptr<scalar_t>(), lse.data_ptr<at::opmath_type<scalar_t>>(),
                                 dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                                 dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_masked_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& mask, const std::optional<at::Tensor>& keep_mask,
    const std::optional<at::Tensor>& tile_map, const at::Tensor& out_, const at::Tensor& lse_,
    double scale) {
  at::Tensor mask_holder;
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  Problem p = make_problem(q, k, v, keep_mask, tile_map, scale, mask_holder, mask);
  const auto acc = acc_dtype(q.scalar_type());
  auto out = contiguous_as(out_, q.scalar_type());
  auto dout = contiguous_as(grad_out, q.scalar_type());
  auto lse = contiguous_as(lse_, acc);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  // dW in w's own (un-broadcast) batch/head shape, full [Lq, Lk] (summed below where w is
  // broadcast along a sequence dim), one accumulator per thread
  at::Tensor w4 = mask;
  while (w4.dim() < 4) w4 = w4.unsqueeze(0);
  const int64_t Bw = w4.size(0), Hw = w4.size(1);
  const int nthreads = at::get_num_threads();
  auto dw = at::zeros({nthreads, Bw, Hw, p.Lq, p.Lk}, q.options().dtype(acc));
  const int64_t dws[4] = {Bw == 1 ? 0 : Hw * p.Lq * p.Lk, Hw == 1 ? 0 : p.Lq * p.Lk, p.Lk, 1};
  if (p.B * p.H * p.Lq * p.Lk == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "soft_masked_attention_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      soft_attention_backward<scalar_t>(
          p, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
          out.data_ptr<scalar_t>(), dout.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(),
          dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
          dw.data_ptr<acc_t>(), dws, Bw * Hw * p.Lq * p.Lk, nthreads);
    });
  }
  auto dmask = dw.sum(0);
  if (w4.size(2) == 1) dmask = dmask.sum(2, true);
  if (w4.size(3) == 1) dmask = dmask.sum(3, true);
  return {dq, dk, dv, dmask.reshape(mask.sizes()).to(mask.scalar_type())};
}

}  // namespace
}  // namespace zoo::cpu

TORCH_LIBRARY_IMPL(zoo, CPU, m) {
  m.impl("masked_attention", &zoo::cpu::masked_attention_cpu);
  m.impl("masked_attention_backward", &zoo::cpu::masked_attention_backward_cpu);
  m.impl("soft_masked_attention", &zoo::cpu::soft_masked_attention_cpu);
  m.impl("soft_masked_attention_backward", &zoo::cpu::soft_masked_attention_backward_cpu);
}

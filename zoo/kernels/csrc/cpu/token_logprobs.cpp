// Token log-probabilities from hidden states, CPU: log_softmax(h W^T / T) at the given tokens
// (and the rows' entropies), never holding the [N, V] logits.
//
// Forward: the work is cut into (row chunk, vocabulary group) items, run in parallel. An item
// computes its logits one [kRows, kVocab] chunk at a time with a BLAS GEMM (MKL's, exported by
// torch's x86 wheels) and folds each chunk into a per-row online state: the running max m, the
// sum s = sum exp(l - m) and, for the entropy, a = sum exp(l - m) (l - m). The groups' states are
// then merged in group order: lse = m + log s, logp = l_token - lse, H = log s - a / s (the
// entropy without subtracting two numbers of the logits' size).
//
// Backward: row stripes in order; within a stripe the vocabulary groups in parallel. For each
// chunk the logits are recomputed and turned into their gradient in place,
//   dL/dl_j = (g_lp (onehot_j - p_j) - g_ent p_j (log p_j + H)) / T,
// then grad_weight[chunk] += G^T h_stripe (each chunk belongs to one group: no race; the stripes
// add in order) and the group's own partial grad_hidden += G W_chunk; the partials are added in
// group order. The chunk, group and stripe sizes depend on the shapes alone, never on the thread
// count, so every sum runs in the same order: the results repeat bit for bit with any number of
// threads. Beyond the inputs and outputs a call holds O(N) statistics, one chunk per thread and
// the backward's partials ([groups, kStripe, H]).
//
// float16/bfloat16 inputs are converted to float32 once (the GEMMs and all sums run in float32);
// float64 runs in float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <vector>

#include "vec_utils.h"

namespace zoo::cpu {
namespace {

constexpr int64_t kRows = 256;    // forward: rows per chunk
constexpr int64_t kStripe = 512;  // backward: rows per stripe
constexpr int64_t kVocab = 1024;  // vocabulary entries per chunk
constexpr int64_t kGroups = 16;   // most vocabulary groups (forward items per row chunk; the
                                  // backward's grad_hidden partials per stripe)

// BLAS (LP64 Fortran symbols): torch's x86 wheels link MKL into libtorch_cpu and export these.
// Weak, so the library still loads where they are missing, and uses its own loops there.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
}

#ifdef ZOO_KERNELS_NO_BLAS
constexpr bool kUseBlas = false;
#else
constexpr bool kUseBlas = true;
#endif

inline bool colmajor_gemm(char ta, char tb, int m, int n, int k, const float* a, int lda,
                          const float* b, int ldb, float beta, float* c, int ldc) {
  if (!kUseBlas || sgemm_ == nullptr) return false;
  const float one = 1;
  sgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
  return true;
}
inline bool colmajor_gemm(char ta, char tb, int m, int n, int k, const double* a, int lda,
                          const double* b, int ldb, double beta, double* c, int ldc) {
  if (!kUseBlas || dgemm_ == nullptr) return false;
  const double one = 1;
  dgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
  return true;
}

// Row-major C[m, n] = op(A) op(B) + beta C, op(A) [m, k] and op(B) [k, n]; `ta`: A is stored
// as its transpose ([k, m], leading dimension lda), `tb` likewise. beta = 0 ignores C.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // column-major, the same memory: C^T = op(B)^T op(A)^T
  if (colmajor_gemm(tb ? 'T' : 'N', ta ? 'T' : 'N', n, m, k, b, std::max<int64_t>(ldb, 1), a,
                    std::max<int64_t>(lda, 1), beta, c, std::max<int64_t>(ldc, 1))) {
    return;
  }
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      T sum = 0;
      for (int64_t p = 0; p < k; ++p) {
        sum += (ta ? a[p * lda + i] : a[i * lda + p]) * (tb ? b[j * ldb + p] : b[p * ldb + j]);
      }
      c[i * ldc + j] = beta == T(0) ? sum : beta * c[i * ldc + j] + sum;
    }
  }
}

// MKL threads a GEMM called outside a parallel region (one torch thread) and may then split its
// reduction; and inside a parallel region, where it runs on one thread, it still picks its
// blocking (the order of a sum) by the thread count it was allowed. One thread, set in every
// thread that calls it, keeps every sum in the same order whatever the number of threads.
struct SequentialBlas {
  int before = 0;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) before = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(before);
  }
};

// Scratch memory aligned to a cache line, wherever it is allocated: MKL's results depend on its
// operands' alignment, which must not depend on which thread (malloc arena) ran a chunk.
template <typename T>
using Scratch = std::unique_ptr<T[], void (*)(void*)>;

template <typename T>
Scratch<T> scratch(int64_t n) {
  const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64 * 64;
  T* p = static_cast<T*>(std::aligned_alloc(64, bytes));
  TORCH_CHECK(p != nullptr, "token_logprobs: out of memory for ", bytes, " bytes of scratch");
  return Scratch<T>(p, &std::free);
}

// The vocabulary in chunks of kVocab, the chunks in at most kGroups contiguous groups.
struct VocabSplit {
  int64_t V, chunks, groups;
  explicit VocabSplit(int64_t v)
      : V(v), chunks((v + kVocab - 1) / kVocab), groups(std::min(chunks, kGroups)) {}
  int64_t first_chunk(int64_t g) const { return g * chunks / groups; }
  int64_t begin(int64_t chunk) const { return chunk * kVocab; }
  int64_t size(int64_t chunk) const { return std::min(kVocab, V - chunk * kVocab); }
};

// One row's online state over some of the vocabulary.
template <typename T>
struct Online {
  T m, s, a;
};

// Divides the chunk x[0, n) of a row's logits by T (in place) and folds it into `st`.
template <typename T, bool ENTROPY>
inline void fold(T* x, int64_t n, T inv_t, Online<T>& st) {
  using Vec = VecT<T>;
  const int64_t L = Vec::size();
  const Vec vinv(inv_t);
  Vec vmax(neg_inf<T>());
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const Vec v = Vec::loadu(x + j) * vinv;
    v.store(x + j);
    vmax = at::vec::maximum(vmax, v);
  }
  T cmax = hmax<T>(vmax);
  for (; j < n; ++j) cmax = std::max(cmax, x[j] *= inv_t);
  const T m = std::max(st.m, cmax);
  const Vec vm(m);
  Vec vs(T(0)), va(T(0));
  j = 0;
  for (; j + L <= n; j += L) {
    const Vec d = Vec::loadu(x + j) - vm;
    const Vec e = vexp(d);
    vs = vs + e;
    if constexpr (ENTROPY) va = at::vec::fmadd(e, d, va);
  }
  T s = hsum<T>(vs), a = ENTROPY ? hsum<T>(va) : T(0);
  for (; j < n; ++j) {
    const T d = x[j] - m, e = std::exp(d);
    s += e;
    if constexpr (ENTROPY) a += e * d;
  }
  if (st.s > T(0)) {  // rescale the earlier chunks' sums to the new max
    const T shift = st.m - m, scale = std::exp(shift);
    s += st.s * scale;
    if constexpr (ENTROPY) a += scale * (st.a + shift * st.s);
  }
  st = {m, s, a};
}

template <typename T>
inline void merge(Online<T>& st, const Online<T>& o) {
  if (o.s <= T(0)) return;
  if (st.s <= T(0)) {
    st = o;
    return;
  }
  const T m = std::max(st.m, o.m);
  const T d1 = st.m - m, d2 = o.m - m, e1 = std::exp(d1), e2 = std::exp(d2);
  st = {m, st.s * e1 + o.s * e2, e1 * (st.a + d1 * st.s) + e2 * (o.a + d2 * o.s)};
}

template <typename T, bool ENTROPY>
void forward(const T* h, const T* w, const int64_t* tok, int64_t N, int64_t V, int64_t H,
             T inv_t, int64_t ignore, T* logprobs, T* entropies, T* lse) {
  const VocabSplit split(V);
  const int64_t G = split.groups, row_chunks = (N + kRows - 1) / kRows;
  std::vector<Online<T>> states(G * N);  // [group, row]
  std::vector<T> target(N, T(0));        // the token's logit / T (written by its group)
  at::parallel_for(0, row_chunks * G, 1, [&](int64_t i0, int64_t i1) {
    const SequentialBlas sequential;
    const Scratch<T> buf = scratch<T>(kRows * kVocab);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t rc = item / G, g = item % G;
      const int64_t r0 = rc * kRows, m = std::min(kRows, N - r0);
      Online<T>* st = states.data() + g * N + r0;
      for (int64_t r = 0; r < m; ++r) st[r] = {neg_inf<T>(), T(0), T(0)};
      for (int64_t c = split.first_chunk(g); c < split.first_chunk(g + 1); ++c) {
        const int64_t v0 = split.begin(c), vc = split.size(c);
        gemm<T>(false, true, m, vc, H, h + r0 * H, H, w + v0 * H, H, T(0), buf.get(), vc);
        for (int64_t r = 0; r < m; ++r) {
          T* x = buf.get() + r * vc;
          fold<T, ENTROPY>(x, vc, inv_t, st[r]);
          const int64_t t = tok[r0 + r];
          if (t >= v0 && t < v0 + vc) target[r0 + r] = x[t - v0];
        }
      }
    }
  });
  at::parallel_for(0, N, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      Online<T> st = states[r];
      for (int64_t g = 1; g < G; ++g) merge(st, states[g * N + r]);
      const T log_s = std::log(st.s);
      lse[r] = st.m + log_s;
      const bool ignored = tok[r] == ignore;
      // <= 0 whatever the rounding: the token's own term is one of the sum's
      logprobs[r] = ignored ? T(0) : std::min((target[r] - st.m) - log_s, T(0));
      if constexpr (ENTROPY) entropies[r] = ignored ? T(0) : std::max(log_s - st.a / st.s, T(0));
    }
  });
}

// x[0, n) holds a row's logits (not yet divided by T); overwrites them with their gradient.
template <typename T>
inline void logit_grad(T* x, int64_t n, int64_t token, T inv_t, T lse, T g_lp, T g_ent, T ent) {
  using Vec = VecT<T>;
  if (g_lp == T(0) && g_ent == T(0)) {
    std::fill(x, x + n, T(0));
    return;
  }
  // dL/dl = -p (g_lp + g_ent (log p + H)) / T, plus g_lp / T at the token
  const Vec vinv(inv_t), vlse(lse), vc(-inv_t * (g_lp + g_ent * ent)), vge(-inv_t * g_ent);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec logp = at::vec::fmsub(Vec::loadu(x + j), vinv, vlse);
    const Vec p = vexp(logp);
    (p * at::vec::fmadd(vge, logp, vc)).store(x + j);
  }
  const T c = -inv_t * (g_lp + g_ent * ent), ge = -inv_t * g_ent;
  for (; j < n; ++j) {
    const T logp = x[j] * inv_t - lse;
    x[j] = std::exp(logp) * (c + ge * logp);
  }
  if (token >= 0 && token < n) x[token] += inv_t * g_lp;
}

template <typename T>
void backward(const T* h, const T* w, const int64_t* tok, const T* lse, const T* g_lp,
              const T* g_ent, const T* ent, int64_t N, int64_t V, int64_t H, T inv_t,
              int64_t ignore, T* grad_h, T* grad_w) {
  const VocabSplit split(V);
  const int64_t G = split.groups;
  const Scratch<T> partial = scratch<T>(G * kStripe * H);  // [group, stripe row, H]
  for (int64_t s0 = 0; s0 < N; s0 += kStripe) {
    const int64_t m = std::min(kStripe, N - s0);
    const T* hs = h + s0 * H;
    at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
      const SequentialBlas sequential;  // in every thread (see SequentialBlas)
      const Scratch<T> buf = scratch<T>(kStripe * kVocab);
      for (int64_t g = g0; g < g1; ++g) {
        T* part = partial.get() + g * kStripe * H;
        for (int64_t c = split.first_chunk(g); c < split.first_chunk(g + 1); ++c) {
          const int64_t v0 = split.begin(c), vc = split.size(c);
          const T* wc = w + v0 * H;
          gemm<T>(false, true, m, vc, H, hs, H, wc, H, T(0), buf.get(), vc);
          for (int64_t r = 0; r < m; ++r) {
            const int64_t row = s0 + r;
            const bool ignored = tok[row] == ignore;
            logit_grad(buf.get() + r * vc, vc, tok[row] - v0, inv_t, lse[row],
                       ignored ? T(0) : g_lp[row], ignored || !g_ent ? T(0) : g_ent[row],
                       ent ? ent[row] : T(0));
          }
          // grad_weight[chunk] (+)= G^T h_stripe; grad_hidden partial (+)= G W_chunk
          gemm<T>(true, false, vc, H, m, buf.get(), vc, hs, H, T(s0 == 0 ? 0 : 1),
                  grad_w + v0 * H, H);
          gemm<T>(false, false, m, H, vc, buf.get(), vc, wc, H,
                  T(c == split.first_chunk(g) ? 0 : 1), part, H);
        }
      }
    });
    at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
      using Vec = VecT<T>;
      for (int64_t r = r0; r < r1; ++r) {
        T* out = grad_h + (s0 + r) * H;
        std::copy(partial.get() + r * H, partial.get() + (r + 1) * H, out);
        for (int64_t g = 1; g < G; ++g) {
          const T* src = partial.get() + (g * kStripe + r) * H;
          int64_t j = 0;
          for (; j + Vec::size() <= H; j += Vec::size()) {
            (Vec::loadu(out + j) + Vec::loadu(src + j)).store(out + j);
          }
          for (; j < H; ++j) out[j] += src[j];
        }
      }
    });
  }
}

at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& tokens,
                  double temperature, const char* op) {
  TORCH_CHECK(hidden.dim() == 2 && at::isFloatingType(hidden.scalar_type()), op,
              ": hidden must be a floating [N, H] tensor, got ", hidden.sizes(), " ",
              hidden.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1) && weight.size(0) > 0 &&
                  weight.scalar_type() == hidden.scalar_type(),
              op, ": weight must be a [V > 0, H=", hidden.size(1), "] ", hidden.scalar_type(),
              " tensor, got ", weight.sizes(), " ", weight.scalar_type());
  TORCH_CHECK(tokens.dim() == 1 && tokens.size(0) == hidden.size(0) &&
                  tokens.scalar_type() == at::kLong,
              op, ": tokens must be an int64 [N=", hidden.size(0), "] tensor, got ",
              tokens.sizes(), " ", tokens.scalar_type());
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), op,
              ": temperature must be finite and > 0, got ", temperature);
}

void check_tokens(const at::Tensor& tokens, int64_t V, int64_t ignore, const char* op) {
  const int64_t* t = tokens.data_ptr<int64_t>();
  for (int64_t r = 0; r < tokens.numel(); ++r) {
    TORCH_CHECK(t[r] == ignore || (t[r] >= 0 && t[r] < V), op, ": tokens[", r, "] = ", t[r],
                " is outside [0, ", V, ")");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cpu(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const at::Tensor& tokens_in,
    double temperature, bool entropy, int64_t ignore_index) {
  check_inputs(hidden_in, weight_in, tokens_in, temperature, "token_logprobs");
  const auto acc = acc_type(hidden_in);
  const at::Tensor hidden = hidden_in.to(acc).contiguous();
  const at::Tensor weight = weight_in.to(acc).contiguous();
  const at::Tensor tokens = tokens_in.contiguous();
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  check_tokens(tokens, V, ignore_index, "token_logprobs");
  const auto opts = hidden.options().dtype(acc);
  at::Tensor logprobs = at::empty({N}, opts), lse = at::empty({N}, opts);
  at::Tensor entropies = at::empty({entropy ? N : 0}, opts);
  if (N == 0) return {logprobs, entropies, lse};
  const SequentialBlas sequential;
  AT_DISPATCH_FLOATING_TYPES(acc, "token_logprobs_cpu", [&] {
    using T = scalar_t;
    const T inv_t = static_cast<T>(1.0 / temperature);
    auto run = [&](auto ent) {
      forward<T, decltype(ent)::value>(
          hidden.data_ptr<T>(), weight.data_ptr<T>(), tokens.data_ptr<int64_t>(), N, V, H,
          inv_t, ignore_index, logprobs.data_ptr<T>(),
          entropy ? entropies.data_ptr<T>() : nullptr, lse.data_ptr<T>());
    };
    if (entropy) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
  return {logprobs, entropies, lse};
}

std::tuple<at::Tensor, at::Tensor> token_logprobs_backward_cpu(
    const at::Tensor& grad_logprobs_in, const std::optional<at::Tensor>& grad_entropy_in,
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const at::Tensor& tokens_in,
    const at::Tensor& lse_in, const std::optional<at::Tensor>& entropy_in, double temperature,
    int64_t ignore_index) {
  const char* op = "token_logprobs_backward";
  check_inputs(hidden_in, weight_in, tokens_in, temperature, op);
  const auto acc = acc_type(hidden_in);
  const int64_t N = hidden_in.size(0), H = hidden_in.size(1), V = weight_in.size(0);
  auto vector = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == N, op, ": ", name, " must be a [N=", N,
                "] tensor, got ", t.sizes());
    return t.to(acc).contiguous();
  };
  const at::Tensor grad_lp = vector(grad_logprobs_in, "grad_logprobs");
  const at::Tensor lse = vector(lse_in, "lse");
  const bool with_entropy = grad_entropy_in.has_value() && grad_entropy_in->defined();
  at::Tensor grad_ent, ent;
  if (with_entropy) {
    TORCH_CHECK(entropy_in.has_value() && entropy_in->defined(), op,
                ": grad_entropy needs the forward's entropies");
    grad_ent = vector(*grad_entropy_in, "grad_entropy");
    ent = vector(*entropy_in, "entropy");
  }
  const at::Tensor hidden = hidden_in.to(acc).contiguous();
  const at::Tensor weight = weight_in.to(acc).contiguous();
  const at::Tensor tokens = tokens_in.contiguous();
  check_tokens(tokens, V, ignore_index, op);
  const auto opts = hidden.options().dtype(acc);
  at::Tensor grad_h = at::empty({N, H}, opts);
  at::Tensor grad_w = N == 0 ? at::zeros({V, H}, opts) : at::empty({V, H}, opts);
  if (N > 0) {
    const SequentialBlas sequential;
    AT_DISPATCH_FLOATING_TYPES(acc, "token_logprobs_backward_cpu", [&] {
      using T = scalar_t;
      backward<T>(hidden.data_ptr<T>(), weight.data_ptr<T>(), tokens.data_ptr<int64_t>(),
                  lse.data_ptr<T>(), grad_lp.data_ptr<T>(),
                  with_entropy ? grad_ent.data_ptr<T>() : nullptr,
                  with_entropy ? ent.data_ptr<T>() : nullptr, N, V, H,
                  static_cast<T>(1.0 / temperature), ignore_index, grad_h.data_ptr<T>(),
                  grad_w.data_ptr<T>());
    });
  }
  return {grad_h.to(hidden_in.scalar_type()), grad_w.to(weight_in.scalar_type())};
}

}  // namespace
}  // namespace zoo::cpu

TORCH_LIBRARY_IMPL(zoo, CPU, m) {
  m.impl("token_logprobs", &zoo::cpu::token_logprobs_cpu);
  m.impl("token_logprobs_backward", &zoo::cpu::token_logprobs_backward_cpu);
}

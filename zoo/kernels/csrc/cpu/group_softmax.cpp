// GroupSoftmax cross-entropy, CPU: two short passes over each row (max, then exp-sums) while
// it sits in L1, rows in parallel with at::parallel_for (OpenMP), classes with at::vec SIMD.
//
// loss_n = lse_n - lse_group_n, lse = logsumexp(z_n), lse_group = logsumexp over the classes
// whose group id (group_table[row_group[n], c]) equals the target's.
// d loss_n / d z_nc = softmax(z_n)_c - [c in group] * exp(z_nc - lse_group_n).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../ops.h"
#include "vec_utils.h"

namespace zoo::cpu {
namespace {

struct Inputs {
  at::Tensor logits, target, row_group;
  int64_t N, C, G;
};

Inputs prepare(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& group_table,
               const at::Tensor& row_group) {
  TORCH_CHECK(logits.dim() == 2, "group_softmax_ce: logits must be [N, C], got ",
              logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "logits must be floating point");
  const int64_t N = logits.size(0), C = logits.size(1);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N, "target must be [N] = [", N, "], got ",
              target.sizes());
  TORCH_CHECK(row_group.dim() == 1 && row_group.size(0) == N, "row_group must be [N] = [", N,
              "], got ", row_group.sizes());
  TORCH_CHECK(group_table.dim() == 2 && group_table.size(1) == C,
              "group_table must be [G, C] with C = ", C, ", got ", group_table.sizes());
  TORCH_CHECK(!at::isFloatingType(group_table.scalar_type()), "group_table must be integer");
  return {logits.contiguous(), target.to(at::kLong).contiguous(),
          row_group.to(at::kLong).contiguous(), N, C, group_table.size(0)};
}

// Group ids are compared in the compute type so the comparison vectorises with the logits.
at::Tensor table_as(const at::Tensor& group_table, at::ScalarType acc) {
  if (group_table.numel() > 0) {
    TORCH_CHECK(group_table.abs().max().item<int64_t>() < (1 << 24),
                "group ids must be smaller than 2^24 in magnitude");
  }
  return group_table.to(acc).contiguous();
}

inline void check_row(int64_t n, int64_t y, int64_t r, int64_t C, int64_t G) {
  TORCH_CHECK(y >= 0 && y < C, "target[", n, "] = ", y, " is outside [0, ", C,
              ") and is not ignore_index");
  TORCH_CHECK(r >= 0 && r < G, "row_group[", n, "] = ", r, " is outside [0, ", G, ")");
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <typename T>
inline void forward_row(const T* z, const T* trow, int64_t C, int64_t y, T& lse, T& lse_g) {
  using Vec = VecT<T>;
  constexpr int64_t VS = Vec::size();
  const T gy = trow[y];
  const Vec vgy(gy), ninf(neg_inf<T>()), zero(T(0));
  Vec vmax(ninf), vgmax(ninf);
  int64_t c = 0;
  for (; c + VS <= C; c += VS) {
    Vec x = Vec::loadu(z + c);
    vmax = at::vec::maximum(vmax, x);
    vgmax = at::vec::maximum(vgmax, Vec::blendv(ninf, x, Vec::loadu(trow + c) == vgy));
  }
  T m = hmax<T>(vmax), mg = hmax<T>(vgmax);
  for (; c < C; ++c) {
    m = std::max(m, z[c]);
    if (trow[c] == gy) mg = std::max(mg, z[c]);
  }
  if (m == neg_inf<T>() || mg == neg_inf<T>()) {  // every logit (of the group) is -inf
    lse = m;
    lse_g = mg;
    return;
  }
  // one exp per element: the group's sum reuses exp(z - m). If the group sits so far below the
  // row max that this sum is tiny (extreme logits), redo it relative to the group's own max.
  Vec vs(zero), vsg(zero);
  const Vec vm(m);
  for (c = 0; c + VS <= C; c += VS) {
    Vec e = vexp(Vec::loadu(z + c) - vm);
    vs = vs + e;
    vsg = vsg + Vec::blendv(zero, e, Vec::loadu(trow + c) == vgy);
  }
  T s = hsum<T>(vs), sg = hsum<T>(vsg);
  for (; c < C; ++c) {
    const T e = std::exp(z[c] - m);
    s += e;
    if (trow[c] == gy) sg += e;
  }
  lse = m + std::log(s);
  if (sg > T(1e-30)) {
    lse_g = m + std::log(sg);
    return;
  }
  const Vec vmg(mg);
  vsg = zero;
  for (c = 0; c + VS <= C; c += VS) {
    Vec eg = vexp(at::vec::minimum(Vec::loadu(z + c) - vmg, zero));
    vsg = vsg + Vec::blendv(zero, eg, Vec::loadu(trow + c) == vgy);
  }
  sg = hsum<T>(vsg);
  for (; c < C; ++c) {
    if (trow[c] == gy) sg += std::exp(z[c] - mg);
  }
  lse_g = mg + std::log(sg);
}

template <typename T>
inline void backward_row(const T* z, const T* trow, int64_t C, int64_t y, T l, T lg, T gl, T* g) {
  using Vec = VecT<T>;
  constexpr int64_t VS = Vec::size();
  const T gy = trow[y];
  const Vec vgy(gy), vl(l), vgl(gl), zero(T(0)), one(T(1));
  // members: p_c - p_c / P_g with 1 / P_g = exp(l - lg): one exp per element when that factor is
  // representable, otherwise two (extreme logits)
  const T k = std::exp(l - lg);
  int64_t c = 0;
  if (std::isfinite(k) && k < T(1e30)) {
    const Vec vk(k);
    for (; c + VS <= C; c += VS) {
      Vec p = vexp(Vec::loadu(z + c) - vl);
      Vec member = Vec::loadu(trow + c).eq(vgy);  // 1 / 0
      (vgl * p * (one - member * vk)).store(g + c);
    }
    for (; c < C; ++c) g[c] = gl * std::exp(z[c] - l) * (trow[c] == gy ? T(1) - k : T(1));
  } else {
    const Vec vlg(lg);
    for (; c + VS <= C; c += VS) {
      Vec x = Vec::loadu(z + c);
      Vec q = Vec::blendv(zero, vexp(at::vec::minimum(x - vlg, zero)), Vec::loadu(trow + c) == vgy);
      (vgl * (vexp(x - vl) - q)).store(g + c);
    }
    for (; c < C; ++c) {
      const T p = std::exp(z[c] - l);
      g[c] = gl * (trow[c] == gy ? p - std::exp(z[c] - lg) : p);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_softmax_ce_cpu(
    const at::Tensor& logits_, const at::Tensor& target_, const at::Tensor& group_table,
    const at::Tensor& row_group_, int64_t ignore_index) {
  auto in = prepare(logits_, target_, group_table, row_group_);
  const int64_t N = in.N, C = in.C, G = in.G;
  const auto acc = acc_dtype(in.logits.scalar_type());
  auto table = table_as(group_table, acc);
  auto opts = in.logits.options().dtype(acc);
  auto loss = at::empty({N}, opts), lse = at::empty({N}, opts), lse_g = at::empty({N}, opts);
  const int64_t* tgt = in.target.data_ptr<int64_t>();
  const int64_t* rg = in.row_group.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, in.logits.scalar_type(), "group_softmax_ce_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* z_all = in.logits.data_ptr<scalar_t>();
        const acc_t* tab = table.data_ptr<acc_t>();
        acc_t* loss_p = loss.data_ptr<acc_t>();
        acc_t* lse_p = lse.data_ptr<acc_t>();
        acc_t* lseg_p = lse_g.data_ptr<acc_t>();
        const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
        at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
          std::vector<acc_t> buf(std::is_same_v<scalar_t, acc_t> ? 0 : C);
          for (int64_t n = begin; n < end; ++n) {
            const int64_t y = tgt[n];
            if (y == ignore_index) {
              loss_p[n] = lse_p[n] = lseg_p[n] = acc_t(0);
              continue;
            }
            const int64_t r = rg[n];
            check_row(n, y, r, C, G);
            const acc_t* z = as_acc<acc_t>(z_all + n * C, C, buf.data());
            forward_row<acc_t>(z, tab + r * C, C, y, lse_p[n], lseg_p[n]);
            loss_p[n] = lse_p[n] - lseg_p[n];  // nan if all logits are -inf, +inf if the group's
          }
        });
      });
  return {loss, lse, lse_g};
}

at::Tensor group_softmax_ce_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits_,
                                         const at::Tensor& target_, const at::Tensor& group_table,
                                         const at::Tensor& row_group_, const at::Tensor& lse_,
                                         const at::Tensor& lse_g_, int64_t ignore_index) {
  auto in = prepare(logits_, target_, group_table, row_group_);
  const int64_t N = in.N, C = in.C;
  const auto acc = acc_dtype(in.logits.scalar_type());
  auto table = table_as(group_table, acc);
  auto go = grad_loss.to(acc).expand({N}).contiguous();
  auto lse = lse_.to(acc).contiguous(), lse_g = lse_g_.to(acc).contiguous();
  auto grad = at::empty_like(in.logits);
  const int64_t* tgt = in.target.data_ptr<int64_t>();
  const int64_t* rg = in.row_group.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, in.logits.scalar_type(), "group_softmax_ce_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
        const scalar_t* z_all = in.logits.data_ptr<scalar_t>();
        scalar_t* g_all = grad.data_ptr<scalar_t>();
        const acc_t* tab = table.data_ptr<acc_t>();
        const acc_t* go_p = go.data_ptr<acc_t>();
        const acc_t* lse_p = lse.data_ptr<acc_t>();
        const acc_t* lseg_p = lse_g.data_ptr<acc_t>();
        const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
        at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
          std::vector<acc_t> zbuf(convert ? C : 0), gbuf(convert ? C : 0);
          for (int64_t n = begin; n < end; ++n) {
            const int64_t y = tgt[n];
            scalar_t* gout = g_all + n * C;
            if (y == ignore_index || go_p[n] == acc_t(0)) {
              std::fill(gout, gout + C, scalar_t(0));
              continue;
            }
            const acc_t* z = as_acc<acc_t>(z_all + n * C, C, zbuf.data());
            acc_t* g = convert ? gbuf.data() : reinterpret_cast<acc_t*>(gout);
            backward_row<acc_t>(z, tab + rg[n] * C, C, y, lse_p[n], lseg_p[n], go_p[n], g);
            if constexpr (convert) store_from_acc(g, C, gout);
          }
        });
      });
  return grad;
}

}  // namespace
}  // namespace zoo::cpu

TORCH_LIBRARY_IMPL(zoo, CPU, m) {
  m.impl("group_softmax_ce", &zoo::cpu::group_softmax_ce_cpu);
  m.impl("group_softmax_ce_backward", &zoo::cpu::group_softmax_ce_backward_cpu);
}

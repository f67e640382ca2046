// Fused Gumbel-Softmax / Gumbel-sigmoid sampling, CPU. Noise is drawn per element from the
// counter-based generator in common.h (seeded from a torch.Generator in Python), transformed,
// added, tempered and normalised in one pass over each row; rows run in parallel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../ops.h"
#include "vec_utils.h"

namespace zoo::cpu {
namespace {

void check_tau(double tau) {
  TORCH_CHECK(tau > 0 && std::isfinite(tau), "tau must be a positive finite number, got ", tau);
}

// logits [..., K] (softmax over the last dim). Returns (out, soft): out is the exact one-hot of
// soft's argmax when hard, else empty (the sample is soft).
std::tuple<at::Tensor, at::Tensor> gumbel_softmax_cpu(const at::Tensor& logits_, double tau,
                                                      bool hard, int64_t seed) {
  check_tau(tau);
  TORCH_CHECK(logits_.dim() >= 1, "gumbel_softmax: logits must have at least one dimension");
  TORCH_CHECK(at::isFloatingType(logits_.scalar_type()), "logits must be floating point");
  auto logits = logits_.contiguous();
  const int64_t K = logits.size(-1);
  const int64_t rows = K == 0 ? 0 : logits.numel() / K;
  auto soft = at::empty_like(logits);
  // outputs must not alias: without `hard` the sample is `soft` and `out` is empty
  auto out = hard ? at::empty_like(logits) : at::empty({0}, logits.options());
  const uint64_t useed = static_cast<uint64_t>(seed);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(),
                                  "gumbel_softmax_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = VecT<acc_t>;
    constexpr int64_t VS = Vec::size();
    const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
    const scalar_t* z_all = logits.data_ptr<scalar_t>();
    scalar_t* soft_all = soft.data_ptr<scalar_t>();
    scalar_t* out_all = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(K, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> y(K), zbuf(std::is_same_v<scalar_t, acc_t> ? 0 : K);
      const Vec vinv(inv_tau), zero(acc_t(0));
      for (int64_t r = begin; r < end; ++r) {
        const acc_t* z = as_acc<acc_t>(z_all + r * K, K, zbuf.data());
        const uint64_t base = static_cast<uint64_t>(r * K);
        for (int64_t c = 0; c < K; ++c) y[c] = uniform_open(useed, base + c);
        // y = (z + g) / tau with g = -log(-log(u)); track the max
        Vec vmax(neg_inf<acc_t>());
        int64_t c = 0;
        for (; c + VS <= K; c += VS) {
          Vec g = zero - (zero - Vec::loadu(y.data() + c).log()).log();
          Vec v = (Vec::loadu(z + c) + g) * vinv;
          v.store(y.data() + c);
          vmax = at::vec::maximum(vmax, v);
        }
        acc_t m = hmax<acc_t>(vmax);
        for (; c < K; ++c) {
          y[c] = (z[c] - std::log(-std::log(y[c]))) * inv_tau;
          m = std::max(m, y[c]);
        }
        Vec vs(zero);
        const Vec vm(m);
        for (c = 0; c + VS <= K; c += VS) {
          Vec e = vexp(Vec::loadu(y.data() + c) - vm);
          e.store(y.data() + c);
          vs = vs + e;
        }
        acc_t s = hsum<acc_t>(vs);
        for (; c < K; ++c) {
          y[c] = std::exp(y[c] - m);
          s += y[c];
        }
        const Vec vrs(acc_t(1) / s);
        for (c = 0; c + VS <= K; c += VS) (Vec::loadu(y.data() + c) * vrs).store(y.data() + c);
        for (; c < K; ++c) y[c] *= acc_t(1) / s;
        store_from_acc(y.data(), K, soft_all + r * K);
        if (hard) {
          // argmax of the float probabilities, first maximum wins (as torch.argmax)
          int64_t best = 0;
          for (int64_t j = 1; j < K; ++j) {
            if (y[j] > y[best]) best = j;
          }
          scalar_t* o = out_all + r * K;
          std::fill(o, o + K, scalar_t(0));
          o[best] = scalar_t(1);
        }
      }
    });
  });
  return {out, soft};
}

// Straight-through (hard) and soft samples share this gradient: soft * (g - <g, soft>) / tau.
at::Tensor gumbel_softmax_backward_cpu(const at::Tensor& grad_, const at::Tensor& soft_,
                                       double tau) {
  check_tau(tau);
  auto soft = soft_.contiguous();
  auto grad = grad_.to(soft.scalar_type()).contiguous();
  const int64_t K = soft.size(-1);
  const int64_t rows = K == 0 ? 0 : soft.numel() / K;
  auto dz = at::empty_like(soft);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, soft.scalar_type(),
                                  "gumbel_softmax_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = VecT<acc_t>;
    constexpr int64_t VS = Vec::size();
    const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
    const scalar_t* s_all = soft.data_ptr<scalar_t>();
    const scalar_t* g_all = grad.data_ptr<scalar_t>();
    scalar_t* d_all = dz.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(K, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      const bool convert = !std::is_same_v<scalar_t, acc_t>;
      std::vector<acc_t> sb(convert ? K : 0), gb(convert ? K : 0), db(K);
      for (int64_t r = begin; r < end; ++r) {
        const acc_t* s = as_acc<acc_t>(s_all + r * K, K, sb.data());
        const acc_t* g = as_acc<acc_t>(g_all + r * K, K, gb.data());
        Vec vdot(acc_t(0));
        int64_t c = 0;
        for (; c + VS <= K; c += VS) vdot = vdot + Vec::loadu(s + c) * Vec::loadu(g + c);
        acc_t dot = hsum<acc_t>(vdot);
        for (; c < K; ++c) dot += s[c] * g[c];
        const Vec vd(dot), vinv(inv_tau);
        for (c = 0; c + VS <= K; c += VS) {
          (Vec::loadu(s + c) * (Vec::loadu(g + c) - vd) * vinv).store(db.data() + c);
        }
        for (; c < K; ++c) db[c] = s[c] * (g[c] - dot) * inv_tau;
        store_from_acc(db.data(), K, d_all + r * K);
      }
    });
  });
  return dz;
}

// Element-wise: soft = sigmoid((z + log u - log(1 - u)) / tau); hard = [soft > 0.5].
std::tuple<at::Tensor, at::Tensor> gumbel_sigmoid_cpu(const at::Tensor& logits_, double tau,
                                                      bool hard, int64_t seed) {
  check_tau(tau);
  TORCH_CHECK(at::isFloatingType(logits_.scalar_type()), "logits must be floating point");
  auto logits = logits_.contiguous();
  const int64_t n = logits.numel();
  auto soft = at::empty_like(logits);
  // outputs must not alias: without `hard` the sample is `soft` and `out` is empty
  auto out = hard ? at::empty_like(logits) : at::empty({0}, logits.options());
  const uint64_t useed = static_cast<uint64_t>(seed);
  constexpr int64_t kChunk = 2048;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(),
                                  "gumbel_sigmoid_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = VecT<acc_t>;
    constexpr int64_t VS = Vec::size();
    const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
    const scalar_t* z_all = logits.data_ptr<scalar_t>();
    scalar_t* s_all = soft.data_ptr<scalar_t>();
    scalar_t* o_all = out.data_ptr<scalar_t>();
    at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t cb, int64_t ce) {
      acc_t u[kChunk], zb[kChunk];
      const Vec one(acc_t(1)), zero(acc_t(0)), vinv(inv_tau);
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        const int64_t start = chunk * kChunk, len = std::min(kChunk, n - start);
        const acc_t* z = as_acc<acc_t>(z_all + start, len, zb);
        for (int64_t i = 0; i < len; ++i) u[i] = uniform_open(useed, start + i);
        int64_t i = 0;
        for (; i + VS <= len; i += VS) {
          Vec vu = Vec::loadu(u + i);
          Vec x = (Vec::loadu(z + i) + vu.log() - (one - vu).log()) * vinv;
          Vec e = vexp(zero - x.abs());  // exp(-|x|) in (0, 1]: stable both ways
          Vec s = Vec::blendv(e / (one + e), one / (one + e), x >= zero);
          s.store(u + i);
        }
        for (; i < len; ++i) {
          const acc_t x = (z[i] + std::log(u[i]) - std::log(acc_t(1) - u[i])) * inv_tau;
          const acc_t e = std::exp(-std::fabs(x));
          u[i] = x >= 0 ? acc_t(1) / (acc_t(1) + e) : e / (acc_t(1) + e);
        }
        store_from_acc(u, len, s_all + start);
        if (hard) {
          for (int64_t j = 0; j < len; ++j) {
            o_all[start + j] = u[j] > acc_t(0.5) ? scalar_t(1) : scalar_t(0);
          }
        }
      }
    });
  });
  return {out, soft};
}

at::Tensor gumbel_sigmoid_backward_cpu(const at::Tensor& grad_, const at::Tensor& soft_,
                                       double tau) {
  check_tau(tau);
  auto soft = soft_.contiguous();
  auto grad = grad_.to(soft.scalar_type()).contiguous();
  auto dz = at::empty_like(soft);
  const int64_t n = soft.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, soft.scalar_type(),
                                  "gumbel_sigmoid_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
    const scalar_t* s = soft.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* d = dz.data_ptr<scalar_t>();
    at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const acc_t sv = static_cast<acc_t>(s[i]);
        d[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * sv * (acc_t(1) - sv) * inv_tau);
      }
    });
  });
  return dz;
}

}  // namespace
}  // namespace zoo::cpu

TORCH_LIBRARY_IMPL(zoo, CPU, m) {
  m.impl("gumbel_softmax", &zoo::cpu::gumbel_softmax_cpu);
  m.impl("gumbel_softmax_backward", &zoo::cpu::gumbel_softmax_backward_cpu);
  m.impl("gumbel_sigmoid", &zoo::cpu::gumbel_sigmoid_cpu);
  m.impl("gumbel_sigmoid_backward", &zoo::cpu::gumbel_sigmoid_backward_cpu);
}

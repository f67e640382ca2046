// Small at::vec helpers shared by the CPU kernels. The vector width is the one the library is
// built for (CPU_CAPABILITY_AVX2 / _AVX512 chosen by zoo/kernels/_build.py from
// torch.backends.cpu.get_cpu_capability(); DEFAULT is portable code). Kernels compute in
// at::opmath_type<scalar_t>: float for float/bfloat16/half, double for double (gradcheck).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/version.h>

#include <cmath>
#include <limits>
#include <type_traits>

namespace zoo::cpu {

template <typename T>
using VecT = at::vec::Vectorized<T>;

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// exp for softmax numerators (inputs <= 0 or -inf). For float, exp_u20 (ATen's own polynomial,
// about 1 ulp on this range) is much faster than Sleef's u10; it exists since torch 2.5.
inline VecT<float> vexp(const VecT<float>& x) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5)
  return x.exp_u20();
#else
  return x.exp();
#endif
}
inline VecT<double> vexp(const VecT<double>& x) { return x.exp(); }

template <typename T>
inline T hmax(const VecT<T>& v) {
  return at::vec::vec_reduce_all<T>(
      [](VecT<T>& a, VecT<T>& b) { return at::vec::maximum(a, b); }, v);
}

template <typename T>
inline T hsum(const VecT<T>& v) {
  return at::vec::vec_reduce_all<T>([](VecT<T>& a, VecT<T>& b) { return a + b; }, v);
}

// n values of any floating dtype as acc_t: a pointer to the input itself when the types match,
// else converted into buf.
template <typename acc_t, typename scalar_t>
inline const acc_t* as_acc(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
    return buf;
  }
}

template <typename acc_t, typename scalar_t>
inline void store_from_acc(const acc_t* src, int64_t n, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (src != dst) std::copy(src, src + n, dst);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

}  // namespace zoo::cpu

// Open-addressing hash table of int64 keys >= 0 -> int32 values, for the sparse convolution's
// kernel maps (sparse_kernel_map.cpp). Keys are the row-major index of a site in the
// (batch, D, H, W) grid (reference.coordinate_keys).
//
// Inserts are lock-free (a compare-and-swap on the key), so the table fills in parallel; lookups
// run after the inserting parallel_for has returned, whose barrier publishes the values.
// Linear probing at a load factor <= 1/4: a lookup nearly always settles on its first slot. The four keys that differ only in their two low bits
// (x-neighbours: 4 * (x / 4) ... + 3) hash to one aligned group of four 16-byte slots, one cache
// line, so the 27 lookups of a 3x3x3 neighbourhood touch about 9-18 lines rather than 27.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace zoo::cpu::sparse {

class KeyTable {
 public:
  static constexpr int64_t kEmpty = -1;

  // A table for up to `capacity_for` keys.
  explicit KeyTable(int64_t capacity_for) {
    int bits = 6;  // at least 64 slots: 16 groups of 4
    while ((int64_t{1} << bits) < 4 * capacity_for) ++bits;
    mask_ = (uint64_t{1} << bits) - 1;
    shift_ = 64 - (bits - 2);
    // [slots, 2]: key, value (as int64: 16-byte slots, 64-byte aligned by the CPU allocator)
    storage_ = at::empty({static_cast<int64_t>(mask_ + 1), 2}, at::kLong);
    slots_ = storage_.data_ptr<int64_t>();
    const int64_t n = storage_.numel();
    int64_t* s = slots_;
    at::parallel_for(0, n, 1 << 16, [s](int64_t b, int64_t e) { std::fill(s + b, s + e, kEmpty); });
  }

  // Thread-safe insert. False when the key is already present (its value is then unchanged).
  bool insert(int64_t key, int32_t value) {
    uint64_t j = start(key);
    while (true) {
      int64_t* slot = slots_ + 2 * j;
      int64_t seen = __atomic_load_n(slot, __ATOMIC_RELAXED);
      if (seen == kEmpty) {
        int64_t expected = kEmpty;
        if (__atomic_compare_exchange_n(slot, &expected, key, false, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
          slot[1] = value;
          return true;
        }
        seen = expected;  // another thread took the slot first: it may hold this very key
      }
      if (seen == key) return false;
      j = (j + 1) & mask_;
    }
  }

  // The value of `key`, or -1. Only once every insert has finished.
  int32_t find(int64_t key) const {
    uint64_t j = start(key);
    const int64_t* slot = slots_ + 2 * j;
    // Nearly always settled by the first slot: one well-predicted branch, and the hit/miss
    // choice a conditional move, so lookups do not serialise on mispredictions.
    if (slot[0] == key || slot[0] == kEmpty) [[likely]] {
      return slot[0] == key ? static_cast<int32_t>(slot[1]) : -1;
    }
    while (true) {
      j = (j + 1) & mask_;
      slot = slots_ + 2 * j;
      if (slot[0] == key) return static_cast<int32_t>(slot[1]);
      if (slot[0] == kEmpty) return -1;
    }
  }

  // Fetches the slot `key` starts probing at into the cache, ahead of its find.
  void prefetch(int64_t key) const { __builtin_prefetch(slots_ + 2 * start(key)); }

  int64_t slots() const { return static_cast<int64_t>(mask_ + 1); }
  int64_t key_at(int64_t j) const { return slots_[2 * j]; }

 private:
  uint64_t start(int64_t key) const {
    const uint64_t k = static_cast<uint64_t>(key);
    return ((((k >> 2) * 0x9E3779B97F4A7C15ULL) >> shift_) << 2) | (k & 3);
  }

  at::Tensor storage_;
  int64_t* slots_ = nullptr;
  uint64_t mask_ = 0;
  uint64_t shift_ = 0;  // not int: stores to int32 outputs then cannot alias it
};

}  // namespace zoo::cpu::sparse

#pragma once
// Loads and stores between a kernel's storage dtype and its accumulation dtype, for the CPU kernels
// that take float16 and bfloat16 as well as float32 and float64.
//
// acc_t<T> = at::opmath_type<T>: float for float16 / bfloat16 (and float), double for double.  The
// kernels keep every operand that they sum into in acc_t and every tensor in memory in T: a 16-bit
// value is widened on load (exact) and rounded once, to nearest even, when a finished result is
// stored.  Vectors are Vectorized<acc_t> (8 floats with AVX2): a reduced-precision load reads 16
// bytes and widens them (vpmovzxwd + shift for bfloat16, vcvtph2ps for float16), a store narrows 8
// floats to 16 bytes.  For T = acc_t both are plain at::vec loads and stores, so the float32 and
// float64 kernels are unchanged.
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace keypointops {

template <typename T>
using acc_t = at::opmath_type<T>;

template <typename T>
using AccVec = at::vec::Vectorized<acc_t<T>>;

template <typename T>
constexpr bool is_reduced_precision = !std::is_same_v<T, acc_t<T>>;

// The first n (<= AccVec<T>::size()) elements at p, widened to acc_t; the lanes past n are zero.
template <typename T>
inline AccVec<T> load_acc(const T* p, int64_t n = AccVec<T>::size()) {
  if constexpr (!is_reduced_precision<T>) {
    return AccVec<T>::loadu(p, n);
  } else {
    if (n == AccVec<T>::size()) {
      AccVec<T> out;
      at::vec::load_to_float<T>(p, out);
      return out;
    }
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, n)));
  }
}

// Stores the first n (<= AccVec<T>::size()) lanes of v at p, rounded to T.  A full vector is one
// 16-byte store: at::vec's store of 8 of a 16-bit vector's 16 lanes is an out-of-line call that
// goes through a stack buffer and memcpy.
template <typename T>
inline void store_acc(const AccVec<T>& v, T* p, int64_t n = AccVec<T>::size()) {
  if constexpr (!is_reduced_precision<T>) {
    v.store(p, n);
  } else {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
    if (n == AccVec<T>::size()) {
      __m128i narrow;
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        narrow = at::vec::cvtfp32_bf16(v);
      } else {
        narrow = at::vec::cvtfp32_fp16(v);
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow);
      return;
    }
#endif
    at::vec::convert_from_float<T>(v, v).store(p, n);
  }
}

// rows x cols elements of src (row stride ld) widened to acc_t into dst (row stride cols).
template <typename T>
void widen_rows(const T* src, int64_t rows, int64_t cols, int64_t ld, acc_t<T>* dst) {
  constexpr int64_t VL = AccVec<T>::size();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; c += VL) {
      load_acc(src + r * ld + c, std::min(VL, cols - c)).store(dst + r * cols + c, std::min(VL, cols - c));
    }
  }
}

// The rows x cols block at src (row stride ld) in acc_t: src itself, or for a 16-bit src its copy
// widened into buffer, whose row stride (cols) is then stored in ld.
template <typename T>
const acc_t<T>* block_in_acc(const T* src, int64_t rows, int64_t cols, int64_t& ld,
                             std::vector<acc_t<T>>& buffer) {
  if constexpr (!is_reduced_precision<T>) {
    return src;
  } else {
    buffer.resize(rows * cols);
    widen_rows(src, rows, cols, ld, buffer.data());
    ld = cols;
    return buffer.data();
  }
}

// The n contiguous elements at src in acc_t: src itself, or (16-bit src) widened into buffer.
template <typename T>
const acc_t<T>* in_acc(const T* src, int64_t n, std::vector<acc_t<T>>& buffer) {
  int64_t ld = n;
  return block_in_acc(src, 1, n, ld, buffer);
}

}  // namespace keypointops

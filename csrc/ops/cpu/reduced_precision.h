#pragma once
// Loads and stores between a kernel's storage dtype and its accumulation dtype, for the CPU kernels
// that take float16 and bfloat16 as well as float32 and float64.
//
// acc_t<T> = at::opmath_type<T>: float for float16 / bfloat16 (and float), double for double.  The
// kernels keep every operand that they sum into in acc_t and every tensor in memory in T: a 16-bit
// value is widened on load (exact) and rounded once, to nearest even, when a finished result is
// stored.  Vectors are Vectorized<acc_t> (8 floats with AVX2, 16 with AVX512): a reduced-precision
// load reads half a vector's bytes and widens them (vpmovzxwd + shift for bfloat16, vcvtph2ps for
// float16), a store narrows a vector of floats to half its bytes.  For T = acc_t both are plain
// at::vec loads and stores, so the float32 and float64 kernels are unchanged.
// Everything here depends on the vector width, so it lives in the namespace of the capability this
// file is compiled for (ops/cpu/cpu_capability.h).
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace keypointops {
namespace CPU_CAPABILITY {

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
// store of half its width (16 bytes with AVX2, 32 with AVX512): at::vec's store of the low half of
// a 16-bit vector is an out-of-line call that goes through a stack buffer and memcpy.
template <typename T>
inline void store_acc(const AccVec<T>& v, T* p, int64_t n = AccVec<T>::size()) {
  if constexpr (!is_reduced_precision<T>) {
    v.store(p, n);
  } else {
#if (defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)) && !defined(_MSC_VER)
    if (n == AccVec<T>::size()) {
      // __m128i (AVX2) or __m256i (AVX512): the narrowed vector, as at::vec converts it.
      decltype(at::vec::cvtfp32_bf16(v)) narrow;
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        narrow = at::vec::cvtfp32_bf16(v);
      } else {
        narrow = at::vec::cvtfp32_fp16(v);
      }
      static_assert(sizeof(narrow) == AccVec<T>::size() * sizeof(T), "one 16-bit lane per float lane");
      std::memcpy(p, &narrow, sizeof(narrow));  // one unaligned vector store
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

}  // namespace CPU_CAPABILITY
}  // namespace keypointops

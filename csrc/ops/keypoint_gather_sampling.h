#pragma once
// keypoint_gather: the sampling rules of torchvision's RoIAlign, per axis, shared by the CPU and
// CUDA kernels.

// The box of a keypoint is the rectangle of side roi_size (input-image pixels; one per axis and
// keypoint when the sizes are a tensor) centred on it.  Along one axis its start is
// (center - roi_size / 2) * scale - offset (offset 0.5 when aligned), its extent end - start (at
// least 1 when not aligned).  With output_size S the box splits into S bins of extent / S per axis,
// bin p starting at start + p * (extent / S), and each bin is a box of its own: its `grid` samples
// sit at bin_start + (i + 0.5) * bin_extent / grid, i < grid (grid = sampling_ratio, or
// ceil(bin_extent) when adaptive).  The kernels treat every (keypoint, bin y, bin x) as a node of
// its own, node k * S * S + py * S + px: S = 1 is the keypoint's box itself.
// A sample outside [-1, size] contributes nothing; otherwise it is clamped to >= 0 and split
// between rows low = floor and low + 1 (all of it on size - 1 from there on).
// RoIAlign's bilinear weight of sample (iy, ix) on pixel (r, q) is the product of these per-axis
// weights, so the weight of pixel (r, q) summed over the grid is axis_weight(y, r) *
// axis_weight(x, q): the kernels compute each axis once per keypoint and reuse the products for
// every channel.  The expressions follow torchvision's kernels operation by operation.
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace keypointops {

template <typename T>
struct BoxAxis {
  T start;       // first edge of the box in feature pixels
  T extent;      // box size in feature pixels (the size of its single bin)
  int64_t grid;  // number of samples along this axis; 0 when none can reach the map
};

// Finite test that needs no <cmath> overload in device code: x - x is 0 exactly when x is finite.
template <typename T>
C10_HOST_DEVICE inline bool is_finite(T x) {
  return x - x == T(0);
}

// Largest half box side in feature pixels (half of the 1e6 limit of the scalar roi_size): a
// per-keypoint size beyond it, or not finite, gives that keypoint no samples (zeros), so that no
// adaptive grid can grow unbounded.
constexpr double kMaxHalfBoxExtent = 5e5;

// The box of a keypoint at `center` along an axis of `size` pixels.  A box that is not finite,
// too large (kMaxHalfBoxExtent) or lies entirely beyond [-2, size + 1] gets no samples: its output
// is 0 under torchvision's rules anyway, and this keeps a far-away keypoint from asking for an
// enormous adaptive grid.
template <typename T>
C10_HOST_DEVICE inline BoxAxis<T> box_axis(T center, T half_size, T scale, bool aligned,
                                           int64_t sampling_ratio, int64_t size) {
  const T offset = aligned ? T(0.5) : T(0);
  const T start = (center - half_size) * scale - offset;
  const T end = (center + half_size) * scale - offset;
  T extent = end - start;
  if (!aligned && extent < T(1)) extent = T(1);
  const T half_extent = half_size * scale;
  const bool reachable = is_finite(start) && is_finite(extent) && start <= T(size + 1) &&
                         start + extent >= T(-2) && half_extent < T(kMaxHalfBoxExtent) &&
                         half_extent > T(-kMaxHalfBoxExtent);
  int64_t grid = 0;
  if (reachable) grid = sampling_ratio > 0 ? sampling_ratio : static_cast<int64_t>(::ceil(extent));
  return {start, extent, grid};
}

// Bin p of `bins` along the axis of `box`, as torchvision's RoIAlign with output_size = bins splits
// it: a box of its own starting at start + p * (extent / bins), with ceil(bin extent) samples when
// adaptive.  bins = 1 returns the box unchanged (bitwise); a box without samples keeps none.
template <typename T>
C10_HOST_DEVICE inline BoxAxis<T> bin_axis(const BoxAxis<T>& box, int64_t p, int64_t bins,
                                           int64_t sampling_ratio) {
  if (box.grid == 0 || bins == 1) return box;
  const T bin = box.extent / static_cast<T>(bins);
  const int64_t grid = sampling_ratio > 0 ? sampling_ratio : static_cast<int64_t>(::ceil(bin));
  return {box.start + static_cast<T>(p) * bin, bin, grid};
}

// Coordinate of sample i, as torchvision computes it.
template <typename T>
C10_HOST_DEVICE inline T sample_coordinate(const BoxAxis<T>& axis, int64_t i) {
  return axis.start + static_cast<T>(i + 0.5) * axis.extent / static_cast<T>(axis.grid);
}

// A range [first, last) of sample indices holding every sample whose coordinate lies in
// [lo, hi]: a superset, widened by a margin for the rounding of the coordinates (callers still
// test each sample).  It keeps the loops short when a large adaptive grid reaches past the map.
template <typename T>
C10_HOST_DEVICE inline void sample_range(const BoxAxis<T>& axis, double lo, double hi,
                                         int64_t& first, int64_t& last) {
  first = 0;
  last = axis.grid;
  if (!(axis.extent > T(0))) return;  // every sample sits at start
  const double start = static_cast<double>(axis.start), extent = static_cast<double>(axis.extent);
  const double slack = 8 * static_cast<double>(std::numeric_limits<T>::epsilon()) *
                       ((start < 0 ? -start : start) + extent + (lo < 0 ? -lo : lo) +
                        (hi < 0 ? -hi : hi) + 1);
  const double per_pixel = static_cast<double>(axis.grid) / extent;
  const double from = (lo - slack - start) * per_pixel - 1.5;
  const double to = (hi + slack - start) * per_pixel + 1.5;
  const auto grid = static_cast<double>(axis.grid);
  if (from > 0) first = from < grid ? static_cast<int64_t>(from) : axis.grid;
  if (to < grid) last = to > 0 ? static_cast<int64_t>(to) : 0;
}

// torchvision's bilinear rule along one axis for coordinate p: false when the sample lies outside
// [-1, size]; otherwise the rows low and high (both size - 1 at the far border) and the weight
// `frac` of high (low gets 1 - frac).
template <typename T>
C10_HOST_DEVICE inline bool axis_taps(T p, int64_t size, int64_t& low, int64_t& high, T& frac) {
  if (!(p >= T(-1) && p <= T(size))) return false;
  if (p <= T(0)) p = T(0);
  low = static_cast<int64_t>(p);
  if (low >= size - 1) {
    low = high = size - 1;
    frac = T(0);
  } else {
    high = low + 1;
    frac = p - static_cast<T>(low);
  }
  return true;
}

// The rows [first, last] that the samples of `axis` touch; first > last when there are none.
template <typename T>
C10_HOST_DEVICE inline void axis_range(const BoxAxis<T>& axis, int64_t size, int64_t& first,
                                       int64_t& last) {
  first = size;
  last = -1;
  int64_t begin, end;
  sample_range(axis, -1.0, static_cast<double>(size), begin, end);
  for (int64_t i = begin; i < end; ++i) {
    int64_t low, high;
    T frac;
    if (!axis_taps(sample_coordinate(axis, i), size, low, high, frac)) continue;
    if (low < first) first = low;
    if (high > last) last = high;
  }
}

// Sum over the samples of `axis` of their bilinear weight on row `row`.
template <typename T>
C10_HOST_DEVICE inline T axis_weight(const BoxAxis<T>& axis, int64_t size, int64_t row) {
  T weight = T(0);
  int64_t begin, end;  // only samples in [row - 1, row + 1] can weigh on the row
  sample_range(axis, static_cast<double>(row - 1), static_cast<double>(row + 1), begin, end);
  for (int64_t i = begin; i < end; ++i) {
    int64_t low, high;
    T frac;
    if (!axis_taps(sample_coordinate(axis, i), size, low, high, frac)) continue;
    if (row == low) weight += T(1) - frac;
    if (row == high) weight += frac;
  }
  return weight;
}

// 1 / (number of samples of the keypoint), as torchvision's count (at least 1).
template <typename T>
C10_HOST_DEVICE inline T inverse_sample_count(const BoxAxis<T>& y, const BoxAxis<T>& x) {
  const int64_t count = y.grid * x.grid;
  return T(1) / static_cast<T>(count > 0 ? count : 1);
}

}  // namespace keypointops

// keypoint_gather CPU kernel.
//
// A node is a keypoint's box (output_size S = 1) or one of its S x S bins (node k * S * S +
// py * S + px, ops/keypoint_gather_sampling.h); below "keypoint" means node.
// For each node the RoIAlign sample grid is reduced once to separable per-axis weights
// (ops/keypoint_gather_sampling.h): a few rows and columns of the map, whose products, with
// 1/count folded in, are the node's taps (pixel offset, weight) -- about 4 for a small box.
// Every channel reuses the same taps:
//   forward   out[b, k, c] = sum_taps weight * features[b, c, pixel]     (written node-major)
//   backward  grad[b, c, pixel] += weight * grad_out[b, k, c]            (k ascending)
// Work is split into tasks of (image, block of channels), handed to the threads one at a time
// (ops/cpu/dynamic_tasks.h: robust to a thread being descheduled on a shared machine); a task
// computes the taps of all the image's keypoints once and then walks its channels.  Two layouts
// are read in place:
//  - contiguous NCHW, planes of a page (4 KiB) or more (KMPNet stage 1: 64x32 floats = 8 KiB):
//    keypoint-major.  Within a tile of 64 channels, a pair of keypoints walks the planes c, c+1,
//    ... (each tap a load at a constant stride of one plane; tap counts up to 4, i.e. a single
//    bilinear sample, fixed at compile time), then the next pair.  A channel's value of a keypoint
//    is sum_t w_t * plane[off_t], in tap order.  At KMPNet stage 1 (256 images, C=256, 12
//    keypoints, one sample) the forward touches ~23 of the 128 cache lines of every plane, ~95 MB
//    of a 512 MiB map that is cold on every call, so it is bound by the memory system.  Plane-major
//    order (each plane once for all keypoints, prefetched a few planes ahead) is as fast on an idle
//    memory system but slower on a loaded one (likely fewer misses in flight with ~20 scattered
//    lines per plane; not the TLB: huge pages do not close the gap).
//  - contiguous NCHW, smaller planes (stage 4: 16x8): plane-major, each group of 4 planes visited
//    once for all keypoints, the cache lines the taps need a page of planes ahead software-prefetched.
//  - channels_last: a pixel's channels are contiguous, so every tap is a vector fmadd over the
//    channel block (at::vec).
// Other strides are copied to NCHW first.
// Backward: each task owns its slice of the gradient (its image, its channels): no data races,
// and every element receives its keypoints' contributions in keypoint order, so the result is
// bitwise deterministic and independent of the thread count.  NCHW walks the taps pixel by pixel
// (each distinct pixel's taps in node order), a vector of channels at a time: the grad_out values
// of a tap's node are contiguous, so a pixel's sum over its taps is a few vector fmadds, and each
// lane is stored once to its channel's plane -- or, where the taps are dense (stage 4's 16 x 8
// planes, patches), a run of pixels' sums is transposed in registers and stored a vector per plane
// -- where a walk node by node would load, add and store one scalar per tap and channel.
// channels_last adds node by node, a vector fmadd over the channel block per tap.  The gradient is
// zero except at the taps: a large one is a fresh anonymous mapping on huge pages
// (ops/cpu/huge_pages.h), whose pages the kernel hands out zeroed, so the kernels only scatter (no
// zero-fill pass over [B, C, H, W], which costs more than everything else here).  The forward's
// output is faulted in on huge pages by the calling thread before the threads write it
// (populate_huge_pages): its 4 KiB page faults are a large part of a forward over small maps
// (stage 4), and threads faulting huge pages side by side wait on each other.
// Memory: the output [B, K * S * S, C] and the gradient [B, C, H, W]; per task the taps of one
// image's nodes (K * S * S * taps); per thread in the NCHW backward one vector of channels of the
// nodes' grad_out rows (K * S * S vectors) and a tile of a vector's width squared on the stack; no
// [B*K, C, ...] intermediate.
// float16 / bfloat16 features: the keypoints, box sizes, taps and every sum are float32
// (ops/cpu/reduced_precision.h); a channel's value of a node is rounded once, when stored.  The
// forward is bound by the latency of the taps' cache lines, and a 16-bit load costs more
// instructions than a float32 one (a scattered 16-bit value is moved to a vector register and
// shifted, and each output is rounded), so the out-of-order window holds fewer loads and fewer
// cache misses overlap than in float32.  The 16-bit forward therefore prefetches: keypoint-major
// NCHW the taps' lines kPairPrefetchPlanes planes ahead, channels_last the next node's pixels
// while it sums the current node.  (The float32 and float64 loops keep enough loads in flight
// without: prefetches there add instructions and cost time.)  The 16-bit backward walks the taps
// pixel by pixel in channels_last as well, and forms each pixel's gradient in float32 and rounds
// it once, instead of adding into a 16-bit gradient node by node; in NCHW one widening load per
// tap covers a vector of channels and one rounding covers the vector.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers (ATen/ops/*.h) only, not ATen/ATen.h
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#if defined(CPU_CAPABILITY_DEFAULT)  // the build that registers the op with torch (below)
#include <torch/library.h>
#endif

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "ops/cpu/cpu_capability.h"
#include "ops/cpu/dynamic_tasks.h"
#include "ops/cpu/huge_pages.h"
#include "ops/cpu/prefetch.h"
#include "ops/cpu/reduced_precision.h"
#include "ops/keypoint_gather.h"
#include "ops/keypoint_gather_sampling.h"

namespace keypointops {
namespace CPU_CAPABILITY {  // this build's capability (ops/cpu/cpu_capability.h)
namespace {

// NCHW forward: keypoint-major from planes of this many bytes (a page) on, plane-major below.
constexpr int64_t kKeypointMajorPlaneBytes = 4096;
constexpr int64_t kChannelTile = 64;      // keypoint-major: channels a pair walks at a time
// plane-major: prefetch this many planes ahead (at stage 4's 16 x 8 planes 4 KiB: the next page, which
// the hardware prefetcher, stopping at page boundaries, does not reach)
constexpr int64_t kPrefetchChannels = 8;
constexpr int64_t kPlaneGroup = 4;  // plane-major: planes summed side by side
// keypoint-major, 16-bit: prefetch this many planes ahead, far enough to hide the lines' latency on
// the CPUs measured (docs/benchmarks.md, bfloat16 against float32).
constexpr int64_t kPairPrefetchPlanes = 16;
constexpr int64_t kCacheLineBytes = 64;
constexpr int64_t kMinChannelBlock = 64;     // smallest block of channels per task
// NCHW backward: a run of a vector's width of pixels with at least this many tapped pixels
// is written as a tile (transposed in registers, one vector store per channel), not lane by lane.
constexpr int64_t kTilePixels = 4;

struct GatherParams {
  int64_t B, C, H, W, K;  // K: nodes per image, keypoints * S * S
  int64_t keypoints, S;   // keypoints per image, bins per axis (output_size)
  double scale, half_size;
  int64_t sampling_ratio;
  bool aligned;
};

// The taps of the nodes of one image: node k's are offset / weight [begin[k], begin[k+1]), offsets
// in pixels (row-major over H x W); the nodes of an invalid keypoint have none.
template <typename T>
struct ImageTaps {
  std::vector<int64_t> offset;
  std::vector<T> weight;
  std::vector<int64_t> begin;
  std::vector<int64_t> line_offsets;  // NCHW plane-major: every distinct cache line the taps touch
  std::vector<T> row_weight, col_weight;
  // Pixel-major view (16-bit backward): the distinct pixels the taps touch; pixel i's taps are
  // j in [pixel_begin[i], pixel_begin[i + 1]), in node order, tap j of node pixel_node[j] with
  // weight pixel_weight[j].
  std::vector<int64_t> pixel_offset, pixel_begin, pixel_node;
  std::vector<T> pixel_weight;

  // sizes: [B, keypoints, 2] box sides (x, y) per keypoint, or null (p.half_size for all).
  void compute(const GatherParams& p, const T* keypoints, int64_t point_dims, const bool* valid,
               const T* sizes, int64_t b) {
    offset.clear();
    weight.clear();
    begin.assign(1, 0);
    const auto half = static_cast<T>(p.half_size), scale = static_cast<T>(p.scale);
    for (int64_t k = 0; k < p.keypoints; ++k) {
      const int64_t n = b * p.keypoints + k;
      const bool used = valid == nullptr || valid[n];
      const T half_x = sizes != nullptr ? sizes[2 * n] * T(0.5) : half;
      const T half_y = sizes != nullptr ? sizes[2 * n + 1] * T(0.5) : half;
      const BoxAxis<T> ay = box_axis(keypoints[n * point_dims + 1], half_y, scale, p.aligned,
                                     p.sampling_ratio, p.H);
      const BoxAxis<T> ax = box_axis(keypoints[n * point_dims], half_x, scale, p.aligned,
                                     p.sampling_ratio, p.W);
      for (int64_t py = 0; py < p.S; ++py) {
        for (int64_t px = 0; px < p.S; ++px) {
          if (used) {
            add_node(bin_axis(ay, py, p.S, p.sampling_ratio),
                     bin_axis(ax, px, p.S, p.sampling_ratio), p);
          }
          begin.push_back(static_cast<int64_t>(offset.size()));
        }
      }
    }
  }

  void add_node(const BoxAxis<T>& ay, const BoxAxis<T>& ax, const GatherParams& p) {
    int64_t row0, row1, col0, col1;
    axis_range(ay, p.H, row0, row1);
    axis_range(ax, p.W, col0, col1);
    if (row0 > row1 || col0 > col1) return;
    const T inv_count = inverse_sample_count(ay, ax);
    row_weight.clear();
    col_weight.clear();
    for (int64_t r = row0; r <= row1; ++r) row_weight.push_back(axis_weight(ay, p.H, r) * inv_count);
    for (int64_t q = col0; q <= col1; ++q) col_weight.push_back(axis_weight(ax, p.W, q));
    for (int64_t r = row0; r <= row1; ++r) {
      for (int64_t q = col0; q <= col1; ++q) {
        const T w = row_weight[r - row0] * col_weight[q - col0];
        if (w == T(0)) continue;
        offset.push_back(r * p.W + q);
        weight.push_back(w);
      }
    }
  }

  // The distinct cache lines of a plane of element_bytes elements (offsets in elements, relative
  // to the plane) that the taps touch, assuming 64-byte aligned planes; used only to prefetch.
  void collect_lines(int64_t element_bytes) {
    const int64_t per_line = kCacheLineBytes / element_bytes;
    line_offsets.clear();
    for (const int64_t off : offset) line_offsets.push_back(off / per_line * per_line);
    std::sort(line_offsets.begin(), line_offsets.end());
    line_offsets.erase(std::unique(line_offsets.begin(), line_offsets.end()), line_offsets.end());
  }

  // Fills the pixel-major view from the taps.
  void collect_pixels() {
    const auto taps = static_cast<int64_t>(offset.size());
    std::vector<int64_t> node(taps), order(taps);
    for (int64_t k = 0; k + 1 < static_cast<int64_t>(begin.size()); ++k) {
      std::fill(node.begin() + begin[k], node.begin() + begin[k + 1], k);
    }
    std::iota(order.begin(), order.end(), int64_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return offset[a] < offset[b]; });
    pixel_offset.clear();
    pixel_begin.clear();
    pixel_node.resize(taps);
    pixel_weight.resize(taps);
    for (int64_t j = 0; j < taps; ++j) {
      const int64_t t = order[j];
      if (j == 0 || offset[t] != pixel_offset.back()) {
        pixel_offset.push_back(offset[t]);
        pixel_begin.push_back(j);
      }
      pixel_node[j] = node[t];
      pixel_weight[j] = weight[t];
    }
    pixel_begin.push_back(taps);
  }
};

// NCHW forward, keypoint-major (planes of a page or more): for a pair of keypoints with NA and NB
// taps (compile-time counts), walk channels [c0, c1): out_a[c] = sum_t wa_t * plane_c[oa_t], and
// likewise out_b.  The taps are summed in their order, acc += w * x from 0, like the generic loop
// below (bitwise the same).
template <int NA, int NB, typename scalar_t, typename acc = acc_t<scalar_t>>
void gather_nchw_pair(const scalar_t* image, int64_t HW, int64_t c0, int64_t c1,
                      const int64_t* offset_a, const acc_t<scalar_t>* weight_a, scalar_t* out_a,
                      const int64_t* offset_b, const acc_t<scalar_t>* weight_b, scalar_t* out_b) {
  int64_t oa[NA > 0 ? NA : 1], ob[NB > 0 ? NB : 1];
  acc wa[NA > 0 ? NA : 1], wb[NB > 0 ? NB : 1];
  for (int t = 0; t < NA; ++t) oa[t] = offset_a[t], wa[t] = weight_a[t];
  for (int t = 0; t < NB; ++t) ob[t] = offset_b[t], wb[t] = weight_b[t];
  const scalar_t* plane = image + c0 * HW;
  for (int64_t c = c0; c < c1; ++c, plane += HW) {
    if constexpr (is_reduced_precision<scalar_t>) {
      if (c + kPairPrefetchPlanes < c1) {
        const scalar_t* ahead = plane + kPairPrefetchPlanes * HW;
        for (int t = 0; t < NA; ++t) prefetch_line(ahead + oa[t]);
        for (int t = 0; t < NB; ++t) prefetch_line(ahead + ob[t]);
      }
    }
    acc a = 0, b = 0;
    for (int t = 0; t < NA; ++t) a += wa[t] * static_cast<acc>(plane[oa[t]]);
    for (int t = 0; t < NB; ++t) b += wb[t] * static_cast<acc>(plane[ob[t]]);
    out_a[c] = static_cast<scalar_t>(a);
    if (out_b != nullptr) out_b[c] = static_cast<scalar_t>(b);
  }
}

// The same for any tap counts (more than kMaxFixedTaps: boxes that span several pixels).
template <typename scalar_t, typename acc = acc_t<scalar_t>>
void gather_nchw_pair_any(const scalar_t* image, int64_t HW, int64_t c0, int64_t c1,
                          const int64_t* offset_a, const acc_t<scalar_t>* weight_a, int64_t na,
                          scalar_t* out_a, const int64_t* offset_b, const acc_t<scalar_t>* weight_b,
                          int64_t nb, scalar_t* out_b) {
  const scalar_t* plane = image + c0 * HW;
  for (int64_t c = c0; c < c1; ++c, plane += HW) {
    if constexpr (is_reduced_precision<scalar_t>) {
      if (c + kPairPrefetchPlanes < c1) {
        const scalar_t* ahead = plane + kPairPrefetchPlanes * HW;
        for (int64_t t = 0; t < na; ++t) prefetch_line(ahead + offset_a[t]);
        for (int64_t t = 0; t < nb; ++t) prefetch_line(ahead + offset_b[t]);
      }
    }
    acc a = 0, b = 0;
    for (int64_t t = 0; t < na; ++t) a += weight_a[t] * static_cast<acc>(plane[offset_a[t]]);
    for (int64_t t = 0; t < nb; ++t) b += weight_b[t] * static_cast<acc>(plane[offset_b[t]]);
    out_a[c] = static_cast<scalar_t>(a);
    if (out_b != nullptr) out_b[c] = static_cast<scalar_t>(b);
  }
}

template <typename scalar_t>
bool keypoint_major_nchw(int64_t HW) {
  return HW * static_cast<int64_t>(sizeof(scalar_t)) >= kKeypointMajorPlaneBytes;
}

constexpr int64_t kMaxFixedTaps = 4;  // a single bilinear sample inside the map has 4 taps

// Calls fn(std::integral_constant<int, n>) for n in [0, kMaxFixedTaps].
template <typename Fn>
void with_tap_count(int64_t n, const Fn& fn) {
  switch (n) {
    case 0: fn(std::integral_constant<int, 0>()); break;
    case 1: fn(std::integral_constant<int, 1>()); break;
    case 2: fn(std::integral_constant<int, 2>()); break;
    case 3: fn(std::integral_constant<int, 3>()); break;
    default: fn(std::integral_constant<int, 4>()); break;
  }
}

// NCHW forward, plane-major (small planes, where the taps cover most of a plane's lines): each
// group of kPlaneGroup planes is visited once for all keypoints, the taps' lines a few planes ahead
// software-prefetched.  A keypoint's taps are summed for the group's planes side by side: each tap's
// offset and weight are loaded once for the group, and the group's sums are independent, so their
// multiply-adds overlap where one plane's sum would wait on its previous add at every tap.  Each
// channel's sum still adds its taps in tap order.
template <int64_t kPlanes, typename scalar_t, typename acc = acc_t<scalar_t>>
void gather_planes(const scalar_t* plane, const ImageTaps<acc>& taps, int64_t K, int64_t C, int64_t HW,
                   scalar_t* out) {
  const int64_t* off = taps.offset.data();
  const acc* w = taps.weight.data();
  for (int64_t k = 0; k < K; ++k) {
    acc sum[kPlanes] = {};
    for (int64_t t = taps.begin[k]; t < taps.begin[k + 1]; ++t) {
      const acc weight = w[t];
      const scalar_t* value = plane + off[t];
      for (int64_t g = 0; g < kPlanes; ++g) sum[g] += weight * static_cast<acc>(value[g * HW]);
    }
    for (int64_t g = 0; g < kPlanes; ++g) out[k * C + g] = static_cast<scalar_t>(sum[g]);
  }
}

template <typename scalar_t>
void gather_nchw_plane_major(const scalar_t* image, const ImageTaps<acc_t<scalar_t>>& taps, int64_t K,
                             int64_t C, int64_t HW, int64_t c0, int64_t c1, scalar_t* out) {
  for (int64_t c = c0; c < c1;) {
    const int64_t planes = c1 - c >= kPlaneGroup ? kPlaneGroup : 1;
    const int64_t ahead_end = std::min(c + kPrefetchChannels + planes, c1);
    for (int64_t ahead_c = c + kPrefetchChannels; ahead_c < ahead_end; ++ahead_c) {
      const scalar_t* ahead = image + ahead_c * HW;
      for (const int64_t line : taps.line_offsets) prefetch_line(ahead + line);
    }
    if (planes == kPlaneGroup) {
      gather_planes<kPlaneGroup>(image + c * HW, taps, K, C, HW, out + c);
    } else {
      gather_planes<1>(image + c * HW, taps, K, C, HW, out + c);
    }
    c += planes;
  }
}

// NCHW forward of channels [c0, c1) of one image: out[k * C + c] = sum_t w_t * plane_c[off_t].
// Planes smaller than a page: plane-major (above).  Otherwise keypoint-major, see the comment at
// the top: within a tile of kChannelTile channels, one pair of keypoints walks the tile's planes,
// then the next pair re-walks them (lines shared with an earlier pair still in L2).
template <typename scalar_t>
void gather_nchw(const scalar_t* image, const ImageTaps<acc_t<scalar_t>>& taps, int64_t K, int64_t C,
                 int64_t HW, int64_t c0, int64_t c1, scalar_t* out) {
  const int64_t* off = taps.offset.data();
  const acc_t<scalar_t>* w = taps.weight.data();
  const int64_t* begin = taps.begin.data();
  if (!keypoint_major_nchw<scalar_t>(HW)) {
    gather_nchw_plane_major(image, taps, K, C, HW, c0, c1, out);
    return;
  }
  for (int64_t t0 = c0; t0 < c1; t0 += kChannelTile) {
    const int64_t t1 = std::min(c1, t0 + kChannelTile);
    for (int64_t k = 0; k < K; k += 2) {
      const bool pair = k + 1 < K;
      const int64_t ka = k, kb = pair ? k + 1 : k;
      const int64_t na = begin[ka + 1] - begin[ka], nb = pair ? begin[kb + 1] - begin[kb] : 0;
      scalar_t* out_a = out + ka * C;
      scalar_t* out_b = pair ? out + kb * C : nullptr;
      if (na > kMaxFixedTaps || nb > kMaxFixedTaps) {
        gather_nchw_pair_any(image, HW, t0, t1, off + begin[ka], w + begin[ka], na, out_a,
                             off + begin[kb], w + begin[kb], nb, out_b);
        continue;
      }
      with_tap_count(na, [&](auto NA) {
        with_tap_count(nb, [&](auto NB) {
          gather_nchw_pair<decltype(NA)::value, decltype(NB)::value>(
              image, HW, t0, t1, off + begin[ka], w + begin[ka], out_a, off + begin[kb],
              w + begin[kb], out_b);
        });
      });
    }
  }
}

// channels_last forward of channels [c0, c1) of one image: out[k * C + c] = sum_t w_t * pixel_t[c].
template <typename scalar_t>
void gather_channels_last(const scalar_t* image, const ImageTaps<acc_t<scalar_t>>& taps, int64_t K,
                          int64_t C, int64_t c0, int64_t c1, scalar_t* out) {
  using Vec = AccVec<scalar_t>;
  constexpr int64_t VL = Vec::size();
  constexpr int64_t kLine = kCacheLineBytes / sizeof(scalar_t);
  for (int64_t k = 0; k < K; ++k) {
    if constexpr (is_reduced_precision<scalar_t>) {  // the next node's pixels (see the top)
      for (int64_t t = taps.begin[std::min(k + 1, K)]; t < taps.begin[std::min(k + 2, K)]; ++t) {
        for (int64_t c = c0; c < c1; c += kLine) prefetch_line(image + taps.offset[t] * C + c);
      }
    }
    for (int64_t c = c0; c < c1; c += VL) {
      const int64_t n = std::min(VL, c1 - c);
      Vec acc(0);
      for (int64_t t = taps.begin[k]; t < taps.begin[k + 1]; ++t) {
        acc = at::vec::fmadd(Vec(taps.weight[t]), load_acc(image + taps.offset[t] * C + c, n), acc);
      }
      store_acc(acc, out + k * C + c, n);
    }
  }
}

// channels_last backward of channels [c0, c1) of one image (zeros on entry):
// pixel_t[c] += w_t * grad_out[k * C + c] for every keypoint k in order.
template <typename scalar_t>
void scatter_channels_last(const scalar_t* grad_out, const ImageTaps<scalar_t>& taps, int64_t K,
                           int64_t C, int64_t c0, int64_t c1, scalar_t* image) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t VL = Vec::size();
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t t = taps.begin[k]; t < taps.begin[k + 1]; ++t) {
      const Vec w(taps.weight[t]);
      scalar_t* pixel = image + taps.offset[t] * C;
      for (int64_t c = c0; c < c1; c += VL) {
        const int64_t n = std::min(VL, c1 - c);
        at::vec::fmadd(w, Vec::loadu(grad_out + k * C + c, n), Vec::loadu(pixel + c, n))
            .store(pixel + c, n);
      }
    }
  }
}

// dst[j * ld_dst + i] = src[i * ld_src + j] for i, j in [0, VL): a VL x VL block of floats, VL the
// vector width, transposed in registers.  (ATen's transpose_mxn<float, 16, 16> handles any M x N
// through masked copies on the stack, several times slower for the full block.)
template <int64_t VL>
inline void transpose_block(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (VL == 16) {
    // rows -> pairs of rows interleaved (32-bit) -> 4 rows' columns per 128-bit lane (64-bit) ->
    // the lanes of 4 registers transposed (128-bit): u[4 * m + e] lane l holds column 4 * l + e of
    // rows 4 * m .. 4 * m + 3.
    __m512 r[16], t[16], u[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
      const __m512d lo_a = _mm512_castps_pd(t[4 * i]), lo_b = _mm512_castps_pd(t[4 * i + 2]);
      const __m512d hi_a = _mm512_castps_pd(t[4 * i + 1]), hi_b = _mm512_castps_pd(t[4 * i + 3]);
      u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo_a, lo_b));
      u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo_a, lo_b));
      u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi_a, hi_b));
      u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi_a, hi_b));
    }
    for (int e = 0; e < 4; ++e) {
      const __m512 v0 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x44);
      const __m512 v1 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xEE);
      const __m512 v2 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x44);
      const __m512 v3 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xEE);
      _mm512_storeu_ps(dst + e * ld_dst, _mm512_shuffle_f32x4(v0, v2, 0x88));
      _mm512_storeu_ps(dst + (4 + e) * ld_dst, _mm512_shuffle_f32x4(v0, v2, 0xDD));
      _mm512_storeu_ps(dst + (8 + e) * ld_dst, _mm512_shuffle_f32x4(v1, v3, 0x88));
      _mm512_storeu_ps(dst + (12 + e) * ld_dst, _mm512_shuffle_f32x4(v1, v3, 0xDD));
    }
  } else
#endif
  {
    at::vec::transpose_mxn<float, VL, VL>(src, ld_src, dst, ld_dst);  // AVX2: 8 x 8 in registers
  }
}

// NCHW backward of channels [c0, c1) of one image (zeros on entry), pixel by pixel:
// plane_c[pixel] = sum over the pixel's taps t (node order) of w_t * grad_out[k_t * C + c],
// formed in the accumulation dtype (float32 for 16-bit scalar_t) and rounded once.  A vector of
// channels at a time: the nodes' grad_out values of those channels are first copied to `rows`
// (K vectors, converted to the accumulation dtype once), so the pixel walk reads them from one
// contiguous buffer: read in place, the K rows lie a row of C values apart, which at a power-of-two
// C maps them all to one L1 set (at stage 4, 17 lines 8 KiB apart, more than the set's ways) and
// every tap's load misses L1.  The rows of the vector kRowsAhead vectors on are prefetched as the
// current ones are copied.  The pixels are walked in runs of VL (a vector's width of a plane's
// row-major pixels): a run with kTilePixels or more tapped pixels becomes a VL x VL
// tile (its pixels' sums, zeros where no tap) transposed in registers and stored as one vector per
// channel plane; otherwise each lane of a pixel's sum is stored to its channel's plane.
template <typename scalar_t, typename acc = acc_t<scalar_t>>
void scatter_nchw_by_pixel(const scalar_t* grad_out, const ImageTaps<acc_t<scalar_t>>& taps,
                           int64_t K, int64_t C, int64_t HW, int64_t c0, int64_t c1, scalar_t* image) {
  using Vec = AccVec<scalar_t>;
  constexpr int64_t VL = Vec::size();
  constexpr int64_t kRowsAhead = 4;
  const int64_t pixels = static_cast<int64_t>(taps.pixel_offset.size());
  const int64_t* node = taps.pixel_node.data();
  const acc* w = taps.pixel_weight.data();
  thread_local std::vector<acc> rows;  // this thread's copy of the K rows' current vector
  rows.resize(K * VL);
  acc* row = rows.data();
  for (int64_t c = c0; c < c1; c += VL) {
    const int64_t n = std::min(VL, c1 - c);
    const int64_t ahead = c + kRowsAhead * VL;
    for (int64_t k = 0; k < K; ++k) {
      if (ahead < c1) prefetch_line(grad_out + k * C + ahead);
      load_acc(grad_out + k * C + c, n).store(row + k * VL);
    }
    scalar_t* planes = image + c * HW;
    const auto pixel_sum = [&](int64_t i) {
      Vec sum(0);
      for (int64_t j = taps.pixel_begin[i]; j < taps.pixel_begin[i + 1]; ++j) {
        sum = at::vec::fmadd(Vec(w[j]), Vec::loadu(row + node[j] * VL), sum);
      }
      return sum;
    };
    for (int64_t i = 0; i < pixels;) {
      // the pixels [i, end) of the run of VL pixels from run_start that holds pixel i
      const int64_t run_start = taps.pixel_offset[i] / VL * VL;
      int64_t end = i + 1;
      while (end < pixels && taps.pixel_offset[end] < run_start + VL) ++end;
      if constexpr (std::is_same_v<acc, float>) {
        if (n == VL && end - i >= kTilePixels && run_start + VL <= HW) {
          // tile[q * VL + l]: pixel run_start + q, channel c + l (zero where no tap)
          alignas(64) float tile[VL * VL];
          for (int64_t q = 0; q < VL; ++q) Vec(0).store(tile + q * VL);
          for (; i < end; ++i) pixel_sum(i).store(tile + (taps.pixel_offset[i] - run_start) * VL);
          if constexpr (std::is_same_v<scalar_t, float>) {
            transpose_block<VL>(tile, VL, planes + run_start, HW);
          } else {  // 16-bit: each channel's run rounded once, as the lane stores below round each sum
            alignas(64) float columns[VL * VL];  // columns[l * VL + q]: channel c + l, pixel run_start + q
            transpose_block<VL>(tile, VL, columns, VL);
            for (int64_t l = 0; l < VL; ++l) store_acc(Vec::loadu(columns + l * VL), planes + l * HW + run_start);
          }
          continue;
        }
      }
      for (; i < end; ++i) {
        scalar_t lanes[VL];
        store_acc(pixel_sum(i), lanes);
        scalar_t* pixel = planes + taps.pixel_offset[i];
        if (n == VL) {  // a constant count: the stores unroll
          for (int64_t l = 0; l < VL; ++l) pixel[l * HW] = lanes[l];
        } else {
          for (int64_t l = 0; l < n; ++l) pixel[l * HW] = lanes[l];
        }
      }
    }
  }
}

// 16-bit channels_last backward of channels [c0, c1) of one image (zeros on entry), pixel by pixel:
// pixel[c] = sum over the pixel's taps t (node order) of w_t * grad_out[k_t * C + c].
template <typename scalar_t>
void scatter_channels_last_by_pixel(const scalar_t* grad_out, const ImageTaps<acc_t<scalar_t>>& taps,
                                    int64_t C, int64_t c0, int64_t c1, scalar_t* image) {
  using Vec = AccVec<scalar_t>;
  constexpr int64_t VL = Vec::size();
  const int64_t pixels = static_cast<int64_t>(taps.pixel_offset.size());
  for (int64_t i = 0; i < pixels; ++i) {
    scalar_t* pixel = image + taps.pixel_offset[i] * C;
    for (int64_t c = c0; c < c1; c += VL) {
      const int64_t n = std::min(VL, c1 - c);
      Vec sum(0);
      for (int64_t j = taps.pixel_begin[i]; j < taps.pixel_begin[i + 1]; ++j) {
        sum = at::vec::fmadd(Vec(taps.pixel_weight[j]),
                             load_acc(grad_out + taps.pixel_node[j] * C + c, n), sum);
      }
      store_acc(sum, pixel + c, n);
    }
  }
}

// Whether the backward walks the taps pixel by pixel (NCHW, and any 16-bit gradient), which needs
// the image's pixel-major taps (ImageTaps::collect_pixels), or keypoint by keypoint (a float32 or
// float64 channels_last gradient).
template <typename scalar_t>
constexpr bool scatters_by_pixel(bool channels_last) {
  return is_reduced_precision<scalar_t> || !channels_last;
}

// Backward of channels [c0, c1) of one image (zeros on entry) from its grad_out rows g [K, C],
// walked as scatters_by_pixel says.
template <typename scalar_t>
void scatter_image(const scalar_t* g, const ImageTaps<acc_t<scalar_t>>& taps, const GatherParams& p,
                   bool channels_last, int64_t c0, int64_t c1, scalar_t* image) {
  if (!scatters_by_pixel<scalar_t>(channels_last)) {
    // float32 / float64 only (the 16-bit dtypes never reach here, and their taps' dtype differs)
    if constexpr (!is_reduced_precision<scalar_t>) scatter_channels_last(g, taps, p.K, p.C, c0, c1, image);
  } else if (channels_last) {
    scatter_channels_last_by_pixel(g, taps, p.C, c0, c1, image);
  } else {
    scatter_nchw_by_pixel(g, taps, p.K, p.C, p.H * p.W, c0, c1, image);
  }
}

// Channel block size such that (image, channel block) tasks keep every thread busy.
int64_t channel_block(int64_t B, int64_t C) {
  const int64_t wanted = (4 * at::get_num_threads() + B - 1) / B;
  const int64_t max_blocks = std::max<int64_t>(1, C / kMinChannelBlock);
  const int64_t blocks = std::clamp<int64_t>(wanted, 1, max_blocks);
  return (C + blocks - 1) / blocks;
}

// Runs fn(b, c0, c1, taps) for every (image, channel block) task in parallel, tasks handed out
// one at a time (ops/cpu/dynamic_tasks.h); taps holds the image's node taps (scalar_t: the
// accumulation dtype), with the cache lines of planes of line_element_bytes elements when that is
// non-zero and the pixel-major view when need_pixels.
template <typename scalar_t, typename Fn>
void for_each_image_task(const GatherParams& p, const at::Tensor& keypoints, const at::Tensor& valid,
                         const at::Tensor& sizes, int64_t line_element_bytes, bool need_pixels,
                         const Fn& fn) {
  const scalar_t* kp = keypoints.const_data_ptr<scalar_t>();
  const bool* vp = valid.defined() ? valid.const_data_ptr<bool>() : nullptr;
  const scalar_t* sp = sizes.defined() ? sizes.const_data_ptr<scalar_t>() : nullptr;
  const int64_t point_dims = keypoints.size(2);
  const int64_t block = channel_block(p.B, p.C);
  const int64_t blocks = (p.C + block - 1) / block;
  for_each_task(p.B * blocks, [&] {
    return [&, taps = ImageTaps<scalar_t>(), tapped_image = int64_t{-1}](int64_t task) mutable {
      const int64_t b = task / blocks;
      const int64_t c0 = task % blocks * block, c1 = std::min(p.C, c0 + block);
      if (b != tapped_image) {
        taps.compute(p, kp, point_dims, vp, sp, b);
        if (line_element_bytes > 0) taps.collect_lines(line_element_bytes);
        if (need_pixels) taps.collect_pixels();
        tapped_image = b;
      }
      fn(b, c0, c1, taps);
    };
  });
}

GatherParams make_params(at::IntArrayRef features_size, const at::Tensor& keypoints,
                         double spatial_scale, double roi_size, int64_t sampling_ratio,
                         bool aligned, int64_t output_size) {
  const int64_t K = keypoints.size(1);
  return {features_size[0], features_size[1], features_size[2], features_size[3],
          K * output_size * output_size, K, output_size, spatial_scale, roi_size * 0.5,
          sampling_ratio, aligned};
}

// roi_sizes in the kernels' dtype, contiguous; undefined when the scalar roi_size applies.
at::Tensor sizes_as(const std::optional<at::Tensor>& roi_sizes, at::ScalarType dtype) {
  return roi_sizes.has_value() ? roi_sizes->to(dtype).contiguous() : at::Tensor();
}

void check_cpu_dtype(at::ScalarType dtype, const char* name) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "keypoint_gather: the CPU kernel takes float32, float64, float16 or bfloat16 ", name,
              ", got ", dtype);
}

at::Tensor keypoint_gather_cpu(const at::Tensor& features_in, const at::Tensor& keypoints_in,
                               const std::optional<at::Tensor>& valid_in,
                               const std::optional<at::Tensor>& roi_sizes, double spatial_scale,
                               double roi_size, int64_t sampling_ratio, bool aligned,
                               int64_t output_size) {
  check_keypoint_gather_args(features_in.sizes(), features_in.device(), keypoints_in, valid_in,
                             roi_sizes, spatial_scale, roi_size, sampling_ratio, output_size);
  check_cpu_dtype(features_in.scalar_type(), "features");
  const bool channels_last = uses_channels_last(features_in);
  const auto features = channels_last ? features_in : features_in.contiguous();
  const auto acc_dtype = at::toOpMathType(features.scalar_type());
  const auto keypoints = keypoints_in.to(acc_dtype).contiguous();
  const auto valid = valid_in.has_value() ? valid_in->contiguous() : at::Tensor();
  const auto sizes = sizes_as(roi_sizes, acc_dtype);
  const GatherParams p = make_params(features.sizes(), keypoints, spatial_scale, roi_size,
                                     sampling_ratio, aligned, output_size);
  auto out = at::empty({p.B, p.K, p.C}, features.options());
  if (out.numel() == 0) return out;
  populate_huge_pages(out);
  const int64_t image_size = p.C * p.H * p.W;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "keypoint_gather_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* fp = features.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const bool need_lines = !channels_last && !keypoint_major_nchw<scalar_t>(p.H * p.W);
    for_each_image_task<acc>(p, keypoints, valid, sizes, need_lines ? sizeof(scalar_t) : 0, false,
                             [&](int64_t b, int64_t c0, int64_t c1, const ImageTaps<acc>& taps) {
      if (channels_last) {
        gather_channels_last(fp + b * image_size, taps, p.K, p.C, c0, c1, op + b * p.K * p.C);
      } else {
        gather_nchw(fp + b * image_size, taps, p.K, p.C, p.H * p.W, c0, c1, op + b * p.K * p.C);
      }
    });
  });
  return out;
}

at::Tensor keypoint_gather_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& keypoints_in,
                                        const std::optional<at::Tensor>& valid_in,
                                        const std::optional<at::Tensor>& roi_sizes,
                                        at::IntArrayRef features_size, bool channels_last,
                                        double spatial_scale, double roi_size,
                                        int64_t sampling_ratio, bool aligned,
                                        int64_t output_size) {
  check_keypoint_gather_backward_args(grad_out_in, features_size, keypoints_in, valid_in, roi_sizes,
                                      spatial_scale, roi_size, sampling_ratio, output_size);
  check_cpu_dtype(grad_out_in.scalar_type(), "grad_out");
  const GatherParams p = make_params(features_size, keypoints_in, spatial_scale, roi_size,
                                     sampling_ratio, aligned, output_size);
  const auto grad_out = grad_out_in.contiguous();
  const auto acc_dtype = at::toOpMathType(grad_out.scalar_type());
  const auto keypoints = keypoints_in.to(acc_dtype).contiguous();
  const auto valid = valid_in.has_value() ? valid_in->contiguous() : at::Tensor();
  const auto sizes = sizes_as(roi_sizes, acc_dtype);
  auto grad = zeros_from_fresh_pages(features_size, grad_out.options(),
      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (grad.numel() == 0) return grad;
  const int64_t image_size = p.C * p.H * p.W;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "keypoint_gather_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    scalar_t* grad_p = grad.mutable_data_ptr<scalar_t>();
    for_each_image_task<acc>(p, keypoints, valid, sizes, 0, scatters_by_pixel<scalar_t>(channels_last),
                             [&](int64_t b, int64_t c0, int64_t c1, const ImageTaps<acc>& taps) {
      scatter_image(gp + b * p.K * p.C, taps, p, channels_last, c0, c1, grad_p + b * image_size);
    });
  });
  return grad;
}

}  // namespace
}  // namespace CPU_CAPABILITY

KEYPOINTOPS_CPU_KERNEL(keypoint_gather, CPU_CAPABILITY::keypoint_gather_cpu)
KEYPOINTOPS_CPU_KERNEL(keypoint_gather_backward, CPU_CAPABILITY::keypoint_gather_backward_cpu)

#if defined(CPU_CAPABILITY_DEFAULT)  // one registration, for every capability's build
TORCH_LIBRARY_IMPL(keypointops, CPU, m) {
  m.impl("keypoint_gather", KEYPOINTOPS_CPU_DISPATCH(keypoint_gather, CPU_CAPABILITY::keypoint_gather_cpu));
  m.impl("keypoint_gather_backward", KEYPOINTOPS_CPU_DISPATCH(keypoint_gather_backward, CPU_CAPABILITY::keypoint_gather_backward_cpu));
}
#endif

}  // namespace keypointops

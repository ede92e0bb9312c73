// keypointops: every operator schema lives here.  Kernels register per dispatch key: the CPU ones
// at the bottom of csrc/ops/cpu/<op>_kernel.cpp, the CUDA ones all in csrc/ops/cuda/register_cuda.cpp
// (declared in ops/cuda/kernels.h); autograd and fake (meta) kernels are registered from Python
// (keypointops/ops/<op>.py) with torch.library.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers (ATen/ops/*.h) only, not ATen/ATen.h
#include <torch/library.h>

#include "ops/cpu/cpu_capability.h"
#include "ops/cpu/gemm_route.h"

#ifdef KEYPOINTOPS_PYTHON_MODULE
#include <Python.h>
// Empty Python module so that `import keypointops._C` loads this library (and runs the
// TORCH_LIBRARY registrations below).  The CMake build makes a plain shared library instead,
// loaded with torch.ops.load_library.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

TORCH_LIBRARY(keypointops, m) {
  // msg_pass: softmax-temperature (aggr "softmax"), power-mean or mean aggregation over the
  // incoming-edge CSR (rowptr, col).
  // (rowptr_t, col_t) is the transposed CSR (targets of the edges leaving each node): forward only
  // checks its shape and passes it on, so that the autograd formula can hand it to backward.
  // Returns (out [N, C], row_max [N, C], row_sum [N, C]): per (node, channel) the message of the
  // largest logit (the softmax is shifted by t*row_max) and the sum of exp(t*(m - row_max)), saved
  // for backward (float32 for reduced precision inputs).
  // With edge_attr [E, C] the message of CSR position k (edge id perm[k]) is
  // relu(x[col[k]] + edge_attr[perm[k]]) + eps: edge_attr is read in place in its own edge order.
  // perm_t (the edge ids of the transposed CSR) is, like rowptr_t and col_t, only checked and
  // passed on for backward.
  // aggr "powermean" (t holds the power p) aggregates c = clamp(m, clamp_min, clamp_max) as
  // out = clamp(mean(c^p), clamp_min, clamp_max)^(1/p), aggr "mean" the plain mean of m (t unread);
  // both return (out, the mean before its clamp [N, C], the in-degree [N, C]) for backward.
  m.def("msg_pass(Tensor x, Tensor rowptr, Tensor col, Tensor rowptr_t, Tensor col_t, Tensor t, "
        "float eps, Tensor? edge_attr=None, Tensor? perm=None, Tensor? perm_t=None, "
        "str aggr=\"softmax\", float clamp_min=0.0001, float clamp_max=100.0) -> (Tensor, Tensor, Tensor)");
  // Backward walks the transposed CSR: each row of grad_x and of grad_edge_attr has one writer, no
  // atomics.  perm_t[k] is the edge id of transposed-CSR position k.
  // Returns (grad_x [N, C], grad_t [C], grad_edge_attr [E, C], or [0] without edge_attr); grad_t is
  // all zeros unless compute_grad_t.
  m.def("msg_pass_backward(Tensor grad_out, Tensor x, Tensor out, Tensor row_max, Tensor row_sum, "
        "Tensor rowptr_t, Tensor col_t, Tensor t, float eps, bool compute_grad_t, "
        "Tensor? edge_attr=None, Tensor? perm_t=None, str aggr=\"softmax\", float clamp_min=0.0001, "
        "float clamp_max=100.0) -> (Tensor, Tensor, Tensor)");
  // part_pool: softmax over H*W of the part logits (groups @ heatmaps) / temperature, then the
  // probability-weighted sum of the features.  groups = None is the identity (P = J).
  // Returns out [B, P, C]; backward recomputes the probabilities from the inputs.
  m.def("part_pool(Tensor features, Tensor heatmaps, Tensor? groups, float temperature) -> Tensor");
  // Returns (grad_features, grad_heatmaps, grad_groups); the ones output_mask leaves out are empty [0].
  m.def("part_pool_backward(Tensor grad_out, Tensor features, Tensor heatmaps, Tensor? groups, "
        "float temperature, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // window_graph_conv: sliding-window block-adjacency graph conv, x [B, T, N, C] and adj [R, L],
  // [B, R, L] or [B, T', R, L] (L = window * N, R = S * L: S stacked scales) -> [B, T', R, C];
  // slot w of window t reads frame t * stride - (window - 1) * dilation / 2 + w * dilation (zeros
  // outside [0, T)), T' = floor((T + 2 pad - (window - 1) * dilation - 1) / stride) + 1.
  m.def("window_graph_conv(Tensor x, Tensor adj, int window, int dilation, int stride) -> Tensor");
  // Backward from x and adj alone (no window tensor saved).  Returns (grad_x, grad_adj); each is an
  // empty [0] tensor when its compute_ flag is false.
  m.def("window_graph_conv_backward(Tensor grad_out, Tensor x, Tensor adj, int window, int dilation, "
        "int stride, bool compute_grad_x, bool compute_grad_adj) -> (Tensor, Tensor)");
  // keypoint_gather: torchvision RoIAlign (output_size S) of a box around each keypoint (x, y =
  // keypoints[b, k, 0:2]) of side roi_size, or roi_sizes[b, k] = (side x, side y) when given,
  // written node-major [B, K * S * S, C] (node k * S * S + py * S + px: bin (py, px) of keypoint
  // k); valid [B, K] bool or None.
  m.def("keypoint_gather(Tensor features, Tensor keypoints, Tensor? valid, Tensor? roi_sizes, "
        "float spatial_scale, float roi_size, int sampling_ratio, bool aligned, int output_size) "
        "-> Tensor");
  // Backward recomputes the sample weights from the keypoints; returns grad_features of
  // features_size, channels_last or contiguous.
  m.def("keypoint_gather_backward(Tensor grad_out, Tensor keypoints, Tensor? valid, "
        "Tensor? roi_sizes, SymInt[] features_size, bool channels_last, float spatial_scale, "
        "float roi_size, int sampling_ratio, bool aligned, int output_size) -> Tensor");
  // rank_stats (CPU only, used by keypointops.evaluation): per query of a [Q, G] distance matrix,
  // (first true-match rank int64 [Q] (-1: no true match), AP float64 [Q], INP float64 [Q]) under
  // the MARS / torchreid rules (same pid and camera removed, pid -1 junk removed, ties by index).
  m.def("rank_stats(Tensor dist, Tensor q_pids, Tensor q_camids, Tensor g_pids, Tensor g_camids) "
        "-> (Tensor, Tensor, Tensor)");
  // The instruction set the CPU kernels run with ("default", "avx2" or "avx512"; chosen when the
  // library loads, ops/cpu/cpu_capability.h), and a switch to another one that the CPU supports
  // (for tests and measurements; it applies to every thread).
  m.def("_cpu_capability() -> str", &keypointops::cpu_capability_name);
  m.def("_set_cpu_capability(str capability) -> ()", &keypointops::set_cpu_capability);
  // Where the CPU kernels send GEMM-shaped work ("library": PyTorch's GEMMs, "own": their loops;
  // ops/cpu/gemm_route.h), and a switch ("library", "own" or "auto"), for tests and measurements.
  m.def("_cpu_gemm_route() -> str", &keypointops::gemm_route_name);
  m.def("_set_cpu_gemm_route(str route) -> ()", &keypointops::set_gemm_route);
}

#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>
#include <tuple>

namespace keypointops {

// The aggregations of msg_pass: softmax with inverse temperature t (DeeperGCN's SoftMax_Agg), the
// same with its weights taken as constants in backward (PyG's semi-gradient "softmax_sg"), power
// mean with power p = t and PyG's clamping (DeeperGCN's PowerMean_Agg), and the mean (the power mean
// of a plain p = 1, which PyG computes without clamping).
enum class MsgPassAggr { kSoftmax, kSoftmaxSemiGrad, kPowerMean, kMean };

// The aggregation named by the op's aggr argument; raises naming the accepted names otherwise.
MsgPassAggr parse_msg_pass_aggr(c10::string_view aggr);

// Device-agnostic argument checks shared by the CPU and CUDA kernels (shapes, dtypes, devices).
void check_msg_pass_args(const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& col,
                         const at::Tensor& t, const char* rowptr_name, const char* col_name);

// Checks of the forward op's arguments: both CSRs (shapes, dtypes, devices) and one edge count.
void check_msg_pass_forward_args(const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& col,
                                 const at::Tensor& rowptr_t, const at::Tensor& col_t,
                                 const at::Tensor& t);

// Checks of the backward op's arguments: the transposed CSR and t as above, grad_out and out of
// x's shape, dtype and device, row_max and row_sum of x's shape and device and t's dtype.
void check_msg_pass_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                  const at::Tensor& out, const at::Tensor& row_max,
                                  const at::Tensor& row_sum, const at::Tensor& rowptr_t,
                                  const at::Tensor& col_t, const at::Tensor& t);

// Checks of the optional edge features: none of edge_attr and perm, or edge_attr [E, C] of x's
// dtype and device and perm [E] int64 on x's device (E = num_edges).
void check_msg_pass_edge_args(const at::Tensor& x, const c10::optional<at::Tensor>& edge_attr,
                              const c10::optional<at::Tensor>& perm, int64_t num_edges,
                              const char* perm_name);

// Content check of an edge permutation on the CPU: a permutation of [0, E).
void check_perm_cpu(const at::Tensor& perm, const char* perm_name);

// Content check of a CSR on the CPU: rowptr[0] == 0, non-decreasing, rowptr[N] == E, col in [0, N).
void check_csr_cpu(const at::Tensor& rowptr, const at::Tensor& col, int64_t num_nodes,
                   const char* rowptr_name, const char* col_name);

// C++ entry points (go through the dispatcher, like torch.ops.keypointops.*).
std::tuple<at::Tensor, at::Tensor, at::Tensor> msg_pass(
    const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& rowptr_t,
    const at::Tensor& col_t, const at::Tensor& t, double eps,
    const c10::optional<at::Tensor>& edge_attr, const c10::optional<at::Tensor>& perm,
    const c10::optional<at::Tensor>& perm_t, c10::string_view aggr, double clamp_min,
    double clamp_max);
std::tuple<at::Tensor, at::Tensor, at::Tensor> msg_pass_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out, const at::Tensor& row_max,
    const at::Tensor& row_sum,
    const at::Tensor& rowptr_t, const at::Tensor& col_t, const at::Tensor& t, double eps,
    bool compute_grad_t, const c10::optional<at::Tensor>& edge_attr,
    const c10::optional<at::Tensor>& perm_t, c10::string_view aggr, double clamp_min,
    double clamp_max);

}  // namespace keypointops

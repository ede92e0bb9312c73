// msg_pass: argument checks shared by every device, and the C++ dispatcher entry points.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers (ATen/ops/*.h) only, not ATen/ATen.h
#include "ops/msg_pass.h"

#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <vector>

namespace keypointops {

MsgPassAggr parse_msg_pass_aggr(c10::string_view aggr) {
  if (aggr == "softmax") return MsgPassAggr::kSoftmax;
  if (aggr == "softmax_sg") return MsgPassAggr::kSoftmaxSemiGrad;
  if (aggr == "powermean") return MsgPassAggr::kPowerMean;
  if (aggr == "mean") return MsgPassAggr::kMean;
  TORCH_CHECK_VALUE(false, "msg_pass: aggr must be 'softmax', 'softmax_sg', 'powermean' or 'mean', got '", aggr,
                    "'");
}

void check_msg_pass_args(const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& col,
                         const at::Tensor& t, const char* rowptr_name, const char* col_name) {
  TORCH_CHECK(x.dim() == 2, "msg_pass: x must be [N, C], got ", x.dim(), " dims");
  TORCH_CHECK(x.is_floating_point(), "msg_pass: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(rowptr.dim() == 1 && rowptr.size(0) == x.size(0) + 1, "msg_pass: ", rowptr_name,
              " must be [N + 1] = [", x.size(0) + 1, "], got ", rowptr.sizes());
  TORCH_CHECK(col.dim() == 1, "msg_pass: ", col_name, " must be 1-D, got ", col.sizes());
  TORCH_CHECK(rowptr.scalar_type() == at::kLong && col.scalar_type() == at::kLong, "msg_pass: ",
              rowptr_name, " and ", col_name, " must be int64, got ", rowptr.scalar_type(), " and ",
              col.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), "msg_pass: t must be [C] = [", x.size(1),
              "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::toOpMathType(x.scalar_type()), "msg_pass: t must be ",
              at::toOpMathType(x.scalar_type()), " for x of ", x.scalar_type(), ", got ",
              t.scalar_type());
  for (const auto* arg : {&rowptr, &col, &t}) {
    TORCH_CHECK(arg->device() == x.device(), "msg_pass: x (", x.device(), ") and ",
                arg == &t ? "t" : (arg == &rowptr ? rowptr_name : col_name), " (", arg->device(),
                ") must be on the same device");
  }
}

void check_msg_pass_forward_args(const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& col,
                                 const at::Tensor& rowptr_t, const at::Tensor& col_t,
                                 const at::Tensor& t) {
  check_msg_pass_args(x, rowptr, col, t, "rowptr", "col");
  check_msg_pass_args(x, rowptr_t, col_t, t, "rowptr_t", "col_t");
  TORCH_CHECK(col_t.numel() == col.numel(), "msg_pass: col_t must have as many edges as col (",
              col.numel(), "), got ", col_t.numel());
}

void check_msg_pass_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                  const at::Tensor& out, const at::Tensor& row_max,
                                  const at::Tensor& row_sum, const at::Tensor& rowptr_t,
                                  const at::Tensor& col_t, const at::Tensor& t) {
  check_msg_pass_args(x, rowptr_t, col_t, t, "rowptr_t", "col_t");
  for (const auto* arg : {&grad_out, &out}) {
    TORCH_CHECK(arg->sizes() == x.sizes() && arg->scalar_type() == x.scalar_type() &&
                    arg->device() == x.device(),
                "msg_pass_backward: ", arg == &out ? "out" : "grad_out", " must match x (",
                x.sizes(), ", ", x.scalar_type(), ", ", x.device(), "), got (", arg->sizes(), ", ",
                arg->scalar_type(), ", ", arg->device(), ")");
  }
  for (const auto* arg : {&row_max, &row_sum}) {
    TORCH_CHECK(arg->sizes() == x.sizes() && arg->scalar_type() == t.scalar_type() &&
                    arg->device() == x.device(),
                "msg_pass_backward: ", arg == &row_max ? "row_max" : "row_sum", " must be ",
                x.sizes(), " of ", t.scalar_type(), " on ", x.device(), ", got (", arg->sizes(), ", ",
                arg->scalar_type(), ", ", arg->device(), ")");
  }
}

void check_msg_pass_edge_args(const at::Tensor& x, const c10::optional<at::Tensor>& edge_attr,
                              const c10::optional<at::Tensor>& perm, int64_t num_edges,
                              const char* perm_name) {
  TORCH_CHECK(edge_attr.has_value() == perm.has_value(), "msg_pass: edge_attr and ", perm_name,
              " must be given together");
  if (!edge_attr.has_value()) return;
  const at::Tensor& ea = *edge_attr;
  const at::Tensor& p = *perm;
  TORCH_CHECK(ea.dim() == 2 && ea.size(0) == num_edges && ea.size(1) == x.size(1),
              "msg_pass: edge_attr must be [E, C] = [", num_edges, ", ", x.size(1), "], got ",
              ea.sizes());
  TORCH_CHECK(ea.scalar_type() == x.scalar_type(), "msg_pass: edge_attr must be ", x.scalar_type(),
              " like x, got ", ea.scalar_type());
  TORCH_CHECK(p.dim() == 1 && p.size(0) == num_edges && p.scalar_type() == at::kLong, "msg_pass: ",
              perm_name, " must be [E] = [", num_edges, "] int64, got ", p.sizes(), " ",
              p.scalar_type());
  for (const auto* arg : {&ea, &p}) {
    TORCH_CHECK(arg->device() == x.device(), "msg_pass: x (", x.device(), ") and ",
                arg == &ea ? "edge_attr" : perm_name, " (", arg->device(),
                ") must be on the same device");
  }
}

void check_perm_cpu(const at::Tensor& perm, const char* perm_name) {
  const auto p = perm.contiguous();
  const int64_t* e = p.data_ptr<int64_t>();
  const int64_t num_edges = p.numel();
  std::vector<bool> seen(num_edges, false);  // every edge once: each gradient row has one writer
  for (int64_t k = 0; k < num_edges; ++k) {
    TORCH_CHECK(e[k] >= 0 && e[k] < num_edges, "msg_pass: ", perm_name, " holds edge id ", e[k],
                " out of range [0, ", num_edges, ")");
    TORCH_CHECK(!seen[e[k]], "msg_pass: ", perm_name, " must be a permutation of [0, E), edge id ",
                e[k], " appears twice");
    seen[e[k]] = true;
  }
}

void check_csr_cpu(const at::Tensor& rowptr, const at::Tensor& col, int64_t num_nodes,
                   const char* rowptr_name, const char* col_name) {
  const auto rp = rowptr.contiguous();
  const auto cl = col.contiguous();
  const int64_t* r = rp.data_ptr<int64_t>();
  const int64_t* c = cl.data_ptr<int64_t>();
  const int64_t num_edges = cl.numel();
  TORCH_CHECK(r[0] == 0, "msg_pass: ", rowptr_name, "[0] must be 0, got ", r[0]);
  TORCH_CHECK(r[num_nodes] == num_edges, "msg_pass: ", rowptr_name, "[-1] must equal the number of "
              "edges (", num_edges, "), got ", r[num_nodes]);
  for (int64_t v = 0; v < num_nodes; ++v) {
    TORCH_CHECK(r[v] <= r[v + 1], "msg_pass: ", rowptr_name, " must be non-decreasing (",
                rowptr_name, "[", v, "] = ", r[v], " > ", rowptr_name, "[", v + 1, "] = ", r[v + 1], ")");
  }
  for (int64_t e = 0; e < num_edges; ++e) {
    TORCH_CHECK(c[e] >= 0 && c[e] < num_nodes, "msg_pass: ", col_name, " holds node index ", c[e],
                " out of range [0, ", num_nodes, ")");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msg_pass(
    const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& rowptr_t,
    const at::Tensor& col_t, const at::Tensor& t, double eps,
    const c10::optional<at::Tensor>& edge_attr, const c10::optional<at::Tensor>& perm,
    const c10::optional<at::Tensor>& perm_t, c10::string_view aggr, double clamp_min,
    double clamp_max) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("keypointops::msg_pass", "")
                       .typed<decltype(msg_pass)>();
  return op.call(x, rowptr, col, rowptr_t, col_t, t, eps, edge_attr, perm, perm_t, aggr, clamp_min,
                 clamp_max);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msg_pass_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out, const at::Tensor& row_max,
    const at::Tensor& row_sum,
    const at::Tensor& rowptr_t, const at::Tensor& col_t, const at::Tensor& t, double eps,
    bool compute_grad_t, const c10::optional<at::Tensor>& edge_attr,
    const c10::optional<at::Tensor>& perm_t, c10::string_view aggr, double clamp_min,
    double clamp_max) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("keypointops::msg_pass_backward", "")
                       .typed<decltype(msg_pass_backward)>();
  return op.call(grad_out, x, out, row_max, row_sum, rowptr_t, col_t, t, eps, compute_grad_t,
                 edge_attr, perm_t, aggr, clamp_min, clamp_max);
}

}  // namespace keypointops

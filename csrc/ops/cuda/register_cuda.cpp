// Registers the CUDA kernels with torch's dispatcher.  In a C++ file of its own, compiled once by
// the host compiler: torch/library.h in a .cu file is parsed four times by nvcc (cudafe++, the host
// compile and cicc for each of two architectures).  Built only with CUDA (setup.py, CMakeLists.txt).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers (ATen/ops/*.h) only, not ATen/ATen.h
#include <torch/library.h>

#include "ops/cuda/kernels.h"

namespace keypointops {

TORCH_LIBRARY_IMPL(keypointops, CUDA, m) {
  m.impl("keypoint_gather", &keypoint_gather_cuda);
  m.impl("keypoint_gather_backward", &keypoint_gather_backward_cuda);
  m.impl("msg_pass", &msg_pass_cuda);
  m.impl("msg_pass_backward", &msg_pass_backward_cuda);
  m.impl("part_pool", &part_pool_cuda);
  m.impl("part_pool_backward", &part_pool_backward_cuda);
  m.impl("window_graph_conv", &window_graph_conv_cuda);
  m.impl("window_graph_conv_backward", &window_graph_conv_backward_cuda);
}

}  // namespace keypointops

"""keypointops: fused C++/CUDA and Triton kernels for keypoint-guided video person re-ID."""
from keypointops import graphs, nn, parts, reference
from keypointops._extension import cpu_capability, cpu_gemm_route, has_cuda_ops, has_ops
from keypointops._opdefs.backend import BACKENDS
from keypointops.graphs import Graph
from keypointops.ops import keypoint_gather, msg_pass, part_pool, window_graph_conv, window_graph_conv_output_length

__version__ = "0.1.0"
__all__ = ["BACKENDS", "Graph", "cpu_capability", "cpu_gemm_route", "graphs", "has_cuda_ops", "has_ops", "keypoint_gather", "msg_pass", "nn", "part_pool",
           "parts", "reference", "window_graph_conv", "window_graph_conv_output_length"]

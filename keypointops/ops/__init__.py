"""Public op functions: one module per op (docstring, backend choice, registration of the compiled ops)."""
from keypointops.ops.keypoint_gather import keypoint_gather
from keypointops.ops.msg_pass import msg_pass
from keypointops.ops.part_pool import part_pool
from keypointops.ops.rank_stats import rank_stats
from keypointops.ops.window_graph_conv import window_graph_conv, window_graph_conv_output_length

__all__ = ["keypoint_gather", "msg_pass", "part_pool", "rank_stats", "window_graph_conv",
           "window_graph_conv_output_length"]

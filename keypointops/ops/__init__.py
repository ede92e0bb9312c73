"""Public op functions: one module per op (argument checks, backend choice, autograd, fake kernels)."""
from keypointops.ops.msg_pass import msg_pass
from keypointops.ops.window_graph_conv import window_graph_conv

__all__ = ["msg_pass", "window_graph_conv"]

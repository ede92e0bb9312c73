"""Public op functions: one module per op (argument checks, backend choice, autograd, fake kernels)."""
from keypointops.ops.keypoint_gather import keypoint_gather
from keypointops.ops.msg_pass import msg_pass

__all__ = ["keypoint_gather", "msg_pass"]

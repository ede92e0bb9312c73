"""Public op functions: one module per op (argument checks, backend choice, autograd, fake kernels)."""
from keypointops.ops.msg_pass import msg_pass

__all__ = ["msg_pass"]

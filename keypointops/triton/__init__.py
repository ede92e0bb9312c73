"""Triton kernels, one module per op, each with its launcher and its torch.library custom ops.

Imported lazily by ``keypointops.ops`` when ``backend="triton"`` is asked for; on a machine
without a GPU they run on CPU tensors under ``TRITON_INTERPRET=1``.
"""

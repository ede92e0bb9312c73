"""Test configuration.  Without a GPU, the Triton kernels run on CPU tensors in Triton's
interpreter: TRITON_INTERPRET=1 must be set before triton is imported, so it is set here, before
any test module imports it.  Shared test code is in helpers.py.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

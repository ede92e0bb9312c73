"""Test configuration shared by every op's tests.

Without a GPU, the Triton kernels run on CPU tensors in Triton's interpreter: TRITON_INTERPRET=1
must be set before triton is imported, so it is set here, before any test module imports it.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from keypointops._extension import has_cuda_ops, has_ops  # noqa: E402
from keypointops._opdefs.backend import triton_available  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends(device: str, op_name: str | None = None) -> list:
    """The fused backends that run on ``device`` here (for op ``op_name`` when given), each a
    pytest param with its skip reason."""
    compiled = pytest.param(device, marks=pytest.mark.skipif(
        not (has_cuda_ops(op_name) if device == "cuda" else has_ops()),
        reason=f"keypointops._C built without {device} kernels"))
    triton = pytest.param("triton", marks=pytest.mark.skipif(
        not triton_available(torch.device(device)), reason="triton not installed"))
    return [compiled, triton]


def device_backend_params(op_name: str | None = None):
    """(device, backend) pairs for parametrize: every fused backend on every device present (that
    has a compiled kernel of ``op_name`` when given)."""
    params = []
    for device in DEVICES:
        for backend in backends(device, op_name):
            params.append(pytest.param(device, backend.values[0], marks=backend.marks,
                                       id=f"{device}-{backend.values[0]}"))
    return params


def tolerances(dtype: torch.dtype) -> dict:
    return {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
            torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]


def gradient_errors(function, inputs, grad_out):
    """Max abs error per input of ``function``'s float32 gradients against its float64 gradients
    (``inputs`` float64, one ``grad_out``)."""
    def grads(dtype):
        typed = [i.to(dtype).requires_grad_() for i in inputs]
        return torch.autograd.grad(function(*typed), typed, grad_out.to(dtype))
    return [float((g.double() - e).abs().max()) for g, e in zip(grads(torch.float32), grads(torch.float64))]


def optimisation_step(model, images, keypoints, pids, lr: float):
    """One real Adam step of ``model`` on a batch: returns (loss before, loss after). The RNG is
    re-seeded before each loss so that both see the same dropout masks and random choices."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def loss():
        torch.manual_seed(5)
        return model.loss(model(images, keypoints), pids)[0]
    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    return before.item(), after.item()

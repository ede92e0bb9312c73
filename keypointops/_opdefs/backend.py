"""What every op shares: the backend choice (``auto``, ``cpu``/``cuda`` (compiled), ``triton``,
``reference``), the Tensor and dtype checks of its arguments, and the registration of its
(forward, backward) pair with torch.library."""
from __future__ import annotations

import os

import torch

from keypointops._checks import check_choice
from keypointops._extension import require_ops

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_backend(owner: str, backend: str, name: str = "backend") -> str:
    """Returns ``backend``; raises ValueError naming ``owner`` and ``name`` unless it is one of :data:`BACKENDS`."""
    check_choice(owner, name, backend, BACKENDS)
    return backend


def check_tensors(op_name: str, **named) -> None:
    """Raises TypeError naming the first argument of ``named`` that is not a Tensor."""
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op_name}: {name} must be a Tensor, got {type(value).__name__}")


def check_same_device(op_name: str, ref_name: str, ref_device, name: str, device, hint: str = "",
                      error: type[Exception] = ValueError) -> None:
    """Raises ``error`` unless ``device`` (of argument ``name``) is ``ref_device`` (of ``ref_name``)."""
    if device != ref_device:
        raise error(f"{op_name}: {ref_name} ({ref_device}) and {name} ({device}) must be on the same device{hint}")


def check_float_dtype(op_name: str, name: str, tensor: torch.Tensor) -> None:
    """Raises ValueError unless ``tensor`` is float32, float64, float16 or bfloat16."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op_name}: {name} must be float32, float64, float16 or bfloat16, got {tensor.dtype}")


def triton_available(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(op_name: str, backend: str, device: torch.device) -> str:
    """The backend that runs ``op_name`` on ``device``; raises if that backend cannot run.

    ``auto`` picks the compiled kernels for CPU and CUDA tensors and the reference elsewhere.  It
    never falls back from a missing build: without ``keypointops._C`` it raises.
    """
    check_backend(op_name, backend)
    if backend == "auto":
        backend = device.type if device.type in ("cpu", "cuda") else "reference"
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            raise ValueError(f"{op_name}: backend={backend!r} needs {backend} tensors, got {device}")
        require_ops(backend, op_name)
    elif backend == "triton" and not triton_available(device):
        raise RuntimeError(f"{op_name}: backend='triton' needs the triton package and CUDA tensors "
                           f"(or TRITON_INTERPRET=1 set before triton is imported, for CPU tensors); "
                           f"got a tensor on {device}")
    return backend


def register_op_pair(forward_name: str, backward_name: str, fake_forward, fake_backward, setup_context,
                     backward) -> None:
    """Registers the fake kernels of a (forward, backward) op pair and the forward's autograd formula.

    ``backward(ctx, backward_op, *grads)`` receives the backward op itself, so one formula serves
    the compiled ops and the Triton ops, which share their schemas.
    """
    torch.library.register_fake(forward_name)(fake_forward)
    torch.library.register_fake(backward_name)(fake_backward)
    backward_op = getattr(torch.ops.keypointops, backward_name.split("::")[1]).default
    torch.library.register_autograd(forward_name, lambda ctx, *grads: backward(ctx, backward_op, *grads),
                                    setup_context=setup_context)

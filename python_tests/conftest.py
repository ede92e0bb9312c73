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



# Relative tolerance of a whole training step under CPU autocast, fused ops against the reference
# (the loss, and the gradient of all parameters as one vector, by norm).  The two round differently
# -- the compiled CPU kernels compute in float32, the reference in the autocast dtype -- so they
# differ by some units of that dtype's precision (2^-8 for bfloat16, 2^-11 for float16) amplified
# through the backbone: measured up to 8 % (CTL) for bfloat16 and 0.4 % for float16.
AUTOCAST_STEP_RTOL = {torch.bfloat16: 0.1, torch.float16: 0.02}


def autocast_training_step(name: str, backend: str, dtype: torch.dtype):
    """One training step of model ``name`` (its cpu preset at width 0.125) under CPU autocast in
    ``dtype``: forward, loss, backward and an SGD step, with its fused ops on ``backend``.  Asserts
    that the gradients are finite and that the step changed the parameters; returns (loss, gradient
    of all parameters as one vector)."""
    from keypointops.models import build_model, get_preset
    from test_pose_maps import clips
    options = dict(get_preset(name, "cpu")["model"], width=0.125)
    torch.manual_seed(0)
    model = build_model(name, 5, **options, ops_backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images, keypoints, pids = clips(frames=options.get("frames", 2))
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=dtype):
        total, _ = model.loss(model(images, keypoints), pids)
    total.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    assert all(p.grad.dtype == p.dtype == torch.float32 for p in params)
    grad = torch.cat([p.grad.flatten() for p in params])
    assert torch.isfinite(grad).all(), f"{name}: non-finite gradients under {dtype} autocast ({backend})"
    before = [p.detach().clone() for p in params]
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    return total.detach().float(), grad


def assert_autocast_step_matches_reference(name: str, dtype: torch.dtype, backend: str = "auto"):
    """The autocast training step with the fused ops (``backend``) agrees with the one with the
    reference ops, within :data:`AUTOCAST_STEP_RTOL`."""
    loss, grad = autocast_training_step(name, backend, dtype)
    ref_loss, ref_grad = autocast_training_step(name, "reference", dtype)
    rtol = AUTOCAST_STEP_RTOL[dtype]
    assert torch.isfinite(loss) and abs(loss - ref_loss) <= rtol * abs(ref_loss), (loss, ref_loss)
    assert grad.shape == ref_grad.shape
    error = ((grad - ref_grad).norm() / ref_grad.norm()).item()
    assert error <= rtol, f"{name}: gradients differ by {error:.3g} (relative) from the reference's"


def check_autocast_policy(op, main, others: dict, cast_others: tuple, dtype: torch.dtype = torch.bfloat16,
                          uses_dot: bool = False, **kwargs):
    """``op(main, **others, **kwargs)`` under CPU autocast in ``dtype`` with ``main`` in ``dtype``
    and ``others`` in float32, on every CPU backend: the compiled kernels compute and return
    float32, Triton and the reference ``dtype`` (``cast_others`` follow ``main``, the rest stay
    float32); the result matches the float64 reference of the inputs as cast, and every gradient
    comes back in its input's dtype.  Outside autocast the mixed dtypes raise (nothing is cast).
    ``uses_dot``: the op's Triton kernels use ``tl.dot``, which Triton's interpreter computes wrong
    for bfloat16 (it multiplies the raw bits: triton-lang/triton#11584), so that case is skipped
    on CPU tensors; tools/triton_aot.py compiles it for the GPU."""
    reduced = main.to(dtype)
    for backend in ("cpu", "triton", "reference"):
        if backend == "cpu" and not has_ops() or backend == "triton" and not triton_available(main.device):
            continue
        if backend == "triton" and uses_dot and dtype == torch.bfloat16 and main.device.type == "cpu":
            continue
        compute = torch.float32 if backend == "cpu" else dtype
        leaf = reduced.clone().requires_grad_()
        leaves = {name: value.clone().requires_grad_(value.is_floating_point())
                  if isinstance(value, torch.Tensor) else value for name, value in others.items()}
        with torch.autocast("cpu", dtype=dtype):
            out = op(leaf, **leaves, **kwargs, backend=backend)
        assert out.dtype == compute, (backend, out.dtype)
        as_cast = {name: value.to(compute).double() if name in cast_others else value
                   for name, value in others.items()}
        expected = op(reduced.double(), **as_cast, **kwargs, backend="reference")
        torch.testing.assert_close(out.double(), expected, **tolerances(dtype))
        out.float().square().sum().backward()
        assert leaf.grad is not None and leaf.grad.dtype == dtype, backend
        for name, value in leaves.items():
            if isinstance(value, torch.Tensor) and value.grad is not None:
                assert value.grad.dtype == others[name].dtype, (backend, name)
    if cast_others:
        with pytest.raises(ValueError, match="dtype"):
            op(reduced, **others, **kwargs)

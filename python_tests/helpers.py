"""What several test modules share: the devices and fused backends to test, tolerances per dtype,
for the model tests, one intra-op thread, synthetic clips and one optimisation step, and the
strategy and checks of the property-based file-parser tests."""
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from keypointops._extension import has_cuda_ops, has_ops
from keypointops._opdefs.backend import triton_available
from keypointops.engine import AMP_DTYPES, forward_backward
from keypointops.graphs import SKELETONS
from keypointops.models import build_model, get_preset

# bench/ goes last on the path: its test_<op>.py modules must not shadow these.
sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))
from interleave import interleaved  # noqa: E402  (bench/interleave.py, the benchmarks' rounds)

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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread (two spin-wait at every parallel region on a busy 2-core
    machine, where a thread the OS has descheduled stalls the other).  The model test modules
    import this fixture."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def without_run_plots(monkeypatch):
    """``keypointops train`` and ``evaluate`` without their PNG plots (matplotlib's drawing of the
    ranking grid takes longer than a tiny run), for tests of other things: test_cli.py's train and
    evaluate runs check the plots."""
    from keypointops import plots

    for name in ("plot_curves", "plot_cmc", "plot_ranking"):
        monkeypatch.setattr(plots, name, lambda *args, **kwargs: None)


def upright_keypoints(height: int, width: int) -> torch.Tensor:
    """COCO-17 keypoints ``[17, 3]`` of a person standing upright, facing the camera, filling an
    ``H x W`` frame (the person's right side on the image's left)."""
    cx = width / 2
    rows = {"nose": 0.08, "left_eye": 0.06, "right_eye": 0.06, "left_ear": 0.07, "right_ear": 0.07,
            "left_shoulder": 0.2, "right_shoulder": 0.2, "left_elbow": 0.35, "right_elbow": 0.35,
            "left_wrist": 0.48, "right_wrist": 0.48, "left_hip": 0.52, "right_hip": 0.52,
            "left_knee": 0.72, "right_knee": 0.72, "left_ankle": 0.92, "right_ankle": 0.92}
    spread = {"nose": 0, "eye": 0.04, "ear": 0.08, "shoulder": 0.2, "elbow": 0.25, "wrist": 0.27,
              "hip": 0.12, "knee": 0.12, "ankle": 0.12}
    points = []
    for name in SKELETONS["coco17"].joints:
        side, _, part = name.partition("_")
        dx = 0.0 if name == "nose" else spread[part] * width * (1 if side == "left" else -1)
        points.append([cx + dx, rows[name] * height, 1.0])
    return torch.tensor(points)


def clips(batch=4, frames=2, height=64, width=32, seed=0, dtype=torch.float32):
    """Random images and jittered upright-person COCO-17 keypoints (some joints missing), shaped
    like the data loader's batches; 2 clips per identity.  Shared by the model tests."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, frames, 3, height, width, generator=g, dtype=dtype)
    keypoints = upright_keypoints(height, width).to(dtype).repeat(batch, frames, 1, 1)
    keypoints[..., :2] += torch.randn(batch, frames, 17, 2, generator=g, dtype=dtype) * 2
    keypoints[..., 2] = (torch.rand(batch, frames, 17, generator=g, dtype=dtype) > 0.15).to(dtype)
    pids = torch.arange(batch // 2).repeat_interleave(2)
    return images, keypoints, pids


# ----------------------------------------------------------------------------------------- file fuzzing

#: Examples per property-based file-parser test: a modest count in CI, more with
#: ``KEYPOINTOPS_FUZZ_EXAMPLES`` (e.g. 1000 for a thorough run).
FUZZ_EXAMPLES = int(os.environ.get("KEYPOINTOPS_FUZZ_EXAMPLES", "100"))

# Tokens that parsers of numbers and structure trip on: huge and special numbers, deep nesting,
# brackets, quotes, other encodings.
_FUZZ_TOKENS = [b"1" + b"0" * 400, b"[1" + b"0" * 400 + b", 2, 1], ", b" -1" + b"0" * 400 + b",", b"1e400", b"-1e400", b"nan", b"NaN", b"inf", b"-inf", b"Infinity", b"[" * 2000,
                b"{" * 2000, b"[]", b"{}", b"null", b"true", b"\"", b"\"people\"", b"\"pose_keypoints_2d\"",
                b"(", b")", b",", b"\x00", b"\xff\xfe", "\u00e9".encode(), b"\n", b"-1", b"0", b"9" * 30,
                b"1e-400", b"[[1, 2, 3]]", b"PK\x03\x04", b"\x93NUMPY", b"MATLAB 5.0"]


def mutated_bytes(valid: bytes):
    """A hypothesis strategy of byte strings: random bytes, or ``valid`` with a few random edits
    (byte overwrites, insertions of random bytes or of the tokens above, a number replaced by a
    token, deletions, truncation, duplicated slices)."""
    from hypothesis import strategies as st

    @st.composite
    def mutate(draw):
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 6))):
            kind = draw(st.sampled_from(["set", "insert", "token", "number", "delete", "truncate", "duplicate"]))
            at = draw(st.integers(0, len(data)))
            numbers = list(re.finditer(rb"-?\d+(\.\d+)?", bytes(data))) if kind == "number" else []
            if numbers:  # a number of a text file replaced by a token
                number = numbers[draw(st.integers(0, len(numbers) - 1))]
                data[number.start():number.end()] = draw(st.sampled_from(_FUZZ_TOKENS))
            elif kind == "set" and data:
                data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
            elif kind == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=16))
            elif kind == "token":
                data[at:at] = draw(st.sampled_from(_FUZZ_TOKENS))
            elif kind == "delete":
                del data[at:at + draw(st.integers(1, 64))]
            elif kind == "truncate":
                del data[at:]
            elif kind == "duplicate":
                data[at:at] = data[at:at + draw(st.integers(1, 256))]
        return bytes(data)

    return st.one_of(st.binary(max_size=2048), mutate())


def fuzz_settings():
    """The hypothesis settings of the file-parser fuzz tests (no deadline: the machine is shared)."""
    from hypothesis import HealthCheck, settings

    return settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def assert_own_error(err: BaseException, path) -> None:
    """A parser's error for a damaged file: a one-line ValueError that names the file."""
    assert type(err) is ValueError, f"{type(err).__name__}: {err}"
    message = str(err)
    assert "\n" not in message and str(path) in message, message


# Relative tolerance of a whole training step under autocast, fused ops against the reference
# (the loss, and the gradient of all parameters as one vector, by norm).  Both compute in the
# autocast dtype but round differently (summation order, where a sum is rounded), so they differ by
# some units of that dtype's precision (2^-8 for bfloat16, 2^-11 for float16) amplified through the
# backbone.  The bound is a fraction of the autocast dtype's own error, the difference between
# either backend's step and the float32 step (figures in docs/benchmarks.md).
AUTOCAST_STEP_RTOL = {torch.bfloat16: 0.1, torch.float16: 0.05}

#: The (device, dtype) cases of every model's autocast training-step test.
AUTOCAST_STEP_CASES = [pytest.param(device, dtype, id=f"{device}-{tag}") for device in DEVICES
                       for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"))]


def autocast_training_step(name: str, backend: str, dtype: torch.dtype, device: str = "cpu"):
    """One training step of model ``name`` (its cpu preset at width 0.125) on ``device`` under
    autocast in ``dtype``, as the engine runs it (:func:`keypointops.engine.forward_backward`: forward
    and loss under autocast, backward), then an SGD step, with its fused ops on ``backend``.  No loss
    scaling: the gradients compared are the true ones (the engine's float16 GradScaler multiplies
    the loss and divides the gradients by the same power of two).  Asserts that the gradients are
    finite and that the step changed the parameters; returns (loss, gradient of all parameters as
    one vector)."""
    options = dict(get_preset(name, "cpu")["model"], width=0.125)
    torch.manual_seed(0)
    model = build_model(name, 5, **options, ops_backend=backend).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images, keypoints, pids = clips(frames=options.get("frames", 2))
    batch = {"images": images, "keypoints": keypoints, "pids": pids}
    amp = next(mode for mode, amp_dtype in AMP_DTYPES.items() if amp_dtype == dtype)
    torch.manual_seed(1)
    total, _ = forward_backward(model, model, batch, torch.device(device), amp)
    params = [p for p in model.parameters() if p.grad is not None]
    assert all(p.grad.dtype == p.dtype == torch.float32 for p in params)
    grad = torch.cat([p.grad.flatten() for p in params])
    assert torch.isfinite(grad).all(), f"{name}: non-finite gradients under {dtype} autocast ({backend})"
    before = [p.detach().clone() for p in params]
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    return total.detach().float(), grad


def assert_autocast_step_matches_reference(name: str, dtype: torch.dtype, device: str = "cpu"):
    """The autocast training step with the fused ops (the device's compiled kernels) agrees with
    the one with the reference ops, within :data:`AUTOCAST_STEP_RTOL`."""
    loss, grad = autocast_training_step(name, "auto", dtype, device)
    ref_loss, ref_grad = autocast_training_step(name, "reference", dtype, device)
    rtol = AUTOCAST_STEP_RTOL[dtype]
    assert torch.isfinite(loss) and abs(loss - ref_loss) <= rtol * abs(ref_loss), (loss, ref_loss)
    assert grad.shape == ref_grad.shape
    error = ((grad - ref_grad).norm() / ref_grad.norm()).item()
    assert error <= rtol, f"{name}: gradients differ by {error:.3g} (relative) from the reference's"


def check_autocast_policy(op, main, others: dict, cast_others: tuple, dtype: torch.dtype = torch.bfloat16,
                          uses_dot: bool = False, **kwargs):
    """``op(main, **others, **kwargs)`` under CPU autocast in ``dtype`` with ``main`` in ``dtype``
    and ``others`` in float32, on every CPU backend: each computes in and returns ``dtype``
    (``cast_others`` follow ``main``, the rest stay float32); the result matches the float64 reference of the inputs as cast, and every gradient
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
        compute = dtype
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


def gradient_errors(function, inputs, grad_out):
    """Max abs error per input of ``function``'s float32 gradients against its float64 gradients
    (``inputs`` float64, one ``grad_out``)."""
    def grads(dtype):
        typed = [i.to(dtype).requires_grad_() for i in inputs]
        return torch.autograd.grad(function(*typed), typed, grad_out.to(dtype))
    return [float((g.double() - e).abs().max()) for g, e in zip(grads(torch.float32), grads(torch.float64))]


def best_cpu_times(fns, rounds: int = 9):
    """For timing comparisons (e.g. of dtypes) on a shared machine: on one intra-op thread, a warm-up
    call of each of ``fns``, then ``rounds`` interleaved rounds calling each once, timed in CPU time of
    the process (``time.process_time``: not the time other jobs hold the core).  Returns the least
    time of each fn and every round's times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = interleaved(dict(enumerate(fns)), rounds, time.process_time)
    finally:
        torch.set_num_threads(threads)
    return [min(column) for column in times.values()], list(zip(*times.values()))

"""part_pool: every fused backend against the reference, gradients, registration, bad input, the
part groupings and the PartPool module."""
import pytest
import torch

import keypointops
from keypointops import parts, reference
from keypointops.nn import PartPool

from helpers import best_cpu_times, check_autocast_policy, device_backend_params, gradient_errors, tolerances



def random_groups(parts, joints):
    """A builder of a random [parts, joints] grouping (non-negative weights, not normalised)."""
    return lambda gen, dtype: torch.rand(parts, joints, generator=gen, dtype=dtype)


# name -> (joints J, groups builder or None for the identity)
CASES = {
    "identity": (5, None),                      # P = J = 5
    "fewer_parts": (7, random_groups(3, 7)),    # P = 3 < J
    "single_part": (4, random_groups(1, 4)),    # P = 1
}
GRAD_TOLERANCES = {torch.float64: dict(rtol=1e-8, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def make_inputs(joints, make_groups, *, batch=2, channels=13, height=5, width=7, dtype=torch.float64,
                device="cpu", seed=0, channels_last=False, scale=1.0, offset=0.0):
    """Odd sizes; features contiguous or channels_last; every input requires grad."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, channels, height, width, generator=gen, dtype=dtype)
    if channels_last:
        features = features.to(memory_format=torch.channels_last)
    heatmaps = torch.randn(batch, joints, height, width, generator=gen, dtype=dtype) * scale + offset
    groups = None if make_groups is None else make_groups(gen, dtype).to(device).requires_grad_()
    return features.to(device).requires_grad_(), heatmaps.to(device).requires_grad_(), groups


def check_against_reference(features, heatmaps, groups, temperature, backend, fwd_tol, grad_tol):
    inputs = [t for t in (features, heatmaps, groups) if t is not None]
    out = keypointops.part_pool(features, heatmaps, groups, temperature=temperature, backend=backend)
    expected = reference.part_pool(features, heatmaps, groups, temperature)
    assert out.shape == expected.shape and out.dtype == features.dtype
    torch.testing.assert_close(out, expected, **fwd_tol)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(99), dtype=out.dtype)
    got = torch.autograd.grad(out, inputs, grad.to(out.device))
    want = torch.autograd.grad(expected, inputs, grad.to(out.device))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **grad_tol)
    return out, got


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("temperature", [0.1, 1.0, 10.0])
def test_matches_reference(device, backend, dtype, case, temperature):
    joints, make_groups = CASES[case]
    features, heatmaps, groups = make_inputs(joints, make_groups, dtype=dtype, device=device)
    check_against_reference(features, heatmaps, groups, temperature, backend, tolerances(dtype),
                            GRAD_TOLERANCES[dtype])


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["identity", "fewer_parts"])
def test_channels_last_features(device, backend, dtype, case):
    joints, make_groups = CASES[case]
    features, heatmaps, groups = make_inputs(joints, make_groups, dtype=dtype, device=device,
                                             channels_last=True, channels=17, height=4, width=6)
    _, grads = check_against_reference(features, heatmaps, groups, 0.5, backend, tolerances(dtype),
                                       GRAD_TOLERANCES[dtype])
    assert grads[0].is_contiguous(memory_format=torch.channels_last)  # the layout autograd expects


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous_inputs(device, backend, dtype):
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(2, 22, 5, 3, generator=gen, dtype=dtype).to(device)[:, ::2]  # C stride 2*H*W
    heatmaps = torch.randn(2, 5, 3, 5, generator=gen, dtype=dtype).to(device).transpose(2, 3)
    groups = torch.rand(4, 10, generator=gen, dtype=dtype).to(device)[:, ::2]
    for tensor in (features, heatmaps, groups):
        tensor.requires_grad_()
    check_against_reference(features, heatmaps, groups, 0.8, backend, tolerances(dtype),
                            GRAD_TOLERANCES[dtype])


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["identity", "fewer_parts"])
def test_large_heatmaps_do_not_overflow(device, backend, dtype, case):
    """Heatmaps around 1e3 (exp overflows float32 beyond ~88 and float64 beyond ~709): the
    max-shifted softmax stays finite and right.  Compared with the float64 reference of the same
    inputs, to the precision a float32 logit of ~1e3 holds (~6e-5); the groups gradient is a sum of
    heatmap values of ~1e3 whose offset cancels, so it is compared relative to that offset."""
    joints, make_groups = CASES[case]
    features, heatmaps, groups = make_inputs(joints, make_groups, dtype=dtype, device=device,
                                             scale=3.0, offset=1e3)
    inputs = [t for t in (features, heatmaps, groups) if t is not None]
    out = keypointops.part_pool(features, heatmaps, groups, backend=backend)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    expected = reference.part_pool(*exact)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(out, inputs, grad.to(out.device, out.dtype))
    want = torch.autograd.grad(expected, exact, grad.to(out.device))
    tol = tolerances(dtype) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in got)
    torch.testing.assert_close(out.double(), expected, **tol)
    for g, w in zip(got[:2], want[:2]):
        torch.testing.assert_close(g.double(), w, **tol)
    if groups is not None:
        torch.testing.assert_close(got[2].double(), want[2], rtol=0, atol=1e3 * tol["atol"])


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_alignnet_grouping(device, backend):
    groups = parts.part_groups("alignnet", dtype=torch.float64, device=device).requires_grad_()
    features, heatmaps, _ = make_inputs(57, None, channels=9, height=6, width=4, device=device)
    check_against_reference(features, heatmaps, groups, 1.0, backend, tolerances(torch.float64),
                            GRAD_TOLERANCES[torch.float64])


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_reduced_precision(device, backend, dtype, channels_last, case):
    """float16 / bfloat16 inputs, float32 accumulation: out within :func:`tolerances` of the dtype
    (bfloat16: 2e-2, float16: 1e-2) of the float32 reference of the same values, the gradients
    (rounded once to the dtype, as the reference's float32 ones are not) within 5e-2."""
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes tl.dot wrong for bfloat16 (triton-lang/triton#11584)")
    joints, make_groups = CASES[case]
    features, heatmaps, groups = make_inputs(joints, make_groups, channels=70, height=9, width=5,
                                             dtype=torch.float32, device=device,
                                             channels_last=channels_last)
    low = [t.detach().to(dtype).requires_grad_() for t in (features, heatmaps, groups) if t is not None]
    exact = [t.detach().float().requires_grad_() for t in low]  # the same values in float32
    out = keypointops.part_pool(*low, temperature=0.5, backend=backend)
    expected = reference.part_pool(*exact, temperature=0.5)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, **tolerances(dtype))
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, low, grad.to(dtype))
    want = torch.autograd.grad(expected, exact, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("parts_count", [8, 17, 27])
def test_many_parts_many_channels(device, backend, parts_count):
    """Parts that fill whole vectors and a remainder (8: one vector, 17: two and 1, 27: three and 3
    with AVX2), channels over several blocks of outputs (200: two of 96 and 8) and an odd map: float32
    against the reference; in the compiled CPU kernel each 16-bit dtype gives exactly its float32 result
    of the same values rounded once (the same float32 sums: 16-bit elements are widened exactly, however
    they are read)."""
    features, heatmaps, _ = make_inputs(parts_count, None, channels=200, height=9, width=5,
                                        dtype=torch.float32, device=device)
    features, heatmaps = features.detach(), heatmaps.detach()
    out = keypointops.part_pool(features, heatmaps, temperature=0.5, backend=backend)
    torch.testing.assert_close(out, reference.part_pool(features, heatmaps, None, 0.5), **tolerances(torch.float32))
    if backend != "cpu":
        return
    for dtype in (torch.bfloat16, torch.float16):
        low = [features.to(dtype), heatmaps.to(dtype)]
        out = keypointops.part_pool(*low, temperature=0.5, backend=backend)
        same_values = keypointops.part_pool(*(t.float() for t in low), temperature=0.5, backend=backend)
        assert torch.equal(out, same_values.to(dtype)), dtype


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("needs", ["features", "heatmaps", "groups"])
def test_gradient_of_one_input(device, backend, needs):
    """Backward computes only what is asked for; each gradient alone still matches the reference."""
    features, heatmaps, groups = make_inputs(6, random_groups(2, 6), device=device)
    inputs = {"features": features, "heatmaps": heatmaps, "groups": groups}
    for name, tensor in inputs.items():
        tensor.requires_grad_(name == needs)
    out = keypointops.part_pool(features, heatmaps, groups, temperature=0.6, backend=backend)
    expected = reference.part_pool(features, heatmaps, groups, 0.6)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, inputs[needs], grad)
    (want,) = torch.autograd.grad(expected, inputs[needs], grad)
    torch.testing.assert_close(got, want, **GRAD_TOLERANCES[torch.float64])


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_gradcheck(device, backend):
    gen = torch.Generator().manual_seed(5)
    features = torch.randn(2, 3, 3, 2, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    heatmaps = torch.randn(2, 3, 3, 2, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    groups = torch.rand(2, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    # The interpreter runs every op of every program in Python: there the randomised (fast) mode;
    # the Triton gradients are also checked entry by entry against the reference
    # (test_matches_reference, float64).
    fast = backend == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(
        lambda f, h, g: keypointops.part_pool(f, h, g, temperature=0.7, backend=backend),
        (features, heatmaps, groups), fast_mode=fast)
    assert torch.autograd.gradcheck(
        lambda f, h: keypointops.part_pool(f, h, temperature=1.3, backend=backend),
        (features, heatmaps), fast_mode=fast)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_backward_is_deterministic(device, backend):
    features, heatmaps, groups = make_inputs(9, random_groups(4, 9), batch=6, channels=40, height=8, width=9,
                                             dtype=torch.float32, device=device)
    out = keypointops.part_pool(features, heatmaps, groups, backend=backend)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, (features, heatmaps, groups), grad, retain_graph=True)
    second = torch.autograd.grad(out, (features, heatmaps, groups), grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_empty_batch_and_channels(device, backend, dtype):
    for batch, channels in ((0, 4), (2, 0)):
        features = torch.randn(batch, channels, 3, 2, device=device, dtype=dtype, requires_grad=True)
        heatmaps = torch.randn(batch, 3, 3, 2, device=device, dtype=dtype, requires_grad=True)
        out = keypointops.part_pool(features, heatmaps, backend=backend)
        assert out.shape == (batch, 3, channels)
        out.sum().backward()
        assert features.grad.shape == features.shape and heatmaps.grad.shape == heatmaps.shape
        assert (heatmaps.grad == 0).all()


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("parts,joints,batch", [(3, 0, 2), (0, 5, 2), (3, 5, 0), (0, 0, 2)],
                         ids=["no_joints", "no_parts", "no_images", "neither"])
def test_zero_sized_groups(device, backend, parts, joints, batch):
    """groups [P, J] with P or J = 0 (no joints: every part's logits are 0, so the softmax is uniform
    and out is the feature mean) and an empty batch: the reference's result and gradients."""
    gen = torch.Generator().manual_seed(8)
    features = torch.randn(batch, 6, 8, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    heatmaps = torch.randn(batch, joints, 8, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    groups = torch.rand(parts, joints, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    out = keypointops.part_pool(features, heatmaps, groups, backend=backend)
    expected = reference.part_pool(features, heatmaps, groups)
    torch.testing.assert_close(out, expected, **tolerances(torch.float64))
    if joints == 0 and batch:
        torch.testing.assert_close(out, features.mean((2, 3))[:, None].expand(batch, parts, 6))
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device)
    got = torch.autograd.grad(out, (features, heatmaps, groups), grad, allow_unused=True)
    want = torch.autograd.grad(expected, (features, heatmaps, groups), grad, allow_unused=True)
    for g, w, x in zip(got, want, (features, heatmaps, groups)):
        torch.testing.assert_close(g, torch.zeros_like(x) if w is None else w, **tolerances(torch.float64))


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("scale,temperature", [(1.0, 100.0), (1.0, 1.0), (1.0, 0.01), (50.0, 0.05)],
                         ids=["flat", "moderate", "sharp", "saturated"])
def test_float32_gradients_as_accurate_as_autograd(device, backend, scale, temperature):
    """The float32 gradients err (against float64) at most twice as much as plain autograd's float32
    gradients of the reference.  At a saturated softmax both are ~0: the two terms of the softmax
    backward at the dominant pixel must cancel exactly, not leave rounding noise / temperature."""
    gen = torch.Generator().manual_seed(12)
    features = torch.randn(2, 8, 8, 6, generator=gen, dtype=torch.float64).to(device)
    heatmaps = (scale * torch.randn(2, 5, 8, 6, generator=gen, dtype=torch.float64)).to(device)
    groups = torch.rand(3, 5, generator=gen, dtype=torch.float64).to(device)
    grad_out = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64).to(device)
    inputs = [features, heatmaps, groups]
    kernel = gradient_errors(lambda f, h, g: keypointops.part_pool(f, h, g, temperature=temperature,
                                                                   backend=backend), inputs, grad_out)
    autograd = gradient_errors(lambda f, h, g: reference.part_pool(f, h, g, temperature), inputs, grad_out)
    for name, k, a in zip(("features", "heatmaps", "groups"), kernel, autograd):
        assert k <= 2 * a, f"grad_{name}: error {k:.3g} vs autograd's {a:.3g}"


def _op_samples(device, dtype=torch.float64):
    gen = torch.Generator().manual_seed(7)
    features = torch.randn(2, 6, 3, 5, generator=gen, dtype=dtype).to(device).requires_grad_()
    heatmaps = torch.randn(2, 4, 3, 5, generator=gen, dtype=dtype).to(device).requires_grad_()
    groups = torch.rand(3, 4, generator=gen, dtype=dtype).to(device).requires_grad_()
    channels_last = features.detach().to(memory_format=torch.channels_last).requires_grad_()
    return [(features, heatmaps, None, 1.0), (features, heatmaps, groups, 0.5),
            (channels_last, heatmaps, groups, 2.0)]


def _forward_op(backend):
    if backend == "triton":
        from keypointops.triton import part_pool as triton_part_pool
        return triton_part_pool.part_pool_triton
    return torch.ops.keypointops.part_pool.default


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_opcheck(device, backend):
    for args in _op_samples(device):
        torch.library.opcheck(_forward_op(backend), args)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_torch_compile_fullgraph(device, backend):
    if backend == "triton" and device == "cpu":
        pytest.skip("torch.compile does not trace Triton kernels in the interpreter on CPU tensors")
    features, heatmaps, groups = make_inputs(5, random_groups(2, 5), dtype=torch.float32, device=device)

    def layer(f, h, g):
        return keypointops.part_pool(f.relu(), h, g, temperature=0.5, backend=backend).tanh().sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = compiled(features, heatmaps, groups)
    torch.testing.assert_close(got, layer(features, heatmaps, groups))
    grads = torch.autograd.grad(got, (features, heatmaps, groups))
    want = torch.autograd.grad(layer(features, heatmaps, groups), (features, heatmaps, groups))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


# --- bad input ----------------------------------------------------------------------------------

def test_bad_input_raises_naming_the_argument():
    f = torch.randn(2, 4, 5, 3)
    h = torch.randn(2, 6, 5, 3)
    with pytest.raises(ValueError, match="heatmaps spatial size \\[4, 3\\] differs from features"):
        keypointops.part_pool(f, torch.randn(2, 6, 4, 3))
    with pytest.raises(ValueError, match="heatmaps has 3 images but features has 2"):
        keypointops.part_pool(f, torch.randn(3, 6, 5, 3))
    with pytest.raises(ValueError, match=r"groups must be \[P, J\] = \[P, 6\]"):
        keypointops.part_pool(f, h, torch.rand(3, 5))
    with pytest.raises(ValueError, match=r"groups must be \[P, J\]"):
        keypointops.part_pool(f, h, torch.rand(6))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite float > 0"):
            keypointops.part_pool(f, h, temperature=bad)
    with pytest.raises(TypeError, match="temperature must be a float"):
        keypointops.part_pool(f, h, temperature=torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"features must be \[B, C, H, W\]"):
        keypointops.part_pool(torch.randn(4, 5, 3), h)
    with pytest.raises(ValueError, match=r"heatmaps must be \[B, J, H, W\]"):
        keypointops.part_pool(f, torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="heatmaps must have the dtype of features"):
        keypointops.part_pool(f, h.double())
    with pytest.raises(ValueError, match="groups must have the dtype of features"):
        keypointops.part_pool(f, h, torch.rand(2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="features must be float32"):
        keypointops.part_pool(f.long(), h.long())
    with pytest.raises(ValueError, match="H \\* W > 0"):
        keypointops.part_pool(torch.randn(2, 4, 0, 3), torch.randn(2, 6, 0, 3))
    with pytest.raises(TypeError, match="groups must be a Tensor or None"):
        keypointops.part_pool(f, h, [[0, 1]])
    with pytest.raises(ValueError, match="backend must be one of"):
        keypointops.part_pool(f, h, backend="gpu")


def test_device_mismatch_raises():
    other = "cuda" if torch.cuda.is_available() else "meta"
    f = torch.randn(2, 4, 5, 3)
    h = torch.randn(2, 6, 5, 3)
    with pytest.raises(ValueError, match=r"features \(cpu\) and heatmaps \(.*\) must be on the same"):
        keypointops.part_pool(f, h.to(other))
    with pytest.raises(ValueError, match=r"features \(cpu\) and groups \(.*\) must be on the same"):
        keypointops.part_pool(f, h, torch.rand(2, 6, device=other))


@pytest.mark.skipif(not keypointops.has_ops(), reason="keypointops._C not built")
def test_compiled_op_checks_its_arguments():
    """Called directly (no Python checks), the C++ op still refuses bad input with a clear error."""
    f = torch.randn(2, 4, 5, 3)
    h = torch.randn(2, 6, 5, 3)
    op = torch.ops.keypointops.part_pool
    with pytest.raises(RuntimeError, match="heatmaps .* must match the batch and spatial sizes"):
        op(f, torch.randn(2, 6, 5, 4), None, 1.0)
    with pytest.raises(RuntimeError, match=r"groups must be \[P, J\] = \[P, 6\]"):
        op(f, h, torch.rand(2, 5), 1.0)
    with pytest.raises(RuntimeError, match="temperature must be a finite number > 0"):
        op(f, h, None, 0.0)
    out = op(f, h, None, 1.0)
    with pytest.raises(RuntimeError, match="grad_out must be"):
        torch.ops.keypointops.part_pool_backward(out[:, :2], f, h, None, 1.0, [True, True, False])
    with pytest.raises(RuntimeError, match="grad_out must be"):
        torch.ops.keypointops.part_pool_backward(out.double(), f, h, None, 1.0, [True, True, False])


# --- the module ----------------------------------------------------------------------------------

def test_part_pool_module():
    gen = torch.Generator().manual_seed(11)
    features = torch.randn(2, 6, 8, 4, generator=gen)
    heatmaps = torch.randn(2, 57, 16, 8, generator=gen)
    pool = PartPool("alignnet", temperature=0.5, resize_heatmaps=True)
    resized = torch.nn.functional.interpolate(heatmaps, size=(8, 4), mode="bilinear", align_corners=False)
    expected = reference.part_pool(features, resized, parts.part_groups("alignnet"), 0.5)
    torch.testing.assert_close(pool(features, heatmaps), expected)
    assert "groups" in dict(pool.named_buffers()) and pool.num_parts == 3
    with pytest.raises(ValueError, match="spatial size"):
        PartPool("alignnet")(features, heatmaps)
    learned = PartPool([[0, 1], [2]], 3, learn_groups=True)
    learned(features, heatmaps[:, :3, :8, :4]).sum().backward()
    assert learned.groups.grad is not None and learned.groups.grad.shape == (2, 3)
    identity = PartPool()
    torch.testing.assert_close(identity(features, heatmaps[:, :5, :8, :4]),
                               reference.part_pool(features, heatmaps[:, :5, :8, :4]))
    with pytest.raises(ValueError, match="learn_groups needs a grouping"):
        PartPool(learn_groups=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_policy(dtype):
    """Under autocast heatmaps and groups follow reduced-precision features."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 4, 5, generator=g)
    others = dict(heatmaps=torch.randn(2, 4, 4, 5, generator=g), groups=torch.rand(3, 4, generator=g))
    check_autocast_policy(keypointops.part_pool, features, others, ("heatmaps", "groups"), temperature=0.7,
                          dtype=dtype, uses_dot=True)


@pytest.mark.skipif(not keypointops.has_ops() or keypointops.cpu_capability() == "default",
                    reason="needs the CPU kernels' AVX2 or AVX512 build (16-bit loads and stores vectorised)")
def test_cpu_bfloat16_forward_is_not_slower_than_float32():
    """CTL's pooling (17 parts, one per keypoint heatmap; 2048 channels, a 16 x 8 map; 48 images, the
    features larger than the last-level cache), NCHW, takes no more CPU time in bfloat16 than in float32,
    up to a margin for timing noise (one thread, CPU time, the best of 9 interleaved rounds).  The
    weighted sum is bound by its FMAs, so a 16-bit forward that widens the features into a buffer
    before broadcasting them (a vector store per 8 elements) is slower than float32; broadcasting them
    in place it is faster.  The margin, 1.2 as for the other ops' such tests, is set by the noise of a
    shared 2-core VM: the test catches the larger regressions (accumulators kept in memory, a second
    widening pass), not the few per cent of one widening pass."""
    gen = torch.Generator().manual_seed(0)
    features32 = torch.randn(48, 2048, 16, 8, generator=gen)
    heatmaps32 = torch.randn(48, 17, 16, 8, generator=gen)

    def forward(dtype):
        features, heatmaps = features32.to(dtype), heatmaps32.to(dtype)
        return lambda: keypointops.part_pool(features, heatmaps, backend="cpu")

    (float32_time, bfloat16_time), rounds = best_cpu_times([forward(torch.float32), forward(torch.bfloat16)])
    assert bfloat16_time < 1.2 * float32_time, rounds


def test_reference_backend_accumulates_in_float32_under_autocast():
    """Under bfloat16 autocast the reference backend computes on the inputs cast to bfloat16 with
    float32 softmax weights and accumulation, as the kernels: autocast must not cast its float32
    einsum back down (bit-equal to the reference run on the cast inputs outside autocast)."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(3, 16, 4, 2, generator=g)
    heatmaps = torch.rand(3, 5, 4, 2, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = keypointops.part_pool(features.bfloat16(), heatmaps, temperature=0.1, backend="reference")
    want = reference.part_pool(features.bfloat16(), heatmaps.bfloat16(), temperature=0.1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, rtol=0, atol=0)

"""keypoint_gather: every fused backend against the reference (and torchvision when installed),
gradients, layouts, registration, bad input; the KeypointGather module."""
import pytest
import torch

import keypointops
from keypointops import reference
from keypointops.nn import KeypointGather

from helpers import DEVICES, check_autocast_policy, device_backend_params, tolerances

STRIDE = 2  # input pixels per feature pixel in most tests: spatial_scale 0.5


def make_features(shape, dtype, device, gen, channels_last=False):
    features = torch.randn(shape, generator=gen, dtype=dtype).to(device)
    return features.to(memory_format=torch.channels_last) if channels_last else features


def make_keypoints(batch, num_keypoints, height, width, dtype, device, gen, *, stride=STRIDE, dims=2):
    """Keypoints in input pixels: random ones in and around the map, plus fixed ones on its
    corners and borders, just outside (in [-1, 0) feature pixels) and far outside."""
    x = torch.rand(batch, num_keypoints, generator=gen, dtype=torch.float64) * (width + 4) - 2
    y = torch.rand(batch, num_keypoints, generator=gen, dtype=torch.float64) * (height + 4) - 2
    # Feature pixels; aligned point samples sit 0.5 lower: (width - 0.5, -0.5) lands on y = -1 and
    # (width + 0.5, height + 0.5) on the far edges, exactly.
    special = torch.tensor([[0, 0], [width, height], [-0.75, height - 0.25], [width + 7, 2],
                            [1.5, -9], [width - 0.5, -0.5], [width + 0.5, height + 0.5]], dtype=torch.float64)
    assert num_keypoints >= len(special)
    x[:, :len(special)], y[:, :len(special)] = special[:, 0], special[:, 1]
    points = [x * stride, y * stride]
    if dims == 3:
        points.append(torch.rand(batch, num_keypoints, generator=gen, dtype=torch.float64) - 0.2)
    return torch.stack(points, -1).to(dtype).to(device)


def make_valid(batch, num_keypoints, device, gen):
    valid = torch.rand(batch, num_keypoints, generator=gen) > 0.2
    valid[:, 0] = True
    valid[0, -1] = False
    return valid.to(device)


def gather(features, keypoints, backend, **kwargs):
    return keypointops.keypoint_gather(features, keypoints, 1 / STRIDE, backend=backend, **kwargs)


ROI_SIZES = [0.0, 1.0, 5.3, 29.0]  # 29 input pixels = 14.5 feature pixels, larger than the map


@pytest.mark.parametrize("device,backend", device_backend_params("keypoint_gather"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2, 3])
@pytest.mark.parametrize("aligned", [True, False])
def test_matches_reference(device, backend, dtype, sampling_ratio, aligned):
    gen = torch.Generator().manual_seed(sampling_ratio + 10 * aligned)
    features = make_features((2, 3, 7, 5), dtype, device, gen)
    keypoints = make_keypoints(2, 9, 7, 5, dtype, device, gen)
    valid = make_valid(2, 9, device, gen)
    for roi_size in ROI_SIZES:
        kwargs = dict(roi_size=roi_size, sampling_ratio=sampling_ratio, aligned=aligned, valid=valid)
        out = gather(features, keypoints, backend, **kwargs)
        expected = reference.keypoint_gather(features, keypoints, 1 / STRIDE, **kwargs)
        assert out.shape == (2, 9, 3) and out.dtype == dtype
        torch.testing.assert_close(out, expected, **tolerances(dtype))
        assert (out[~valid] == 0).all()


def test_reference_follows_torchvision_rules():
    """Hand-computed values of the reference: bilinear interpolation, border clamping, the zero
    beyond [-1, size], the mean over the grid, and the empty adaptive grid of an aligned point."""
    features = torch.arange(12, dtype=torch.float64).reshape(1, 1, 3, 4)  # value = 4 * row + col
    def at(x, y, **kwargs):
        keypoints = torch.tensor([[[x, y]]], dtype=torch.float64)
        return reference.keypoint_gather(features, keypoints, 1.0, **kwargs).item()
    point = dict(roi_size=0.0, sampling_ratio=1, aligned=True)    # one sample at (x - 0.5, y - 0.5)
    assert at(1.75, 1.0, **point) == pytest.approx(0.5 * 4 + 1.25)
    assert at(3.5 + 0.5, 1.5 + 0.5, **point) == pytest.approx(0.5 * 7 + 0.5 * 11)  # last column
    assert at(0.0, 1.5, **point) == 4.0 and at(-0.5, 1.5, **point) == 4.0  # [-1, 0) clamps to 0
    assert at(-0.51, 1.5, **point) == 0.0 and at(4.51, 1.5, **point) == 0.0  # beyond [-1, size]
    assert at(4.5, 1.5, **point) == 7.0 and at(1.5, 3.5, **point) == 9.0
    # Not aligned, the box is at least one pixel wide: [x, x + 1], one sample at x + 0.5.
    assert at(1.25, 0.5, roi_size=0.0, sampling_ratio=1, aligned=False) == pytest.approx(4 + 1.75)
    # A 2 x 2 box at (1, 1), not aligned: samples at 0.5 and 1.5 on both axes, averaged.
    assert at(1.0, 1.0, roi_size=2.0, sampling_ratio=2, aligned=False) == pytest.approx(4 + 1)
    assert at(1.0, 1.0, roi_size=0.0, sampling_ratio=-1, aligned=True) == 0.0


@pytest.mark.parametrize("device,backend", device_backend_params("keypoint_gather"))
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts_and_non_contiguous_keypoints(device, backend, layout):
    gen = torch.Generator().manual_seed(3)
    features = make_features((2, 6, 7, 5), torch.float64, device, gen, channels_last=layout == "channels_last")
    if layout == "strided":
        features = features[:, ::2]                                   # [2, 3, 7, 5], channel stride 70
    keypoints = make_keypoints(2, 8, 7, 5, torch.float64, device, gen, dims=3).transpose(0, 1)
    keypoints = keypoints.contiguous().transpose(0, 1)                # [2, 8, 3], not contiguous
    assert not keypoints.is_contiguous()
    features = features.detach().requires_grad_()
    out = gather(features, keypoints, backend, sampling_ratio=-1, roi_size=5.3)
    expected = reference.keypoint_gather(features, keypoints, 1 / STRIDE, sampling_ratio=-1, roi_size=5.3)
    torch.testing.assert_close(out, expected, **tolerances(torch.float64))
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device)
    got, = torch.autograd.grad(out, features, grad)
    want, = torch.autograd.grad(expected, features, grad)
    torch.testing.assert_close(got, want, **tolerances(torch.float64))
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device,backend", device_backend_params("keypoint_gather"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_match_reference(device, backend, dtype, channels_last):
    gen = torch.Generator().manual_seed(4)
    # One image and 130 channels: the CPU kernel splits the channels into blocks, CUDA into tiles.
    features = make_features((1, 130, 7, 5), dtype, device, gen, channels_last).requires_grad_()
    keypoints = make_keypoints(1, 9, 7, 5, dtype, device, gen)
    valid = make_valid(1, 9, device, gen)
    grad = torch.randn(1, 9, 130, generator=gen, dtype=dtype).to(device)
    for roi_size, sampling_ratio in [(1.0, 2), (29.0, -1), (0.0, 3)]:
        kwargs = dict(roi_size=roi_size, sampling_ratio=sampling_ratio, valid=valid)
        out = gather(features, keypoints, backend, **kwargs)
        got, = torch.autograd.grad(out, features, grad)
        want, = torch.autograd.grad(reference.keypoint_gather(features, keypoints, 1 / STRIDE, **kwargs),
                                    features, grad)
        torch.testing.assert_close(out, reference.keypoint_gather(features, keypoints, 1 / STRIDE, **kwargs),
                                   **tolerances(dtype))
        torch.testing.assert_close(got, want, **tolerances(dtype))


@pytest.mark.parametrize("device,backend", device_backend_params("keypoint_gather"))
def test_gradcheck(device, backend):
    gen = torch.Generator().manual_seed(5)
    features = make_features((2, 3, 5, 4), torch.float64, device, gen).requires_grad_()
    keypoints = make_keypoints(2, 7, 5, 4, torch.float64, device, gen)
    valid = make_valid(2, 7, device, gen)
    fast = backend == "triton" and device == "cpu"  # the interpreter is slow: one random direction
    for kwargs in [dict(), dict(roi_size=7.0, sampling_ratio=-1, aligned=False, valid=valid)]:
        assert torch.autograd.gradcheck(lambda f: gather(f, keypoints, backend, **kwargs), (features,),
                                        fast_mode=fast)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf, interpreted
@pytest.mark.parametrize("device,backend", device_backend_params("keypoint_gather"))
def test_invalid_keypoints_give_zeros_and_no_gradient(device, backend):
    gen = torch.Generator().manual_seed(6)
    features = make_features((2, 4, 7, 5), torch.float64, device, gen).requires_grad_()
    keypoints = make_keypoints(2, 7, 7, 5, torch.float64, device, gen, dims=3)
    keypoints[0, 2] = float("nan")            # a missing keypoint: NaN coordinates, invalid
    keypoints[0, 2, 2] = -1.0
    keypoints[1, 3, :2] = float("inf")        # non-finite but marked valid: zeros as well
    keypoints[1, 3, 2] = 1.0
    out = gather(features, keypoints, backend, roi_size=3.0)
    valid = keypoints[..., 2] > 0
    assert torch.isfinite(out).all()
    assert (out[~valid] == 0).all() and (out[1, 3] == 0).all()
    explicit = gather(features, keypoints[..., :2], backend, roi_size=3.0, valid=valid)
    torch.testing.assert_close(out, explicit)
    # Only the invalid keypoints get gradient: none flows to the features.
    grad = torch.zeros_like(out)
    grad[~valid] = 1.0
    grad[1, 3] = 1.0
    assert (torch.autograd.grad(out, features, grad)[0] == 0).all()
    # An explicit valid overrides the confidences.
    all_valid = torch.ones(2, 7, dtype=torch.bool, device=device)
    overridden = gather(features, keypoints.nan_to_num(0.0), backend, roi_size=3.0, valid=all_valid)
    assert (overridden[0, 1] != 0).any()


@pytest.mark.parametrize("device,backend", device_backend_params("keypoint_gather"))
def test_far_keypoints_with_adaptive_grid(device, backend):
    """A keypoint far outside gives zeros at once, even with an adaptive grid."""
    features = torch.randn(1, 2, 4, 3, device=device)
    keypoints = torch.tensor([[[1e30, 1.0], [1.0, -1e30], [2.0, 3.0]]], device=device)
    out = keypointops.keypoint_gather(features, keypoints, 1.0, roi_size=3e5, sampling_ratio=-1,
                                      backend=backend)
    assert (out[0, :2] == 0).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("device,backend", device_backend_params("keypoint_gather"))
def test_non_dyadic_scale_and_empty_sizes(device, backend):
    gen = torch.Generator().manual_seed(7)
    features = make_features((2, 5, 9, 6), torch.float64, device, gen)
    keypoints = (torch.rand(2, 6, 2, generator=gen, dtype=torch.float64) * torch.tensor([18.0, 27.0])).to(device)
    for kwargs in [dict(roi_size=2.2, sampling_ratio=-1), dict(roi_size=4.0, aligned=False)]:
        out = keypointops.keypoint_gather(features, keypoints, 1 / 3, backend=backend, **kwargs)
        torch.testing.assert_close(out, reference.keypoint_gather(features, keypoints, 1 / 3, **kwargs),
                                   **tolerances(torch.float64))
    assert gather(features[:, :0], keypoints, backend).shape == (2, 6, 0)
    assert gather(features, keypoints[:, :0], backend).shape == (2, 0, 5)
    empty = features[:0].detach().requires_grad_()
    out = gather(empty, keypoints[:0], backend)
    assert out.shape == (0, 6, 5)
    assert torch.autograd.grad(out.sum(), empty)[0].shape == (0, 5, 9, 6)


@pytest.mark.parametrize("device,backend", device_backend_params("keypoint_gather"))
def test_backward_is_deterministic(device, backend):
    gen = torch.Generator().manual_seed(8)
    # Many overlapping boxes, so that pixels receive several keypoints' contributions.
    features = make_features((2, 70, 9, 8), torch.float32, device, gen).requires_grad_()
    keypoints = (torch.rand(2, 40, 2, generator=gen) * 10 + 3).to(device)
    out = gather(features, keypoints, backend, roi_size=6.0, sampling_ratio=3)
    grad = torch.randn(out.shape, generator=gen).to(device)
    first, = torch.autograd.grad(out, features, grad, retain_graph=True)
    second, = torch.autograd.grad(out, features, grad)
    assert torch.equal(first, second)
    if device == "cpu" and backend == "cpu":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single, = torch.autograd.grad(gather(features, keypoints, backend, roi_size=6.0, sampling_ratio=3),
                                          features, grad)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(first, single)


def _compiled_or_triton_ops(backend):
    if backend == "triton":
        from keypointops.triton import keypoint_gather as triton_keypoint_gather
        return (triton_keypoint_gather.keypoint_gather_triton,
                triton_keypoint_gather.keypoint_gather_triton_backward)
    return torch.ops.keypointops.keypoint_gather.default, torch.ops.keypointops.keypoint_gather_backward.default


@pytest.mark.parametrize("device,backend", device_backend_params("keypoint_gather"))
def test_opcheck(device, backend):
    forward, backward = _compiled_or_triton_ops(backend)
    gen = torch.Generator().manual_seed(9)
    features = make_features((2, 3, 5, 4), torch.float64, device, gen).requires_grad_()
    keypoints = make_keypoints(2, 7, 5, 4, torch.float64, device, gen)
    valid = make_valid(2, 7, device, gen)
    torch.library.opcheck(forward, (features, keypoints, valid, 0.5, 1.0, 2, True))
    torch.library.opcheck(forward, (features.detach().to(memory_format=torch.channels_last).requires_grad_(),
                                    keypoints, None, 0.5, 3.0, -1, False))
    grad_out = torch.randn(2, 7, 3, generator=gen, dtype=torch.float64).to(device)
    torch.library.opcheck(backward, (grad_out, keypoints, valid, [2, 3, 5, 4], True, 0.5, 1.0, 2, True))


@pytest.mark.parametrize("device,backend", device_backend_params("keypoint_gather"))
def test_torch_compile_fullgraph(device, backend):
    if backend == "triton" and device == "cpu":
        pytest.skip("torch.compile does not trace Triton kernels in the interpreter on CPU tensors")
    gen = torch.Generator().manual_seed(10)
    features = make_features((2, 4, 7, 5), torch.float32, device, gen).requires_grad_()
    keypoints = make_keypoints(2, 7, 7, 5, torch.float32, device, gen, dims=3)
    module = KeypointGather(1 / STRIDE, roi_size=2.0, backend=backend)

    def layer(features):
        return module(features, keypoints).relu().sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = compiled(features)
    torch.testing.assert_close(got, layer(features))
    torch.testing.assert_close(torch.autograd.grad(got, features)[0],
                               torch.autograd.grad(layer(features), features)[0])


@pytest.mark.parametrize("device,backend", device_backend_params("keypoint_gather"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,channels_last", [((2, 40, 7, 5), False), ((2, 40, 7, 5), True),
                                                 ((2, 3, 64, 32), False)],
                         ids=["small_planes", "channels_last", "page_planes"])
def test_reduced_precision(device, backend, dtype, shape, channels_last):
    """float16/bfloat16 features, float32 keypoints: sums in float32, out and the gradient in the
    features' dtype, within :func:`tolerances` of that dtype (bfloat16: 2e-2, float16: 1e-2) of the
    reference.  The shapes take the compiled CPU kernel's three paths: plane-major and keypoint-major
    NCHW (planes of a page or more) and channels_last.  Zero-sized dimensions included."""
    if backend == "triton" and device == "cpu" and shape[2] * shape[3] > 64:
        pytest.skip("Triton's interpreter is slow: the small planes suffice there")
    gen = torch.Generator().manual_seed(11)
    _, _, height, width = shape
    features = make_features(shape, dtype, device, gen, channels_last=channels_last).requires_grad_()
    keypoints = make_keypoints(2, 9, height, width, torch.float32, device, gen)
    keypoints[:, :3] = keypoints[:, 3:6] + 0.25  # neighbours that share pixels (summed per pixel)
    out = gather(features, keypoints, backend, roi_size=5.3, sampling_ratio=-1)
    expected = reference.keypoint_gather(features, keypoints, 1 / STRIDE, roi_size=5.3, sampling_ratio=-1)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, **tolerances(dtype))
    grad = torch.randn(out.shape, generator=gen).to(device, dtype)
    got = torch.autograd.grad(out, features, grad)[0]
    assert got.dtype == dtype
    torch.testing.assert_close(got, torch.autograd.grad(expected, features, grad)[0], **tolerances(dtype))
    for f, k in ((features[:, :0], keypoints), (features, keypoints[:, :0]), (features[:0], keypoints[:0])):
        empty = f.detach().requires_grad_()
        out = gather(empty, k, backend)
        assert out.shape == (f.size(0), k.size(1), f.size(1)) and out.dtype == dtype
        assert torch.autograd.grad(out.sum(), empty)[0].shape == f.shape


# --- torchvision (test-only dependency; on a GPU machine also on CUDA tensors) ---------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampling_ratio,roi_size,aligned", [(2, 1.0, True), (1, 1.0, False), (-1, 5.3, True),
                                                             (-1, 29.0, False), (3, 0.0, True)])
def test_matches_torchvision_roi_align(device, dtype, sampling_ratio, roi_size, aligned):
    ops = pytest.importorskip("torchvision.ops")
    gen = torch.Generator().manual_seed(12)
    features = make_features((3, 6, 7, 5), dtype, device, gen).requires_grad_()
    keypoints = make_keypoints(3, 10, 7, 5, dtype, device, gen)
    half = roi_size / 2
    image = torch.arange(3, dtype=dtype, device=device).repeat_interleave(10)[:, None]
    boxes = torch.cat([image, (keypoints - half).reshape(-1, 2), (keypoints + half).reshape(-1, 2)], 1)
    expected = ops.roi_align(features, boxes, 1, 1 / STRIDE, sampling_ratio, aligned).reshape(3, 10, 6)
    grad = torch.randn(3, 10, 6, generator=gen, dtype=dtype).to(device)
    want, = torch.autograd.grad(expected, features, grad)
    backends = ([device] if device == "cpu" or keypointops.has_cuda_ops("keypoint_gather") else []) + (
        ["triton"] if device == "cuda" else [])
    for backend in backends:
        out = gather(features, keypoints, backend, roi_size=roi_size, sampling_ratio=sampling_ratio,
                     aligned=aligned)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.autograd.grad(out, features, grad)[0], want, rtol=1e-5, atol=1e-5)


# --- module -------------------------------------------------------------------------------------

def test_module_matches_function_and_stores_its_settings():
    gen = torch.Generator().manual_seed(13)
    features = make_features((2, 4, 7, 5), torch.float32, "cpu", gen)
    keypoints = make_keypoints(2, 7, 7, 5, torch.float32, "cpu", gen, dims=3)
    module = KeypointGather(0.5, roi_size=3.0, sampling_ratio=-1, aligned=False)
    assert "spatial_scale=0.5" in repr(module) and "sampling_ratio=-1" in repr(module)
    assert list(module.state_dict()) == []
    expected = keypointops.keypoint_gather(features, keypoints, 0.5, roi_size=3.0, sampling_ratio=-1,
                                           aligned=False, backend="reference")
    torch.testing.assert_close(module(features, keypoints), expected)
    valid = torch.zeros(2, 7, dtype=torch.bool)
    assert (module(features, keypoints, valid) == 0).all()
    with pytest.raises(ValueError, match="spatial_scale"):
        KeypointGather(float("nan"))
    with pytest.raises(ValueError, match="backend"):
        KeypointGather(0.5, backend="gpu")


# --- bad input ----------------------------------------------------------------------------------

def test_bad_input_raises_naming_the_argument():
    features = torch.randn(2, 3, 7, 5)
    keypoints = torch.rand(2, 4, 2) * 10
    call = keypointops.keypoint_gather
    with pytest.raises(ValueError, match="features must be"):
        call(torch.randn(3, 7, 5), keypoints, 0.5)
    with pytest.raises(ValueError, match="keypoints must be"):
        call(features, torch.rand(4, 2), 0.5)
    with pytest.raises(ValueError, match="keypoints must be"):
        call(features, torch.rand(2, 4, 4), 0.5)
    with pytest.raises(ValueError, match="keypoints hold 3 images but features hold 2"):
        call(features, torch.rand(3, 4, 2), 0.5)
    with pytest.raises(ValueError, match="keypoints must be floating point"):
        call(features, torch.ones(2, 4, 2, dtype=torch.long), 0.5)
    for scale in [float("nan"), float("inf"), 0.0, -1.0, "0.5"]:
        with pytest.raises(ValueError, match="spatial_scale must be"):
            call(features, keypoints, scale)
    with pytest.raises(ValueError, match="roi_size must be"):
        call(features, keypoints, 0.5, roi_size=-1.0)
    with pytest.raises(ValueError, match="roi_size must be"):
        call(features, keypoints, 0.5, roi_size=float("nan"))
    with pytest.raises(ValueError, match="roi_size \\* spatial_scale"):
        call(features, keypoints, 0.5, roi_size=1e7)
    for ratio in [0, -2, 1.5, True]:
        with pytest.raises(ValueError, match="sampling_ratio must be"):
            call(features, keypoints, 0.5, sampling_ratio=ratio)
    with pytest.raises(TypeError, match="aligned must be"):
        call(features, keypoints, 0.5, aligned=1)
    with pytest.raises(ValueError, match="valid must be"):
        call(features, keypoints, 0.5, valid=torch.ones(2, 4))
    with pytest.raises(ValueError, match="valid must be"):
        call(features, keypoints, 0.5, valid=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="features must be float32"):
        call(features.long(), keypoints, 0.5)
    with pytest.raises(ValueError, match="non-empty H x W"):
        call(torch.randn(2, 3, 0, 5), keypoints, 0.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        call(features, keypoints, 0.5, backend="gpu")


def test_device_mismatch_raises():
    other = "cuda" if torch.cuda.is_available() else "meta"
    features = torch.randn(2, 3, 7, 5)
    keypoints = torch.rand(2, 4, 2) * 10
    with pytest.raises(ValueError, match=r"features \(cpu\) and keypoints \(.*\) must be on the same device"):
        keypointops.keypoint_gather(features, keypoints.to(other), 0.5)
    with pytest.raises(ValueError, match=r"features \(cpu\) and valid \(.*\) must be on the same device"):
        keypointops.keypoint_gather(features, keypoints, 0.5, valid=torch.ones(2, 4, dtype=torch.bool, device=other))


@pytest.mark.skipif(not keypointops.has_ops(), reason="keypointops._C not built")
def test_compiled_op_checks_its_arguments():
    """Called directly, the C++ kernels refuse bad input with a message naming the argument."""
    op = torch.ops.keypointops.keypoint_gather
    features = torch.randn(2, 3, 7, 5)
    keypoints = torch.rand(2, 4, 2)
    with pytest.raises(RuntimeError, match="keypoints must be \\[B, K, 2\\] or \\[B, K, 3\\] with B = 2"):
        op(features, torch.rand(3, 4, 2), None, 0.5, 1.0, 2, True)
    with pytest.raises(RuntimeError, match="features must be \\[B, C, H, W\\]"):
        op(torch.randn(3, 7, 5), keypoints, None, 0.5, 1.0, 2, True)
    with pytest.raises(RuntimeError, match="spatial_scale must be finite"):
        op(features, keypoints, None, float("inf"), 1.0, 2, True)
    with pytest.raises(RuntimeError, match="valid must be bool"):
        op(features, keypoints, torch.ones(2, 4), 0.5, 1.0, 2, True)
    with pytest.raises(RuntimeError, match="sampling_ratio must be"):
        op(features, keypoints, None, 0.5, 1.0, 0, True)
    with pytest.raises(RuntimeError, match="must be on the same device"):
        op(features, keypoints.to("meta"), None, 0.5, 1.0, 2, True)
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16 features, got Long"):
        op(features.long(), keypoints, None, 0.5, 1.0, 2, True)
    with pytest.raises(RuntimeError, match="grad_out must be \\[B, K, C\\]"):
        torch.ops.keypointops.keypoint_gather_backward(torch.randn(2, 4, 5), keypoints, None, [2, 3, 7, 5],
                                                       False, 0.5, 1.0, 2, True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_policy(dtype):
    """Under autocast float32 keypoints stay float32 beside reduced-precision features."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 6, 8, 7, generator=g)
    keypoints = torch.rand(2, 5, 2, generator=g) * torch.tensor([28.0, 32.0])
    check_autocast_policy(keypointops.keypoint_gather, features, dict(keypoints=keypoints), (), spatial_scale=0.25,
                          dtype=dtype)


@pytest.mark.parametrize("device, backend", device_backend_params("keypoint_gather"))
def test_offsets_past_int32(device, backend):
    """One image of 2.9e9 > 2^31 elements (channels_last, 11 GiB of float32 that stays untouched
    on the CPU: only the sampled pixels are written and read): keypoints near its far corner read
    elements whose offsets need 64 bits.  The result equals the reference on a small patch around
    them.  Triton's interpreter takes minutes at this size: its case runs on CUDA only."""
    if backend == "triton" and device == "cpu":
        pytest.skip("Triton's interpreter takes minutes on an 11 GiB tensor; runs on CUDA")
    channels, size, y0, x0 = 32768, 300, 292, 290
    try:
        features = torch.empty((1, channels, size, size), device=device, memory_format=torch.channels_last)
    except (RuntimeError, MemoryError) as error:
        pytest.skip(f"cannot reserve an 11 GiB tensor here: {error}")
    patch = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
    features[:, :, y0:y0 + 8, x0:x0 + 8] = patch
    keypoints = torch.tensor([[[x0 + 3.3, y0 + 2.6], [x0 + 4.5, y0 + 5.7]]], device=device)
    assert (y0 + 5) * size * channels > 2 ** 31  # the offsets of the sampled pixels
    out = keypointops.keypoint_gather(features, keypoints, 1.0, roi_size=1.5, sampling_ratio=2, backend=backend)
    expected = reference.keypoint_gather(patch, keypoints - torch.tensor([x0, y0], device=device), 1.0,
                                         roi_size=1.5, sampling_ratio=2)
    torch.testing.assert_close(out, expected, **tolerances(torch.float32))

"""keypoint_gather: every fused backend against the reference (and torchvision when installed),
gradients, layouts, registration, bad input; the KeypointGather module."""
import math

import pytest
import torch

import keypointops
from keypointops import reference
from keypointops.nn import KeypointGather

from helpers import DEVICES, best_cpu_times, check_autocast_policy, device_backend_params, tolerances

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


ROI_SIZES = [0.0, 1.0, 5.3, 15.0]  # 15 input pixels = 7.5 feature pixels, larger than the 7 x 5 maps


@pytest.mark.parametrize("device,backend", device_backend_params("keypoint_gather"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2, 3])
@pytest.mark.parametrize("aligned", [True, False])
def test_matches_reference(device, backend, dtype, sampling_ratio, aligned):
    if backend == "triton" and device == "cpu" and sampling_ratio in (1, 3):
        pytest.skip("Triton's interpreter is slow; every positive sampling_ratio runs the same Triton code (a "
                    "loop bound): 2 here, 1 in test_patches_match_roi_align")
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
    if backend == "triton" and device == "cpu" and channels_last:
        pytest.skip("Triton's interpreter is slow; Triton reads any strides with the same code (channels_last in "
                    "test_layouts_and_non_contiguous_keypoints and test_reduced_precision)")
    gen = torch.Generator().manual_seed(4)
    # One image and 130 channels: the CPU kernel splits the channels into blocks, CUDA into tiles.
    features = make_features((1, 130, 7, 5), dtype, device, gen, channels_last).requires_grad_()
    keypoints = make_keypoints(1, 9, 7, 5, dtype, device, gen)
    valid = make_valid(1, 9, device, gen)
    grad = torch.randn(1, 9, 130, generator=gen, dtype=dtype).to(device)
    for roi_size, sampling_ratio in [(1.0, 2), (15.0, -1), (0.0, 3)]:
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
    # Many overlapping boxes, so that pixels receive several keypoints' contributions.  Triton's
    # interpreter runs the programs one after another, in order: there 10 boxes (still overlapping)
    # run the same code at a quarter of the cost.
    num_keypoints = 10 if backend == "triton" and device == "cpu" else 40
    features = make_features((2, 70, 9, 8), torch.float32, device, gen).requires_grad_()
    keypoints = (torch.rand(2, num_keypoints, 2, generator=gen) * 10 + 3).to(device)
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
    """The ops' registration (schema, fake kernels, autograd through AOT dispatch) for each kind of
    argument: opcheck runs each op a dozen times, so 3 keypoints per image (one on the map, one on
    its far edges, one far outside); the values are tested against the reference above."""
    forward, backward = _compiled_or_triton_ops(backend)
    gen = torch.Generator().manual_seed(9)
    features = make_features((2, 3, 5, 4), torch.float64, device, gen).requires_grad_()
    keypoints = make_keypoints(2, 7, 5, 4, torch.float64, device, gen)[:, ::3].contiguous()
    valid = make_valid(2, 7, device, gen)[:, ::3].contiguous()
    torch.library.opcheck(forward, (features, keypoints, valid, None, 0.5, 1.0, 2, True, 1))
    torch.library.opcheck(forward, (features.detach().to(memory_format=torch.channels_last).requires_grad_(),
                                    keypoints, None, None, 0.5, 3.0, -1, False, 1))
    sizes = (torch.rand(2, 3, 2, generator=gen, dtype=torch.float64) * 6).to(device)
    torch.library.opcheck(forward, (features, keypoints, valid, sizes, 0.5, 0.0, -1, True, 3))
    torch.library.opcheck(forward, (features, keypoints, None, None, 0.5, 4.0, 2, False, 2))
    grad_out = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64).to(device)
    torch.library.opcheck(backward, (grad_out, keypoints, valid, None, [2, 3, 5, 4], True, 0.5, 1.0, 2, True, 1))
    grad_out = torch.randn(2, 3 * 4, 3, generator=gen, dtype=torch.float64).to(device)
    torch.library.opcheck(backward, (grad_out, keypoints, valid, sizes, [2, 3, 5, 4], False, 0.5, 0.0, 1, True, 2))


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


@pytest.mark.parametrize("device,backend", device_backend_params("keypoint_gather"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size_dims", [2, 3], ids=["square_boxes", "rectangular_boxes"])
def test_reduced_precision_patches(device, backend, dtype, channels_last, size_dims):
    """float16/bfloat16 features with 3 x 3 patches and per-keypoint float32 box sizes ([B, K] or
    [B, K, 2]): the bins' taps and sums in float32, out [B, K, C, 3, 3] and the gradient in the
    features' dtype, within :func:`tolerances` of that dtype of the reference."""
    if backend == "triton" and device == "cpu" and (channels_last or size_dims == 2):
        pytest.skip("Triton's interpreter is slow; it reads any strides with the same code ([B, K] box sizes "
                    "are a stride-0 view of [B, K, 2]; they run on Triton in test_patches_match_roi_align)")
    gen = torch.Generator().manual_seed(24)
    features = make_features((2, 24, 7, 5), dtype, device, gen, channels_last=channels_last).requires_grad_()
    keypoints = make_keypoints(2, 10, 7, 5, torch.float32, device, gen)
    keypoints[:, 7:] = keypoints[:, 3:6] + 0.25  # neighbours whose bins share pixels (summed per pixel)
    sizes = (2 + torch.rand((2, 10, 2)[:size_dims], generator=gen) * 8).to(device)
    valid = make_valid(2, 10, device, gen)
    kwargs = dict(roi_size=sizes, sampling_ratio=-1, output_size=3, valid=valid)
    out = gather(features, keypoints, backend, **kwargs)
    expected = reference.keypoint_gather(features, keypoints, 1 / STRIDE, **kwargs)
    assert out.shape == (2, 10, 24, 3, 3) and out.dtype == dtype
    torch.testing.assert_close(out, expected, **tolerances(dtype))
    grad = torch.randn(out.shape, generator=gen).to(device, dtype)
    got = torch.autograd.grad(out, features, grad)[0]
    assert got.dtype == dtype
    torch.testing.assert_close(got, torch.autograd.grad(expected, features, grad)[0], **tolerances(dtype))


@pytest.mark.skipif(not keypointops.has_ops(), reason="needs the compiled CPU kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,channels_last", [((2, 200, 7, 5), False), ((2, 200, 7, 5), True),
                                                 ((2, 200, 64, 32), False), ((2, 21, 7, 5), False)],
                         ids=["small_planes", "channels_last", "page_planes", "21_channels"])
def test_cpu_reduced_precision_backward_is_the_float32_sum_rounded_once(dtype, shape, channels_last):
    """The compiled CPU backward of a 16-bit grad_out equals, bit for bit, the float32 kernel's
    backward of the same values rounded once to the dtype: every pixel's taps are summed in float32
    in node order, as float32 sums them.  200 channels in two tasks of 100 on one thread (the second
    starts inside a vector of channels) and 21 channels (vectors and a remainder); 3 x 3 bins of
    boxes that overlap, so that pixels take several nodes' taps."""
    gen = torch.Generator().manual_seed(5)
    batch, channels, height, width = shape
    keypoints = torch.rand(batch, 9, 2, generator=gen) * torch.tensor([width * 2.0, height * 2.0])
    keypoints[:, 3:6] = keypoints[:, :3] + 0.25
    grad = torch.randn(batch, 9 * 3 * 3, channels, generator=gen).to(dtype)
    args = (keypoints, None, None, list(shape), channels_last, 0.5, 5.3, -1, True, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the channel blocks do not depend on the machine
    try:
        got = torch.ops.keypointops.keypoint_gather_backward(grad, *args)
        expected = torch.ops.keypointops.keypoint_gather_backward(grad.float(), *args).to(dtype)
    finally:
        torch.set_num_threads(threads)
    assert got.dtype == dtype
    assert torch.equal(got, expected)


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


# --- patches (output_size) and per-keypoint box sizes --------------------------------------------

def roi_align_loops(features, boxes, output_size, spatial_scale, sampling_ratio, aligned):
    """torchvision's RoIAlign forward written out sample by sample (its CPU kernel's loops and
    bilinear rule, in Python scalars): ``boxes`` ``[R, 5]`` = (image, x1, y1, x2, y2) -> ``[R, C, S, S]``.
    Independent of keypointops.reference: the check of the reference itself."""
    _, channels, height, width = features.shape
    out = torch.zeros(len(boxes), channels, output_size, output_size, dtype=torch.float64)
    image_features = features.double()

    def bilinear(image, y, x):
        if y < -1.0 or y > height or x < -1.0 or x > width:
            return torch.zeros(channels, dtype=torch.float64)
        y, x = max(y, 0.0), max(x, 0.0)
        y_low, x_low = int(y), int(x)
        if y_low >= height - 1:
            y_high = y_low = height - 1
            y = float(y_low)
        else:
            y_high = y_low + 1
        if x_low >= width - 1:
            x_high = x_low = width - 1
            x = float(x_low)
        else:
            x_high = x_low + 1
        ly, lx = y - y_low, x - x_low
        hy, hx = 1.0 - ly, 1.0 - lx
        f = image_features[image]
        return (hy * hx * f[:, y_low, x_low] + hy * lx * f[:, y_low, x_high]
                + ly * hx * f[:, y_high, x_low] + ly * lx * f[:, y_high, x_high])

    for r, (image, x1, y1, x2, y2) in enumerate(boxes.tolist()):
        offset = 0.5 if aligned else 0.0
        start_x, start_y = x1 * spatial_scale - offset, y1 * spatial_scale - offset
        roi_w, roi_h = x2 * spatial_scale - offset - start_x, y2 * spatial_scale - offset - start_y
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_w, bin_h = roi_w / output_size, roi_h / output_size
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / output_size)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / output_size)
        count = max(grid_h * grid_w, 1)
        for py in range(output_size):
            for px in range(output_size):
                total = torch.zeros(channels, dtype=torch.float64)
                for iy in range(grid_h):
                    y = start_y + py * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = start_x + px * bin_w + (ix + 0.5) * bin_w / grid_w
                        total += bilinear(int(image), y, x)
                out[r, :, py, px] = total / count
    return out


def boxes_of(keypoints, sizes):
    """torchvision boxes [B * K, 5] of the keypoints' boxes: sizes [B, K, 2] (side x, side y)."""
    batch, num_keypoints = keypoints.shape[:2]
    image = torch.arange(batch, dtype=torch.float64).repeat_interleave(num_keypoints)[:, None]
    centers, half = keypoints[..., :2].double().reshape(-1, 2), sizes.double().reshape(-1, 2) / 2
    return torch.cat([image, centers - half, centers + half], 1)


PATCH_CASES = [  # (output_size, sampling_ratio, aligned, roi_size kind)
    (3, 2, True, "scalar"), (3, -1, True, "per_keypoint"), (2, 1, False, "per_axis"),
    (3, -1, False, "per_axis"), (1, 2, True, "per_keypoint"), (4, 1, True, "scalar"),
]


def make_roi_size(kind, batch, num_keypoints, gen):
    if kind == "scalar":
        return 7.3
    sizes = torch.rand(batch, num_keypoints, 2 if kind == "per_axis" else 1, generator=gen,
                       dtype=torch.float64) * 12
    sizes[0, 1] = 0.0  # a zero-sized box: one sample point (no sample at all when aligned and adaptive)
    return sizes if kind == "per_axis" else sizes[..., 0]


def sizes_as_pairs(roi_size, batch, num_keypoints):
    if isinstance(roi_size, torch.Tensor):
        return roi_size if roi_size.dim() == 3 else roi_size[..., None].expand(batch, num_keypoints, 2)
    return torch.full((batch, num_keypoints, 2), roi_size, dtype=torch.float64)


@pytest.mark.parametrize("device,backend", device_backend_params("keypoint_gather") + [("cpu", "reference")])
@pytest.mark.parametrize("output_size,sampling_ratio,aligned,kind", PATCH_CASES)
def test_patches_match_roi_align(device, backend, output_size, sampling_ratio, aligned, kind):
    """S x S patches with per-keypoint boxes: every backend (the reference included) against
    RoIAlign written out sample by sample, with keypoints in, on and beyond the map's borders."""
    gen = torch.Generator().manual_seed(output_size + 10 * sampling_ratio + 100 * aligned)
    features = make_features((2, 3, 7, 5), torch.float64, "cpu", gen)
    keypoints = make_keypoints(2, 8, 7, 5, torch.float64, "cpu", gen)
    roi_size = make_roi_size(kind, 2, 8, gen)
    expected = roi_align_loops(features, boxes_of(keypoints, sizes_as_pairs(roi_size, 2, 8)), output_size,
                               1 / STRIDE, sampling_ratio, aligned).reshape(2, 8, 3, output_size, output_size)
    to = (lambda t: t.to(device)) if isinstance(roi_size, torch.Tensor) else (lambda t: t)
    out = gather(features.to(device), keypoints.to(device), backend, roi_size=to(roi_size),
                 sampling_ratio=sampling_ratio, aligned=aligned, output_size=output_size)
    assert out.shape == (2, 8, 3, output_size, output_size)
    torch.testing.assert_close(out.cpu(), expected, **tolerances(torch.float64))


def bilinear_grid_patches(features, keypoints, sizes, output_size, sampling_ratio, spatial_scale):
    """Aligned S x S patches the plain way: each bin's sample coordinates, bilinear interpolation
    by gathering the four neighbours of every sample, the mean per bin (keypoints inside the map)."""
    batch, channels, height, width = features.shape
    start = (keypoints - sizes / 2) * spatial_scale - 0.5                            # [B, K, 2]
    bin_size = sizes * spatial_scale / output_size
    steps = torch.arange(output_size, dtype=features.dtype)[:, None] * bin_size[..., None, None] + (
        torch.arange(sampling_ratio, dtype=features.dtype) + 0.5) * bin_size[..., None, None] / sampling_ratio
    coords = start[..., None, None] + steps                                           # [B, K, 2, S, r]
    x = coords[:, :, 0].clamp(0, width - 1)[:, :, None, :, None, :]                   # [B, K, 1, S, 1, r]
    y = coords[:, :, 1].clamp(0, height - 1)[:, :, :, None, :, None]                  # [B, K, S, 1, r, 1]
    x, y = torch.broadcast_tensors(x, y)
    x0, y0 = x.floor().long(), y.floor().long()
    x1, y1 = (x0 + 1).clamp(max=width - 1), (y0 + 1).clamp(max=height - 1)
    lx, ly = x - x0, y - y0
    b = torch.arange(batch)[:, None, None, None, None, None]
    pixels = features.permute(0, 2, 3, 1)
    value = ((1 - ly) * (1 - lx))[..., None] * pixels[b, y0, x0] + ((1 - ly) * lx)[..., None] * pixels[b, y0, x1] \
        + (ly * (1 - lx))[..., None] * pixels[b, y1, x0] + (ly * lx)[..., None] * pixels[b, y1, x1]
    return value.mean((4, 5)).permute(0, 1, 4, 2, 3)                                 # [B, K, C, S, S]


@pytest.mark.parametrize("device,backend", device_backend_params("keypoint_gather"))
def test_patches_match_plain_bilinear_grid(device, backend):
    gen = torch.Generator().manual_seed(21)
    features = make_features((2, 4, 12, 9), torch.float64, "cpu", gen)
    keypoints = torch.rand(2, 5, 2, generator=gen, dtype=torch.float64) * torch.tensor([4.0, 8.0]) * STRIDE + 6
    sizes = 2 + torch.rand(2, 5, 2, generator=gen, dtype=torch.float64) * 6
    expected = bilinear_grid_patches(features, keypoints, sizes, 3, 2, 1 / STRIDE)
    out = gather(features.to(device), keypoints.to(device), backend, roi_size=sizes.to(device), sampling_ratio=2,
                 output_size=3)
    torch.testing.assert_close(out.cpu(), expected, **tolerances(torch.float64))


@pytest.mark.parametrize("device,backend", device_backend_params("keypoint_gather"))
@pytest.mark.parametrize("channels_last", [False, True])
def test_patch_gradients(device, backend, channels_last):
    """Patches: gradients equal the reference's; float64 gradcheck (Triton: fast mode)."""
    if backend == "triton" and device == "cpu" and channels_last:
        pytest.skip("the interpreter is slow; Triton reads any strides with the same code (tested NCHW here, "
                    "channels_last in test_layouts_and_non_contiguous_keypoints)")
    gen = torch.Generator().manual_seed(22)
    features = make_features((2, 3, 7, 5), torch.float64, device, gen, channels_last).requires_grad_()
    keypoints = make_keypoints(2, 8, 7, 5, torch.float64, device, gen)
    sizes = (torch.rand(2, 8, generator=gen, dtype=torch.float64) * 9).to(device)
    valid = make_valid(2, 8, device, gen)
    kwargs = dict(roi_size=sizes, sampling_ratio=-1, output_size=3, valid=valid)
    out = gather(features, keypoints, backend, **kwargs)
    expected = reference.keypoint_gather(features, keypoints, 1 / STRIDE, **kwargs)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device)
    torch.testing.assert_close(torch.autograd.grad(out, features, grad)[0],
                               torch.autograd.grad(expected, features, grad)[0], **tolerances(torch.float64))
    small = features.detach()[:1, :2].requires_grad_()
    assert torch.autograd.gradcheck(
        lambda f: gather(f, keypoints[:1, :4], backend, roi_size=sizes[:1, :4], sampling_ratio=2, output_size=2),
        (small,), fast_mode=backend == "triton" and device == "cpu")


@pytest.mark.parametrize("device,backend", device_backend_params("keypoint_gather") + [("cpu", "reference")])
def test_per_keypoint_sizes_that_are_not_finite_or_huge_give_zeros(device, backend):
    gen = torch.Generator().manual_seed(23)
    features = make_features((1, 3, 7, 5), torch.float32, device, gen)
    keypoints = torch.tensor([[[4.0, 6.0], [5.0, 5.0], [3.0, 3.0], [6.0, 2.0]]], device=device)
    sizes = torch.tensor([[2.0, float("nan"), 4e6, float("inf")]], device=device)  # 4e6: half side 1e6 feature px
    out = gather(features, keypoints, backend, roi_size=sizes, sampling_ratio=-1, output_size=2)
    assert out.shape == (1, 4, 3, 2, 2)
    assert (out[0, 1:] == 0).all() and (out[0, 0] != 0).any()
    torch.testing.assert_close(out[0, 0], gather(features, keypoints[:, :1], backend, roi_size=2.0,
                                                 sampling_ratio=-1, output_size=2)[0, 0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("output_size,sampling_ratio,aligned", [(3, 2, True), (2, -1, False), (3, -1, True)])
def test_patches_match_torchvision_roi_align(device, output_size, sampling_ratio, aligned):
    ops = pytest.importorskip("torchvision.ops")
    gen = torch.Generator().manual_seed(24)
    features = make_features((3, 6, 7, 5), torch.float64, device, gen).requires_grad_()
    keypoints = make_keypoints(3, 10, 7, 5, torch.float64, device, gen)
    sizes = (torch.rand(3, 10, 2, generator=gen, dtype=torch.float64) * 10).to(device)
    expected = ops.roi_align(features, boxes_of(keypoints, sizes).to(device), output_size, 1 / STRIDE,
                             sampling_ratio, aligned).reshape(3, 10, 6, output_size, output_size)
    backends = [device] if device == "cpu" or keypointops.has_cuda_ops("keypoint_gather") else []
    for backend in backends + (["triton"] if device == "cuda" else []):
        out = gather(features, keypoints, backend, roi_size=sizes, sampling_ratio=sampling_ratio, aligned=aligned,
                     output_size=output_size)
        torch.testing.assert_close(out, expected, **tolerances(torch.float64))


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
    with pytest.raises(ValueError, match="output_size must be None or a positive int"):
        KeypointGather(0.5, output_size=0)


def test_module_patches_and_per_keypoint_roi_size():
    """output_size=S gives the function's [B, K, C, S, S] patches; a call's [B, K] or [B, K, 2]
    roi_size replaces the module's box side for that call."""
    gen = torch.Generator().manual_seed(14)
    features = make_features((2, 4, 9, 7), torch.float32, "cpu", gen)
    keypoints = make_keypoints(2, 9, 9, 7, torch.float32, "cpu", gen, dims=2)
    module = KeypointGather(0.5, roi_size=4.0, sampling_ratio=2, output_size=3)
    assert "output_size=3" in repr(module)
    out = module(features, keypoints)
    assert out.shape == (2, 9, 4, 3, 3)
    torch.testing.assert_close(out, keypointops.keypoint_gather(features, keypoints, 0.5, roi_size=4.0,
                                                                output_size=3, backend="reference"))
    for sizes in (torch.rand(2, 9, generator=gen) * 6 + 1, torch.rand(2, 9, 2, generator=gen) * 6 + 1):
        expected = keypointops.keypoint_gather(features, keypoints, 0.5, roi_size=sizes, output_size=3,
                                               backend="reference")
        torch.testing.assert_close(module(features, keypoints, roi_size=sizes), expected)
        assert not torch.allclose(expected, out)


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
    for size in [0, -1, 2.0, True]:
        with pytest.raises(ValueError, match="output_size must be None or a positive int"):
            call(features, keypoints, 0.5, output_size=size)
    with pytest.raises(ValueError, match=r"roi_size as a tensor must be \[B, K\] = \[2, 4\] or \[B, K, 2\]"):
        call(features, keypoints, 0.5, roi_size=torch.ones(2, 4, 3))
    with pytest.raises(ValueError, match="roi_size must be floating point"):
        call(features, keypoints, 0.5, roi_size=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"features \(cpu\) and roi_size \(meta\) must be on the same device"):
        call(features, keypoints, 0.5, roi_size=torch.ones(2, 4, device="meta"))


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
        op(features, torch.rand(3, 4, 2), None, None, 0.5, 1.0, 2, True, 1)
    with pytest.raises(RuntimeError, match="features must be \\[B, C, H, W\\]"):
        op(torch.randn(3, 7, 5), keypoints, None, None, 0.5, 1.0, 2, True, 1)
    with pytest.raises(RuntimeError, match="spatial_scale must be finite"):
        op(features, keypoints, None, None, float("inf"), 1.0, 2, True, 1)
    with pytest.raises(RuntimeError, match="valid must be bool"):
        op(features, keypoints, torch.ones(2, 4), None, 0.5, 1.0, 2, True, 1)
    with pytest.raises(RuntimeError, match="sampling_ratio must be"):
        op(features, keypoints, None, None, 0.5, 1.0, 0, True, 1)
    with pytest.raises(RuntimeError, match="output_size must be positive"):
        op(features, keypoints, None, None, 0.5, 1.0, 2, True, 0)
    with pytest.raises(RuntimeError, match="roi_sizes must be \\[B, K, 2\\] = \\[2, 4, 2\\]"):
        op(features, keypoints, None, torch.ones(2, 4), 0.5, 1.0, 2, True, 1)
    with pytest.raises(RuntimeError, match="roi_sizes must be floating point"):
        op(features, keypoints, None, torch.ones(2, 4, 2, dtype=torch.long), 0.5, 1.0, 2, True, 1)
    with pytest.raises(RuntimeError, match="must be on the same device"):
        op(features, keypoints.to("meta"), None, None, 0.5, 1.0, 2, True, 1)
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16 features, got Long"):
        op(features.long(), keypoints, None, None, 0.5, 1.0, 2, True, 1)
    with pytest.raises(RuntimeError, match="grad_out must be \\[B, K \\* S \\* S, C\\] = \\[2, 4, 3\\]"):
        torch.ops.keypointops.keypoint_gather_backward(torch.randn(2, 4, 5), keypoints, None, None, [2, 3, 7, 5],
                                                       False, 0.5, 1.0, 2, True, 1)
    with pytest.raises(RuntimeError, match="grad_out must be .* = \\[2, 36, 3\\]"):
        torch.ops.keypointops.keypoint_gather_backward(torch.randn(2, 4, 3), keypoints, None, None, [2, 3, 7, 5],
                                                       False, 0.5, 1.0, 2, True, 3)


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


@pytest.mark.skipif(not keypointops.has_ops() or keypointops.cpu_capability() == "default",
                    reason="needs the CPU kernels' AVX2 or AVX512 build (16-bit loads and stores vectorised)")
def test_cpu_bfloat16_forward_is_not_slower_than_float32():
    """KMPNet's one-sample forward at stage 1 (12 keypoints, 256 channels, a 64 x 32 map, 48 images:
    larger than the last-level cache, so the taps' cache lines come from memory), NCHW, takes no more
    CPU time in bfloat16 than in float32, up to a margin for timing noise (one thread, CPU time, the
    best of 9 interleaved rounds).  A 16-bit forward that does not prefetch the taps keeps fewer cache
    misses in flight and is slower than float32; the timing noise of a shared 2-core VM sets the
    margin at 1.2 (as for window_graph_conv), so the test catches the larger such regressions, not
    every one (figures in docs/benchmarks.md)."""
    gen = torch.Generator().manual_seed(0)
    features32 = torch.randn(48, 256, 64, 32, generator=gen)
    keypoints = torch.rand(48, 12, 2, generator=gen) * torch.tensor([31.0, 63.0]) * 4 + 0.5

    def forward(dtype):
        features = features32.to(dtype)
        return lambda: keypointops.keypoint_gather(features, keypoints, 0.25, roi_size=1.0, sampling_ratio=1,
                                                   aligned=False, backend="cpu")

    (float32_time, bfloat16_time), rounds = best_cpu_times([forward(torch.float32), forward(torch.bfloat16)])
    assert bfloat16_time < 1.2 * float32_time, rounds


@pytest.mark.skipif(not keypointops.has_ops() or keypointops.cpu_capability() == "default",
                    reason="needs the CPU kernels' AVX2 or AVX512 build (16-bit loads and stores vectorised)")
def test_cpu_bfloat16_backward_is_not_slower_than_float32():
    """The backward at stage 4 (17 keypoints, 4 bilinear samples each, 2048 channels, 16 x 8 planes,
    NCHW, 24 images) takes no more CPU time in bfloat16 than in float32, up to the margin for timing
    noise of the forward's test above (one thread, CPU time, the best of 9 interleaved rounds).  A
    16-bit NCHW backward that sums each channel's pixels one at a time (a scattered 16-bit grad_out
    load per tap and a rounding per element) takes well over the float32 time; summing a vector of
    channels at a time, as the float32 backward does too, less (half the bytes per vector)."""
    gen = torch.Generator().manual_seed(0)
    images, channels, height, width = 24, 2048, 16, 8
    keypoints = torch.rand(images, 17, 2, generator=gen) * torch.tensor([width - 1.0, height - 1.0]) * 16
    grad32 = torch.randn(images, 17, channels, generator=gen)

    def backward(dtype):
        grad = grad32.to(dtype)
        return lambda: torch.ops.keypointops.keypoint_gather_backward(
            grad, keypoints, None, None, [images, channels, height, width], False, 1 / 16, 1.0, 2, True, 1)

    (float32_time, bfloat16_time), rounds = best_cpu_times([backward(torch.float32), backward(torch.bfloat16)])
    assert bfloat16_time < 1.2 * float32_time, rounds

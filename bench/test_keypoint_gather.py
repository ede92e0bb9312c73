"""keypoint_gather against what a user would otherwise write: F.grid_sample on the RoIAlign sample
grid then permute (the baseline), and torchvision's roi_align + reshape when torchvision is installed.

Cases, features NCHW as a backbone returns them (the channels_last row converts them beforehand,
untimed):
- stage1, stage4: KMPNet stage 1 (256 images = 32 clips x 8 frames, C=256, 64x32 map, stride 4) and
  stage 4 (C=2048, 16x8 map, stride 16), 17 COCO keypoints, the op's defaults (box of 1 input
  pixel, sampling_ratio=2, aligned=True: 4 bilinear samples per keypoint).
- stage1_kmpnet, stage1_point: stage 1 with KMPNet's 12 keypoints and one bilinear sample per
  keypoint: KMPNet's own setting (box [x, y, x+1, y+1], aligned=False, sampling_ratio=1, i.e.
  keypoints + 0.5 with roi_size=1) and a plain point sample (roi_size=0, aligned=True).  The
  grid_sample baseline then takes its single sample directly (no mean over samples).

Patches (test_keypoint_patches): 3 x 3 RoIAlign patches (output_size=3, sampling_ratio=2: 36
bilinear samples per keypoint) at KMPNet stage 1 with its 12 keypoints, boxes of 12 input pixels
(3 feature pixels: one per bin), and the same with a box per keypoint ([B, K] sizes, 8-16 input
pixels, as scaled by a person's height).  Result [B, K, C, 3, 3].  The baseline is the plain-PyTorch
equivalent of roi_align: every bin's sample grid through F.grid_sample, the mean per bin, the
[B, C, K, 3, 3] result permuted to [B, K, C, 3, 3]; torchvision's roi_align + reshape when installed.
"""
import pytest
import torch
import torch.nn.functional as F

import keypointops
from keypointops._opdefs.backend import triton_available

import floors
from conftest import SMALL, timed_pass

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Sampling of the 4-samples cases (the op's defaults) and of the single-sample cases.
DEFAULTS = dict(keypoints=17, roi_size=1.0, sampling_ratio=2, aligned=True, shift=0.0)
KMPNET = dict(keypoints=12, roi_size=1.0, sampling_ratio=1, aligned=False, shift=0.5)
POINT = dict(keypoints=12, roi_size=0.0, sampling_ratio=1, aligned=True, shift=0.0)
CASES = {  # SMALL: a smoke run (the Triton interpreter is slow) with 1/8 (stage 4: 1/32) of the channels
    "stage1": dict(channels=32 if SMALL else 256, height=64, width=32, stride=4, **DEFAULTS),
    "stage4": dict(channels=64 if SMALL else 2048, height=16, width=8, stride=16, **DEFAULTS),
    "stage1_kmpnet": dict(channels=32 if SMALL else 256, height=64, width=32, stride=4, **KMPNET),
    "stage1_point": dict(channels=32 if SMALL else 256, height=64, width=32, stride=4, **POINT),
}
IMAGES = 2 if SMALL else 256
IMPLS = ["keypointops", "keypointops-channels_last", "triton", "reference", "grid_sample", "torchvision"]

try:
    from torchvision.ops import roi_align
except ImportError:
    roi_align = None


def grid_sample_gather(features, keypoints, spatial_scale, spec):
    """What a user without torchvision writes: the sampling_ratio x sampling_ratio sample grid of
    each box, F.grid_sample (align_corners=False: pixel p -> (2p + 1) / size - 1; border padding
    clamps as RoIAlign does inside [-1, size]), the mean over the samples (when more than one),
    permute to [B, K, C]."""
    batch, _, height, width = features.shape
    ratio, roi_size = spec["sampling_ratio"], spec["roi_size"]
    offset = 0.5 if spec["aligned"] else 0.0
    start = (keypoints - roi_size / 2) * spatial_scale - offset                      # [B, K, 2]
    extent = roi_size * spatial_scale if spec["aligned"] else max(roi_size * spatial_scale, 1.0)
    steps = (torch.arange(ratio, device=features.device, dtype=features.dtype) + 0.5) * extent / ratio
    xs = start[..., 0, None] + steps                                                 # [B, K, s]
    ys = start[..., 1, None] + steps
    grid = torch.stack(torch.broadcast_tensors(xs[:, :, None, :], ys[:, :, :, None]), -1)
    size = torch.tensor([width, height], device=features.device, dtype=features.dtype)
    grid = ((2 * grid + 1) / size - 1).reshape(batch, keypoints.shape[1], -1, 2)      # [B, K, s*s, 2]
    samples = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
    samples = samples[..., 0] if ratio == 1 else samples.mean(-1)                     # [B, C, K]
    return samples.permute(0, 2, 1)                                                  # [B, K, C]


def torchvision_gather(features, keypoints, spatial_scale, spec):
    batch, channels = features.shape[:2]
    num_keypoints = keypoints.shape[1]
    half = spec["roi_size"] / 2
    image = torch.arange(batch, device=features.device, dtype=features.dtype).repeat_interleave(num_keypoints)
    points = keypoints.reshape(-1, 2)
    boxes = torch.cat([image[:, None], points - half, points + half], 1)
    out = roi_align(features, boxes, 1, spatial_scale, spec["sampling_ratio"], spec["aligned"])  # [B*K, C, 1, 1]
    return out.reshape(batch, num_keypoints, channels)


def make_case(case, device):
    """Features, keypoints (as the op takes them, KMPNet's + 0.5 included) and the spatial scale.
    The sample points lie inside the map, where every implementation computes the same thing."""
    spec = CASES[case]
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(IMAGES, spec["channels"], spec["height"], spec["width"], generator=gen)
    image_size = torch.tensor([spec["width"] - 1, spec["height"] - 1], dtype=torch.float32) * spec["stride"]
    keypoints = torch.rand(IMAGES, spec["keypoints"], 2, generator=gen) * image_size + spec["shift"]
    return features.to(device), keypoints.to(device), 1.0 / spec["stride"]


def make_forward(impl, spatial_scale, spec):
    """forward(features, keypoints) -> [B, K, C] of one implementation."""
    if impl == "grid_sample":
        return lambda f, k: grid_sample_gather(f, k, spatial_scale, spec)
    if impl == "torchvision":
        return lambda f, k: torchvision_gather(f, k, spatial_scale, spec)
    backend = {"triton": "triton", "reference": "reference"}.get(impl, "auto")
    return lambda f, k: keypointops.keypoint_gather(f, k, spatial_scale, roi_size=spec["roi_size"],
                                                    sampling_ratio=spec["sampling_ratio"],
                                                    aligned=spec["aligned"], backend=backend)


def gather_work(spec, features, keypoints, box, backward):
    """What the case must do (``floors.keypoint_gather``), ``box`` the mean box side in input pixels:
    RoIAlign's samples of a bin at (i + 0.5) / ratio of the bin, so the first and last of a
    keypoint's lie (1 - 1 / (bins ratio)) of the box apart."""
    bins, ratio = spec.get("output_size", 1), spec["sampling_ratio"]
    extent = box / spec["stride"]
    if not spec["aligned"]:
        extent = max(extent, 1.0)
    batch, channels, height, width = features.shape
    return floors.keypoint_gather(batch, channels, height, width, keypoints.size(1),
                                  extent * (1 - 1 / (bins * ratio)), ratio * ratio, bins * bins, backward)


def make_fn(forward, features, keypoints, backward):
    features = features.detach().requires_grad_(backward)
    return timed_pass(lambda: forward(features, keypoints), [features], backward)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_keypoint_gather(measure, case, impl, backward, device):
    if impl == "triton" and (not triton_available(torch.device(device)) or (device == "cpu" and not SMALL)):
        pytest.skip("Triton runs on GPU (on CPU only interpreted, as a small smoke run)")
    if impl == "torchvision" and roi_align is None:
        pytest.skip("torchvision is not installed")
    features, keypoints, spatial_scale = make_case(case, device)
    if impl == "keypointops-channels_last":
        features = features.contiguous(memory_format=torch.channels_last)
    spec = CASES[case]
    forward = make_forward(impl, spatial_scale, spec)
    with torch.no_grad():
        expected = make_forward("reference", spatial_scale, spec)(features[:2], keypoints[:2])
        torch.testing.assert_close(forward(features[:2], keypoints[:2]), expected, rtol=1e-4, atol=1e-4)
    measure(make_fn(forward, features, keypoints, backward),
            group=f"keypoint_gather {case} {'fwd+bwd' if backward else 'fwd'} {device}",
            impl=impl, device=device, baseline=impl == "grid_sample",
            work=gather_work(spec, features, keypoints, spec["roi_size"], backward))


PATCH_CASES = {
    "stage1_patch3": dict(channels=32 if SMALL else 256, height=64, width=32, stride=4, keypoints=12,
                          roi_size=12.0, sampling_ratio=2, aligned=True, output_size=3, per_keypoint=False),
    "stage1_patch3_sizes": dict(channels=32 if SMALL else 256, height=64, width=32, stride=4, keypoints=12,
                                roi_size=12.0, sampling_ratio=2, aligned=True, output_size=3, per_keypoint=True),
}


def patch_sizes(spec, keypoints):
    """Box sides [B, K] of the case: its roi_size, or per keypoint 8-16 input pixels."""
    if not spec["per_keypoint"]:
        return torch.full(keypoints.shape[:2], spec["roi_size"], device=keypoints.device)
    gen = torch.Generator().manual_seed(1)
    return (8 + 8 * torch.rand(keypoints.shape[:2], generator=gen)).to(keypoints.device)


def make_patch_case(case, device):
    """Features, keypoints and the spatial scale of a patch case: boxes inside the map (up to 16
    input pixels = 4 feature pixels wide), where every implementation computes the same thing."""
    spec = PATCH_CASES[case]
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(IMAGES, spec["channels"], spec["height"], spec["width"], generator=gen).to(device)
    low = torch.tensor([2.0, 2.0]) * spec["stride"]
    span = torch.tensor([spec["width"] - 5.0, spec["height"] - 5.0]) * spec["stride"]
    keypoints = (low + torch.rand(IMAGES, spec["keypoints"], 2, generator=gen) * span).to(device)
    return features, keypoints, 1.0 / spec["stride"]


def grid_sample_patches(features, keypoints, sizes, spatial_scale, spec):
    """What a user without torchvision writes for S x S patches: per bin its r x r sample grid
    (RoIAlign's, aligned), F.grid_sample, the mean per bin, permute to [B, K, C, S, S]."""
    batch, channels, height, width = features.shape
    bins, ratio = spec["output_size"], spec["sampling_ratio"]
    start = (keypoints - sizes[..., None] / 2) * spatial_scale - 0.5                  # [B, K, 2]
    bin_size = (sizes * spatial_scale / bins)[..., None]                             # [B, K, 1]
    offsets = (torch.arange(bins, device=features.device, dtype=features.dtype)[:, None]
               + (torch.arange(ratio, device=features.device, dtype=features.dtype) + 0.5) / ratio).flatten()
    xs = start[..., 0, None] + offsets * bin_size                                    # [B, K, S*r]
    ys = start[..., 1, None] + offsets * bin_size
    grid = torch.stack(torch.broadcast_tensors(xs[:, :, None, :], ys[:, :, :, None]), -1)   # [B, K, S*r, S*r, 2]
    size = torch.tensor([width, height], device=features.device, dtype=features.dtype)
    grid = ((2 * grid + 1) / size - 1).reshape(batch, -1, bins * ratio, 2)
    samples = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
    samples = samples.view(batch, channels, -1, bins, ratio, bins, ratio).mean((4, 6))   # [B, C, K, S, S]
    return samples.permute(0, 2, 1, 3, 4)


def torchvision_patches(features, keypoints, sizes, spatial_scale, spec):
    batch, channels = features.shape[:2]
    num_keypoints = keypoints.shape[1]
    image = torch.arange(batch, device=features.device, dtype=features.dtype).repeat_interleave(num_keypoints)
    points, half = keypoints.reshape(-1, 2), sizes.reshape(-1, 1) / 2
    boxes = torch.cat([image[:, None], points - half, points + half], 1)
    out = roi_align(features, boxes, spec["output_size"], spatial_scale, spec["sampling_ratio"], spec["aligned"])
    return out.view(batch, num_keypoints, channels, spec["output_size"], spec["output_size"])


def make_patch_forward(impl, spatial_scale, spec, sizes):
    """forward(features, keypoints) -> [B, K, C, S, S] of one implementation."""
    if impl == "grid_sample":
        return lambda f, k: grid_sample_patches(f, k, sizes[:k.shape[0]], spatial_scale, spec)
    if impl == "torchvision":
        return lambda f, k: torchvision_patches(f, k, sizes[:k.shape[0]], spatial_scale, spec)
    backend = {"triton": "triton", "reference": "reference"}.get(impl, "auto")
    return lambda f, k: keypointops.keypoint_gather(
        f, k, spatial_scale, roi_size=sizes[:k.shape[0]] if spec["per_keypoint"] else spec["roi_size"],
        sampling_ratio=spec["sampling_ratio"], aligned=spec["aligned"], output_size=spec["output_size"],
        backend=backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(PATCH_CASES))
def test_keypoint_patches(measure, case, impl, backward, device):
    if impl == "triton" and (not triton_available(torch.device(device)) or device == "cpu"):
        pytest.skip("Triton runs on GPU (interpreted on CPU it takes minutes over the patches' bins even "
                    "at the smoke size; python_tests/test_keypoint_gather.py runs it on small cases)")
    if impl == "torchvision" and roi_align is None:
        pytest.skip("torchvision is not installed")
    spec = PATCH_CASES[case]
    features, keypoints, spatial_scale = make_patch_case(case, device)
    if impl == "keypointops-channels_last":
        features = features.contiguous(memory_format=torch.channels_last)
    sizes = patch_sizes(spec, keypoints)
    forward = make_patch_forward(impl, spatial_scale, spec, sizes)
    with torch.no_grad():
        expected = make_patch_forward("reference", spatial_scale, spec, sizes)(features[:2], keypoints[:2])
        torch.testing.assert_close(forward(features[:2], keypoints[:2]), expected, rtol=1e-4, atol=1e-4)
    measure(make_fn(forward, features, keypoints, backward),
            group=f"keypoint_gather {case} {'fwd+bwd' if backward else 'fwd'} {device}",
            impl=impl, device=device, baseline=impl == "grid_sample",
            work=gather_work(spec, features, keypoints, sizes.mean().item(), backward))

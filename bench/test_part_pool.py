"""part_pool against softmax + bmm in plain PyTorch (the baseline) and the reference.

Cases: (a) CTL: 192 images (8 ids x 4 clips x 6 frames), C=2048, 16x8 map, 17 COCO keypoint
heatmaps pooled one part per keypoint (groups = identity, P=17); (b) AlignNet: 240 images, C=2048,
16x8 map, 57 OpenPose maps (19 heatmaps + 38 part-affinity fields) pooled into head / torso+arms /
legs (P=3).  Gradients flow into the features and the heatmaps.
"""
import pytest
import torch

import keypointops
from keypointops import parts
from keypointops._opdefs.backend import triton_available

import floors
from conftest import SMALL, timed_pass

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = {
    "ctl": dict(images=4 if SMALL else 192, joints=17, groups=None),
    "alignnet": dict(images=4 if SMALL else 240, joints=57, groups=parts.ALIGNNET_BODY_PARTS),
}
CHANNELS = 64 if SMALL else 2048
HEIGHT, WIDTH = 16, 8
IMPLS = ["keypointops", "triton", "reference", "softmax_bmm"]


def softmax_bmm(features, heatmaps, groups):
    """What a user writes without the op: part logits, softmax over H*W, batched matmul."""
    logits = heatmaps.flatten(2)
    if groups is not None:
        logits = torch.matmul(groups, logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.bmm(probs, features.flatten(2).transpose(1, 2))


def make_case(case, device):
    gen = torch.Generator().manual_seed(0)
    spec = CASES[case]
    features = torch.randn(spec["images"], CHANNELS, HEIGHT, WIDTH, generator=gen).to(device)
    heatmaps = torch.randn(spec["images"], spec["joints"], HEIGHT, WIDTH, generator=gen).to(device)
    groups = None
    if spec["groups"] is not None:
        groups = parts.part_groups(spec["groups"], spec["joints"]).to(device)
    return features, heatmaps, groups


def make_fn(impl, features, heatmaps, groups, backward):
    features = features.detach().requires_grad_(backward)
    heatmaps = heatmaps.detach().requires_grad_(backward)
    if impl == "softmax_bmm":
        def forward():
            return softmax_bmm(features, heatmaps, groups)
    else:
        backend = {"keypointops": "auto", "triton": "triton", "reference": "reference"}[impl]

        def forward():
            return keypointops.part_pool(features, heatmaps, groups, backend=backend)

    return timed_pass(forward, [features, heatmaps], backward)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_part_pool(measure, case, impl, backward, device):
    if impl == "triton" and (not triton_available(torch.device(device)) or (device == "cpu" and not SMALL)):
        pytest.skip("Triton runs on GPU (on CPU only interpreted, as a small smoke run)")
    features, heatmaps, groups = make_case(case, device)
    fn = make_fn(impl, features, heatmaps, groups, backward)
    batch, channels, height, width = features.shape
    work = floors.part_pool(batch, channels, height * width, heatmaps.size(1),
                            heatmaps.size(1) if groups is None else groups.size(0), groups is not None, backward)
    measure(fn, group=f"part_pool {case} {'fwd+bwd' if backward else 'fwd'} {device}",
            impl=impl, device=device, baseline=impl == "softmax_bmm", work=work)

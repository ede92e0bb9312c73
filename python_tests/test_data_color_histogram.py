"""The colour-histogram baselines (keypointops.models.color_histogram): contract, what each one can
and cannot tell apart."""
import torch

from keypointops.models.color_histogram import ColorHistogram, PartColorHistogram

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
RED, BLUE, GREY = (0.8, 0.1, 0.1), (0.1, 0.2, 0.8), (0.5, 0.5, 0.5)


def person(top, legs, shift=0, height=64, width=32):
    """A grey frame with a 'torso' block of colour ``top`` and a 'legs' block of colour ``legs``,
    moved down by ``shift`` pixels, and its COCO-17 keypoints."""
    image = torch.tensor(GREY).view(3, 1, 1).repeat(1, height, width)
    image[:, 10 + shift:30 + shift, 8:24] = torch.tensor(top).view(3, 1, 1)
    image[:, 30 + shift:50 + shift, 8:24] = torch.tensor(legs).view(3, 1, 1)
    kp = torch.zeros(17, 3)
    points = {5: (10, 12), 6: (22, 12), 7: (10, 20), 8: (22, 20), 9: (10, 27), 10: (22, 27), 11: (11, 29),
              12: (21, 29), 13: (11, 39), 14: (21, 39), 15: (11, 48), 16: (21, 48)}
    for k, (x, y) in points.items():
        kp[k] = torch.tensor([x + 0.5, y + shift + 0.5, 1.0])
    return (image - MEAN) / STD, kp


def clip(*frames):
    return torch.stack([f[0] for f in frames])[None], torch.stack([f[1] for f in frames])[None]


def distance(model, a, b):
    return (model(*a) - model(*b)).norm().item()


def test_contract():
    images, kp = clip(person(RED, BLUE), person(RED, BLUE, shift=2))
    images, kp = images.repeat(3, 1, 1, 1, 1), kp.repeat(3, 1, 1, 1)
    for model, dim in ((ColorHistogram(), 128), (ColorHistogram(stripes=4), 512), (PartColorHistogram(), 6 * 128)):
        out = model(images, kp)
        assert out.shape == (3, dim) and out.dtype == torch.float32
        assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_placement_swap_fools_the_global_histogram_only():
    a, b = clip(person(RED, BLUE)), clip(person(BLUE, RED))
    assert distance(ColorHistogram(), a, b) < 1e-5
    assert distance(ColorHistogram(stripes=4), a, b) > 0.3
    assert distance(PartColorHistogram(), a, b) > 0.5


def test_part_histogram_follows_the_keypoints():
    a, b = clip(person(RED, BLUE)), clip(person(RED, BLUE, shift=8))
    assert distance(PartColorHistogram(), a, b) < 1e-5  # the body moved, the keypoints with it
    assert distance(ColorHistogram(stripes=4), a, b) > 0.1


def test_missing_joints_leave_parts_out():
    images, kp = clip(person(RED, BLUE))
    empty = PartColorHistogram()(images, torch.zeros_like(kp))
    assert torch.isfinite(empty).all() and (empty == 0).all()

"""Clip transforms: keypoints follow every geometric step, flips swap left and right joints, missing
joints stay missing, one decision per clip."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from keypointops.data.keypoint_files import COCO17_FLIP
from keypointops.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, Compose, HorizontalFlip, Normalize,
                                         RandomErasing, Resize, build_transform)


def joint_colour(k):
    return (40 + 12 * k, 255 - 12 * k, (97 * k) % 256)


def marked_clip(frames=3, size=(96, 40)):
    """Frames with a disc of joint k's own colour at joint k (joint 4 missing)."""
    rng = np.random.default_rng(0)
    height, width = size
    images, keypoints = [], np.zeros((frames, 17, 3), np.float32)
    for t in range(frames):
        order = rng.permutation(18)
        image = Image.new("RGB", (width, height), (0, 0, 0))
        draw = ImageDraw.Draw(image)
        for k in range(17):
            if k == 4:
                continue
            slot = int(order[k])  # distinct grid slots, so that discs never overlap
            x, y = 8 + 12 * (slot % 3) + rng.uniform(-1.5, 1.5), 8 + 14 * (slot // 3) + rng.uniform(-1.5, 1.5)
            keypoints[t, k] = (x, y, 0.9)
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=joint_colour(k))
        images.append(image)
    return images, keypoints


def colour_at(images, t, x, y):
    return tuple(int(v) for v in images[t, int(y), int(x)])


def test_resize_moves_keypoints_with_the_pixels():
    images, keypoints = marked_clip()
    out, kp = Resize(64, 32)(images, keypoints, np.random.default_rng(0))
    assert out.shape == (3, 64, 32, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(kp[..., 0], keypoints[..., 0] * 32 / 40, rtol=1e-6)
    np.testing.assert_allclose(kp[..., 1], keypoints[..., 1] * 64 / 96, rtol=1e-6)
    assert (kp[:, 4] == 0).all()
    for k in (0, 9, 16):
        got = np.array(colour_at(out, 0, *kp[0, k, :2]))
        assert np.abs(got - joint_colour(k)).max() < 40


def test_flip_keeps_keypoints_on_the_same_body_parts():
    images, keypoints = marked_clip()
    array, kp = Resize(96, 40)(images, keypoints, None)
    flipped, fkp = HorizontalFlip(p=1.0)(array, kp, np.random.default_rng(0))
    np.testing.assert_array_equal(flipped, array[:, :, ::-1])
    for t in range(3):
        for k in range(17):
            source = COCO17_FLIP[k]   # the joint that lands in slot k: its mirror-image partner
            if source == 4:
                assert (fkp[t, k] == 0).all()  # missing stays missing, not (W, 0)
                continue
            assert fkp[t, k, 0] == pytest.approx(40 - kp[t, source, 0])
            assert colour_at(flipped, t, *fkp[t, k, :2]) == joint_colour(source)
    # Left and right swapped: the new left wrist is the old right wrist, mirrored.
    assert fkp[0, 9, 1] == kp[0, 10, 1]


def test_flip_decision_is_per_clip():
    images, keypoints = marked_clip(frames=4)
    array, kp = Resize(96, 40)(images, keypoints, None)
    outcomes = set()
    for seed in range(12):
        flipped, _ = HorizontalFlip(0.5)(array, kp, np.random.default_rng(seed))
        per_frame = [np.array_equal(flipped[t], array[t, :, ::-1]) for t in range(4)]
        assert len(set(per_frame)) == 1
        outcomes.add(per_frame[0])
    assert outcomes == {True, False}


def test_normalize_and_random_erasing():
    images = np.full((2, 8, 6, 3), 255, np.uint8)
    x, _ = Normalize()(images, None, None)
    assert x.shape == (2, 3, 8, 6) and x.dtype == np.float32
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    np.testing.assert_allclose(x[0, :, 0, 0], expected, rtol=1e-6)
    kp = np.ones((2, 17, 3), np.float32)
    erased, kp_out = RandomErasing(p=1.0, area=(0.2, 0.3))(x.copy(), kp, np.random.default_rng(1))
    zero = (erased == 0).all(1)
    assert zero.any() and np.array_equal(zero[0], zero[1])  # the same rectangle in every frame
    assert kp_out is kp


def test_build_transform_pipeline():
    images, keypoints = marked_clip()
    out, kp = build_transform(64, 32, train=True)(images, keypoints, np.random.default_rng(0))
    assert out.shape == (3, 3, 64, 32) and out.dtype == torch.float32
    assert kp.shape == (3, 17, 3) and kp.dtype == torch.float32
    test = build_transform(64, 32, train=False)
    assert [type(s) for s in test.steps] == [Resize, Normalize]
    assert isinstance(test, Compose)

"""Keypoint-corruption controls (keypointops.data.corruption) and their use by the test loader."""
import numpy as np
import pytest
import torch
from PIL import Image

from keypointops.data import Tracklet, build_loader
from keypointops.data.corruption import KEYPOINT_CORRUPTIONS, corrupt_keypoints, donor_frames, donor_indices
from keypointops.data.keypoint_files import COCO17_FLIP


@pytest.fixture(scope="module")
def tracklets(tmp_path_factory):
    """4 identities x 2 tracklets of 5 or 9 frames (32 x 16 images); identity p's joint k sits at
    x = 1 + k % 14, y = 2 + p * 7 (every joint present but joint 3 of identity 0)."""
    root = tmp_path_factory.mktemp("clips")
    out = []
    for pid in range(4):
        for camid in range(2):
            length = 5 if camid == 0 else 9
            frames = []
            for f in range(length):
                path = root / f"{pid}_{camid}_{f}.png"
                Image.fromarray(np.full((32, 16, 3), pid * 50, np.uint8)).save(path)
                frames.append(str(path))
            kp = np.zeros((length, 17, 3), np.float32)
            kp[:, :, 0] = 1 + np.arange(17) % 14
            kp[:, :, 1] = 2 + pid * 7
            kp[:, :, 2] = 1.0
            if pid == 0:
                kp[:, 3] = 0
            out.append(Tracklet(tuple(frames), pid, camid, kp))
    return out


def _keypoints(tracklets, setting):
    loader = build_loader(tracklets, train=False, frames=3, sampling="evenly", height=64, width=32,
                          batch_size=8, workers=0, keypoints=setting)
    return next(iter(loader))["keypoints"]


def test_settings_change_keypoints_as_documented(tracklets):
    as_is = _keypoints(tracklets, "as-is")  # input pixels x2 (32x16 -> 64x32)
    assert torch.equal(as_is[2, 0, 5], torch.tensor([2.0 * 6, 2.0 * 9, 1.0]))
    assert torch.equal(_keypoints(tracklets, "zeroed"), torch.zeros_like(as_is))
    assert torch.equal(_keypoints(tracklets, "swapped"), as_is[:, :, list(COCO17_FLIP)])
    shifted = _keypoints(tracklets, "shifted")
    present = as_is[..., 2] > 0
    assert torch.equal(shifted[..., 1][present], as_is[..., 1][present] + 16.0)
    assert torch.equal(shifted[~present], torch.zeros_like(shifted[~present]))
    assert torch.equal(shifted[..., 0], as_is[..., 0])
    shuffled = _keypoints(tracklets, "shuffled")
    own_pid_row = (as_is[:, 0, 5, 1] / 2 - 2) / 7
    donor_pid_row = (shuffled[:, 0, 5, 1] / 2 - 2) / 7
    assert bool((own_pid_row != donor_pid_row).all()), "a shuffled tracklet kept its own identity's keypoints"


def test_donors_other_identity_and_deterministic():
    pids = [0, 0, 1, 1, 2, 2, 2]
    donors = donor_indices(pids, seed=3)
    assert np.array_equal(donors, donor_indices(pids, seed=3))
    assert all(pids[d] != pids[i] for i, d in enumerate(donors))
    assert all(d != i for i, d in enumerate(donor_indices([5, 5, 5], seed=0)))


def test_donor_frames_relative_positions():
    assert donor_frames(np.array([0, 2, 4]), 5, 9).tolist() == [0, 4, 8]
    assert donor_frames(np.array([0]), 1, 9).tolist() == [0]


def test_unknown_setting_lists_choices(tracklets):
    with pytest.raises(ValueError, match="choose from " + ", ".join(KEYPOINT_CORRUPTIONS)):
        corrupt_keypoints(np.zeros((1, 17, 3), np.float32), "mirrored", 64)
    with pytest.raises(ValueError, match="test-time control"):
        build_loader(tracklets, train=True, frames=2, sampling="evenly", height=64, width=32, batch_size=2,
                     workers=0, keypoints="zeroed")

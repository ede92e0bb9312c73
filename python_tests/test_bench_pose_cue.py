"""bench/pose_cue.py's features: the pose cue it measures is the body's, not the crop's (invariant to
where the person stands in the crop and how tall the person is drawn); the pose branch trains on the
model's inputs and on body-normalised ones."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import pose_cue  # noqa: E402


def test_features_ignore_the_person_s_place_and_size_in_the_crop():
    rng = np.random.default_rng(0)
    clip = np.concatenate([rng.uniform(10, 60, (4, 17, 2)), np.ones((4, 17, 1))], axis=-1)
    clip[1, 3, 2] = 0.0                                          # a missing joint
    moved = clip.copy()
    moved[..., :2] = clip[..., :2] * 1.7 + np.array([5.0, -12.0])
    np.testing.assert_allclose(pose_cue.body_normalised(moved), pose_cue.body_normalised(clip), atol=1e-5)
    np.testing.assert_allclose(pose_cue.limb_ratios(moved), pose_cue.limb_ratios(clip), rtol=1e-6)
    assert (pose_cue.body_normalised(clip)[1, 3] == 0).all()
    other = clip.copy()
    other[:, 13:, 1] += 8.0                                      # longer shins: another body
    assert not np.allclose(pose_cue.limb_ratios(other), pose_cue.limb_ratios(clip))


def test_the_pose_branch_trains_on_the_model_s_inputs():
    rng = np.random.default_rng(0)

    class TinySplit:
        keypoints = [np.concatenate([rng.uniform(0, 60, (9, 17, 2)), np.ones((9, 17, 1))], axis=-1)
                     for _ in range(6)]
        pids = np.array([0, 0, 1, 1, 2, 2])
        sizes = [(128, 64)] * 6

    split = TinySplit()
    x = pose_cue.pose_branch_inputs(split, 0, np.arange(pose_cue.FRAMES))
    assert x.shape == (pose_cue.FRAMES, 14, 2) and 0 <= x.min() and x.max() <= 1
    net, ce_start, ce_end = pose_cue.train_classifier(split, pose_cue.pose_branch_net(8), pose_cue.pose_branch_inputs,
                                                      16, steps=3, seed=0)
    assert ce_start == np.log(3) and np.isfinite(ce_end)
    assert pose_cue.test_features(net, pose_cue.pose_branch_inputs, (split,)).shape == (6, 16)
    body = pose_cue.body_pose_branch_inputs(split, 0, np.arange(pose_cue.FRAMES))
    assert body.shape == (pose_cue.FRAMES, 14, 2)
    split.keypoints[0][..., :2] = split.keypoints[0][..., :2] * 0.5 + 7.0     # the person drawn elsewhere
    np.testing.assert_allclose(pose_cue.body_pose_branch_inputs(split, 0, np.arange(pose_cue.FRAMES)), body,
                               atol=1e-5)
    net, _, ce_end = pose_cue.train_classifier(split, pose_cue.body_pose_branch_net(8),
                                               pose_cue.body_pose_branch_inputs, 16, steps=3, seed=0)
    assert np.isfinite(ce_end)
    assert pose_cue.test_features(net, pose_cue.body_pose_branch_inputs, (split,)).shape == (6, 16)

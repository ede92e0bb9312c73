"""bench/pose_cue.py's features: the pose cue it measures is the body's, not the crop's (invariant to
where the person stands in the crop and how tall the person is drawn)."""
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

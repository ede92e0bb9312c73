"""Keypoint files: .pose and OpenPose JSON round trips, missing / NaN / malformed input, skeleton
conversion, the per-tracklet .npz cache (and its rebuild when the files change), load_keypoints,
and random / mutated bytes fed to each parser."""
import io
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from helpers import FUZZ_EXAMPLES, assert_own_error, fuzz_settings, mutated_bytes

from keypointops.data import Tracklet, load_keypoints
from keypointops.data.keypoint_files import (COCO17_FLIP, cache_tracklet_keypoints, from_coco17, read_cache,
                                             read_openpose, read_pose, sanitize, to_coco17, write_cache,
                                             write_openpose, write_pose)
from keypointops.graphs import SKELETONS


def random_keypoints(seed=0, shape=(17,)):
    rng = np.random.default_rng(seed)
    kp = np.zeros(shape + (3,), np.float32)
    kp[..., 0] = rng.uniform(1, 64, shape)
    kp[..., 1] = rng.uniform(1, 128, shape)
    kp[..., 2] = rng.uniform(0.1, 1, shape)
    return kp


def test_pose_round_trip(tmp_path):
    kp = random_keypoints()
    kp[3] = 0  # a missing joint
    write_pose(tmp_path / "a.pose", kp)
    text = (tmp_path / "a.pose").read_text()
    assert text.count("\n") == 1 and text.startswith("[[")
    np.testing.assert_allclose(read_pose(tmp_path / "a.pose"), kp, atol=1e-2)
    assert (read_pose(tmp_path / "a.pose")[3] == 0).all()


def test_pose_python_spellings_and_missing_conventions(tmp_path):
    rows = [[10.0, 20.0, 0.9]] * 17
    rows[0] = ["nan", 5.0, 0.9]         # NaN coordinate
    rows[1] = [4.0, 5.0, -1.0]          # negative confidence
    rows[2] = [0.0, 0.0, 0.8]           # the (0, 0) convention
    rows[3] = [7.0, 8.0, "nan"]         # NaN confidence
    body = ", ".join(f"({x}, {y}, {s})" for x, y, s in rows)   # tuples, as Python writes them
    (tmp_path / "b.pose").write_text(f"[{body}]\nignored second line\n")
    kp = read_pose(tmp_path / "b.pose")
    assert kp.dtype == np.float32 and kp.shape == (17, 3)
    assert (kp[:4] == 0).all()
    np.testing.assert_allclose(kp[4:], [[10, 20, 0.9]] * 13, rtol=1e-6)


@pytest.mark.parametrize("content", ["[[1, 2, 3]]", "not a list", "__import__('os').system('true')",
                                     "[[1, 2, 3]] * 17", ""])
def test_malformed_pose_raises_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.pose"
    path.write_text(content + "\n")
    with pytest.raises(ValueError, match="bad.pose"):
        read_pose(path)


def test_sanitize():
    kp = np.array([[1, 2, 0.5], [np.inf, 2, 0.5], [1, 2, 0], [0, 0, 1], [0, 3, 1], [-1, -1, 1], [-2, 5, 1]],
                  np.float32)
    out = sanitize(kp)
    np.testing.assert_array_equal(out, [[1, 2, 0.5], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 3, 1], [0, 0, 0],
                                        [-2, 5, 1]])


def test_coco17_flip_swaps_left_and_right():
    joints = SKELETONS["coco17"].joints
    for k, j in enumerate(COCO17_FLIP):
        assert joints[j] == joints[k].replace("left", "#").replace("right", "left").replace("#", "right")
    assert COCO17_FLIP[0] == 0 and sorted(COCO17_FLIP) == list(range(17))


@pytest.mark.parametrize("skeleton", ["body25", "openpose18"])
def test_openpose_round_trip_and_neck(tmp_path, skeleton):
    kp = random_keypoints(1)
    write_openpose(tmp_path / "a_keypoints.json", kp, skeleton)
    data = json.loads((tmp_path / "a_keypoints.json").read_text())
    flat = np.asarray(data["people"][0]["pose_keypoints_2d"]).reshape(-1, 3)
    joints = SKELETONS[skeleton].joints
    assert len(flat) == len(joints)
    np.testing.assert_allclose(flat[joints.index("neck"), :2], (kp[5, :2] + kp[6, :2]) / 2, atol=1e-3)
    np.testing.assert_allclose(read_openpose(tmp_path / "a_keypoints.json"), kp, atol=1e-3)
    # The neck is valid only when both shoulders are.
    kp[6] = 0
    assert (from_coco17(kp, skeleton)[joints.index("neck")] == 0).all()
    assert (to_coco17(from_coco17(kp, skeleton), skeleton) == sanitize(kp)).all()


def test_openpose_picks_the_most_confident_person_and_handles_none(tmp_path):
    weak, strong = random_keypoints(2), random_keypoints(3)
    weak[:, 2] = 0.1
    strong[:, 2] = 0.9
    people = [{"pose_keypoints_2d": from_coco17(k, "body25").reshape(-1).tolist()} for k in (weak, strong)]
    (tmp_path / "two.json").write_text(json.dumps({"people": people}))
    np.testing.assert_allclose(read_openpose(tmp_path / "two.json"), strong, atol=1e-5)
    (tmp_path / "none.json").write_text(json.dumps({"people": []}))
    assert (read_openpose(tmp_path / "none.json") == 0).all()
    (tmp_path / "bad.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": [1, 2, 3]}]}))
    with pytest.raises(ValueError, match="bad.json"):
        read_openpose(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        read_openpose(tmp_path / "broken.json")


def test_npz_cache_round_trip(tmp_path):
    kp = random_keypoints(4, (5, 17))
    write_cache(tmp_path / "c" / "t.npz", kp)
    np.testing.assert_array_equal(read_cache(tmp_path / "c" / "t.npz"), kp)
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["t.npz"]  # no temporary file left
    np.save(tmp_path / "wrong.npy", kp)
    with pytest.raises(ValueError, match="wrong"):
        read_cache(tmp_path / "wrong.npy")


def test_load_keypoints_sources(tmp_path):
    frames = tuple(str(tmp_path / "img" / f"f{i}.jpg") for i in range(3))
    kp = random_keypoints(5, (3, 17))
    (tmp_path / "kp").mkdir()
    write_pose(tmp_path / "kp" / "f0.pose", kp[0])
    write_openpose(tmp_path / "kp" / "f2_keypoints.json", kp[2])
    from_folder = load_keypoints(Tracklet(frames, 1, 0, str(tmp_path / "kp")))
    np.testing.assert_allclose(from_folder[[0, 2]], kp[[0, 2]], atol=1e-2)
    assert (from_folder[1] == 0).all()  # no file: every joint missing
    np.testing.assert_array_equal(load_keypoints(Tracklet(frames, 1, 0, kp)), kp)
    assert load_keypoints(Tracklet(frames, 1, 0)).shape == (3, 17, 3)
    with pytest.raises(ValueError, match="must be"):
        load_keypoints(Tracklet(frames[:2], 1, 0, kp))


def test_cache_counts_missing_files(tmp_path):
    frames = [tuple(str(tmp_path / f"t{t}_{i}.jpg") for i in range(4)) for t in range(3)]
    for t in range(3):
        for i in range(4):
            if (t, i) not in ((0, 1), (2, 3)):
                write_pose(tmp_path / f"t{t}_{i}.pose", random_keypoints(t * 4 + i))
    tracklets = [Tracklet(f, t, 0) for t, f in enumerate(frames)]

    def frame_file(frame):
        path = tmp_path / (frame[len(str(tmp_path)) + 1:-4] + ".pose")
        return path if path.is_file() else None

    for _ in range(2):  # built, then read back from the cache: the same count
        cached, missing, total = cache_tracklet_keypoints(tracklets, frame_file, tmp_path / "cache", "fixture")
        assert (missing, total) == (2, 12)
        assert all(str(t.keypoints).endswith(".npz") for t in cached)
    assert (load_keypoints(cached[0])[1] == 0).all() and (load_keypoints(cached[0])[0] > 0).any()


def _cached_tracklet(tmp_path, frames=3):
    """One tracklet with a .pose file per frame; returns (tracklets, frame_file, cache folder)."""
    names = tuple(str(tmp_path / f"f{i}.jpg") for i in range(frames))
    for i in range(frames):
        write_pose(tmp_path / f"f{i}.pose", random_keypoints(i))

    def frame_file(frame):
        path = Path(frame).with_suffix(".pose")
        return path if path.is_file() else None
    return [Tracklet(names, 0, 0)], frame_file, tmp_path / "cache"


@pytest.mark.parametrize("change", ["replaced", "removed", "added"])
def test_cache_rebuilds_when_the_keypoint_files_change(tmp_path, caplog, change):
    tracklets, frame_file, cache = _cached_tracklet(tmp_path)
    if change == "added":
        os.unlink(tmp_path / "f1.pose")
    cache_tracklet_keypoints(tracklets, frame_file, cache, "fixture")
    new = random_keypoints(99)
    if change == "removed":
        os.unlink(tmp_path / "f1.pose")
    else:  # the same size as before: the modification time tells
        write_pose(tmp_path / "f1.pose", new)
        stat = os.stat(tmp_path / "f1.pose")
        os.utime(tmp_path / "f1.pose", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with caplog.at_level(logging.WARNING, logger="keypointops.data"):
        cached, missing, _ = cache_tracklet_keypoints(tracklets, frame_file, cache, "fixture")
    got = load_keypoints(cached[0])[1]
    if change == "removed":
        assert missing == 1 and (got == 0).all()
    else:
        assert missing == 0
        np.testing.assert_allclose(got, new, atol=1e-2)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["fixture"]  # said once
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="keypointops.data"):
        cache_tracklet_keypoints(tracklets, frame_file, cache, "fixture")
    assert not caplog.records  # up to date again


def test_damaged_cache_is_rebuilt(tmp_path):
    tracklets, frame_file, cache = _cached_tracklet(tmp_path)
    cached, _, _ = cache_tracklet_keypoints(tracklets, frame_file, cache, "fixture")
    Path(cached[0].keypoints).write_bytes(b"garbage")
    cached, _, _ = cache_tracklet_keypoints(tracklets, frame_file, cache, "fixture")
    np.testing.assert_allclose(load_keypoints(cached[0])[2], random_keypoints(2), atol=1e-2)


def test_huge_numbers_name_the_file(tmp_path):
    (tmp_path / "a.pose").write_text("[" + ", ".join(["[1, 2, 0.5]"] * 16 + ["[" + "1" + "0" * 400 + ", 2, 1]"]) + "]")
    with pytest.raises(ValueError, match="a.pose"):
        read_pose(tmp_path / "a.pose")
    (tmp_path / "b.json").write_text('{"people": [{"pose_keypoints_2d": [1' + "0" * 400 + ', 2, 1]}]}')
    with pytest.raises(ValueError, match="b.json"):
        read_openpose(tmp_path / "b.json")


def _fuzz(parser, valid: bytes, suffix: str, check_result):
    """Feeds random and mutated versions of ``valid`` to ``parser``: it returns a result that passes
    ``check_result`` or raises its own one-line ValueError naming the file."""
    folder = tempfile.TemporaryDirectory()
    path = Path(folder.name) / f"frame{suffix}"
    examples = []

    @fuzz_settings()
    @given(mutated_bytes(valid))
    def run(data):
        examples.append(len(data))
        path.write_bytes(data)
        try:
            result = parser(path)
        except Exception as err:  # noqa: BLE001 - the property: only the parser's own error type
            assert_own_error(err, path)
        else:
            check_result(result)

    with folder:
        run()
    assert len(examples) >= FUZZ_EXAMPLES


def _frame_keypoints(kp):
    assert kp.dtype == np.float32 and kp.shape == (17, 3) and np.isfinite(kp).all()


def test_fuzz_pose_files(tmp_path):
    write_pose(tmp_path / "a.pose", random_keypoints())
    _fuzz(read_pose, (tmp_path / "a.pose").read_bytes(), ".pose", _frame_keypoints)


def test_fuzz_openpose_files(tmp_path):
    write_openpose(tmp_path / "a.json", random_keypoints())
    _fuzz(read_openpose, (tmp_path / "a.json").read_bytes(), "_keypoints.json", _frame_keypoints)


def test_fuzz_cache_files(tmp_path):
    write_cache(tmp_path / "a.npz", random_keypoints(0, (4, 17)), 1, "fingerprint")
    for compressed in (False, True):  # the stored and the deflated zip layouts
        valid = (tmp_path / "a.npz").read_bytes()
        if compressed:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, keypoints=random_keypoints(0, (4, 17)), missing_files=np.int64(1))
            valid = buffer.getvalue()

        def check(kp):
            assert kp.dtype == np.float32 and kp.ndim == 3 and kp.shape[1:] == (17, 3) and np.isfinite(kp).all()
        _fuzz(read_cache, valid, ".npz", check)

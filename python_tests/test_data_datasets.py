"""Dataset readers against small hand-made folders of each format."""
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from helpers import FUZZ_EXAMPLES, assert_own_error, fuzz_settings, mutated_bytes
from scipy.io import savemat

from keypointops.data import (MARS, PRID2011, DatasetNotFoundError, DukeMTMCVideoReID, PoseTrackReID, build_dataset,
                              iLIDSVID, load_keypoints)
from keypointops.data.keypoint_files import write_pose


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def mars_fixture(root, with_keypoints=True):
    """MARS layout: train pids 3 (cams 1, 2) and 7 (cam 1); test: pid 5 in cams 1, 2, 3, pid 9 in
    cams 2 and 4, a distractor (pid 0) and a junk tracklet (pid -1)."""
    tracks = {
        "train": [(3, 1, 1, 3), (3, 2, 1, 2), (7, 1, 1, 4)],
        "test": [(-1, 3, 1, 2), (0, 2, 1, 3), (5, 1, 1, 2), (5, 2, 1, 3), (5, 3, 1, 2), (9, 2, 1, 2), (9, 4, 1, 3)],
    }
    for split, rows in tracks.items():
        names, info = [], []
        for pid, cam, tracklet, length in rows:
            folder = "00-1" if pid == -1 else f"{pid:04d}"
            start = len(names) + 1
            for f in range(length):
                name = f"{folder}C{cam}T{tracklet:04d}F{f + 1:03d}"
                touch(root / f"bbox_{split}" / folder / f"{name}.jpg")
                if with_keypoints and not (split == "train" and pid == 7 and f == 0):
                    kp = np.zeros((17, 3), np.float32)
                    kp[:, :2], kp[:, 2] = [10 + f, 20], 0.9
                    (root / f"bbox_{split}_keypoints" / folder).mkdir(parents=True, exist_ok=True)
                    write_pose(root / f"bbox_{split}_keypoints" / folder / f"{name}.pose", kp)
                names.append(name + ".jpg")
            info.append((start, len(names), pid, cam))
        (root / "info").mkdir(parents=True, exist_ok=True)
        (root / "info" / f"{split}_name.txt").write_text("\n".join(names) + "\n")
        savemat(root / "info" / f"tracks_{split}_info.mat", {f"track_{split}_info": np.array(info, float)})
    # Queries: pid 5 in cam 1, pid 9 in cam 2 (1-based rows of the test info).
    savemat(root / "info" / "query_IDX.mat", {"query_IDX": np.array([[3, 6]], float)})
    return root


def test_mars_protocol(tmp_path, caplog):
    root = mars_fixture(tmp_path / "mars")
    with caplog.at_level(logging.WARNING, logger="keypointops.data"):
        ds = build_dataset("mars", tmp_path)  # the parent folder works too
    assert ds.num_train_pids == 2 and ds.num_train_cams == 2
    assert sorted((t.pid, t.camid, len(t.frames)) for t in ds.train) == [(0, 0, 3), (0, 1, 2), (1, 0, 4)]
    assert [(t.pid, t.camid) for t in ds.query] == [(5, 0), (9, 1)]
    assert sorted((t.pid, t.camid) for t in ds.gallery) == [(0, 1), (5, 1), (5, 2), (9, 3)]  # junk dropped
    assert ds.query[0].frames[0] == str(root / "bbox_test" / "0005" / "0005C1T0001F001.jpg")
    # One missing .pose file (pid 7's first frame), reported once for the dataset.
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["MARS: 1 of 24 frames have no keypoint file; their joints are missing"]
    pid7 = next(t for t in ds.train if t.pid == 1)
    kp = load_keypoints(pid7)
    assert (kp[0] == 0).all() and kp[1, 0, 0] == pytest.approx(11)
    assert len(MARS(root, drop_distractors=True).gallery) == 3
    # Without keypoint folders, tracklets have none.
    bare = mars_fixture(tmp_path / "bare", with_keypoints=False)
    assert all(t.keypoints is None for t in MARS(bare).train)


def test_mars_missing_and_inconsistent_files(tmp_path):
    root = mars_fixture(tmp_path / "mars", with_keypoints=False)
    (root / "info" / "query_IDX.mat").unlink()
    with pytest.raises(DatasetNotFoundError, match="query_IDX.mat") as err:
        MARS(root)
    assert "zheng-lab" in str(err.value)
    savemat(root / "info" / "query_IDX.mat", {"query_IDX": np.array([[99]], float)})
    with pytest.raises(ValueError, match="out of range"):
        MARS(root)
    savemat(root / "info" / "query_IDX.mat", {"query_IDX": np.array([[3]], float)})
    savemat(root / "info" / "tracks_train_info.mat", {"track_train_info": np.array([[1, 3, 4, 1]], float)})
    with pytest.raises(ValueError, match="does not belong"):
        MARS(root)
    with pytest.raises(DatasetNotFoundError, match="bbox_train"):
        MARS(tmp_path / "nothing")


def test_ilidsvid_splits_from_the_mat_file(tmp_path):
    root = tmp_path / "ilids-vid"
    people = [f"person{i:03d}" for i in (1, 2, 4, 5)]
    for cam in ("cam1", "cam2"):
        for person in people:
            for f in range(3):
                touch(root / "i-LIDS-VID" / "sequences" / cam / person / f"{cam}_{person}_{f:05d}.png")
    ls_set = np.array([[1, 2, 3, 4], [4, 3, 2, 1]] * 5, float)  # 1-based; test = the first half
    (root / "train-test people splits").mkdir()
    savemat(root / "train-test people splits" / "train_test_splits_ilidsvid.mat", {"ls_set": ls_set})
    ds = build_dataset("ilidsvid", tmp_path, split_id=1)
    assert sorted({t.pid for t in ds.query}) == [4, 5] and sorted({t.pid for t in ds.gallery}) == [4, 5]
    assert {t.camid for t in ds.query} == {0} and {t.camid for t in ds.gallery} == {1}
    assert ds.num_train_pids == 2 and len(ds.train) == 4 and ds.num_train_cams == 2
    assert len(ds.train[0].frames) == 3
    splits = json.loads((root / "splits.json").read_text())
    assert len(splits) == 10 and splits[0]["test"] == ["person001", "person002"]
    with pytest.raises(ValueError, match="split_id"):
        iLIDSVID(root, split_id=10)


def test_prid2011_makes_and_stores_ten_splits(tmp_path):
    root = tmp_path / "prid2011"
    cams = root / "prid_2011" / "multi_shot"
    for i in range(1, 7):
        for cam, frames in (("cam_a", 23), ("cam_b", 22 if i != 6 else 10)):
            for f in range(frames):
                touch(cams / cam / f"person_{i:04d}" / f"{f + 1:04d}.png")
    touch(cams / "cam_a" / "person_0099" / "0001.png")  # seen by one camera only
    ds = PRID2011(tmp_path, split_id=3)
    splits = json.loads((root / "splits_prid2011.json").read_text())
    assert len(splits) == 10
    kept = {f"person_{i:04d}" for i in range(1, 6)}  # person 6 (10 frames in cam_b) and 99 are left out
    for split in splits:
        assert len(split["train"]) == len(split["test"]) == 2
        assert not set(split["train"]) & set(split["test"]) and set(split["train"] + split["test"]) <= kept
    assert len({tuple(s["test"]) for s in splits}) > 1
    assert {t.pid for t in ds.query} == {int(p[7:]) for p in splits[3]["test"]}
    assert PRID2011(root, split_id=3).query == ds.query  # the stored splits are reused


def test_dukev_reader(tmp_path):
    root = tmp_path / "DukeMTMC-VideoReID"
    for split, pid, tracklet, cam, frames in (("train", 1, 1, 6, 3), ("train", 1, 2, 2, 2), ("train", 8, 1, 3, 2),
                                              ("query", 4, 1, 1, 2), ("gallery", 4, 1, 5, 2), ("gallery", 4, 2, 1, 1)):
        for f in (3, 1, 2)[:frames] if frames == 3 else range(1, frames + 1):
            touch(root / split / f"{pid:04d}" / f"{tracklet:04d}" / f"{pid:04d}_C{cam}_F{f:04d}_X1234.jpg")
    kp = np.full((17, 3), 5.0, np.float32)
    write_pose(root / "query" / "0004" / "0001" / "0004_C1_F0001_X1234.pose", kp)
    ds = DukeMTMCVideoReID(tmp_path)
    assert ds.num_train_pids == 2 and ds.num_train_cams == 3
    first = next(t for t in ds.train if t.camid == 5)
    assert [f[-15:-10] for f in first.frames] == ["F0001", "F0002", "F0003"]  # ordered by frame number
    assert [(t.pid, t.camid) for t in ds.query] == [(4, 0)]
    assert sorted((t.pid, t.camid) for t in ds.gallery) == [(4, 0), (4, 4)]
    assert load_keypoints(ds.query[0])[0, 0, 0] == 5.0 and (load_keypoints(ds.query[0])[1] == 0).all()
    touch(root / "train" / "0001" / "0003" / "garbage.jpg")
    with pytest.raises(ValueError, match="garbage.jpg"):
        DukeMTMCVideoReID(root)


def test_posetrackreid_reader(tmp_path):
    root = tmp_path / "posetrack-reid"
    entries = {"train": [[["a1.pose", "a2.pose"], 11, 3], [["b1.pose"], 12, 4]],
               "query": [[["q1.pose"], 20, 7]], "gallery": [[["g1.pose", "g2.pose"], 20, 8]]}
    for split, rows in entries.items():
        root.mkdir(exist_ok=True)
        (root / f"{split}_names.json").write_text(json.dumps(rows))
        folder = "train" if split == "train" else "val"
        for names, pid, _ in rows:
            for name in names:
                touch(root / folder / str(pid) / name.replace(".pose", ".jpg"))
                (root / f"{folder}_keypoints" / str(pid)).mkdir(parents=True, exist_ok=True)
                write_pose(root / f"{folder}_keypoints" / str(pid) / name, np.full((17, 3), 0.5, np.float32))
    ds = PoseTrackReID(tmp_path)
    assert sorted((t.pid, t.camid) for t in ds.train) == [(0, 3), (1, 4)]
    assert [(t.pid, t.camid) for t in ds.query] == [(20, 7)] and ds.gallery[0].camid == 8
    assert ds.gallery[0].frames[1].endswith("val/20/g2.jpg")
    assert load_keypoints(ds.gallery[0]).shape == (2, 17, 3) and (load_keypoints(ds.gallery[0])[..., 2] > 0).all()
    (root / "query_names.json").unlink()
    with pytest.raises(DatasetNotFoundError, match="query_names.json"):
        PoseTrackReID(root)


def test_build_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("market", tmp_path)
    with pytest.raises(ValueError, match="needs root"):
        build_dataset("mars")
    for name, missing in (("ilidsvid", "cam1"), ("prid2011", "cam_a"), ("dukev", "train"),
                          ("posetrackreid", "train_names.json")):
        with pytest.raises(DatasetNotFoundError, match=missing):
            build_dataset(name, tmp_path)


MARS_INFO_FILES = ["train_name.txt", "test_name.txt", "tracks_train_info.mat", "tracks_test_info.mat", "query_IDX.mat"]


@pytest.mark.parametrize("name", MARS_INFO_FILES)
def test_fuzz_mars_info_files(name):
    """Random and mutated bytes in one of MARS's info files: the reader builds the dataset or raises
    its own one-line ValueError naming a file of info/ (a damaged file, or one that no longer
    matches the others), never another exception."""
    folder = tempfile.TemporaryDirectory()
    root = mars_fixture(Path(folder.name) / "mars", with_keypoints=False)
    valid = (root / "info" / name).read_bytes()
    examples = []

    @fuzz_settings()
    @given(mutated_bytes(valid))
    def run(data):
        examples.append(len(data))
        (root / "info" / name).write_bytes(data)
        try:
            MARS(root)
        except Exception as err:  # noqa: BLE001 - the property: only the reader's own error type
            assert_own_error(err, root / "info")

    with folder:
        run()
    assert len(examples) >= FUZZ_EXAMPLES


@pytest.mark.parametrize("name", ["tracks_test_info.mat", "test_name.txt"])
@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_mars_info_file_is_a_one_line_error(tmp_path, name, damage):
    root = mars_fixture(tmp_path / "mars", with_keypoints=False)
    path = root / "info" / name
    path.write_bytes(b"" if damage == "empty" else path.read_bytes()[:150] + b"\xff\xfe")
    with pytest.raises(ValueError, match=name) as err:
        MARS(root)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("compressed", [False, True])
def test_mat_reader_matches_scipy(tmp_path, compressed):
    from scipy.io import loadmat

    from keypointops.data.mat_files import read_mat

    rng = np.random.default_rng(0)
    arrays = {"info": rng.integers(-1, 1000, (7, 4)).astype(float), "ints": np.arange(12, dtype=np.int32).reshape(3, 4),
              "row": np.array([[3, 6]], float), "cube": rng.random((2, 3, 4)).astype(np.float32),
              "empty": np.zeros((0, 4)), "bytes": np.uint8([[1, 2]])}
    savemat(tmp_path / "a.mat", arrays, do_compression=compressed)
    got, expected = read_mat(tmp_path / "a.mat"), loadmat(tmp_path / "a.mat")
    for name in arrays:
        assert got[name].dtype == expected[name].dtype
        np.testing.assert_array_equal(got[name], expected[name])
    savemat(tmp_path / "b.mat", {"text": "abc", "cell": np.array([1, "x"], dtype=object)})
    with pytest.raises(ValueError, match="b.mat: unreadable .mat file: variable 'text' is not a real numeric"):
        read_mat(tmp_path / "b.mat")

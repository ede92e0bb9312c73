"""The synthetic generator: determinism, the MARS reader loads it with the asked counts, keypoints
land on the rendered body, the cache folder is generated atomically once."""
import json

import numpy as np
import pytest
from PIL import Image

from keypointops.data import MARS, build_dataset, load_keypoints
from keypointops.data import synthetic

SMALL = dict(num_train_ids=4, num_test_ids=5, seed=3, num_cameras=3, frames=5, size=(48, 24))


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "data"
    synthetic.generate(root, workers=1, progress=False, **SMALL)
    return root


def files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and "keypoints_cache" not in p.parts}


def test_same_seed_gives_byte_identical_files(small_root, tmp_path):
    synthetic.generate(tmp_path / "again", workers=2, progress=False, **SMALL)  # workers do not matter
    first = files(small_root)
    assert files(tmp_path / "again") == first
    synthetic.generate(tmp_path / "other", workers=1, progress=False, **{**SMALL, "seed": 4})
    assert files(tmp_path / "other") != first


def test_mars_reader_loads_it_with_the_asked_counts(small_root):
    described = json.loads((small_root / "synthetic.json").read_text())["counts"]
    ds = MARS(small_root)
    assert ds.num_train_pids == SMALL["num_train_ids"]
    assert sorted({t.pid for t in ds.train}) == list(range(SMALL["num_train_ids"]))
    test_ids = {t.pid for t in ds.query + ds.gallery} - {0}
    assert test_ids == set(range(SMALL["num_train_ids"] + 1, SMALL["num_train_ids"] + SMALL["num_test_ids"] + 1))
    assert len(ds.train) == described["train"]["tracklets"]
    assert len(ds.query) == described["test"]["query"] > 0
    assert len(ds.query) + len(ds.gallery) == described["test"]["tracklets"] - described["test"]["junk"]
    assert all(0 <= t.camid < SMALL["num_cameras"] for t in ds.train + ds.query + ds.gallery)
    assert all(t.pid != -1 for t in ds.query + ds.gallery)
    assert sum(t.pid == 0 for t in ds.gallery) == described["test"]["distractors"]
    # Every query identity has a gallery tracklet in another camera.
    for q in ds.query:
        assert any(g.pid == q.pid and g.camid != q.camid for g in ds.gallery)
    kp = load_keypoints(ds.train[0])
    assert kp.shape == (len(ds.train[0].frames), 17, 3) and (kp[..., 2] > 0).mean() > 0.5
    image = Image.open(ds.train[0].frames[0])
    assert image.size == (SMALL["size"][1], SMALL["size"][0])
    assert len(MARS(small_root, drop_distractors=True).gallery) == len(ds.gallery) - described["test"]["distractors"]


def test_keypoints_land_on_the_rendered_body():
    rng = np.random.default_rng(0)
    size = (128, 64)
    cameras = [synthetic.make_camera(rng, size) for _ in range(4)]
    on_body, total = 0, 0
    for i in range(8):
        person = synthetic.make_identity(rng, synthetic.make_family(rng), i)
        frames, keypoints, masks = synthetic.render_tracklet(np.random.default_rng(i), person, cameras[i % 4], 4,
                                                             size, occluders=0.0, with_masks=True)
        assert len(frames) == len(masks) == 4 and keypoints.shape == (4, 17, 3)
        for kp, mask in zip(keypoints, masks):
            mask = np.asarray(mask)
            for joint in (5, 6, 11, 12, 15, 16):  # shoulders, hips, ankles
                x, y, c = kp[joint]
                if c > 0.5:
                    total += 1
                    on_body += mask[int(y), int(x)] > 0
    assert total > 100 and on_body / total > 0.9


def test_ensure_synthetic_generates_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KEYPOINTOPS_CACHE", str(tmp_path / "cache"))
    params = dict(SMALL, num_train_ids=2, num_test_ids=2)
    root = synthetic.default_root(**params)
    assert root.parent == tmp_path / "cache" and root.name.startswith(f"synthetic-v{synthetic.VERSION}-")
    assert synthetic.default_root(**{**params, "seed": 9}) != root
    ds = build_dataset("synthetic", progress=False, workers=1, **params)
    assert (root / "synthetic.json").is_file() and ds.num_train_pids == 2
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [root.name]  # no temporary folder left
    stamp = (root / "synthetic.json").stat().st_mtime_ns
    assert synthetic.ensure_synthetic(**params) == root
    assert (root / "synthetic.json").stat().st_mtime_ns == stamp  # reused, not regenerated
    with pytest.raises(ValueError, match="other parameters"):
        synthetic.ensure_synthetic(root, **{**params, "seed": 5})
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "x").write_text("")
    with pytest.raises(FileExistsError, match="partial"):
        synthetic.ensure_synthetic(tmp_path / "partial", **params)


def test_bad_parameters():
    with pytest.raises(ValueError, match="num_cameras"):
        synthetic.default_root(num_cameras=12)
    with pytest.raises(ValueError, match="size"):
        synthetic.default_root(size=(8, 4))

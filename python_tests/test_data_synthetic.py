"""The synthetic generator: determinism, the MARS reader loads it with the asked counts, keypoints
land on the rendered body, the cache folder is generated atomically once; the hard variant: equal
colour areas, gait twins, and the no-training checks that make it a test of alignment (the hip
moves within an identity, the keypoint-aligned part histogram beats the 4-stripe one)."""
import dataclasses
import hashlib
import json
import math

import numpy as np
import pytest
from PIL import Image

import torch

from keypointops.data import MARS, build_dataset, hold_out_validation, load_keypoints
from keypointops.data import synthetic
from keypointops.data.synthetic import appearance, rendering
from keypointops.engine import evaluate_models
from keypointops.models.color_histogram import ColorHistogram, PartColorHistogram

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


def test_validation_split_holds_out_training_identities(small_root):
    """hold_out_validation: query and gallery are training identities taken out of the training
    set (relabelled 0..n-1), none of the test split; every held-out tracklet is in the gallery and,
    where its identity has another camera, a query with a gallery match there; the same split for
    the same seed; bad counts are one-line errors."""
    full = MARS(small_root)
    validation = hold_out_validation(full, 2)
    assert (full.evaluation_split, validation.evaluation_split) == ("test", "validation")
    kept, held = {t.frames for t in validation.train}, {t.frames for t in validation.gallery}
    assert not kept & held and kept | held == {t.frames for t in full.train}
    assert not held & {t.frames for t in full.query + full.gallery}
    assert sorted({t.pid for t in validation.train}) == list(range(validation.num_train_pids)) == [0, 1]
    assert 0 < len(validation.query) and {t.frames for t in validation.query} <= held
    for q in validation.query:
        assert any(g.pid == q.pid and g.camid != q.camid for g in validation.gallery)
    assert [t.frames for t in hold_out_validation(full, 2).query] == [t.frames for t in validation.query]
    assert any({t.frames for t in hold_out_validation(full, 2, seed=seed).train} != kept for seed in range(1, 6))
    for bad in (0, 4):
        with pytest.raises(ValueError, match=rf"^validation_ids={bad}: must be between 1 and 3 \(the dataset "
                                             r"has 4 training identities\)$"):
            hold_out_validation(full, bad)


def test_neutral_knobs_render_the_default_dataset(small_root, tmp_path):
    synthetic.generate(tmp_path / "neutral", workers=1, progress=False, **SMALL, **synthetic.NEUTRAL)
    assert files(tmp_path / "neutral") == files(small_root)
    assert set(json.loads((small_root / "synthetic.json").read_text())["params"]) == set(synthetic.DEFAULTS)
    # The keypoints and frame names of this dataset as every version 2 generator writes them (the
    # JPEG bytes are left out: they depend on the image library's encoder).
    digest = hashlib.sha256()
    for path in sorted(small_root.rglob("*")):
        if path.suffix in (".pose", ".txt"):
            digest.update(str(path.relative_to(small_root)).encode())
            digest.update(path.read_bytes())
    assert synthetic.VERSION == 2
    assert digest.hexdigest() == "0071bae830ef789a4f2fc3627ae2f8847533271a87d32f0aaa93351819262312"


HARD_FRAMING = rendering.Framing(height=0.6, feet=0.8, shift=0.2, jitter=2.0)


@pytest.mark.parametrize("families, framing", [("colours", rendering.Framing()), ("placement", HARD_FRAMING)])
def test_keypoints_land_on_the_rendered_body(families, framing):
    rng = np.random.default_rng(0)
    size = (128, 64)
    cameras = [synthetic.make_camera(rng, size) for _ in range(4)]
    on_body, total = 0, 0
    for i in range(8):
        if families == "colours":
            person = synthetic.make_identity(rng, synthetic.make_family(rng), i)
        else:
            person = synthetic.make_placement_identity(rng, synthetic.make_placement_family(rng), 0)
        frames, keypoints, masks = synthetic.render_tracklet(np.random.default_rng(i), person, cameras[i % 4], 4,
                                                             size, occluders=0.0, with_masks=True, framing=framing)
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
    with pytest.raises(ValueError, match="families"):
        synthetic.default_root(families="stripes")
    with pytest.raises(ValueError, match="person_height"):
        synthetic.default_root(person_height=(0.9, 0.5))
    with pytest.raises(ValueError, match="shift"):
        synthetic.default_root(shift=2.0)
    with pytest.raises(ValueError, match="body_spread"):
        synthetic.default_root(body_spread=0)
    with pytest.raises(ValueError, match="unknown parameter.*'colour'"):
        synthetic.default_root(colour=1)
    with pytest.raises(ValueError, match="split"):
        synthetic.gait_twins(".", split="query")


@pytest.mark.parametrize("short_sleeves", [False, True])
def test_placement_swap_covers_equal_areas(short_sleeves):
    """Upper garment and trousers cover equal areas on average over views and gait phases, so
    swapping their colours leaves a family member's colour histogram unchanged."""
    rng = np.random.default_rng(1)
    family = synthetic.make_placement_family(rng)
    person = dataclasses.replace(synthetic.make_placement_identity(rng, family, 0), top=(255, 0, 0),
                                 lower=(0, 0, 255), hat=None, accent=None, accent_on=None,
                                 short_sleeves=short_sleeves, waist=appearance.EQUAL_AREA_WAIST[short_sleeves])
    upper_share = []
    for _ in range(40):
        image = Image.new("RGB", (128, 256))
        proj = rendering._Projection(rng.uniform(0, 2 * math.pi), 220, 64, 245)
        rendering._draw_person(rendering._Canvas(image, None), person,
                               rendering._body_joints(person, rng.uniform(0, 2 * math.pi)), proj)
        pixels = np.asarray(image).reshape(-1, 3)
        red, blue = ((pixels == (255, 0, 0)).all(1).sum(), (pixels == (0, 0, 255)).all(1).sum())
        upper_share.append(red / (red + blue))
    assert abs(np.mean(upper_share) - 0.5) < 0.04


def test_accent_is_drawn_on_its_side():
    """A left-sleeve accent lands around the left elbow's keypoint, not the right one's."""
    rng = np.random.default_rng(2)
    person = dataclasses.replace(synthetic.make_placement_identity(rng, synthetic.make_placement_family(rng), 0),
                                 accent=(0, 255, 0), accent_on="l_arm", short_sleeves=False)
    hits = {"l": 0, "r": 0}
    for view in (0.0, math.pi):  # front and back: the left arm on either side of the image
        image = Image.new("RGB", (128, 256))
        proj = rendering._Projection(view, 220, 64, 245)
        joints = rendering._body_joints(person, 0.3)
        rendering._draw_person(rendering._Canvas(image, None), person, joints, proj)
        pixels = np.asarray(image)
        for side in hits:
            u, v = proj.uv(joints[f"{side}_elbow"])
            hits[side] += int((pixels[int(v), int(u)] == (0, 255, 0)).all())
    assert hits == {"l": 2, "r": 0}


NO_TRAINING = dict(num_train_ids=2, num_test_ids=30, frames=6, distractors=0.0, junk=0.0, seed=1)


def test_hard_variant_is_a_test_of_alignment(tmp_path):
    """The no-training checks, at a small size: within an identity the hip moves >= 15 px at 128 x 64
    (about 1.5 px on the default dataset), and the keypoint-aligned part histogram reaches at least
    twice the 4-stripe histogram's mAP."""
    hard = build_dataset("synthetic-hard", tmp_path / "hard", progress=False, workers=1, **NO_TRAINING)
    described = json.loads((tmp_path / "hard" / "synthetic.json").read_text())
    assert described["params"]["families"] == "placement" and described["params"]["occluders"] == 0.5
    default = build_dataset("synthetic", tmp_path / "default", progress=False, workers=1, **NO_TRAINING)
    assert synthetic.hip_spread(hard.query + hard.gallery, 128) >= 15
    assert synthetic.hip_spread(default.query + default.gallery, 128) < 4
    config = {"train": dict(frames=4, test_sampling="evenly", height=128, width=64, batch_size=16),
              "workers": 0, "seed": 0}
    results = evaluate_models({"stripes": ColorHistogram(stripes=4), "parts": PartColorHistogram()}, hard, config,
                              torch.device("cpu"))
    assert results["parts"]["mAP"] >= 2 * results["stripes"]["mAP"]


def test_gait_twins_look_alike_and_walk_sideways(tmp_path):
    params = dict(num_train_ids=2, num_test_ids=16, frames=4, size=(64, 32), gait_twins=0.6, seed=2)
    synthetic.generate(tmp_path, workers=1, progress=False, **params)
    pairs = synthetic.gait_twins(tmp_path)
    assert pairs and all(2 < a < b <= 18 for a, b in pairs)
    assert all(a <= 2 and b <= 2 for a, b in synthetic.gait_twins(tmp_path, "train"))
    people, twins = appearance._identities(np.random.default_rng((params["seed"], 2)), 18, "colours", 0.6)
    for a, b in twins:
        first, second = people[a], people[b]
        assert dataclasses.replace(second, **{k: getattr(first, k) for k in
                                              ("height", "build", "legs", "stride", "cadence", "arm_swing")}) == first
        assert (second.legs, second.stride) != (first.legs, first.stride)
    # Side views: the shoulders nearly overlap in x.
    dataset = MARS(tmp_path)
    twin_pids = {pid for pair in pairs for pid in pair}
    spans = {True: [], False: []}
    for t in dataset.query + dataset.gallery:
        kp = load_keypoints(t)
        both = (kp[:, [5, 6], 2] > 0).all(1)
        spans[t.pid in twin_pids].extend(np.abs(kp[both, 5, 0] - kp[both, 6, 0]))
    assert np.mean(spans[True]) < 0.5 * np.mean(spans[False])


@pytest.mark.parametrize("families", ["colours", "placement"])
def test_body_spread_widens_the_bodies_about_their_centres(families):
    traits = ("height", "build", "legs", "stride", "arm_swing")

    def people(**spread):
        return appearance._identities(np.random.default_rng(5), 400, families, 0.3, **spread)[0]

    default, neutral, wide = people(), people(body_spread=1.0), people(body_spread=2.0)
    assert neutral == default                        # the neutral spread draws the same people
    for trait in traits:
        base = np.array([getattr(p, trait) for p in default])
        values = np.array([getattr(p, trait) for p in wide])
        centre, half = (base.min() + base.max()) / 2, (base.max() - base.min()) / 2
        assert values.std() > 1.7 * base.std(), trait
        low = max(centre - 2.0 * half, 0.0) if trait == "arm_swing" else centre - 2.0 * half  # swings >= 0
        assert abs(np.median(values) - (low + centre + 2.0 * half) / 2) < 0.2 * half, trait
        assert values.max() <= centre + 2.0 * half * 1.01, trait
    assert min(p.arm_swing for p in wide) >= 0.0      # a swing, never a negative amplitude
    cadence = np.array([p.cadence for p in wide])
    assert 0.06 <= cadence.min() and cadence.max() <= 0.11   # the cadence's range stays
    assert synthetic.default_root(body_spread=2.0) != synthetic.default_root()
    assert synthetic.default_root(body_spread=1.0) == synthetic.default_root()

"""build_loader: the batch contract, determinism across workers and epochs, evaluation chunks, bad
images."""
import numpy as np
import pytest
import torch
from PIL import Image

from keypointops.data import Tracklet, build_loader
from keypointops.data.keypoint_files import write_pose


@pytest.fixture(scope="module")
def tracklets(tmp_path_factory):
    """6 identities x 2 tracklets of 3..9 frames (48 x 24 images, keypoints on a marker pixel)."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    out = []
    for pid in range(6):
        for camid in range(2):
            length = 3 + (pid * 2 + camid) % 7
            frames, kp = [], np.zeros((length, 17, 3), np.float32)
            for f in range(length):
                image = np.zeros((48, 24, 3), np.uint8)
                image[..., 0] = pid * 40
                x, y = int(rng.integers(2, 22)), int(rng.integers(2, 46))
                image[y, x] = 255
                path = root / f"{pid}_{camid}_{f}.png"
                Image.fromarray(image).save(path)
                frames.append(str(path))
                kp[f, :, :2], kp[f, :, 2] = (x + 0.5, y + 0.5), 1.0
            kp[:, 3] = 0  # one joint missing everywhere
            out.append(Tracklet(tuple(frames), pid, camid, kp))
    return out


def test_train_batch_contract(tracklets):
    loader = build_loader(tracklets, train=True, frames=4, sampling="restricted_random", height=32, width=16,
                          batch_size=6, instances=2, workers=0, seed=1)
    loader.batch_sampler.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) == 2  # 6 identities x 2 tracklets in batches of P=3 x K=2
    batch = batches[0]
    assert batch["images"].shape == (6, 4, 3, 32, 16) and batch["images"].dtype == torch.float32
    assert batch["keypoints"].shape == (6, 4, 17, 3) and batch["keypoints"].dtype == torch.float32
    for key in ("pids", "camids", "index"):
        assert batch[key].shape == (6,) and batch[key].dtype == torch.int64
    for b in range(6):
        assert tracklets[batch["index"][b]].pid == batch["pids"][b]
    # Joint 3 is missing in every frame: slot 3, or slot 4 for a flipped clip (the ears swap).
    for clip in batch["keypoints"]:
        assert (clip[:, 3] == 0).all() or (clip[:, 4] == 0).all()
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(12))


def test_keypoints_follow_the_pixels_through_the_loader(tracklets):
    loader = build_loader(tracklets, train=True, frames=3, sampling="evenly", height=96, width=48, batch_size=4,
                          flip=True, random_erase=False, workers=0, seed=2)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    for batch in loader:
        images = batch["images"] * std + mean  # [B, T, 3, H, W] in [0, 1]
        for b in range(4):
            for t in range(3):
                x, y = batch["keypoints"][b, t, 0, :2]
                assert images[b, t, 1, int(y), int(x)] > 0.3  # the marker (green only there)


def test_batches_do_not_depend_on_workers_and_repeat_per_epoch(tracklets):
    def epoch_batches(workers, epoch):
        loader = build_loader(tracklets, train=True, frames=4, sampling="random_consecutive", height=32, width=16,
                              batch_size=4, workers=workers, seed=5)
        loader.batch_sampler.set_epoch(epoch)
        return list(loader)

    serial = epoch_batches(0, 3)
    parallel = epoch_batches(2, 3)
    assert len(serial) == len(parallel) == 3
    for a, b in zip(serial, parallel):
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = epoch_batches(0, 4)
    assert any(not torch.equal(a["index"], b["index"]) for a, b in zip(serial, other))


def test_ranks_shard_the_epoch(tracklets):
    seen = []
    for rank in range(2):
        loader = build_loader(tracklets, train=True, frames=2, sampling="evenly", height=16, width=8, batch_size=2,
                              instances=2, workers=0, rank=rank, world_size=2)
        seen.append({i for batch in loader for i in batch["index"].tolist()})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_eval_all_covers_every_frame(tracklets):
    loader = build_loader(tracklets, train=False, frames=4, sampling="all", height=16, width=8, batch_size=5,
                          workers=0)
    counts = {}
    for batch in loader:
        for i in batch["index"].tolist():
            counts[i] = counts.get(i, 0) + 1
    assert counts == {i: -(-len(t.frames) // 4) for i, t in enumerate(tracklets)}
    one = build_loader(tracklets, train=False, frames=4, sampling="evenly", height=16, width=8, batch_size=5,
                       workers=0)
    assert [i for b in one for i in b["index"].tolist()] == list(range(len(tracklets)))


def test_undecodable_image_names_the_file(tmp_path, tracklets):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    clip = [Tracklet((str(bad),), 0, 0)]
    loader = build_loader(clip, train=False, frames=2, sampling="evenly", height=16, width=8, batch_size=1,
                          workers=0)
    with pytest.raises(ValueError, match="broken.jpg"):
        next(iter(loader))
    with pytest.raises(ValueError, match="'all' is for testing"):
        build_loader(tracklets, train=True, frames=2, sampling="all", height=16, width=8, batch_size=2, workers=0)


def test_keypoint_folders_work_through_the_loader(tmp_path):
    frames = []
    for f in range(2):
        Image.new("RGB", (20, 40)).save(tmp_path / f"f{f}.jpg")
        frames.append(str(tmp_path / f"f{f}.jpg"))
    kp = np.zeros((17, 3), np.float32)
    kp[:, :2], kp[:, 2] = (10, 20), 0.8
    write_pose(tmp_path / "f1.pose", kp)
    loader = build_loader([Tracklet(tuple(frames), 0, 0, str(tmp_path))], train=False, frames=2, sampling="evenly",
                          height=80, width=40, batch_size=1, workers=0)
    batch = next(iter(loader))
    assert (batch["keypoints"][0, 0] == 0).all()
    assert torch.allclose(batch["keypoints"][0, 1, 0], torch.tensor([20.0, 40.0, 0.8]))

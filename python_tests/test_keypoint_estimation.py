"""Keypoints for a dataset without any (``keypointops keypoints``): the OpenPose decoder on maps
rendered from known keypoints, and the command end to end on a tiny synthetic set with random
OpenPose weights, resumed, then trained on."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import upright_keypoints, without_run_plots  # noqa: F401 (the fixture)
from keypointops.cli import main
from keypointops.data.keypoint_files import COCO17_FLIP
from keypointops.keypoint_estimation import decode_pose, keypoint_file
from keypointops.models.pose_maps import OpenPoseBody, render_heatmaps, render_pose_maps

HEIGHT, WIDTH = 256, 128


def jittered_person(seed: int) -> torch.Tensor:
    """An upright person moved by up to 6 px per joint, about one joint in six missing."""
    g = torch.Generator().manual_seed(seed)
    kp = upright_keypoints(HEIGHT, WIDTH)
    kp[:, :2] += torch.rand(17, 2, generator=g) * 12 - 6
    kp[:, 2] = (torch.rand(17, generator=g) > 0.15).float()
    kp[kp[:, 2] == 0] = 0
    return kp


@pytest.mark.parametrize("seed", range(6))
def test_decoder_recovers_rendered_keypoints(seed):
    kp = jittered_person(seed)
    decoded = torch.from_numpy(decode_pose(render_pose_maps(kp, (HEIGHT, WIDTH))))
    present = kp[:, 2] > 0
    assert torch.equal(decoded[:, 2] > 0, present)                       # missing stays missing
    assert (decoded[~present] == 0).all()
    error = (decoded[present, :2] - kp[present, :2]).norm(dim=-1)
    assert error.max() <= 1.0, error.max()                               # within 1 px
    mirror = torch.tensor(COCO17_FLIP)                                   # never swapped: nearer its own
    both = present & present[mirror] & (mirror != torch.arange(17))      # joint than the mirrored one
    own = (decoded[both, :2] - kp[both, :2]).norm(dim=-1)
    swapped = (decoded[both, :2] - kp[mirror][both, :2]).norm(dim=-1)
    assert (own < swapped).all()


def test_part_affinity_fields_pick_the_peak_connected_to_the_body():
    kp = jittered_person(0)
    kp[9, 2] = 1.0
    kp[9, :2] = torch.tensor([90.0, 120.0])                              # the left wrist, on the body
    maps = render_pose_maps(kp, (HEIGHT, WIDTH))
    # a brighter left-wrist peak in a corner, joined to nothing (another person's wrist)
    stray = render_heatmaps(torch.tensor([[1.0, 29.0]]), (HEIGHT // 8, WIDTH // 8), 7 / 8)[0] * 1.3
    maps[7] = torch.maximum(maps[7], stray)                              # COCO-18 channel 7: left wrist
    assert maps[7].max() > 1.2
    decoded = decode_pose(maps)
    assert np.abs(decoded[9, :2] - kp[9, :2].numpy()).max() <= 1.0
    only_heatmaps = maps.clone()
    only_heatmaps[19:] = 0                                               # without fields: the higher peak
    assert np.abs(decode_pose(only_heatmaps)[9, :2] - kp[9, :2].numpy()).max() > 50


def test_decoder_rejects_other_layouts():
    with pytest.raises(ValueError, match=r"maps must be \[57, h, w\]"):
        decode_pose(np.zeros((19, 4, 4)))


TINY_DATA = ["--ids", "3", "--cameras", "2", "--frames", "3", "--size", "64", "32"]


def test_keypoints_command_end_to_end(tmp_path, capsys, without_run_plots):
    """From frames without keypoints to a trained keypoint model with keypointops commands only
    (random OpenPose weights: the keypoints are noise, the plumbing is what is tested)."""
    root = tmp_path / "data"
    assert main(["synth", "--out", str(root), *TINY_DATA]) == 0
    for name in ("bbox_train_keypoints", "bbox_test_keypoints", "keypoints_cache"):
        shutil.rmtree(root / name, ignore_errors=True)                   # a dataset without keypoints
    from keypointops.data import build_dataset, load_keypoints
    before = build_dataset("synthetic", str(root))          # caches "no keypoint file" for every frame
    assert (load_keypoints(before.train[0])[..., 2] == 0).all()
    torch.manual_seed(0)
    weights = tmp_path / "body_pose_model.pth"
    torch.save(OpenPoseBody().state_dict(), weights)
    argv = ["keypoints", "--data", "synthetic", "--root", str(root), "--weights", str(weights),
            "--size", "64", "32", "--threads", "1", "--threshold", "0"]
    assert main(argv) == 0
    frames = sorted(Path(root).glob("bbox_*/*/*.jpg"))
    poses = sorted(Path(root).glob("bbox_*_keypoints/*/*.pose"))
    assert len(poses) == len(frames) > 0
    assert "0 of" in capsys.readouterr().out
    assert main(argv) == 0                                               # resumed: every tracklet done
    assert "keypoints of 0 frames written" in capsys.readouterr().out

    dataset = build_dataset("synthetic", str(root))          # the cache notices the new files
    kp = load_keypoints(dataset.train[0])
    assert kp.shape[1:] == (17, 3) and (kp[..., 2] > 0).any()
    out = tmp_path / "run"
    assert main(["train", "--model", "ctl", "--data", "synthetic", "--root", str(root), "--out", str(out),
                 "--workers", "0", "--threads", "1", "--epochs", "1", "--max-steps", "1", "--batch-size", "4",
                 "--instances", "2", "--frames", "2", "--height", "64", "--width", "32",
                 "--model-option", "width=0.125", "--no-baselines"]) == 0
    assert (out / "model.pt").is_file()


def test_keypoints_command_wrong_weights_one_line_error(tmp_path, capsys):
    weights = tmp_path / "other.pth"
    torch.save({"conv1_1.weight": torch.zeros(3)}, weights)
    assert main(["keypoints", "--data", "synthetic", "--root", str(tmp_path / "data"), "--weights", str(weights)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tensor 'conv1_1.weight' has shape [3], expected [64, 3, 3, 3]" in err


def test_keypoint_files_go_where_the_readers_look():
    from keypointops.data import iLIDSVID

    two_camera = iLIDSVID.__new__(iLIDSVID)                              # readers of sidecar files
    assert keypoint_file(two_camera, "/d/cam1/person001/f001.png") == Path("/d/cam1/person001/f001.pose")

"""keypointops.models.pose_maps: the 57 OpenPose-style maps rendered from COCO-17 keypoints, and
the OpenPose COCO body network (shapes, caffe layer names, local weights)."""
import numpy as np
import pytest
import torch

from keypointops import graphs, parts
from keypointops.data.keypoint_files import from_coco17, sanitize
from keypointops.models.pose_maps import (OPENPOSE_LIMBS, PoseMaps, load_openpose_weights,
                                          openpose18_from_coco17, openpose_input, render_heatmaps, render_pose_maps)
from helpers import one_thread, upright_keypoints  # noqa: F401 (autouse fixture)

OP18 = graphs.SKELETONS["openpose18"].joints
COCO17 = graphs.SKELETONS["coco17"].joints


def test_openpose18_from_coco17():
    coco = upright_keypoints(256, 128)
    coco[..., 2] = torch.arange(1.0, 18.0)   # distinct confidences identify each joint
    op18 = openpose18_from_coco17(coco)
    assert op18.shape == (18, 3)
    for j, name in enumerate(OP18):
        if name == "neck":
            continue
        torch.testing.assert_close(op18[j], coco[COCO17.index(name)], rtol=0, atol=0)
    shoulders = coco[[COCO17.index("left_shoulder"), COCO17.index("right_shoulder")]]
    torch.testing.assert_close(op18[1, :2], shoulders[:, :2].mean(0))
    assert op18[1, 2] == shoulders[:, 2].min()
    coco[COCO17.index("right_shoulder"), 2] = 0                # one shoulder missing: no neck
    assert openpose18_from_coco17(coco)[1, 2] == 0
    batched = openpose18_from_coco17(coco.expand(2, 3, 17, 3))
    assert batched.shape == (2, 3, 18, 3)
    with pytest.raises(ValueError, match="keypoints must be"):
        openpose18_from_coco17(torch.zeros(18, 3))


def test_openpose18_from_coco17_agrees_with_the_keypoint_files():
    """The models' COCO-18 joints are those keypoint files are written with (``from_coco17``) bit
    for bit where a joint is valid; where it is not, the file's joint is (0, 0, 0) and the models'
    has confidence 0."""
    rng = np.random.default_rng(0)
    kp = rng.uniform(1, 100, (3, 17, 3)).astype(np.float32)
    kp[..., 2] = rng.choice([0.0, 0.3, 0.9], size=(3, 17))
    kp[0, [5, 6], 2] = 0.9                                     # a valid neck
    kp[1, 5, 2] = 0.0                                          # a missing one
    files = from_coco17(kp, "openpose18")
    models = openpose18_from_coco17(torch.from_numpy(sanitize(kp))).numpy()
    valid = models[..., 2] > 0
    assert valid[0, 1] and not valid[1, 1]
    assert files[valid].tobytes() == models[valid].tobytes()
    assert (files[~valid] == 0).all() and (models[~valid][:, 2] == 0).all()


def test_limb_table_and_alignnet_grouping():
    """The 19 limbs cover the 38 PAF channels once; the AlignNet grouping of graphs is the paper's
    sets (docs/models/alignnet.md), rebuilt here from joint names and limbs."""
    assert sorted(c for _, _, c in OPENPOSE_LIMBS) == list(range(0, 38, 2))
    undirected = {frozenset(limb[:2]) for limb in OPENPOSE_LIMBS}
    assert {frozenset(e) for e in graphs.SKELETONS["openpose18"].edges} <= undirected
    channel = {(OP18[a], OP18[b]): c for a, b, c in OPENPOSE_LIMBS}
    assert channel[("neck", "nose")] == 47 - 19 and channel[("right_hip", "right_knee")] == 21 - 19

    def members(joints, limbs):
        limb_channels = [19 + channel[limb] + k for limb in limbs for k in (0, 1)]
        return sorted([OP18.index(j) for j in joints] + limb_channels)

    expected = [
        members(["nose", "neck", "right_eye", "left_eye", "right_ear", "left_ear"],
                [("right_eye", "right_ear"), ("left_eye", "left_ear"), ("nose", "left_eye"),
                 ("nose", "right_eye"), ("neck", "nose")]),
        members(["right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist"],
                [("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist"), ("neck", "right_hip"),
                 ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"), ("neck", "left_hip")]),
        members(["right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle"],
                [("right_hip", "right_knee"), ("right_knee", "right_ankle"), ("left_hip", "left_knee"),
                 ("left_knee", "left_ankle")]),
    ]
    groups = parts.part_groups("alignnet")
    assert [row.nonzero().flatten().tolist() for row in groups] == expected


def test_heatmaps_and_background():
    coco = upright_keypoints(128, 64)
    nose = COCO17.index("nose")
    coco[nose, :2] = torch.tensor([8 * 3 + 3.5, 8 * 1 + 3.5])   # on the centre of cell (row 1, col 3)
    coco[COCO17.index("left_wrist"), 2] = 0
    maps = render_pose_maps(coco, (128, 64))
    assert maps.shape == (57, 16, 8)
    heat = maps[:19]
    assert heat[0, 1, 3] == 1 and heat[0].argmax() == 1 * 8 + 3
    assert (heat[OP18.index("left_wrist")] == 0).all()
    torch.testing.assert_close(heat[18], (1 - heat[:18].amax(0)).clamp(min=0))
    assert heat[18, 15, 0] > 0.99 and heat[18, 1, 3] == 0       # background away from the person
    sharper = render_pose_maps(coco, (128, 64), sigma=3.5)
    assert sharper[0].sum() < heat[0].sum()
    assert render_pose_maps(coco.expand(2, 3, 17, 3), (96, 48)).shape == (2, 3, 57, 12, 6)
    with pytest.raises(ValueError, match="image_size"):
        render_pose_maps(coco, (4, 64))


def test_pafs_point_along_limbs():
    coco = upright_keypoints(256, 128)
    maps = render_pose_maps(coco, (256, 128))
    joints = openpose18_from_coco17(coco)
    cells = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(16.0), indexing="ij"), -1)
    centres = cells.flip(-1) * 8 + 3.5                                        # (x, y) in input pixels
    for a, b, c in OPENPOSE_LIMBS:
        field = maps[19 + c: 21 + c]                                          # [2, h, w]
        on = field.norm(dim=0) > 0
        direction = (joints[b, :2] - joints[a, :2]) / (joints[b, :2] - joints[a, :2]).norm()
        if (joints[b, :2] - joints[a, :2]).norm() >= 16:                     # longer than 2 cells
            assert on.sum() >= 2, (OP18[a], OP18[b])
        torch.testing.assert_close(field[:, on].T, direction.expand(int(on.sum()), 2))
        # every cell with a field lies on the segment, within limb_width (8 pixels) of it
        rel = centres[on] - joints[a, :2]
        along = rel @ direction
        across = (rel[:, 0] * direction[1] - rel[:, 1] * direction[0]).abs()
        length = (joints[b, :2] - joints[a, :2]).norm()
        assert (along >= -1e-4).all() and (along <= length + 1e-4).all() and (across <= 8 + 1e-4).all()
    neck_to_nose = maps[47:49]
    assert (neck_to_nose[1][neck_to_nose[1] != 0] < 0).all()                  # points up the image
    coco[COCO17.index("right_knee"), 2] = 0                                   # missing joint: no fields
    missing = render_pose_maps(coco, (256, 128))
    assert (missing[21:25] == 0).all() and (missing[27:29] != 0).any()


def test_rendered_maps_put_head_above_legs():
    """docs/models/alignnet.md: the argmax cells of the head, torso+arms and legs maps go top to bottom,
    on the pose-map grid (32 x 16) and on the feature grid the part masks live on (8 x 4)."""
    maps = render_pose_maps(upright_keypoints(256, 128), (256, 128))
    composite = torch.einsum("qf,fhw->qhw", parts.part_groups("alignnet"), maps)
    for grid in (composite, torch.nn.functional.adaptive_avg_pool2d(composite, (8, 4))):
        rows = [int(part.flatten().argmax()) // grid.size(2) for part in grid]
        assert rows[0] < rows[1] < rows[2], rows


def test_openpose_input():
    rgb = torch.rand(2, 3, 8, 8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    normalised = (rgb - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(openpose_input(normalised), rgb[:, [2, 1, 0]] * 255 / 256 - 0.5)


def _caffe_names() -> list[str]:
    front = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv3_4",
             "conv4_1", "conv4_2", "conv4_3_CPM", "conv4_4_CPM"]
    stage1 = [f"conv5_{i}_CPM_L{b}" for b in (1, 2) for i in range(1, 6)]
    later = [f"Mconv{i}_stage{s}_L{b}" for s in range(2, 7) for b in (1, 2) for i in range(1, 8)]
    return front + stage1 + later


def test_openpose_body_network(tmp_path):
    torch.manual_seed(0)
    pose = PoseMaps("network")
    net = pose.net
    assert sorted(net.state_dict()) == sorted(f"{n}.{p}" for n in _caffe_names() for p in ("weight", "bias"))
    assert sum(p.numel() for p in net.parameters()) == 52_311_446          # the COCO model's 52.3 M
    assert net.Mconv1_stage2_L1.in_channels == 185 and net.Mconv7_stage6_L1.out_channels == 38
    images = torch.randn(2, 3, 16, 8)
    with torch.no_grad():
        out = pose(images, None)
    assert out.shape == (2, 57, 2, 1)
    assert (out[:, :19] < 0).any() and (out[:, 19:] < 0).any()   # both final convs are linear (no ReLU)
    for name, param in net.named_parameters():                   # (weight gradients of 52 M parameters
        param.requires_grad_(name == "conv1_1.weight")           # are slow on a CPU)
    pose(images, None).square().sum().backward()                 # end to end: gradients reach VGG's first conv
    assert net.conv1_1.weight.grad.abs().sum() > 0
    path = tmp_path / "body_pose_model.pth"
    torch.save(net.state_dict(), path)
    saved = net.conv1_1.weight.detach().clone()
    with torch.no_grad():
        net.conv1_1.weight.zero_()
    load_openpose_weights(net, path)
    torch.testing.assert_close(net.conv1_1.weight.detach(), saved, rtol=0, atol=0)
    state = net.state_dict()
    del state["conv1_1.bias"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="tensor 'conv1_1.bias' is missing") as info:
        load_openpose_weights(net, path)
    assert len(str(info.value).splitlines()) == 1
    state["conv1_1.bias"] = torch.zeros(3)                       # wrong shape: the first mismatch is named
    state["Mconv7_stage6_L2.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"tensor 'conv1_1.bias' has shape \[3\], expected \[64\]"):
        load_openpose_weights(net, path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable torch file"):
        load_openpose_weights(net, path)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_openpose_weights(net, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="source"):
        PoseMaps("openpose")
    with pytest.raises(ValueError, match="weights"):
        PoseMaps("render", weights=path)


def test_render_heatmaps():
    keypoints = torch.tensor([[[2.0, 1.0, 0.9], [0.5, 3.25, 0.0], [float("nan"), 1.0, 1.0]],
                              [[4.0, 0.0, 1.0], [-3.0, 2.0, 0.5], [1.0, 1.0, 0.2]]], dtype=torch.float64)
    heatmaps = render_heatmaps(keypoints, (4, 5), 1.5)
    assert heatmaps.shape == (2, 3, 4, 5) and heatmaps.dtype == torch.float64
    assert heatmaps[0, 0, 1, 2] == 1.0 and heatmaps[0, 0].argmax() == 1 * 5 + 2
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(5.0), indexing="ij")
    expected = torch.exp(-((cols + 3.0) ** 2 + (rows - 2.0) ** 2) / (2 * 1.5 ** 2)).double()
    torch.testing.assert_close(heatmaps[1, 1], expected)
    assert (heatmaps[0, 1] == 0).all() and (heatmaps[0, 2] == 0).all()   # confidence 0, NaN
    valid = torch.ones(2, 3, dtype=torch.bool)
    overridden = render_heatmaps(keypoints[..., :2], (4, 5), 1.5, valid)
    assert overridden[0, 1].max() > 0 and (overridden[0, 2] == 0).all()
    assert render_heatmaps(keypoints[0], (4, 5), 1.5).shape == (3, 4, 5)
    with pytest.raises(ValueError, match="sigma must be"):
        render_heatmaps(keypoints, (4, 5), 0.0)
    with pytest.raises(ValueError, match="size must be"):
        render_heatmaps(keypoints, (4,), 1.0)
    with pytest.raises(ValueError, match="keypoints must be"):
        render_heatmaps(keypoints[..., :1], (4, 5), 1.0)
    with pytest.raises(ValueError, match="valid must be"):
        render_heatmaps(keypoints, (4, 5), 1.0, valid[:, :2])

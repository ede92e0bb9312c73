"""Body-part groupings (keypointops.parts)."""
import pytest
import torch

from keypointops import graphs, parts


def test_part_groups_averages_rows():
    groups = parts.part_groups([[0, 2], [1], [0, 1, 3]], 4, dtype=torch.float64)
    expected = torch.tensor([[0.5, 0, 0.5, 0], [0, 1, 0, 0], [1 / 3, 1 / 3, 0, 1 / 3]], dtype=torch.float64)
    torch.testing.assert_close(groups, expected)
    named = parts.part_groups({"a": (1, 2), "b": (0,)}, 3)
    torch.testing.assert_close(named, torch.tensor([[0, 0.5, 0.5], [1.0, 0, 0]]))
    with pytest.raises(ValueError, match="part 1 holds joint indices \\[4\\] out of range"):
        parts.part_groups([[0], [4]], 4)
    with pytest.raises(ValueError, match="part 0 has no joints"):
        parts.part_groups([[]], 4)
    with pytest.raises(ValueError, match="part 0 repeats a joint"):
        parts.part_groups([[1, 1]], 4)
    with pytest.raises(ValueError, match="num_joints must be an int >= 1"):
        parts.part_groups([[0]])
    with pytest.raises(ValueError, match="unknown grouping 'pcb'"):
        parts.part_groups("pcb")


def test_named_groupings():
    alignnet = parts.part_groups("alignnet")
    assert alignnet.shape == (3, 57)  # over cat([19 OpenPose heatmaps, 38 PAFs])
    joints = graphs.SKELETONS["openpose18"].joints
    covered = sorted(j for part in parts.ALIGNNET_BODY_PARTS.values() for j in part if j < 19)
    assert covered == list(range(18)) and (alignnet[:, 18] == 0).all()  # each joint once, no background
    assert {joints[j] for j in parts.ALIGNNET_BODY_PARTS["lower"] if j < 19} == {
        "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle"}
    assert parts.part_groups("ctl10").shape == (10, 17)
    assert parts.part_groups("ctl5").shape == (5, 17)
    assert parts.part_groups("ctl5_of_10").shape == (5, 10)
    names10 = list(parts.CTL_PARTS_10)
    for name, members in parts.CTL_PARTS_5_OF_10.items():  # the levels nest
        union = set().union(*(parts.CTL_PARTS_10[names10[i]] for i in members))
        assert union == set(parts.CTL_PARTS_5[name])
    assert set().union(*parts.CTL_PARTS_10.values()) == set(range(17))
    for grouping in (alignnet, parts.part_groups("ctl10"), parts.part_groups("ctl5")):
        torch.testing.assert_close(grouping.sum(1), torch.ones(grouping.size(0)))

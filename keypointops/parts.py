"""Body-part groupings of keypoint heatmaps: the part sets of AlignNet and CTL, and the row-averaging
matrix (:func:`part_groups`) that :func:`keypointops.part_pool` takes as ``groups``."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["part_groups", "PART_GROUPINGS", "ALIGNNET_BODY_PARTS", "CTL_PARTS_10", "CTL_PARTS_5", "CTL_PARTS_5_OF_10"]

# AlignNet (Rambhatla & Jones, BMVC 2019, Eq. 2) averages three sets of OpenPose's 57 output maps,
# pose57 = cat([19 heatmaps ("openpose18" joints + background), 38 part-affinity fields]) with the
# PAF of OpenPose limb k at channels 19 + mapIdx (x, y), into head / torso+arms / legs.  The sets are
# the paper's (docs/models/alignnet.md): the joint heatmaps plus the x and y PAFs of
# the listed limbs.  Background (18) and the Neck-shoulder and shoulder-ear PAFs are in no set.
ALIGNNET_BODY_PARTS: dict[str, tuple[int, ...]] = {
    # nose, neck, eyes, ears; PAFs Neck-Nose, Nose-REye, Nose-LEye, REye-REar, LEye-LEar
    "upper": (0, 1, 14, 15, 16, 17, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56),
    # shoulders, elbows, wrists; PAFs Neck-RHip, Neck-LHip, RSho-RElb, RElb-RWr, LSho-LElb, LElb-LWr
    "middle": (2, 3, 4, 5, 6, 7, 19, 20, 25, 26, 33, 34, 35, 36, 41, 42, 43, 44),
    # hips, knees, ankles; PAFs RHip-RKnee, RKnee-RAnk, LHip-LKnee, LKnee-LAnk
    "lower": (8, 9, 10, 11, 12, 13, 21, 22, 23, 24, 27, 28, 29, 30),
}

# CTL (Liu et al., CVPR 2021) pools its 17 COCO keypoints into 10 and then 5 parts without listing
# them.  Chosen here, over "coco17" joints, so that the levels nest (every 5-part is the union of
# 10-parts, CTL_PARTS_5_OF_10) and follow the skeleton: 10 parts = the head, the torso and the
# eight limb bones; 5 parts = the trunk (head + torso) and the four limbs, the star the body's
# topology reduces to.  Parts share their end joints (an elbow is in the upper arm and the forearm).
CTL_PARTS_10: dict[str, tuple[int, ...]] = {
    "head": (0, 1, 2, 3, 4),
    "torso": (5, 6, 11, 12),
    "left_upper_arm": (5, 7),
    "left_forearm": (7, 9),
    "right_upper_arm": (6, 8),
    "right_forearm": (8, 10),
    "left_thigh": (11, 13),
    "left_shin": (13, 15),
    "right_thigh": (12, 14),
    "right_shin": (14, 16),
}
CTL_PARTS_5: dict[str, tuple[int, ...]] = {
    "trunk": (0, 1, 2, 3, 4, 5, 6, 11, 12),
    "left_arm": (5, 7, 9),
    "right_arm": (6, 8, 10),
    "left_leg": (11, 13, 15),
    "right_leg": (12, 14, 16),
}
# The 5 parts as groups of the 10 parts (indices into CTL_PARTS_10's order), for pooling part nodes.
CTL_PARTS_5_OF_10: dict[str, tuple[int, ...]] = {
    "trunk": (0, 1), "left_arm": (2, 3), "right_arm": (4, 5), "left_leg": (6, 7), "right_leg": (8, 9),
}
# Each grouping by name, with the number of joints (heatmap channels) it indexes.
PART_GROUPINGS: dict[str, tuple[dict[str, tuple[int, ...]], int]] = {
    "alignnet": (ALIGNNET_BODY_PARTS, 57),
    "ctl10": (CTL_PARTS_10, 17),
    "ctl5": (CTL_PARTS_5, 17),
    "ctl5_of_10": (CTL_PARTS_5_OF_10, 10),
}


def part_groups(parts, num_joints: int | None = None, *, dtype: torch.dtype = torch.float32,
                device=None) -> Tensor:
    """The ``[P, J]`` row-averaging matrix of a part grouping: ``groups[q, j] = 1 / len(parts[q])``
    for the joints ``j`` of part ``q``, 0 elsewhere, so that ``groups @ heatmaps`` averages each
    part's joint heatmaps (the ``groups`` argument of :func:`keypointops.part_pool`).

    Args:
        parts: a sequence of joint-index sequences (one per part), a mapping from part names to
            joint indices (parts in the mapping's order), or the name of a grouping in
            ``PART_GROUPINGS`` (``"alignnet"``, ``"ctl10"``, ``"ctl5"``, ``"ctl5_of_10"``).
        num_joints: ``J``, the number of heatmap channels (columns); optional for a named grouping.
        dtype, device: of the returned matrix.
    """
    if isinstance(parts, str):
        if parts not in PART_GROUPINGS:
            raise ValueError(f"part_groups: unknown grouping {parts!r}; known: {sorted(PART_GROUPINGS)}")
        parts, default_joints = PART_GROUPINGS[parts]
        num_joints = default_joints if num_joints is None else num_joints
    if num_joints is None or isinstance(num_joints, bool) or not isinstance(num_joints, int) \
            or num_joints < 1:
        raise ValueError(f"part_groups: num_joints must be an int >= 1, got {num_joints!r}")
    rows = list(parts.values()) if isinstance(parts, dict) else list(parts)
    groups = torch.zeros(len(rows), num_joints, dtype=torch.float64)
    for q, joints in enumerate(rows):
        joints = list(joints)
        if not joints:
            raise ValueError(f"part_groups: part {q} has no joints")
        if any(isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < num_joints for j in joints):
            raise ValueError(f"part_groups: part {q} holds joint indices {joints} out of range "
                             f"[0, {num_joints})")
        if len(set(joints)) != len(joints):
            raise ValueError(f"part_groups: part {q} repeats a joint: {joints}")
        groups[q, joints] = 1.0 / len(joints)
    return groups.to(dtype=dtype, device=device)

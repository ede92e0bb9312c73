"""``PartPool``: heatmap-softmax part pooling as a module (AlignNet composite parts, CTL parts)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from keypointops.parts import part_groups
from keypointops.ops.part_pool import part_pool

__all__ = ["PartPool"]


class PartPool(nn.Module):
    """Pools ``[B, C, H, W]`` features into ``[B, P, C]`` part vectors with keypoint heatmaps.

    Each part's weights are the softmax over ``H*W`` of its logits ``groups @ heatmaps`` at
    ``temperature`` (see :func:`keypointops.part_pool`).

    Args:
        parts: the ``[P, J]`` grouping: None (identity, one part per heatmap channel), the name of a
            grouping in :data:`keypointops.parts.PART_GROUPINGS` (``"alignnet"``: head /
            torso+arms / legs from OpenPose's 19 heatmaps + 38 part-affinity fields, ``"ctl10"`` /
            ``"ctl5"``: CTL's parts of the 17 COCO keypoints), a sequence or mapping of joint-index
            lists (row-averaged by :func:`keypointops.parts.part_groups`, needs ``num_joints``), or
            a ``[P, J]`` tensor.
        num_joints: ``J``, the heatmap channels, for a sequence or mapping of joint lists (for a
            named grouping it overrides the grouping's own count).
        temperature: softmax temperature (> 0).
        learn_groups: make the grouping a trainable parameter (initialised as given) instead of a
            buffer.
        resize_heatmaps: resize heatmaps of another spatial size to the feature grid (bilinear)
            instead of raising.
        backend: as in :func:`keypointops.part_pool`.

    Shapes: ``features`` ``[B, C, H, W]``, ``heatmaps`` ``[B, J, h, w]`` -> ``[B, P, C]``.
    """

    def __init__(self, parts=None, num_joints: int | None = None, *, temperature: float = 1.0,
                 learn_groups: bool = False, resize_heatmaps: bool = False, backend: str = "auto"):
        super().__init__()
        if parts is None:
            groups = None
        elif isinstance(parts, Tensor):
            if parts.dim() != 2:
                raise ValueError(f"PartPool: a parts tensor must be [P, J], got shape {list(parts.shape)}")
            groups = parts.detach().clone()
        else:
            groups = part_groups(parts, num_joints)
        if groups is None and learn_groups:
            raise ValueError("PartPool: learn_groups needs a grouping (parts is None: the identity)")
        if learn_groups:
            self.groups = nn.Parameter(groups)
        else:
            self.register_buffer("groups", groups)
        self.temperature = float(temperature)
        self.resize_heatmaps = resize_heatmaps
        self.backend = backend

    @property
    def num_parts(self) -> int | None:
        """P, or None for the identity grouping (P = J of the heatmaps)."""
        return None if self.groups is None else self.groups.size(0)

    def forward(self, features: Tensor, heatmaps: Tensor) -> Tensor:
        if self.resize_heatmaps and heatmaps.dim() == 4 and heatmaps.shape[2:] != features.shape[2:]:
            heatmaps = F.interpolate(heatmaps, size=features.shape[2:], mode="bilinear",
                                     align_corners=False)
        groups = None if self.groups is None else self.groups.to(features.dtype)
        return part_pool(features, heatmaps.to(features.dtype), groups, temperature=self.temperature,
                         backend=self.backend)

    def extra_repr(self) -> str:
        parts = "identity" if self.groups is None else f"{self.groups.size(0)}x{self.groups.size(1)}"
        return (f"groups={parts}, temperature={self.temperature}"
                + (", resize_heatmaps=True" if self.resize_heatmaps else ""))

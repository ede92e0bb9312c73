"""``KeypointGather``: the ``keypoint_gather`` op as a module (KMPNet's per-stage node features)."""
from __future__ import annotations

from torch import Tensor, nn

from keypointops._opdefs.backend import check_backend
from keypointops._opdefs.keypoint_gather import check_sampling_args
from keypointops.ops.keypoint_gather import keypoint_gather

__all__ = ["KeypointGather"]


class KeypointGather(nn.Module):
    """Samples ``[B, C, H, W]`` features at keypoints into ``[B, K, C]`` node features.

    Stores the sampling settings of :func:`keypointops.keypoint_gather` (no parameters).
    One bilinear sample at each keypoint is ``KeypointGather(1 / stride, roi_size=0.0,
    sampling_ratio=1, aligned=True)`` (KMPNet's default); KMPNet's released code corresponds to
    ``KeypointGather(1 / stride, roi_size=1.0, sampling_ratio=1, aligned=False)`` applied to
    ``keypoints + 0.5``, which samples one feature cell right of and below the keypoint.

    Args:
        spatial_scale: feature pixels per input pixel (``1 / stride``).
        roi_size: side of the box around each keypoint, in input pixels.
        sampling_ratio: samples per axis, or -1 for adaptive.
        aligned: torchvision's ``aligned`` (pixel-centre convention).
        backend: as :func:`keypointops.keypoint_gather`.
    """

    def __init__(self, spatial_scale: float, *, roi_size: float = 1.0, sampling_ratio: int = 2,
                 aligned: bool = True, backend: str = "auto"):
        super().__init__()
        check_sampling_args(spatial_scale, roi_size, sampling_ratio, aligned)
        self.spatial_scale = spatial_scale
        self.roi_size = roi_size
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.backend = check_backend("KeypointGather", backend)

    def forward(self, features: Tensor, keypoints: Tensor, valid: Tensor | None = None) -> Tensor:
        """``features`` ``[B, C, H, W]``, ``keypoints`` ``[B, K, 2 or 3]`` in input pixels,
        optional ``valid`` ``[B, K]`` -> ``[B, K, C]``."""
        return keypoint_gather(features, keypoints, self.spatial_scale, roi_size=self.roi_size,
                               sampling_ratio=self.sampling_ratio, aligned=self.aligned, valid=valid,
                               backend=self.backend)

    def extra_repr(self) -> str:
        return (f"spatial_scale={self.spatial_scale}, roi_size={self.roi_size}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, backend={self.backend!r}")

"""``KeypointGather``: the ``keypoint_gather`` op as a module (KMPNet's per-stage node features)."""
from __future__ import annotations

from torch import Tensor, nn

from keypointops._opdefs.backend import check_backend
from keypointops._opdefs.keypoint_gather import check_sampling_args
from keypointops.ops.keypoint_gather import keypoint_gather

__all__ = ["KeypointGather"]


class KeypointGather(nn.Module):
    """Samples ``[B, C, H, W]`` features at keypoints into ``[B, K, C]`` node features, or
    ``[B, K, C, S, S]`` keypoint-centred patches with ``output_size=S``.

    Stores the sampling settings of :func:`keypointops.keypoint_gather` (no parameters).
    One bilinear sample at each keypoint is ``KeypointGather(1 / stride, roi_size=0.0,
    sampling_ratio=1, aligned=True)`` (KMPNet's default); KMPNet's released code corresponds to
    ``KeypointGather(1 / stride, roi_size=1.0, sampling_ratio=1, aligned=False)`` applied to
    ``keypoints + 0.5``, which samples one feature cell right of and below the keypoint.

    Args:
        spatial_scale: feature pixels per input pixel (``1 / stride``).
        roi_size: side of the box around each keypoint, in input pixels (a call may give each
            keypoint its own, see :meth:`forward`).
        sampling_ratio: samples per axis, or -1 for adaptive.
        aligned: torchvision's ``aligned`` (pixel-centre convention).
        output_size: None (one bin per keypoint) or ``S`` (an ``S x S`` RoIAlign grid per
            keypoint).
        backend: as :func:`keypointops.keypoint_gather`.
    """

    def __init__(self, spatial_scale: float, *, roi_size: float = 1.0, sampling_ratio: int = 2,
                 aligned: bool = True, output_size: int | None = None, backend: str = "auto"):
        super().__init__()
        check_sampling_args(spatial_scale, roi_size, sampling_ratio, aligned, output_size)
        self.spatial_scale = spatial_scale
        self.roi_size = roi_size
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.output_size = output_size
        self.backend = check_backend("KeypointGather", backend)

    def forward(self, features: Tensor, keypoints: Tensor, valid: Tensor | None = None,
                roi_size: Tensor | None = None) -> Tensor:
        """``features`` ``[B, C, H, W]``, ``keypoints`` ``[B, K, 2 or 3]`` in input pixels,
        optional ``valid`` ``[B, K]``, optional per-keypoint box sides ``roi_size`` ``[B, K]`` or
        ``[B, K, 2]`` (e.g. scaled by each person's height; default: the module's ``roi_size``)
        -> ``[B, K, C]``, or ``[B, K, C, S, S]`` with ``output_size=S``."""
        return keypoint_gather(features, keypoints, self.spatial_scale,
                               roi_size=self.roi_size if roi_size is None else roi_size,
                               sampling_ratio=self.sampling_ratio, aligned=self.aligned, valid=valid,
                               output_size=self.output_size, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"spatial_scale={self.spatial_scale}, roi_size={self.roi_size}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, output_size={self.output_size}, "
                f"backend={self.backend!r}")

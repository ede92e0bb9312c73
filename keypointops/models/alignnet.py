"""AlignNet: body-part alignment + temporal attention pooling (Rambhatla & Jones, BMVC 2019).

Built as ``docs/models/alignnet.md`` specifies.  Per frame of a clip ``[B, T, 3, H, W]``:

* **Appearance** (Eq. 1): a torchvision-named ResNet-50 trunk (:class:`~keypointops.models.backbones.ResNet`,
  no ``avgpool``/``fc``, last stride 2) gives ``f_a`` ``[N, C, h, w]`` (``N = B T``, ``C = 2048``,
  ``h x w = H / 32 x W / 32``: 8 x 4 at 256 x 128).
* **Pose maps** (:class:`~keypointops.models.pose_maps.PoseMaps`): the 57 OpenPose maps
  ``cat([19 heatmaps, 38 PAFs])`` at ``H / 8 x W / 8``, rendered from the keypoints
  (``pose_source="render"``, the default here: no OpenPose weights can be fetched) or output by the
  OpenPose COCO body network fine-tuned end to end (``pose_source="network"``, the paper's), then
  area-averaged to ``h x w`` (``adaptive_avg_pool2d``).
* **Parts** (Eq. 2-5): one fused :func:`keypointops.part_pool` call with ``groups`` = the constant
  ``3 x 57`` averaging matrix ``parts.part_groups("alignnet")`` (head 16 / torso+arms 18 / legs 14
  maps), ``temperature`` T (Eq. 3: 1): ``sum_hw softmax_hw(G pose57 / T) f_a``, times ``1 / (h w)``
  for the literal average pool of Eq. 5 (``part_norm="avg"``; ``"sum"`` leaves it out).
* **Frame descriptor** (Eq. 6): ``[GAP(f_a); head; torso; legs]``, ``4 C`` = 8192-d.
* **Temporal attention pooling** (Eq. 7-9): ``tap_g`` scores ``f_a``, ``tap_p`` the head-masked
  map ``f_a * p_u`` (``p_u`` = the head's softmax mask); each is ``conv3x3(C -> C/8, no bias) -> BN
  -> ReLU -> conv3x3(C/8 -> C/8)``, mean over channels and space, sigmoid: one weight in (0, 1) per
  frame.  ``w_g`` weights the global slice, ``w_p`` the three part slices (``tap_per_part``: one
  TAP per part on ``f_a * p_r``).  The clip descriptor is ``(1/T) sum_t w_t f_t`` (``tap_agg="mean"``;
  ``"sum"`` = Eq. 7 literally, ``"wnorm"`` = ``sum w f / sum w``).
* **Head and losses**: ``Linear(8192 -> K)`` on the clip descriptor; cross-entropy
  without label smoothing on the logits plus the batch-hard triplet loss (margin 0.3) on the
  descriptor, weights 1:1 (:mod:`keypointops.losses`).

Ablation switches: ``use_parts=False`` is the paper's Baseline (GAP only, 2048-d),
``use_tap=False`` is "AlignNet + AvgPool" (``f_video = mean_t f_frame``); ``paf_mode``,
``temperature``, ``last_stride``.  Small CPU variants: ``depth``, ``width`` (the backbone's
width multiplier; ``C`` and the TAP width scale with it) and the input size (any multiple of 32).
Eval mode returns the clip descriptor ``[B, D]`` (no L2 normalisation).  :meth:`AlignNet.diagnostics`
gives the masks' normalised entropy and the part-global cosine of the training frames (logged per
epoch), :meth:`AlignNet.part_masks` the masks themselves (the run folder's ``part_masks.png``).

Deviations from the paper, with reasons:

* ``pose_source="render"`` is the default: OpenPose's COCO weights cannot be fetched here, and a
  randomly initialised OpenPose gives no alignment.  The rendered maps are OpenPose's training
  targets drawn from the batch's keypoints (see :mod:`keypointops.models.pose_maps`); they are
  constants, so nothing is fine-tuned through them.  ``pose_source="network", pose_weights=PATH``
  is the paper's model.
* One learning rate for every parameter (the engine's contract has one ``lr``); the paper gives
  OpenPose the lowest and the TAP nets and classifier a higher one.
* The paper's ``ReduceLROnPlateau`` schedule is replaced by fixed milestones in its presets (:mod:`keypointops.models.presets`)
  (the training contract has milestones only).
* The ``cpu`` preset sharpens the masks and sums the parts (``temperature=0.03, part_norm="sum"``;
  the ``paper`` preset keeps Eq. 3 and 5 as printed).  With T = 1 the masks collapse: a composite
  map averages 14-18 maps of which each cell meets only a few, so its values span about 0.1-0.2,
  and the softmax over the ``h w`` cells is nearly uniform (normalised entropy 0.9999 on the
  rendered maps of 128 x 64 frames, 8 x 4 cells): every part vector is then the global vector
  (cosine 0.9999) and the keypoints change nothing.  Dividing the composite maps by 0.03 gives
  masks of normalised entropy about 0.6 on the training frames, head above torso above legs (the
  value was read off the training split's masks, not off any accuracy).  ``part_norm="avg"`` leaves
  the part slices at ``1 / (h w)`` = 1/32 of the global slice's scale, where the distance and the
  triplet loss hardly see them, so the embedding barely depends on the keypoints; ``"sum"`` keeps
  the parts at the global slice's scale (the keypoint controls of docs/results.md).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keypointops.losses import batch_hard_triplet, cross_entropy_label_smooth
from keypointops.models.backbones import ResNet, load_pretrained
from keypointops.models.heads import init_kaiming_fan_out
from keypointops.models.pose_maps import NUM_POSE_MAPS, PoseMaps
from keypointops._checks import check_choice
from keypointops._opdefs.backend import check_backend
from keypointops.ops.part_pool import part_pool
from keypointops.parts import part_groups

__all__ = ["AlignNet", "TemporalAttentionPooling"]

_PART_NORMS = ("avg", "sum")
_PAF_MODES = ("raw", "abs", "magnitude")
_TAP_AGGS = ("mean", "sum", "wnorm")


class TemporalAttentionPooling(nn.Module):
    """TAP: ``conv3x3(C -> hidden, no bias) -> BN -> ReLU -> conv3x3(hidden -> hidden)``, then
    the mean over channels and space and a sigmoid: ``forward(x [N, C, h, w]) -> [N]`` in (0, 1).

    Each frame is scored on its own (2-D convs over the batch of frames).  Kaiming init.
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        init_kaiming_fan_out(self)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.conv2(self.relu(self.bn1(self.conv1(x)))).mean((1, 2, 3)))


class AlignNet(nn.Module):
    """AlignNet (see the module docstring for the architecture and the deviations).

    Args:
        num_classes: ``K``, training identities (the classifier's outputs).
        depth, width, last_stride: of the ResNet appearance trunk (paper: 50, 1, 2).
        pretrained: local torchvision ResNet state dict for the trunk (width 1 only), or None.
        use_parts: the part branch (False: the paper's Baseline, a 2048-d descriptor).
        use_tap: the TAP nets (False: "AlignNet + AvgPool", the plain temporal mean).
        tap_per_part: one TAP net per part, each on its own masked map, instead of the shared
            ``tap_p`` on the head map.
        tap_hidden: TAP width; None = ``C // 8`` (256 at full size).
        tap_agg: ``"mean"`` | ``"sum"`` | ``"wnorm"`` temporal aggregation.
        part_norm: ``"avg"`` (literal Eq. 5, parts divided by ``h w``) | ``"sum"``.
        paf_mode: ``"raw"`` (signed PAFs averaged as they are, Eq. 2) | ``"abs"`` | ``"magnitude"``
            (each x/y pair replaced by its length, counted twice).
        temperature: of the part softmax: the composite maps are divided by it (Eq. 3: 1).
        pose_source: ``"render"`` | ``"network"`` (see :class:`~keypointops.models.pose_maps.PoseMaps`).
        pose_weights: local caffe-converted OpenPose state dict (``pose_source="network"``).
        pose_sigma, limb_width: of the rendered maps, in input pixels.
        margin: of the batch-hard triplet loss (0.3).
        ops_backend: backend of the fused ``part_pool`` (``"reference"``: plain PyTorch).

    ``forward(images [B, T, 3, H, W], keypoints [B, T, 17, 3])``: in training mode a dict with
    ``logits`` ``[B, K]``, ``features`` (the clip descriptor ``[B, D]``), ``frame_features``
    ``[B, T, D]`` and ``frame_weights`` ``[B, T, D]`` (the per-slice TAP weights; ones without
    TAP); in eval mode the clip descriptor ``[B, D]``, ``D = 4 C`` (``C`` without parts).
    """

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0, last_stride: int = 2,
                 pretrained: str | os.PathLike | None = None, use_parts: bool = True, use_tap: bool = True,
                 tap_per_part: bool = False, tap_hidden: int | None = None, tap_agg: str = "mean",
                 part_norm: str = "avg", paf_mode: str = "raw", temperature: float = 1.0,
                 pose_source: str = "render", pose_weights: str | os.PathLike | None = None,
                 pose_sigma: float = 7.0, limb_width: float = 8.0, margin: float = 0.3,
                 ops_backend: str = "auto"):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"AlignNet: num_classes must be a positive int, got {num_classes!r}")
        check_choice("AlignNet", "tap_agg", tap_agg, _TAP_AGGS)
        check_choice("AlignNet", "part_norm", part_norm, _PART_NORMS)
        check_choice("AlignNet", "paf_mode", paf_mode, _PAF_MODES)
        check_backend("AlignNet", ops_backend, "ops_backend")
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"AlignNet: temperature must be a positive number, got {temperature!r}")
        if tap_per_part and not (use_parts and use_tap):
            raise ValueError("AlignNet: tap_per_part needs use_parts=True and use_tap=True")
        self.use_parts, self.use_tap, self.tap_per_part = bool(use_parts), bool(use_tap), bool(tap_per_part)
        self.tap_agg, self.part_norm, self.paf_mode = tap_agg, part_norm, paf_mode
        self.temperature, self.margin, self.ops_backend = float(temperature), float(margin), ops_backend

        self.backbone = ResNet(depth, last_stride=last_stride, width=width)
        if pretrained is not None:
            load_pretrained(self.backbone, pretrained)
        channels = self.backbone.channels[-1]
        self.channels = channels
        if tap_hidden is None:
            tap_hidden = max(1, channels // 8)
        if not isinstance(tap_hidden, int) or tap_hidden < 1:
            raise ValueError(f"AlignNet: tap_hidden must be a positive int or None, got {tap_hidden!r}")
        if self.use_parts:
            self.pose_maps = PoseMaps(pose_source, weights=pose_weights, sigma=pose_sigma,
                                      limb_width=limb_width)
            # [3, 57], a constant: float64 (cast per call) so that a float64 model uses exact 1/16, 1/18, 1/14
            self.register_buffer("groups", part_groups("alignnet", NUM_POSE_MAPS, dtype=torch.float64),
                                 persistent=False)
        elif pose_source != "render" or pose_weights is not None:
            raise ValueError("AlignNet: pose_source / pose_weights need use_parts=True")
        if self.use_tap:
            self.tap_g = TemporalAttentionPooling(channels, tap_hidden)
            if self.use_parts:
                self.tap_p = (nn.ModuleList(TemporalAttentionPooling(channels, tap_hidden) for _ in range(3))
                              if self.tap_per_part else TemporalAttentionPooling(channels, tap_hidden))
        self.num_parts = 3 if self.use_parts else 0
        self.embedding_dim = channels * (1 + self.num_parts)
        self.classifier = nn.Linear(self.embedding_dim, num_classes)
        self._diagnostics = torch.zeros(3, dtype=torch.float64)   # frames, sum of entropies, of cosines

    def _masks(self, pose: Tensor) -> Tensor:
        """The part masks ``[N, 3, h, w]`` of pose maps at the feature grid (Eq. 2-3): the composite
        maps divided by the temperature, each softmax-normalised over its ``h w`` cells."""
        logits = torch.einsum("qf,nfhw->nqhw", self.groups.to(pose.dtype), pose)
        return torch.softmax(logits.flatten(2) / self.temperature, -1).view_as(logits)

    @torch.no_grad()
    def _record(self, masks: Tensor, parts: Tensor, global_features: Tensor) -> None:
        """Adds a training batch's frames to the running sums of :meth:`diagnostics`."""
        p = masks.flatten(2).double()
        cells = p.size(-1)
        entropy = -(p * p.clamp(min=torch.finfo(p.dtype).tiny).log()).sum(-1) / max(math.log(cells), 1e-12)
        cosine = F.cosine_similarity(parts.double(), global_features.double()[:, None], dim=-1)
        self._diagnostics += torch.stack([torch.tensor(float(p.size(0)), dtype=torch.float64),
                                          entropy.mean(1).sum().cpu(), cosine.mean(1).sum().cpu()])

    def diagnostics(self) -> dict[str, float]:
        """Means over the training frames since the last call, which resets them (the engine logs
        them per epoch): ``mask_entropy``, a part mask's entropy divided by ``log(h w)`` (1: uniform,
        the parts are the global feature; 0: one cell), and ``part_cosine``, the cosine similarity of
        a part vector and the frame's global vector.  Empty without parts or training frames."""
        frames, entropy, cosine = self._diagnostics.tolist()
        self._diagnostics.zero_()
        if frames == 0:
            return {}
        return {"mask_entropy": entropy / frames, "part_cosine": cosine / frames}

    @torch.no_grad()
    def part_masks(self, images: Tensor, keypoints: Tensor) -> Tensor | None:
        """The part masks ``[B, T, 3, h, w]`` (head, torso + arms, legs; each sums to 1 over the
        feature grid) of a batch of clips, or None without parts."""
        if not self.use_parts:
            return None
        x = images.flatten(0, 1)
        grid = tuple(self.backbone(x)[-1].shape[-2:])
        masks = self._masks(self._pose(x, keypoints.flatten(0, 1), grid).to(x.dtype))
        return masks.unflatten(0, tuple(images.shape[:2]))

    def _pose(self, images: Tensor, keypoints: Tensor, grid: tuple[int, int]) -> Tensor:
        """``pose57`` at the feature grid ``[N, 57, h, w]``, after ``paf_mode``."""
        pose = self.pose_maps(images, keypoints)
        if self.paf_mode != "raw":
            heat, paf = pose[:, :19], pose[:, 19:]
            if self.paf_mode == "abs":
                paf = paf.abs()
            else:
                pairs = paf.unflatten(1, (19, 2))
                paf = torch.linalg.vector_norm(pairs, dim=2, keepdim=True).expand_as(pairs).flatten(1, 2)
            pose = torch.cat([heat, paf], 1)
        return F.adaptive_avg_pool2d(pose, grid)

    def frames(self, images: Tensor, keypoints: Tensor) -> tuple[Tensor, Tensor | None]:
        """Frame descriptors ``[B, T, D]`` (Eq. 6) and their per-slice TAP weights ``[B, T, D]``
        (None without TAP)."""
        if not isinstance(images, Tensor) or images.dim() != 5 or images.size(2) != 3:
            raise ValueError(f"AlignNet: images must be [B, T, 3, H, W], got {list(getattr(images, 'shape', []))}")
        batch, frames = images.shape[:2]
        if (not isinstance(keypoints, Tensor) or keypoints.shape[:2] != images.shape[:2]
                or tuple(keypoints.shape[2:]) != (17, 3)):
            raise ValueError(f"AlignNet: keypoints must be [B, T, 17, 3] = [{batch}, {frames}, 17, 3], got "
                             f"{list(getattr(keypoints, 'shape', []))}")
        x = images.flatten(0, 1)
        fa = self.backbone(x)[-1]                                               # [N, C, h, w]
        slices = [fa.mean((2, 3))]
        weights = [self.tap_g(fa)] if self.use_tap else []
        if self.use_parts:
            grid = tuple(fa.shape[-2:])
            pose = self._pose(x, keypoints.flatten(0, 1), grid).to(fa.dtype)     # [N, 57, h, w]
            groups = self.groups.to(fa.dtype)
            parts = part_pool(fa, pose, groups, temperature=self.temperature, backend=self.ops_backend)
            if self.part_norm == "avg":
                parts = parts / (grid[0] * grid[1])
            slices += list(parts.unbind(1))
            # the masks again (3 x h w values per frame): TAP_p reads the unpooled masked map f_a * p_r,
            # which part_pool never forms, and the diagnostics read the masks
            masks = self._masks(pose) if self.use_tap or self.training else None
            if self.training:
                self._record(masks, parts, slices[0])
            if self.use_tap:
                masked = fa[:, None] * (masks if self.tap_per_part else masks[:, :1])[:, :, None]
                if self.tap_per_part:
                    weights += [tap(masked[:, q]) for q, tap in enumerate(self.tap_p)]
                else:
                    weights += [self.tap_p(masked[:, 0])] * self.num_parts    # the head map weights all parts
        frame_features = torch.cat(slices, 1).unflatten(0, (batch, frames))
        if not self.use_tap:
            return frame_features, None
        weights = torch.stack(weights, 1).repeat_interleave(self.channels, 1)   # [N, D]
        return frame_features, weights.unflatten(0, (batch, frames))

    def forward(self, images: Tensor, keypoints: Tensor):
        frame_features, weights = self.frames(images, keypoints)
        if weights is None:
            video = frame_features.mean(1)
        elif self.tap_agg == "mean":
            video = (weights * frame_features).mean(1)
        elif self.tap_agg == "sum":
            video = (weights * frame_features).sum(1)
        else:
            video = (weights * frame_features).sum(1) / weights.sum(1)
        if not self.training:
            return video
        return {"logits": self.classifier(video), "features": video, "frame_features": frame_features,
                "frame_weights": torch.ones_like(frame_features) if weights is None else weights}

    def loss(self, output: dict, pids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``L = CE(logits) + batch-hard triplet(features, margin)`` (no label smoothing, 1:1)."""
        ce = cross_entropy_label_smooth(output["logits"], pids, epsilon=0.0)
        triplet = batch_hard_triplet(output["features"], pids, margin=self.margin)
        return ce + triplet, {"ce": ce, "triplet": triplet}

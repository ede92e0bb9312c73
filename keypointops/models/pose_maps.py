"""OpenPose-style pose maps for AlignNet: 19 heatmaps + 38 part-affinity fields (``pose57``).

AlignNet (``docs/models/alignnet.md``) reads the 57 output maps of OpenPose's COCO body
model at 1/8 of the input resolution, in the layout ``pose57 = cat([heatmaps19, paf38])``:

* channels 0-18: the heatmaps of the 18 COCO-18 joints (``graphs.skeleton("openpose18")`` order:
  nose, neck, right shoulder/elbow/wrist, left shoulder/elbow/wrist, right hip/knee/ankle, left
  hip/knee/ankle, right/left eye, right/left ear) and the background;
* channels 19-56: the x and y part-affinity fields of the 19 OpenPose limbs (:data:`OPENPOSE_LIMBS`),
  limb ``k`` at ``19 + mapIdx[k]`` (x) and the next channel (y), the order of the CMU demo code, so
  ``parts.part_groups("alignnet")`` indexes the tensor directly.

Two sources give these maps (:class:`PoseMaps`):

* ``"render"`` (:func:`render_pose_maps`): the maps OpenPose is trained to output, drawn from the
  batch's COCO-17 keypoints the way OpenPose draws its training targets (Cao et al., CVPR 2017):
  a Gaussian of sigma 7 input pixels per joint (:func:`render_heatmaps`), the background
  ``max(1 - max_j heatmap_j, 0)``, and per limb the unit vector from its first to its second
  joint on the grid cells within ``limb_width`` (8 input pixels = 1 grid cell, the CMU code's
  threshold) of the segment.  The neck, which COCO-17 lacks, is the mid-shoulder point, valid only
  when both shoulders are.  Used when no OpenPose weights exist (here: always; nothing is
  downloaded).
* ``"network"`` (:class:`OpenPoseBody`): the OpenPose COCO body network (VGG-19 front + 6 two-branch
  stages, 52.3 M parameters) with the original layer names, so a caffe-converted state dict
  (``body_pose_model.pth`` of the PyTorch ports) loads from a local file with
  :func:`load_openpose_weights`.  AlignNet fine-tunes it end to end.

Deviations, with reasons:

* Grid convention: a heatmap/PAF cell ``(i, j)`` is centred on input pixel
  ``(x, y) = (8 j + 3.5, 8 i + 3.5)`` (pixel centres at integer coordinates), the heatmap
  convention of the CMU training code (``start = stride / 2 - 0.5``).  The CMU code draws PAFs on
  ``joint / 8`` without that offset; one convention for both keeps heatmap peaks on their limbs.
* The PAF support is the paper's (Eq. 8-9: ``0 <= along <= length`` and ``|across| <= width``),
  not the CMU code's bounding box of the segment widened by the threshold.
* No cut-off of the Gaussian tails (the CMU code zeroes ``exp(-d^2 / 2 sigma^2) < 0.01``).
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor, nn

from keypointops.data.keypoint_files import from_coco17_tensor
from keypointops.data.transforms import denormalize

__all__ = ["OPENPOSE_LIMBS", "NUM_POSE_MAPS", "POSE_STRIDE", "openpose18_from_coco17",
           "render_heatmaps", "render_pose_maps", "openpose_input", "OpenPoseBody", "load_openpose_weights", "PoseMaps"]

NUM_POSE_MAPS = 57   # 19 heatmaps + 38 part-affinity fields
POSE_STRIDE = 8      # input pixels per pose-map cell (OpenPose's three 2x2 max-pools)

# The 19 OpenPose limbs (CMU demo code's limbSeq, 0-based COCO-18 joints; the field points from the
# first joint to the second) and the channel of each limb's x field within the 38 PAF maps
# (mapIdx - 19; y is the next channel).
OPENPOSE_LIMBS: tuple[tuple[int, int, int], ...] = (
    (1, 2, 12), (1, 5, 20), (2, 3, 14), (3, 4, 16), (5, 6, 22), (6, 7, 24), (1, 8, 0), (8, 9, 2),
    (9, 10, 4), (1, 11, 6), (11, 12, 8), (12, 13, 10), (1, 0, 28), (0, 14, 30), (14, 16, 34),
    (0, 15, 32), (15, 17, 36), (2, 16, 18), (5, 17, 26))
# _PAF_FROM_LIMB_ORDER[c]: which channel of the limb-ordered [19 limbs x (x, y)] stack is PAF channel c.
_PAF_FROM_LIMB_ORDER = tuple(sorted(range(38), key=lambda i: OPENPOSE_LIMBS[i // 2][2] + i % 2))


def render_heatmaps(keypoints: Tensor, size: tuple[int, int], sigma: float,
                    valid: Tensor | None = None) -> Tensor:
    """Gaussian heatmaps of keypoints, one channel per keypoint: ``[..., K, H, W]``.

    ``heatmap[..., k, i, j] = exp(-((j - x_k)^2 + (i - y_k)^2) / (2 sigma^2))``: keypoints are in
    heatmap pixels with pixel ``(i, j)`` centred at ``(x, y) = (j, i)`` (the convention of
    OpenPose / HRNet training targets), so a keypoint on a pixel centre peaks at 1 there.

    Args:
        keypoints: ``[..., K, 2]`` ``(x, y)`` or ``[..., K, 3]`` ``(x, y, confidence)``, floating.
        size: ``(H, W)`` of the heatmaps.
        sigma: standard deviation in heatmap pixels, finite and positive.
        valid: optional ``[..., K]`` bool; defaults to ``confidence > 0`` for ``[..., K, 3]``.
            Invalid keypoints, and keypoints with a non-finite coordinate, get all-zero heatmaps.

    Returns:
        ``[..., K, H, W]`` tensor of ``keypoints``' dtype and device.
    """
    if not isinstance(keypoints, Tensor) or not keypoints.is_floating_point():
        raise ValueError("render_heatmaps: keypoints must be a floating point Tensor")
    if keypoints.dim() < 2 or keypoints.shape[-1] not in (2, 3):
        raise ValueError(f"render_heatmaps: keypoints must be [..., K, 2] or [..., K, 3], got shape "
                         f"{list(keypoints.shape)}")
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(n, int) and n > 0 for n in size)):
        raise ValueError(f"render_heatmaps: size must be (H, W) of positive ints, got {size!r}")
    if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"render_heatmaps: sigma must be a finite positive number, got {sigma!r}")
    if valid is None:
        valid = keypoints[..., 2] > 0 if keypoints.shape[-1] == 3 else torch.ones(
            keypoints.shape[:-1], dtype=torch.bool, device=keypoints.device)
    elif (not isinstance(valid, Tensor) or valid.dtype != torch.bool
          or valid.shape != keypoints.shape[:-1] or valid.device != keypoints.device):
        raise ValueError(f"render_heatmaps: valid must be a bool tensor of shape "
                         f"{list(keypoints.shape[:-1])} on {keypoints.device}")
    points = keypoints[..., :2]
    valid = valid & points.isfinite().all(-1)
    points = torch.where(valid[..., None], points, torch.zeros_like(points))
    height, width = size
    cols = torch.arange(width, dtype=keypoints.dtype, device=keypoints.device)
    rows = torch.arange(height, dtype=keypoints.dtype, device=keypoints.device)
    scale = -0.5 / sigma ** 2
    along_x = ((cols - points[..., 0:1]) ** 2 * scale).exp()                    # [..., K, W]
    along_y = ((rows - points[..., 1:2]) ** 2 * scale).exp()                    # [..., K, H]
    along_y = along_y * valid[..., None].to(keypoints.dtype)
    return along_y[..., :, None] * along_x[..., None, :]


def openpose18_from_coco17(keypoints: Tensor) -> Tensor:
    """OpenPose COCO-18 keypoints ``[..., 18, 3]`` from COCO-17 keypoints ``[..., 17, 3]``.

    Joint order of ``graphs.skeleton("openpose18")``.  The neck is the mean of the two shoulders;
    its confidence is the smaller of theirs, so it is valid (``> 0``) only when both are
    (:func:`keypointops.data.keypoint_files.from_coco17_tensor`).
    """
    if not isinstance(keypoints, Tensor) or keypoints.dim() < 2 or tuple(keypoints.shape[-2:]) != (17, 3):
        raise ValueError(f"openpose18_from_coco17: keypoints must be [..., 17, 3] (x, y, confidence) "
                         f"in COCO-17 order, got {list(getattr(keypoints, 'shape', []))}")
    return from_coco17_tensor(keypoints, "openpose18")


def render_pose_maps(keypoints: Tensor, image_size: tuple[int, int], *, sigma: float = 7.0,
                     limb_width: float = 8.0) -> Tensor:
    """The 57 OpenPose maps ``[..., 57, H // 8, W // 8]`` drawn from COCO-17 keypoints.

    Args:
        keypoints: ``[..., 17, 3]`` ``(x, y, confidence)`` in pixels of the ``H x W`` network input;
            a joint with confidence ``<= 0`` is missing (no peak; no field on its limbs).
        image_size: ``(H, W)`` of the network input; the maps are ``H // 8 x W // 8``, the size of
            OpenPose's output for that input.
        sigma: standard deviation of the joint Gaussians, in input pixels (OpenPose: 7).
        limb_width: half-width of a limb's field, in input pixels (OpenPose: 1 cell = 8).

    Returns:
        ``cat([heatmaps19, paf38])`` in the module's channel layout, of ``keypoints``' dtype.  Not
        differentiable in the keypoint positions (the limb support is a hard mask).
    """
    if not isinstance(keypoints, Tensor) or not keypoints.is_floating_point():
        raise ValueError("render_pose_maps: keypoints must be a floating point Tensor [..., 17, 3]")
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or not all(isinstance(n, int) and n >= POSE_STRIDE for n in image_size)):
        raise ValueError(f"render_pose_maps: image_size must be (H, W), ints >= {POSE_STRIDE}, "
                         f"got {image_size!r}")
    if not isinstance(limb_width, (int, float)) or not limb_width > 0:
        raise ValueError(f"render_pose_maps: limb_width must be a positive number, got {limb_width!r}")
    joints = openpose18_from_coco17(keypoints)
    height, width = image_size[0] // POSE_STRIDE, image_size[1] // POSE_STRIDE
    offset = POSE_STRIDE / 2 - 0.5
    xy = (joints[..., :2] - offset) / POSE_STRIDE                               # grid coordinates
    valid = (joints[..., 2] > 0) & xy.isfinite().all(-1)
    heat = render_heatmaps(xy, (height, width), sigma / POSE_STRIDE, valid=valid)  # [..., 18, h, w]
    background = (1 - heat.amax(-3, keepdim=True)).clamp(min=0)

    start = torch.tensor([limb[0] for limb in OPENPOSE_LIMBS], device=keypoints.device)
    end = torch.tensor([limb[1] for limb in OPENPOSE_LIMBS], device=keypoints.device)
    a, b = xy[..., start, :], xy[..., end, :]                                    # [..., 19, 2]
    length = (b - a).norm(dim=-1, keepdim=True)                                  # [..., 19, 1]
    limb_valid = valid[..., start] & valid[..., end] & (length[..., 0] > 1e-6)
    unit = torch.where(limb_valid[..., None], (b - a) / length.clamp(min=1e-6), 0.0)
    rows = torch.arange(height, dtype=keypoints.dtype, device=keypoints.device)
    cols = torch.arange(width, dtype=keypoints.dtype, device=keypoints.device)
    dx = cols - a[..., 0:1]                                                      # [..., 19, w]
    dy = rows - a[..., 1:2]                                                      # [..., 19, h]
    ux, uy = unit[..., 0, None, None], unit[..., 1, None, None]
    along = dx[..., None, :] * ux + dy[..., :, None] * uy                        # [..., 19, h, w]
    across = (dx[..., None, :] * uy - dy[..., :, None] * ux).abs()
    on_limb = (along >= 0) & (along <= length[..., None]) & (across <= limb_width / POSE_STRIDE)
    on_limb = on_limb & limb_valid[..., None, None]
    paf = torch.stack([ux * on_limb, uy * on_limb], -3).flatten(-4, -3)          # [..., 38, h, w]
    order = torch.tensor(_PAF_FROM_LIMB_ORDER, device=keypoints.device)
    return torch.cat([heat, background, paf.index_select(-3, order)], -3)


def openpose_input(images: Tensor) -> Tensor:
    """OpenPose's input from ImageNet-normalised RGB images ``[N, 3, H, W]`` (the batch contract).

    The CMU COCO model reads BGR ``uint8 / 256 - 0.5``: the images are un-normalised to RGB in
    ``[0, 1]``, reordered to BGR and mapped to ``x * 255 / 256 - 0.5``.
    """
    return denormalize(images).flip(-3) * (255 / 256) - 0.5


# OpenPose COCO body network: (name, in, out, kernel) per conv; "pool" is a 2x2 max-pool, stride 2.
_VGG_FRONT = (("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), "pool",
              ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3), "pool",
              ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3),
              ("conv3_4", 256, 256, 3), "pool",
              ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3), ("conv4_3_CPM", 512, 256, 3),
              ("conv4_4_CPM", 256, 128, 3))
_BRANCH_OUT = {"L1": 38, "L2": 19}   # L1: part-affinity fields, L2: heatmaps
_STAGES = 6


def _branch(stage: int, branch: str) -> tuple[tuple[str, int, int, int], ...]:
    out = _BRANCH_OUT[branch]
    if stage == 1:
        return tuple((f"conv5_{i}_CPM_{branch}", 128, 128, 3) for i in (1, 2, 3)) + (
            (f"conv5_4_CPM_{branch}", 128, 512, 1), (f"conv5_5_CPM_{branch}", 512, out, 1))
    return ((f"Mconv1_stage{stage}_{branch}", 128 + 38 + 19, 128, 7),) + tuple(
        (f"Mconv{i}_stage{stage}_{branch}", 128, 128, 7) for i in (2, 3, 4, 5)) + (
        (f"Mconv6_stage{stage}_{branch}", 128, 128, 1), (f"Mconv7_stage{stage}_{branch}", 128, out, 1))


class OpenPoseBody(nn.Module):
    """The OpenPose COCO body network (Cao et al., CVPR 2017; CMU ``pose_iter_440000``).

    VGG-19 ``conv1_1`` .. ``conv4_2`` (three 2x2 max-pools: output stride 8), ``conv4_3_CPM``
    (512 -> 256) and ``conv4_4_CPM`` (256 -> 128), then 6 stages of two branches, ``L1`` (38
    part-affinity fields) and ``L2`` (19 heatmaps): stage 1 three 3x3 convs and two 1x1 convs,
    stages 2-6 five 7x7 convs and two 1x1 convs on ``cat([L1, L2, features])`` (185 channels).
    ReLU after every conv except the last of each branch, so the outputs are linear (the PAFs are
    signed; this drops the ReLU the PyTorch port Hzzone/pytorch-openpose puts after
    ``Mconv7_stage6_L2``, docs/models/alignnet.md).  Every conv is a direct child named as in the caffe
    model, so ``state_dict()`` keys are the converted file's (``conv1_1.weight``,
    ``Mconv7_stage6_L2.bias``, ...).

    ``forward(x [N, 3, H, W])`` (input as :func:`openpose_input`) returns the last stage's maps as
    ``pose57 = cat([heatmaps19, paf38])`` ``[N, 57, H // 8, W // 8]``.  Without loaded weights the
    convs have PyTorch's default init.
    """

    def __init__(self):
        super().__init__()
        self._front = tuple(layer if layer == "pool" else layer[0] for layer in _VGG_FRONT)
        self._branches = tuple({b: tuple(layer[0] for layer in _branch(s, b)) for b in _BRANCH_OUT}
                               for s in range(1, _STAGES + 1))
        layers = [layer for layer in _VGG_FRONT if layer != "pool"]
        layers += [layer for s in range(1, _STAGES + 1) for b in _BRANCH_OUT for layer in _branch(s, b)]
        for name, cin, cout, kernel in layers:
            self.add_module(name, nn.Conv2d(cin, cout, kernel, padding=kernel // 2))
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2, 2)

    def _run(self, names: tuple[str, ...], x: Tensor, last_linear: bool) -> Tensor:
        for i, name in enumerate(names):
            if name == "pool":
                x = self.pool(x)
                continue
            x = getattr(self, name)(x)
            if not (last_linear and i == len(names) - 1):
                x = self.relu(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.size(1) != 3:
            raise ValueError(f"OpenPoseBody: input must be images [N, 3, H, W], got "
                             f"{list(getattr(x, 'shape', []))}")
        features = self._run(self._front, x, last_linear=False)
        stage_input = features
        for branches in self._branches:
            paf = self._run(branches["L1"], stage_input, last_linear=True)
            heat = self._run(branches["L2"], stage_input, last_linear=True)
            stage_input = torch.cat([paf, heat, features], 1)
        return torch.cat([heat, paf], 1)


def load_openpose_weights(net: OpenPoseBody, path: str | os.PathLike) -> OpenPoseBody:
    """Loads a caffe-converted OpenPose COCO body state dict from the local file ``path``.

    The file (read with ``torch.load(weights_only=True)``) holds the caffe layer names
    (``conv1_1.weight`` ... ``Mconv7_stage6_L2.bias``), as ``body_pose_model.pth`` of the PyTorch
    ports; it loads with ``strict=True``.  Nothing is downloaded.  Returns ``net``.
    """
    if not isinstance(net, OpenPoseBody):
        raise TypeError(f"load_openpose_weights: net must be an OpenPoseBody, got {type(net).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_openpose_weights: no such weights file {os.fspath(path)!r} "
                                "(weights are read from a local file, never downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged or foreign file
        raise ValueError(f"load_openpose_weights: {os.fspath(path)!r} is not a readable torch file "
                         f"({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"load_openpose_weights: {os.fspath(path)!r} does not hold a state dict")
    expected = net.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise ValueError(f"load_openpose_weights: {os.fspath(path)!r} is not in the layout of the OpenPose COCO "
                             f"body network: tensor {name!r} is missing")
        got = state[name]
        if not isinstance(got, torch.Tensor) or got.shape != tensor.shape:
            raise ValueError(f"load_openpose_weights: {os.fspath(path)!r} is not in the layout of the OpenPose COCO "
                             f"body network: tensor {name!r} has shape {list(getattr(got, 'shape', []))}, "
                             f"expected {list(tensor.shape)}")
    unexpected = [name for name in state if name not in expected]
    if unexpected:
        raise ValueError(f"load_openpose_weights: {os.fspath(path)!r} is not in the layout of the OpenPose COCO "
                         f"body network: unexpected tensor {unexpected[0]!r}")
    net.load_state_dict(state, strict=True)
    return net


class PoseMaps(nn.Module):
    """AlignNet's pose maps ``[N, 57, H // 8, W // 8]`` from a batch of frames and their keypoints.

    Args:
        source: ``"render"`` (:func:`render_pose_maps` from the keypoints; no parameters) or
            ``"network"`` (:class:`OpenPoseBody` on the images, trained end to end).
        weights: for ``"network"``, a local caffe-converted OpenPose state dict to load (see
            :func:`load_openpose_weights`); None leaves the network at its random init.
        sigma, limb_width: of :func:`render_pose_maps`, in input pixels.

    ``forward(images [N, 3, H, W] ImageNet-normalised, keypoints [N, 17, 3])``.
    """

    def __init__(self, source: str = "render", *, weights: str | os.PathLike | None = None,
                 sigma: float = 7.0, limb_width: float = 8.0):
        super().__init__()
        if source not in ("render", "network"):
            raise ValueError(f"PoseMaps: source must be 'render' or 'network', got {source!r}")
        if weights is not None and source != "network":
            raise ValueError("PoseMaps: weights are for source='network' (the OpenPose body network)")
        if not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(f"PoseMaps: sigma must be a positive number, got {sigma!r}")
        self.source, self.sigma, self.limb_width = source, float(sigma), float(limb_width)
        self.net = OpenPoseBody() if source == "network" else None
        if weights is not None:
            load_openpose_weights(self.net, weights)

    def forward(self, images: Tensor, keypoints: Tensor) -> Tensor:
        if self.net is not None:
            return self.net(openpose_input(images))
        with torch.no_grad():
            size = (int(images.shape[-2]), int(images.shape[-1]))   # ints also under the ONNX tracer
            return render_pose_maps(keypoints.to(images.dtype), size,
                                    sigma=self.sigma, limb_width=self.limb_width)

    def extra_repr(self) -> str:
        return (f"source={self.source!r}" if self.net is not None
                else f"source='render', sigma={self.sigma}, limb_width={self.limb_width}")

r"""RGCN and LGCN: pose features beyond appearance for video person re-ID (``docs/models/rgcn.md``).

Two branches with no shared parameters, one clip ``[B, T, 3, H, W]`` + its keypoints
``[B, T, 17, 3]`` (COCO-17, network-input pixels) in:

* **appearance**: a ResNet (ResNet-50, last stride 2 by default) per frame, global average pooling
  of the last stage -> ``f_t^a`` (2048), then a temporal aggregator -> ``f^a``:
  ``"avg"`` (AP, the paper's default baseline, Eq. 1), ``"attention"`` (AA, Eq. 2, with Gao &
  Nevatia's temporal-attention head: ``Conv2d(C, 256, kernel = the whole final map) -> ReLU ->
  Conv1d(256, 1, 3, padding 1)`` over time, softmax over the ``T`` frames) or ``"lstm"`` (RA, Eq. 3:
  the mean of an LSTM's outputs, hidden size ``lstm_hidden``, 2048 by default).
* **pose**: the 14 OpenPose joints (COCO-18 order without eyes and ears, ``graphs.skeleton("pose14")``)
  converted from COCO-17 (the neck synthesised as the mid-shoulder point, valid only when both
  shoulders are); node features = the coordinates divided by the input width / height, missing
  joints (confidence ``<= conf_thresh``) exactly ``(0, 0)``, no mask anywhere.  One graph
  per frame with ``Â = D^-1/2 (A + I) D^-1/2`` of the 13 skeleton edges, no edge between frames.
  :class:`RecurrentGraphConv` runs Eq. 6 (RGCN, ``recurrence="tanh"``)

  .. math:: H_t = \tanh(H_{t-1} W_h + \mathrm{ReLU}(\hat A X_t W_x) + b),\quad H_0 = 0

  or Eq. 8 (LGCN, ``recurrence="lstm"``: the four gates f, i, o, g each with its own
  ``ReLU(Â X_t W_*)`` input term, ``H_{t-1} U_*`` and ``b_*``; ``H_t = O_t ⊙ tanh(C_t)``), with
  ``H_t`` ``[14, n]``, then :class:`DualAttention` (DAM, Eqs. 9-14) pools ``[B, T, 14, n]`` to
  ``f^p = [h^(n); h^(t)]`` (2n = 512): node-attention over the time-averaged node states and
  time-attention over the node-averaged frame states, one score vector each.

Training: ``logits = Linear([f^a; f^p])`` (the only coupling of the branches); the loss (Eqs. 17-19)
is ``L_id + λ L_tri(f^a) + (1 - λ) L_tri(f^p)`` with ``λ = L_tri^a / (L_tri^a + L_tri^p)`` recomputed
every step and detached (no gradient through λ), or a fixed λ (``triplet_weight``, the
Table VII ablation).  Inference: the clip embedding is ``[f^a; f^p]``, concatenated raw
(``embedding="appearance"`` / ``"pose"``: one branch alone, to see what each contributes).
``pose_branch=False`` is the appearance-only row of Table III (the same appearance network, the ID
classifier on ``f^a``, ``L_id + L_tri(f^a)``).  :meth:`RGCN.diagnostics` logs λ and the scale of the
two branches once per epoch.

Fused ops (docs/models/rgcn.md), each called with ``backend=ops_backend``:

* the per-frame graph conv ``Â X_t`` for every frame is ``window_graph_conv(X, Â, window=1)``
  (a window of one frame holds no cross-frame edge, so it is exactly the paper's graph);
* node- and time-attention are ``part_pool`` over a ``[B, n, S, 1]`` "feature map" of the
  ``S = 14`` nodes / ``T`` frames with the scores as a one-channel heatmap (softmax over the
  positions, then the weighted sum); the AA aggregator uses it the same way over frames.

``ops_backend="reference"`` gives the plain-PyTorch model (the reference ops are a gather + the
dense ``einsum``, and ``softmax`` + a weighted sum); it exports to ONNX.  The recurrences, the ResNet and the losses have
no fused op.

Deviations from the paper (docs/models/rgcn.md), with the reason:

* Keypoints come from the data pipeline in COCO-17 (the data layer's batch contract), so the neck is
  synthesised (the COCO-17 fallback of docs/models/rgcn.md) instead of read from OpenPose COCO-18.
* Coordinates are normalised by the network-input size (the pipeline gives keypoints in input
  pixels after every transform) rather than by the original crop size; for a resize it is the
  same number.  The pipeline flips keypoints with the images (left and right joints swapped),
  where the paper keeps the pose unflipped; the model cannot tell the difference.
* The triplet losses are :func:`keypointops.losses.batch_hard_triplet` (mean over anchors);
  a sum over anchors is not offered.  The ID loss is
  :func:`keypointops.losses.cross_entropy_label_smooth` with ``label_smooth=0`` by default (plain
  cross-entropy, as in the paper).
* Test clips: at the ``paper`` preset ``test_sampling="all"`` cuts a tracklet into consecutive clips
  of ``T`` frames (the loader's padding of the last clip, not the paper's cyclic repeat) and averages
  the clip embeddings (the mean of ``[f^a; f^p]`` is the paper's per-branch mean, concatenated); the
  ``cpu`` preset samples ``T`` evenly spaced frames, as every other model's ``cpu`` preset does.
* ``depth``/``width`` of the backbone and ``hidden`` (n) give the small CPU variant
  (the ``cpu`` preset of :mod:`keypointops.models.presets`, with a shorter clip and smaller images); it is not in the paper.

Not implemented: the pose-branch baselines of Tables IV/V (GCN&RNN, GCN&LSTM, ST-GCN, EvolveGCN)
and the BiCnet-TKS appearance model.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from keypointops._checks import check_choice
from keypointops.graphs import normalize_adjacency, skeleton
from keypointops.losses import batch_hard_triplet, cross_entropy_label_smooth
from keypointops.models._common import RunningMeans
from keypointops.models.backbones import ResNet, load_pretrained
from keypointops.models.pose_maps import openpose18_from_coco17
from keypointops.ops.part_pool import part_pool
from keypointops.ops.window_graph_conv import window_graph_conv

__all__ = ["RGCN", "LGCN", "RecurrentGraphConv", "DualAttention", "TemporalAggregator",
           "pose14_from_coco17"]

_POSE14_JOINTS = skeleton("pose14").num_joints   # OpenPose COCO-18 joints 0..13 (docs/models/rgcn.md)
_RECURRENCES = {"tanh": 1, "lstm": 4}     # recurrence -> number of gates (weight blocks)
_READOUTS = ("dam", "nam", "tam", "mean")
_AGGREGATORS = ("avg", "attention", "lstm")
_EMBEDDINGS = ("both", "appearance", "pose")


def pose14_from_coco17(keypoints: Tensor, *, size: tuple[int, int] | None = None,
                       conf_thresh: float = 0.0) -> Tensor:
    """The pose branch's node features ``[..., 14, 2]`` from COCO-17 keypoints ``[..., 17, 3]``.

    Joint order of ``graphs.skeleton("pose14")``: OpenPose COCO-18 joints 0..13 of
    :func:`~keypointops.models.pose_maps.openpose18_from_coco17` (the neck is the mean of the two
    shoulders with the smaller of their confidences, so it is valid only when both are).  A joint
    is missing when its confidence is ``<= conf_thresh``; missing joints get exactly ``(0, 0)``
    (the paper's zero padding).  With ``size = (H, W)`` x is divided by ``W`` and y by ``H``
    (visible joints in ``[0, 1]`` for points inside the image); ``None`` keeps pixels.
    """
    joints = openpose18_from_coco17(keypoints)[..., :_POSE14_JOINTS, :]
    xy = joints[..., :2]
    if size is not None:
        height, width = size
        xy = xy / xy.new_tensor([float(width), float(height)])
    return torch.where((joints[..., 2] > conf_thresh)[..., None], xy, torch.zeros_like(xy))


def _check_positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be an int >= 1, got {value!r}")


class RecurrentGraphConv(nn.Module):
    r"""The pose network of RGCN (Eq. 6/7, ``recurrence="tanh"``) and LGCN (Eq. 8, ``"lstm"``).

    ``G`` gates (1 for RGCN, 4 for LGCN in the order f, i, o, g) share one layout: the input
    weights ``W^(1)`` ``[in_channels, G, n]`` and, for ``gc_layers = L > 1``, ``W^(l)`` ``[G, n, n]``
    (one ``n x n`` matrix per gate, Eq. 7 by analogy for LGCN); the recurrent weight
    ``[n, G*n]`` and the bias ``[G*n]``.  The input term of every frame is computed at once:

    * ``inner_act=False`` (Eq. 7 as printed, the default): ``ReLU(Â^L X W^(1) ... W^(L))``, the
      aggregation applied to the 2-channel coordinates (cheapest);
    * ``inner_act=True``: ``ReLU(Â ... ReLU(Â X W^(1)) ... W^(L))`` (an alternative reading of the paper).

    ``Â Z`` for all frames is ``window_graph_conv(Z, Â, window=1, backend=ops_backend)``.  Then for
    ``t = 1..T`` with ``H_0 = C_0 = 0``: RGCN ``H_t = tanh(U_t + H_{t-1} W_h + b)``; LGCN
    ``[F, I, O, G] = [σ, σ, σ, tanh](U_t + H_{t-1} U + b)``, ``C_t = F ⊙ C_{t-1} + I ⊙ G``,
    ``H_t = O ⊙ tanh(C_t)``.  The recurrent term right-multiplies: nodes do not mix over time.
    Init: Xavier-uniform per gate matrix, zero bias.

    Shapes: ``x`` ``[B, T, 14, in_channels]`` -> ``[B, T, 14, n]``.  n = 256: 66,304 parameters
    for RGCN, 265,216 for LGCN.
    """

    def __init__(self, hidden: int = 256, *, recurrence: str = "tanh", gc_layers: int = 1,
                 inner_act: bool = False, in_channels: int = 2, ops_backend: str = "auto"):
        super().__init__()
        owner = "RecurrentGraphConv"
        check_choice(owner, "recurrence", recurrence, _RECURRENCES)
        for name, value in (("hidden", hidden), ("gc_layers", gc_layers), ("in_channels", in_channels)):
            _check_positive_int(owner, name, value)
        self.recurrence, self.hidden, self.inner_act = recurrence, hidden, bool(inner_act)
        self.gates = _RECURRENCES[recurrence]
        self.ops_backend = ops_backend
        # The 0/1 skeleton (a constant, not in the state dict); Â is normalised in the input's dtype
        # (exact in float64 after .double()).
        self.register_buffer("skeleton", skeleton("pose14").adjacency(), persistent=False)
        self.input_weights = nn.ParameterList(
            [nn.Parameter(torch.empty(in_channels, self.gates, hidden))]
            + [nn.Parameter(torch.empty(self.gates, hidden, hidden)) for _ in range(gc_layers - 1)])
        self.recurrent_weight = nn.Parameter(torch.empty(hidden, self.gates * hidden))
        self.bias = nn.Parameter(torch.zeros(self.gates * hidden))
        for gate in range(self.gates):
            nn.init.xavier_uniform_(self.input_weights[0].data[:, gate])
            nn.init.xavier_uniform_(self.recurrent_weight.data[:, gate * hidden:(gate + 1) * hidden])
            for weight in self.input_weights[1:]:
                nn.init.xavier_uniform_(weight.data[gate])

    def adjacency(self, dtype: torch.dtype) -> Tensor:
        """``Â = D^-1/2 (A + I) D^-1/2`` ``[14, 14]`` of the 13 limbs of ``pose14`` (docs/models/rgcn.md)."""
        return normalize_adjacency(self.skeleton.to(dtype))

    def aggregate(self, z: Tensor, adjacency: Tensor | None = None) -> Tensor:
        """``Â z_t`` for every frame of ``z`` ``[B, T, 14, C]``: the graph conv's aggregation."""
        if adjacency is None:
            adjacency = self.adjacency(z.dtype)
        return window_graph_conv(z.contiguous(), adjacency, 1, backend=self.ops_backend)

    def input_term(self, x: Tensor) -> Tensor:
        """``ReLU(Â X_t W)`` of every frame and gate: ``[B, T, 14, in]`` -> ``[B, T, 14, G*n]``."""
        adjacency = self.adjacency(x.dtype)
        first, rest = self.input_weights[0], list(self.input_weights[1:])
        if not self.inner_act:
            z = x
            weight = first                                                   # [C, G, n]
            for layer in rest:
                z = self.aggregate(z, adjacency)
                weight = torch.einsum("cgn,gnm->cgm", weight, layer)
            return torch.relu(self.aggregate(z, adjacency) @ weight.flatten(1))
        z = torch.relu(self.aggregate(x, adjacency) @ first.flatten(1))
        for layer in rest:
            z = self.aggregate(z, adjacency).unflatten(-1, (self.gates, self.hidden))
            z = torch.relu(torch.einsum("btkgn,gnm->btkgm", z, layer).flatten(-2))
        return z

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.size(2) != self.skeleton.size(0):
            raise ValueError(f"RecurrentGraphConv: x must be [B, T, {self.skeleton.size(0)}, "
                             f"{self.input_weights[0].size(0)}], got {list(getattr(x, 'shape', []))}")
        inputs = self.input_term(x) + self.bias                              # [B, T, K, G*n]
        state = inputs.new_zeros(inputs.size(0), inputs.size(2), self.hidden)
        cell = torch.zeros_like(state)
        states = []
        for t in range(inputs.size(1)):
            pre = inputs[:, t] + state @ self.recurrent_weight
            if self.recurrence == "tanh":
                state = torch.tanh(pre)
            else:
                forget, input_gate, output, candidate = pre.chunk(4, -1)
                cell = torch.sigmoid(forget) * cell + torch.sigmoid(input_gate) * torch.tanh(candidate)
                state = torch.sigmoid(output) * torch.tanh(cell)
            states.append(state)
        return torch.stack(states, 1)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, recurrence={self.recurrence!r}, gc_layers={len(self.input_weights)}, "
                f"inner_act={self.inner_act}, ops_backend={self.ops_backend!r}")


def attention_pool(features: Tensor, scores: Tensor, backend: str) -> Tensor:
    """``sum_s softmax_s(scores)[b, s] * features[b, s, :]``: ``[B, S, D]``, ``[B, S]`` -> ``[B, D]``.

    One ``part_pool`` call: the ``S`` positions are a ``[B, D, S, 1]`` feature map (a
    channels_last view of ``features``, no copy) and the scores a one-channel heatmap.
    """
    grid = features.unsqueeze(2).permute(0, 3, 1, 2)                       # [B, D, S, 1]
    return part_pool(grid, scores.unsqueeze(1).unsqueeze(-1).contiguous(), backend=backend)[:, 0]


class DualAttention(nn.Module):
    r"""DAM (Eqs. 9-14): ``[B, T, K, n]`` node states -> ``f^p``.

    Node-attention: ``H̄ = mean_t H_t`` ``[B, K, n]``, ``h^(n) = Σ_j softmax_j(H̄_j · w_n) H̄_j``;
    time-attention: ``h̄_t = mean_j H_{t,j}`` ``[B, T, n]``, ``h^(t) = Σ_t softmax_t(h̄_t · w_t) h̄_t``.
    Both pools are :func:`attention_pool` (``part_pool``).  ``readout``: ``"dam"`` ->
    ``[h^(n); h^(t)]`` (2n), ``"nam"`` / ``"tam"`` -> one of them (n), ``"mean"`` -> the mean over
    nodes and frames (n): the Table VI ablation.  No mask.  ``w_n``, ``w_t`` ~ U(±1/√n).
    """

    def __init__(self, hidden: int = 256, *, readout: str = "dam", ops_backend: str = "auto"):
        super().__init__()
        check_choice("DualAttention", "readout", readout, _READOUTS)
        _check_positive_int("DualAttention", "hidden", hidden)
        self.readout, self.ops_backend = readout, ops_backend
        bound = hidden ** -0.5
        self.node_score = nn.Parameter(torch.empty(hidden).uniform_(-bound, bound))
        self.time_score = nn.Parameter(torch.empty(hidden).uniform_(-bound, bound))
        self.out_features = 2 * hidden if readout == "dam" else hidden

    def node_attention(self, states: Tensor) -> Tensor:
        nodes = states.mean(1)                                               # [B, K, n]
        return attention_pool(nodes, nodes @ self.node_score, self.ops_backend)

    def time_attention(self, states: Tensor) -> Tensor:
        frames = states.mean(2)                                              # [B, T, n]
        return attention_pool(frames, frames @ self.time_score, self.ops_backend)

    def forward(self, states: Tensor) -> Tensor:
        if self.readout == "mean":
            return states.mean((1, 2))
        if self.readout == "nam":
            return self.node_attention(states)
        if self.readout == "tam":
            return self.time_attention(states)
        return torch.cat([self.node_attention(states), self.time_attention(states)], 1)


class TemporalAggregator(nn.Module):
    """The appearance branch's temporal aggregator: ``[B, T, C, h, w]`` final maps -> ``f^a``.

    ``"avg"`` (AP): the mean over frames of the globally average-pooled maps.  ``"attention"``
    (AA, Gao & Nevatia's temporal attention): ``Conv2d(C, 256, kernel = map_size)`` on every
    frame's map -> ReLU -> ``Conv1d(256, 1, 3, padding=1)`` over time -> softmax over ``T`` ->
    weighted mean of the pooled frame vectors (:func:`attention_pool`).  ``"lstm"`` (RA): the mean
    of the outputs of an ``nn.LSTM(C, lstm_hidden)`` over the pooled frame vectors.
    """

    def __init__(self, channels: int, *, aggregator: str = "avg", map_size: tuple[int, int] | None = None,
                 lstm_hidden: int = 2048, ops_backend: str = "auto"):
        super().__init__()
        check_choice("TemporalAggregator", "aggregator", aggregator, _AGGREGATORS)
        self.aggregator, self.ops_backend = aggregator, ops_backend
        self.out_features = channels
        if aggregator == "attention":
            if map_size is None:
                raise ValueError("TemporalAggregator: aggregator='attention' needs map_size (h, w), the "
                                 "size of the backbone's final map (its conv covers the whole map)")
            self.map_size = tuple(map_size)
            self.spatial = nn.Conv2d(channels, 256, self.map_size)
            self.temporal = nn.Conv1d(256, 1, 3, padding=1)
        elif aggregator == "lstm":
            _check_positive_int("TemporalAggregator", "lstm_hidden", lstm_hidden)
            self.lstm = nn.LSTM(channels, lstm_hidden, batch_first=True)
            self.out_features = lstm_hidden

    def forward(self, maps: Tensor) -> Tensor:
        batch, frames = maps.shape[:2]
        pooled = maps.mean((3, 4))                                           # [B, T, C]
        if self.aggregator == "avg":
            return pooled.mean(1)
        if self.aggregator == "lstm":
            return self.lstm(pooled)[0].mean(1)
        if tuple(maps.shape[3:]) != self.map_size:
            raise ValueError(f"TemporalAggregator: the backbone's final map is {list(maps.shape[3:])} but the "
                             f"attention conv was built for map_size {list(self.map_size)}; set the model's "
                             "input_size to the images' (H, W)")
        hidden = torch.relu(self.spatial(maps.flatten(0, 1))).view(batch, frames, -1)
        scores = self.temporal(hidden.transpose(1, 2))[:, 0]                 # [B, T]
        return attention_pool(pooled, scores, self.ops_backend)


def _final_map_size(input_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Size of a ResNet's final map: ``ceil(n / 2)`` per stride-2 layer (conv1, maxpool, stages)."""
    def shrink(n: int) -> int:
        for _ in range(int(math.log2(stride))):
            n = (n + 1) // 2
        return n
    return shrink(input_size[0]), shrink(input_size[1])


class RGCN(nn.Module):
    """AP+RGCN (or AA / RA + RGCN): the appearance branch and the RGCN pose branch with DAM.

    ``forward(images [B, T, 3, H, W], keypoints [B, T, 17, 3])``: in training mode a dict
    ``{"logits" [B, num_classes], "appearance" f^a [B, Da], "pose" f^p [B, Dp]}`` (no ``"pose"``
    without the pose branch) for :meth:`loss`; in eval mode the clip embedding ``[f^a; f^p]``
    ``[B, Da + Dp]`` (2560 at full size), or one branch (``embedding``).

    Args:
        num_classes: training identities (the classifier on ``[f^a; f^p]``: Linear with bias,
            PyTorch's default init).
        recurrence: ``"tanh"`` (RGCN, Eq. 6) or ``"lstm"`` (LGCN, Eq. 8); :class:`LGCN` sets it.
        hidden: n, the width of the node states (256).
        gc_layers, inner_act: the GC-layer ablation (Eq. 7), see :class:`RecurrentGraphConv`.
        readout: ``"dam"``, ``"nam"``, ``"tam"`` or ``"mean"`` (:class:`DualAttention`).
        depth, width, last_stride: the ResNet (50, 1.0, 2 = the paper's ResNet-50).
        aggregator: ``"avg"`` (AP), ``"attention"`` (AA) or ``"lstm"`` (RA), see
            :class:`TemporalAggregator`; ``lstm_hidden`` its LSTM width.
        input_size: ``(H, W)`` of the images, needed only by the AA head (its conv spans the
            final map).
        pretrained: path of a torchvision ImageNet ResNet state dict, read with
            :func:`keypointops.models.backbones.load_pretrained` (nothing is downloaded).
        coord_norm: ``"image"`` (x / W, y / H of the input) or ``"none"`` (pixels).
        conf_thresh: a keypoint with confidence ``<= conf_thresh`` is missing.
        margin: the triplet margin δ (0.3).
        triplet_weight: ``"adaptive"`` (λ = L_a / (L_a + L_p), detached) or a fixed λ in [0, 1].
        label_smooth: label smoothing of the ID loss (0: the paper's plain cross-entropy).
        pose_branch: False: the appearance-only model (no pose network; the classifier on ``f^a``,
            the loss ``L_id + L_tri(f^a)``), Table III's baseline rows.
        embedding: the eval-mode output: ``"both"`` (``[f^a; f^p]``, the paper's), ``"appearance"``
            (``f^a``) or ``"pose"`` (``f^p``); without the pose branch ``"both"`` is ``f^a``.
        ops_backend: backend of every fused op (``"reference"``: the plain-PyTorch model).
    """

    def __init__(self, num_classes: int, *, recurrence: str = "tanh", hidden: int = 256,
                 gc_layers: int = 1, inner_act: bool = False, readout: str = "dam", depth: int = 50,
                 width: float = 1.0, last_stride: int = 2, aggregator: str = "avg",
                 lstm_hidden: int = 2048, input_size: tuple[int, int] = (256, 128),
                 pretrained: str | None = None, coord_norm: str = "image", conf_thresh: float = 0.0,
                 margin: float = 0.3, triplet_weight: str | float = "adaptive",
                 label_smooth: float = 0.0, pose_branch: bool = True, embedding: str = "both",
                 ops_backend: str = "auto"):
        super().__init__()
        owner = type(self).__name__
        _check_positive_int(owner, "num_classes", num_classes)
        check_choice(owner, "coord_norm", coord_norm, ("image", "none"))
        check_choice(owner, "pose_branch", pose_branch, (True, False))
        check_choice(owner, "embedding", embedding, _EMBEDDINGS if pose_branch else ("both", "appearance"))
        if triplet_weight != "adaptive" and (isinstance(triplet_weight, bool)
                                             or not isinstance(triplet_weight, (int, float))
                                             or not 0.0 <= triplet_weight <= 1.0):
            raise ValueError(f"{owner}: triplet_weight must be 'adaptive' or a number in [0, 1], "
                             f"got {triplet_weight!r}")
        self.coord_norm, self.conf_thresh = coord_norm, float(conf_thresh)
        self.margin, self.triplet_weight, self.label_smooth = margin, triplet_weight, label_smooth
        self.pose_branch, self.embedding = bool(pose_branch), embedding
        self._stats = RunningMeans()
        self.backbone = ResNet(depth, last_stride=last_stride, width=width)
        if pretrained is not None:
            load_pretrained(self.backbone, pretrained)
        self.aggregator = TemporalAggregator(
            self.backbone.channels[-1], aggregator=aggregator, lstm_hidden=lstm_hidden,
            map_size=_final_map_size(input_size, self.backbone.strides[-1]), ops_backend=ops_backend)
        features = self.aggregator.out_features
        if self.pose_branch:
            self.pose = RecurrentGraphConv(hidden, recurrence=recurrence, gc_layers=gc_layers,
                                           inner_act=inner_act, ops_backend=ops_backend)
            self.readout = DualAttention(hidden, readout=readout, ops_backend=ops_backend)
            features += self.readout.out_features
        self.classifier = nn.Linear(features, num_classes)

    def features(self, images: Tensor, keypoints: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(f^a [B, Da], f^p [B, Dp])`` of a batch of clips (``f^p`` None without the pose branch)."""
        if not isinstance(images, Tensor) or images.dim() != 5 or images.size(2) != 3:
            raise ValueError(f"{type(self).__name__}: images must be [B, T, 3, H, W], got "
                             f"{list(getattr(images, 'shape', []))}")
        if (not isinstance(keypoints, Tensor) or keypoints.dim() != 4
                or tuple(keypoints.shape[:2]) != tuple(images.shape[:2]) or tuple(keypoints.shape[2:]) != (17, 3)):
            raise ValueError(f"{type(self).__name__}: keypoints must be [B, T, 17, 3] = "
                             f"{list(images.shape[:2]) + [17, 3]}, got {list(getattr(keypoints, 'shape', []))}")
        batch, frames = images.shape[:2]
        maps = self.backbone(images.flatten(0, 1))[-1]
        appearance = self.aggregator(maps.unflatten(0, (batch, frames)))
        if not self.pose_branch:
            return appearance, None
        size = tuple(images.shape[-2:]) if self.coord_norm == "image" else None
        coords = pose14_from_coco17(keypoints, size=size, conf_thresh=self.conf_thresh).to(appearance.dtype)
        return appearance, self.readout(self.pose(coords))

    def forward(self, images: Tensor, keypoints: Tensor):
        appearance, pose = self.features(images, keypoints)
        if pose is None:
            return appearance if not self.training else {"logits": self.classifier(appearance),
                                                         "appearance": appearance}
        if not self.training:
            return {"both": lambda: torch.cat([appearance, pose], 1), "appearance": lambda: appearance,
                    "pose": lambda: pose}[self.embedding]()
        return {"logits": self.classifier(torch.cat([appearance, pose], 1)),
                "appearance": appearance, "pose": pose}

    def loss(self, output: dict, pids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``L_id + λ L_tri(f^a) + (1 - λ) L_tri(f^p)`` (Eqs. 17-19) and its parts.

        λ is ``L_tri^a / (L_tri^a + L_tri^p + 1e-12)`` of the detached losses (``"adaptive"``) or
        the fixed ``triplet_weight``; it is a weight, never differentiated.  Without the pose branch:
        ``L_id + L_tri(f^a)``, parts ``{"id", "triplet_appearance"}``.
        """
        identity = cross_entropy_label_smooth(output["logits"], pids, epsilon=self.label_smooth)
        appearance = batch_hard_triplet(output["appearance"], pids, margin=self.margin)
        self._stats.add(norm_appearance=output["appearance"].norm(dim=1).mean())
        if not self.pose_branch:
            return identity + appearance, {"id": identity, "triplet_appearance": appearance}
        pose = batch_hard_triplet(output["pose"], pids, margin=self.margin)
        if self.triplet_weight == "adaptive":
            lam = appearance.detach() / (appearance.detach() + pose.detach() + 1e-12)
        else:
            lam = appearance.new_tensor(float(self.triplet_weight))
        self._stats.add(norm_pose=output["pose"].norm(dim=1).mean(), **{"lambda": lam})
        total = identity + lam * appearance + (1.0 - lam) * pose
        return total, {"id": identity, "triplet_appearance": appearance, "triplet_pose": pose, "lambda": lam}

    def diagnostics(self) -> dict[str, float]:
        """Means over the training steps since the last call: ``lambda`` (the adaptive weight of the
        appearance triplet; the paper's intent: the larger triplet loss gets the larger weight),
        ``norm_appearance`` and ``norm_pose`` (``|f^a|``, ``|f^p|``: the two branches' scale in the
        raw concatenation)."""
        return self._stats.read()


class LGCN(RGCN):
    """AP+LGCN: :class:`RGCN` with the LSTM-gated graph recurrence (Eq. 8, ``recurrence="lstm"``)."""

    def __init__(self, num_classes: int, **options):
        if "recurrence" in options:
            raise ValueError("LGCN: recurrence is fixed to 'lstm'; use RGCN(recurrence=...) to choose it")
        super().__init__(num_classes, recurrence="lstm", **options)

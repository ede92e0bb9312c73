"""KMPNet (Chen et al., AAAI 2022): keypoint message passing for video person re-ID.

Architecture, deviations from the paper and the authors' released code: ``docs/models/kmpnet.md``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keypointops._checks import check_choice
from keypointops.graphs import Graph, Skeleton, skeleton
from keypointops.models.backbones import ResNet
from keypointops.models._common import check_clip, frame_loss
from keypointops.models.baselines import PCBVideo, ResNet50Video
from keypointops.models.heads import BNNeck, init_kaiming_fan_out
from keypointops.nn import DeepGCNLayer, GENConv, KeypointGather

__all__ = ["KMPNet", "JRPP_GROUPS", "headless_keypoints", "flip_frames"]

# Graph pooling (JRPP with G1, G2, G3 on the 12 headless joints, docs/models/kmpnet.md): name -> nodes.
JRPP_GROUPS: dict[str, tuple[int, ...]] = {
    "whole": tuple(range(12)),
    "upper": (0, 1, 2, 3, 4, 5),
    "lower": (6, 7, 8, 9, 10, 11),
    "left_arm_right_leg": (0, 2, 4, 7, 9, 11),
    "right_arm_left_leg": (1, 3, 5, 6, 8, 10),
}
GRAPHS = ("both", "spatial", "temporal")
GATHERS = ("keypoint", "released")
VISUALS = {"pcb": PCBVideo, "resnet50": ResNet50Video}
EMBEDDINGS = ("x_c", "x_g")


def headless_keypoints(keypoints: Tensor) -> tuple[Tensor, Tensor]:
    """COCO-17 ``[B, T, 17, 3]`` -> the 12 headless joints ``xy [B*T, 12, 2]`` and ``valid [B*T, 12]``.

    A joint is invalid iff ``x <= 0 and y <= 0`` (the released code's rule for the unannotated
    (0, 0) joint) or its confidence is ``<= 0`` (the batch contract's mark of a missing joint,
    which stays valid under transforms that move coordinates).  Otherwise the confidence is unused.
    """
    kp = keypoints[:, :, 5:].flatten(0, 1)
    x, y, conf = kp.unbind(-1)
    valid = ~((x <= 0) & (y <= 0)) & (conf > 0)
    return kp[..., :2], valid


def flip_frames(images: Tensor, xy: Tensor, flipped: Tensor, mirror_keypoints: bool = True) -> tuple[Tensor, Tensor]:
    """Mirrors the frames ``flipped [N]`` of ``images [N, 3, H, W]``; with ``mirror_keypoints`` their
    keypoints ``xy [N, K, 2]`` too (``x <- W - x``, joint labels kept, docs/models/kmpnet.md).  The
    validity of a joint must be computed before (a mirrored (0, 0) would look valid)."""
    images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
    if mirror_keypoints:
        mirrored = torch.stack([images.size(-1) - xy[..., 0], xy[..., 1]], -1)
        xy = torch.where(flipped[:, None, None], mirrored, xy)
    return images, xy


class KMPNet(nn.Module):
    r"""KMPNet: a frame-level re-ID CNN trained with a keypoint graph branch that is dropped at inference.

    **Visual branch** (docs/models/kmpnet.md): PCB-p4 on ResNet-50 with last stride 1 (``visual="pcb"``,
    :class:`~keypointops.models.baselines.PCBVideo`), or the IDE ResNet-50 with last stride 2
    (``visual="resnet50"``, :class:`~keypointops.models.baselines.ResNet50Video`); ``self.visual``
    is that baseline, so stage A's checkpoint loads into it (:meth:`init_from_state`).

    **Graph branch** (training only): after each of the 5 CNN stages (stem, layer1..4)
    :func:`keypointops.keypoint_gather` reads the stage's map at the 12 headless joints, one
    bilinear sample per joint.  ``gather="keypoint"`` (the default) samples at the keypoint itself, as
    the paper describes: a keypoint at input pixel ``(x, y)`` (pixel ``i`` covers ``[i, i + 1)``)
    lies at ``(x s - 0.5, y s - 0.5)`` in the cells of a map of scale ``s = 1 / stride`` (cell
    centres at integers), which is ``roi_size=0, aligned=True, sampling_ratio=1``.
    ``gather="released"`` is the released code's sampling (``keypoints + 0.5, roi_size=1,
    aligned=False``): RoIAlign widens the 1-pixel box to one feature cell, so its sample lands at
    ``x s + 0.5``, one feature cell right of and below the keypoint (4, 4, 8, 16, 16 input pixels
    at the five stages).  An invalid joint (:func:`headless_keypoints`) gets the stage's global
    average instead.  Fusion (Eq. 1): ``h <- W_down,k(f_k(kp) + W_up,k(h))``
    (``down.0`` takes the stem's features alone; ``up.k-1``/``down.k``: Linear with Kaiming fan_out
    init, zero bias).  Between fusions run the 27 DeeperGCN res+ blocks (:class:`keypointops.nn.DeepGCNLayer`
    with :class:`keypointops.nn.GENConv`: LayerNorm, ReLU, dropout 0.1, softmax aggregation with a
    learnable scalar t, MLP 64-128-64 with LayerNorm) split ``5/7/11/4`` (``gcn[0..3]``) over the
    spatial-temporal graph (12 joints x T frames; KMPNet's 11 skeleton edges in every frame and
    same-joint edges between consecutive frames, both directions, no self loops), built once per
    (clips, frames, device) and reused by all 27 layers.  Read-out: LayerNorm, ReLU, dropout 0.1,
    per frame the mean over the 5 JRPP node groups (:data:`JRPP_GROUPS`), each into its own BNNeck
    (``Linear(64 -> 256)``, BN1d with frozen zero bias, bias-free classifier).

    **Loss**: the plain mean of the label-smoothed (ε = 0.1) CE of every classifier (4 PCB
    stripes + 5 graph heads = 9; 1 + 5 = 6 with ``visual="resnet50"``), every frame labelled with
    its tracklet's identity.

    **Inference**: eval mode with ``embedding="x_c"`` runs ``self.visual`` only: no
    keypoints, no graph, no fused op, no graph-branch parameter (8192-d per frame for PCB,
    averaged over the clip).  ``embedding="x_g"`` (Table 4) runs the graph branch in eval mode
    and returns the per-frame L2-normalised concatenation of the 5 BN outputs, averaged (1280-d).

    Args:
        num_classes: training identities.
        visual: ``"pcb"`` or ``"resnet50"``.
        depth, width: the visual branch's ResNet (50, 1.0 in the paper; smaller for the CPU).
        graph: ``"both"`` (E_S and E_T, the paper's model), ``"spatial"`` or ``"temporal"`` (Table 3).
        embedding: eval-mode output, ``"x_c"`` (the paper's) or ``"x_g"``.
        gcn_channels: hidden width of the graph branch (64).
        gcn_split: res+ blocks between consecutive fusions ((5, 7, 11, 4)).
        frame_flip: probability of mirroring each frame independently inside the model in training
            (0: the data pipeline flips, per clip, moving the keypoints with the pixels).  This is
            the released code's per-frame flip, for exact reproduction.
        flip_keypoints: mirror the keypoints of the frames flipped by ``frame_flip``;
            ``False`` reproduces the released code's bug (images flipped, keypoints not).
        gather: ``"keypoint"`` (the node feature read at the keypoint) or ``"released"`` (the
            released code's sampling, one feature cell off).
        graph_gradient: ``False`` gathers from detached stage maps, so the graph losses train the
            graph branch but never reach the backbone (not in the paper: an ablation control that
            keeps stage B's loss, with the visual branch's 4 of its 9 terms, and removes only the
            mechanism the paper credits, the graph's gradient into the CNN).
        ops_backend: backend of every fused op (``keypoint_gather``, ``msg_pass``).
        visual_options: further options of the visual branch (``parts``, ``reduced_dim``).

    Deviations from the paper: ``frame_flip`` defaults to 0 with the data pipeline flipping whole
    clips (consistent frames for every temporal model) instead of each frame; a joint with
    confidence 0 is also invalid (the batch contract's missing joint); invalid joints take the
    plain global mean (the paper's description, not the released code's slightly
    skewed RoIAlign weights); the node features are read at the keypoints (``gather="keypoint"``),
    where the released code reads one feature cell off.

    **Two-stage protocol**: stage A trains the visual branch alone (``keypointops train --model
    pcb``); stage B is KMPNet whose visual branch starts from stage A's weights and whose graph branch
    is new (``--model kmpnet --init-from STAGE_A/model.pt``, :meth:`init_from_state`); the paper's
    "+ fine-tune" control trains stage A's model on without the graph, with stage B's epochs and
    schedule (``--model pcb --init-from STAGE_A/model.pt``).
    """

    def __init__(self, num_classes: int, *, visual: str = "pcb", depth: int = 50, width: float = 1.0,
                 graph: str = "both", embedding: str = "x_c", gcn_channels: int = 64,
                 gcn_split: tuple[int, ...] = (5, 7, 11, 4), frame_flip: float = 0.0, flip_keypoints: bool = True,
                 gather: str = "keypoint", graph_gradient: bool = True, ops_backend: str = "auto",
                 **visual_options):
        super().__init__()
        check_choice("KMPNet", "visual", visual, sorted(VISUALS))
        check_choice("KMPNet", "graph", graph, GRAPHS)
        check_choice("KMPNet", "gather", gather, GATHERS)
        check_choice("KMPNet", "embedding", embedding, EMBEDDINGS)
        check_choice("KMPNet", "graph_gradient", graph_gradient, (True, False))
        if len(gcn_split) != 4 or not all(isinstance(n, int) and n >= 0 for n in gcn_split):
            raise ValueError(f"KMPNet: gcn_split must be 4 block counts (one per fusion after the stem), "
                             f"got {gcn_split!r}")
        if not 0.0 <= frame_flip <= 1.0:
            raise ValueError(f"KMPNet: frame_flip must be a probability, got {frame_flip!r}")
        self.visual_name = visual
        self.visual = VISUALS[visual](num_classes, depth=depth, width=width, ops_backend=ops_backend,
                                      **visual_options)
        self.ops_backend = ops_backend
        self.graph_kind, self.embedding = graph, embedding
        self.frame_flip, self.flip_keypoints = float(frame_flip), bool(flip_keypoints)
        self.graph_gradient = graph_gradient
        backbone, c = self.visual.backbone, gcn_channels
        # at the keypoint: a box of size 0 (one sample), pixel-centre aligned; released: a 1-pixel box
        # at keypoint + 0.5, not aligned (widened to one feature cell)
        box = dict(roi_size=0.0, aligned=True) if gather == "keypoint" else dict(roi_size=1.0, aligned=False)
        self.gather_shift = 0.0 if gather == "keypoint" else 0.5
        self.gather = nn.ModuleList(KeypointGather(1.0 / stride, sampling_ratio=1, backend=ops_backend, **box)
                                    for stride in backbone.strides)
        self.up = nn.ModuleList(init_kaiming_fan_out(nn.Linear(c, ch)) for ch in backbone.channels[1:])
        self.down = nn.ModuleList(init_kaiming_fan_out(nn.Linear(ch, c)) for ch in backbone.channels)
        self.gcn = nn.ModuleList(nn.ModuleList(self._block(c, ops_backend) for _ in range(n)) for n in gcn_split)
        self.post_norm = nn.LayerNorm(c)
        self.register_buffer("pool", self._pool_matrix(), persistent=False)
        self.heads = nn.ModuleList(BNNeck(c, num_classes, embed_dim=256) for _ in JRPP_GROUPS)
        self._graphs: dict[tuple, Graph] = {}

    @staticmethod
    def _block(channels: int, ops_backend: str) -> DeepGCNLayer:
        conv = GENConv(channels, channels, aggr="softmax", t=1.0, learn_t=True, num_layers=2, norm="layer",
                       bias=True, backend=ops_backend)
        return DeepGCNLayer(conv, nn.LayerNorm(channels), nn.ReLU(), block="res+", dropout=0.1)

    @staticmethod
    def _pool_matrix() -> Tensor:
        pool = torch.zeros(len(JRPP_GROUPS), 12)
        for i, nodes in enumerate(JRPP_GROUPS.values()):
            pool[i, list(nodes)] = 1.0 / len(nodes)
        return pool

    @property
    def backbone(self) -> ResNet:
        """The visual branch's ResNet (what :func:`keypointops.models.backbones.load_pretrained` fills)."""
        return self.visual.backbone

    def graph_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the graph branch (fusion projections, GCN blocks, read-out, heads)."""
        return [p for name, p in self.named_parameters() if not name.startswith("visual.")]

    def init_from_state(self, state: dict[str, Tensor], model: str) -> None:
        """Stage B of the two-stage protocol: the weights of a stage-A checkpoint of the visual
        branch's model (``"pcb"``, or ``"resnet50"`` for ``visual="resnet50"``) fill ``self.visual``;
        the graph branch keeps its initialisation.  Another model raises ``ValueError`` (a KMPNet
        checkpoint loads whole without this hook: :func:`keypointops.checkpoints.init_from_checkpoint`)."""
        if model != self.visual_name:
            raise ValueError(f"KMPNet (visual={self.visual_name!r}) starts from a {self.visual_name!r} (stage A) "
                             f"checkpoint, not a {model!r} one")
        self.visual.load_state_dict(state)

    def graph(self, clips: int, frames: int, device: torch.device) -> Graph:
        """The spatial-temporal graph of ``clips`` clips of ``frames`` frames (built once, cached)."""
        key = (clips, frames, str(device))
        if key not in self._graphs:
            skel = skeleton("kmpnet12")
            if self.graph_kind == "temporal":
                skel = Skeleton("kmpnet12_no_limbs", skel.joints, ())
            self._graphs[key] = Graph.spatial_temporal(skel, frames=frames, batch=clips,
                                                       temporal=self.graph_kind != "spatial", device=device)
        return self._graphs[key]

    def forward(self, images: Tensor, keypoints: Tensor | None = None):
        graph_needed = self.training or self.embedding == "x_g"
        check_clip(images, keypoints, "KMPNet", need_keypoints=graph_needed)
        if not graph_needed:
            return self.visual(images)
        B, T = images.shape[:2]
        x = images.flatten(0, 1)
        xy, valid = headless_keypoints(keypoints)
        xy = xy.to(x.dtype)
        if self.training and self.frame_flip > 0:
            flipped = torch.rand(x.size(0), device=x.device) < self.frame_flip
            x, xy = flip_frames(x, xy, flipped, self.flip_keypoints)
        graph = self.graph(B, T, x.device)
        f, h = x, None
        for k, stage in enumerate(self.visual.backbone.stages):
            f = stage(f)
            if k > 0:
                for block in self.gcn[k - 1]:
                    h = block(h, graph)
            read = f if self.graph_gradient else f.detach()
            nodes = self.gather[k](read, xy + self.gather_shift, valid)
            nodes = torch.where(valid[..., None], nodes, read.mean((2, 3))[:, None, :]).flatten(0, 1)
            h = self.down[k](nodes if h is None else nodes + self.up[k - 1](h))
        h = F.dropout(F.relu(self.post_norm(h)), p=0.1, training=self.training)
        parts = torch.einsum("pk,nkc->npc", self.pool, h.view(B * T, 12, -1))
        heads = [head(parts[:, i]) for i, head in enumerate(self.heads)]
        if not self.training:
            x_g = F.normalize(torch.cat([bn for _, bn, _ in heads], 1), dim=1)
            return x_g.view(B, T, -1).mean(1)
        logits = self.visual.logits(f)
        logits.update({f"graph_{name}": out for name, (_, _, out) in zip(JRPP_GROUPS, heads)})
        return {"logits": logits, "frames": T}

    def loss(self, output: dict, pids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The plain mean of the 9 (6) per-frame label-smoothed CE terms (docs/models/kmpnet.md)."""
        return frame_loss(output["logits"], pids, output["frames"])

"""CTL (Liu et al., CVPR 2021): spatial-temporal correlation and topology learning for video re-ID.

Architecture (``docs/models/ctl.md``), for a clip of ``T``
frames, ``C`` backbone channels:

* **Backbone**: ResNet-50 with last stride 1 (:mod:`keypointops.models.backbones`), the
  layer4 map ``F`` ``[B*T, C, H/16, W/16]``.
* **Keypoint features** (Eq. 1): the frozen HRNet is stood in for by heatmaps rendered
  from the batch's keypoints (:func:`keypointops.models.pose_maps.render_heatmaps`, HRNet's output grid
  ``H/4 x W/4`` and its training-target sigma 2, peak = the keypoint confidence as HRNet's maximum
  is its score), resized bilinearly to ``F``'s grid; 17 keypoint features
  ``V_s1 = part_pool(F, heatmaps, temperature=0.1)`` (the softmax-weighted sum over the map);
  10 and 5 part features averaged from them (``V_s2 = P2 V_s1``, ``V_s3 = P3 V_s1`` with the
  groupings ``parts.CTL_PARTS_10`` / ``CTL_PARTS_5``); the global feature ``V_g`` = GAP of ``F``.
* **3D-GCL** (Eqs. 2-4): per scale ``L = 2`` layers of
  :class:`keypointops.nn.WindowGraphConv3D`: window ``tau = 3``, adjacency
  ``D^-1/2 (tile(A_p + I) + I) D^-1/2 + tile(A_m) + A_c`` (``A_m`` learnable, zero-init, ``N x N``;
  ``A_c`` the advanced context block, one ``[L, L]`` topology per window, so the fused op gets the
  ``[B, T, L, L]`` adjacency), the window-collapse conv, the shortcut from layer 2 on
  (``first_layer_shortcut=True``: on every layer, an ablation row that is not in the paper).
  The physical graphs: the COCO skeleton (s1), :data:`CTL10_SKELETON` and :data:`CTL5_SKELETON`.
* **CS-GCL** (Eqs. 5-7): :class:`CrossScaleGraphConv` s1 -> s3 and s2 -> s3 (a dense
  softmax attention over the source nodes, plain PyTorch), ``V_p = X_s3 + alpha (X_s13 + X_s23)``.
* **Fusion**: ``V_f^g = TAP(V_g)``, ``V_f^a = TAP(mean_n V_p[n] + V_g)`` (the paper sums the
  parts, see the deviations), ``V_f^c = TAP(concat_n g_c(V_p[n])[:C] + V_g)``; one BNNeck
  classifier per vector.
* **Loss** (Eq. 9): label-smoothed CE on the three logits + batch-hard triplet on the three
  pre-BN vectors + ``lambda_3`` x the diversity loss of the time-averaged ``V_p``
  (:mod:`keypointops.losses`).  At test time: the BNNeck output of ``V_f^a`` (``embedding="global"``:
  that of ``V_f^g``, the keypoint-free feature of the same model, for comparison).

The rows of the paper's ablation Tables 3-5 are :data:`VARIANTS` (``variant="basel"``, ...), built
from these switches: ``graph_layers`` (0 = "Basel"), ``window`` (``tau``; 1 with
``context="sample"`` and ``collapse=False`` = the frame-level GCN of "+ContRe", Eq. 4 without the
3D-GCL's window collapse), ``learned_adjacency`` and ``context`` (Table 4's
adjacency terms), ``cross_scale`` (``"graph"`` = CS-GCL, ``"pool"`` = the addition fusion of Basel /
+ContRe / +3D), ``cross_scale_sources`` and ``cross_scale_stages`` (Table 5).

Deviations from the paper (docs/models/ctl.md):

* The heatmaps are rendered from keypoints, not predicted by HRNet (the weights cannot be fetched;
  for a frozen pose net this is the same information).
* Degree normalisation of the fixed skeleton only, with ``A_m`` and ``A_c`` added after it (as
  2s-AGCN and MS-G3D add theirs), where Eq. 4 normalises by the degrees of the full signed adjacency,
  which reach zero (:class:`~keypointops.nn.WindowGraphConv3D` says why).
* ``V_f^a`` adds the *mean* of the five part features to ``V_g`` (``part_fusion="mean"``), where
  the paper writes their sum (``part_fusion="sum"``).  The paper gives no relative scale of the
  two terms.  Each part (a softmax-weighted sum of the map, or a 3D-GCL output after BN + ReLU) is
  about as large as ``V_g`` (at the ``cpu`` preset's initialisation: part norms 12-17 each, 62
  summed, ``V_g`` 9), so the sum makes ``V_f^a`` five parts to one global feature and the parts
  swamp it; with the mean, every channel of ``V_f^a`` holds one part's worth beside ``V_g``, as
  every channel of ``V_f^c`` does (one reduced part per block of channels).
* The diversity loss weight ``lambda_3`` is ``C / 2048`` (``diversity_weight=None``): the paper's
  ``lambda_3 = 1`` at its ``C = 2048`` channels scaled to the channel count used (1/16 at the
  ``cpu`` preset's ``C = 128``).  The part features are non-negative (ReLU outputs), so their Gram
  is the identity only when the five parts use disjoint channels (C / 5 each), a partition that
  costs the identity features more the fewer channels there are; at ``C = 128`` and weight 1 the
  loss starts as large as the summed cross-entropy (15.5 vs 13.1 at initialisation).
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keypointops._checks import check_choice
from keypointops.graphs import Skeleton
from keypointops.losses import batch_hard_triplet, cross_entropy_label_smooth, diversity_loss
from keypointops.models._common import RunningMeans
from keypointops.models.backbones import ResNet, load_pretrained
from keypointops.models.heads import BNNeck
from keypointops.models.pose_maps import render_heatmaps
from keypointops.nn import WindowGraphConv3D
from keypointops.ops.part_pool import part_pool
from keypointops.parts import CTL_PARTS_5, CTL_PARTS_10, part_groups

__all__ = ["CTL", "CrossScaleGraphConv", "CTL10_SKELETON", "CTL5_SKELETON", "VARIANTS"]

# The physical graphs of the part scales (docs/models/ctl.md): s2 links the torso to the head and to the
# upper limb bones, and each upper bone to its lower one; s3 is a star on the trunk.
CTL10_SKELETON = Skeleton("ctl10", tuple(CTL_PARTS_10),
                          ((0, 1), (1, 2), (2, 3), (1, 4), (4, 5), (1, 6), (6, 7), (1, 8), (8, 9)))
CTL5_SKELETON = Skeleton("ctl5", tuple(CTL_PARTS_5), ((0, 1), (0, 2), (0, 3), (0, 4)))
_SCALES = {"s1": "coco17", "s2": CTL10_SKELETON, "s3": CTL5_SKELETON}
_HEATMAP_STRIDE = 4   # HRNet's output grid: 1/4 of the input

# build_model("ctl", n, variant=row) for the rows of Tables 3-5 (docs/models/ctl.md): the switches
# each row sets (the others keep the full model's values).
VARIANTS: dict[str, dict] = {
    "basel": dict(graph_layers=0, cross_scale="pool"),
    "basel+contre": dict(window=1, context="sample", collapse=False, cross_scale="pool"),
    "basel+contre+3d": dict(cross_scale="pool"),
    "ctl": {},
    "ctl-ap": dict(learned_adjacency=False, context=None),
    "ctl-apam": dict(context=None),
    "cs-gcl-m2": dict(cross_scale_stages=2),
    "cs-gcl-s3": dict(cross_scale_sources=()),
    "cs-gcl-s3s1": dict(cross_scale_sources=("s1",)),
}
_EMBEDDINGS = ("attended", "global")
_PART_FUSIONS = ("mean", "sum")

class _FCBN(nn.Module):
    """CTL's ``FC + BN + ReLU`` on the last dimension (BN statistics over all leading dimensions).

    The CS-GCL applies the FC of some of these in parts (split weights, pairwise differences) and
    then :meth:`activate`; :meth:`forward` is the plain composition.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.norm = nn.BatchNorm1d(out_features)

    def activate(self, y: Tensor) -> Tensor:
        return self.norm(y.reshape(-1, y.size(-1))).view_as(y).relu()

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.linear(x))


class CrossScaleGraphConv(nn.Module):
    r"""CTL's cross-scale graph conv (docs/models/ctl.md, Eqs. 5-6): source-scale nodes -> target-scale nodes.

    For source nodes ``x_i`` (``[..., N_a, C]``) and target nodes ``x_m`` (``[..., N_b, C]``) of a
    frame, with ``phi``, ``psi``, ``h``, ``f`` each ``FC + BN + ReLU`` (embedding width ``d``)::

        p_i = sum_j h_a([phi(x_i), psi(x_j - x_i)]);   r_i = f_a([x_i, p_i])     (source)
        p_m = sum_j h_b([phi(x_m), psi(x_j - x_m)]);   r_m = f_b([x_m, p_m])     (target)
        A[m, i] = softmax_i(r_m . r_i);   out = relu(A X_a W)

    ``phi`` and ``psi`` are shared by both scales, ``h`` and ``f`` are per scale; the
    softmax runs over the source nodes, temperature 1.  Computed exactly but without the
    concatenations: ``psi``'s FC is applied to the nodes before the pairwise difference, and
    ``h`` / ``f`` apply the two halves of their weight to the two halves of their input.
    """

    def __init__(self, channels: int, embed_dim: int = 256):
        super().__init__()
        self.embed_dim = embed_dim
        self.phi = _FCBN(channels, embed_dim)
        self.psi = _FCBN(channels, embed_dim)
        self.h_source = _FCBN(2 * embed_dim, embed_dim)
        self.f_source = _FCBN(channels + embed_dim, embed_dim)
        self.h_target = _FCBN(2 * embed_dim, embed_dim)
        self.f_target = _FCBN(channels + embed_dim, embed_dim)
        self.weight = nn.Linear(channels, channels, bias=False)

    def relation(self, x: Tensor, h: _FCBN, f: _FCBN) -> Tensor:
        """``r`` ``[..., N, d]`` of nodes ``x`` ``[..., N, C]`` (Eq. 5's ``r``, with ``h``, ``f`` of their scale)."""
        d = self.embed_dim
        phi = self.phi(x)                                                     # [..., N, d]
        u = F.linear(x, self.psi.linear.weight)
        pair = self.psi.activate(u.unsqueeze(-3) - u.unsqueeze(-2) + self.psi.linear.bias)  # [.., i, j, d]
        h_weight = h.linear.weight
        h_in = (F.linear(phi, h_weight[:, :d], h.linear.bias).unsqueeze(-2)
                + F.linear(pair, h_weight[:, d:]))
        p = h.activate(h_in).sum(-2)                                          # [..., N, d]
        f_weight = f.linear.weight
        channels = x.size(-1)
        return f.activate(F.linear(x, f_weight[:, :channels], f.linear.bias)
                          + F.linear(p, f_weight[:, channels:]))

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        """``source`` ``[..., N_a, C]``, ``target`` ``[..., N_b, C]`` -> ``[..., N_b, C]``."""
        r_source = self.relation(source, self.h_source, self.f_source)
        r_target = self.relation(target, self.h_target, self.f_target)
        attention = torch.softmax(r_target @ r_source.transpose(-1, -2), dim=-1)   # [..., N_b, N_a]
        return (attention @ self.weight(source)).relu()


class CTL(nn.Module):
    """CTL for clips ``images`` ``[B, T, 3, H, W]`` with ``keypoints`` ``[B, T, 17, 3]`` (see the module doc).

    ``forward`` returns, in training mode, a dict with ``features`` (the three pre-BN vectors
    ``V_f^g, V_f^a, V_f^c``, each ``[B, C]``), ``logits`` (three ``[B, num_classes]``) and ``parts``
    (``V_p`` averaged over time, ``[B, 5, C]``); in eval mode the BNNeck output of ``V_f^a``
    (or of ``V_f^g``, see ``embedding``) ``[B, C]``.  :meth:`loss` turns the training output into
    Eq. 9's loss; :meth:`diagnostics` gives the scale of the fused terms and the diversity loss.

    Args:
        num_classes: training identities.
        depth, width: of the ResNet backbone (50 and 1.0 in the paper; ``width`` scales every stage).
        pretrained: path of a local torchvision ImageNet ResNet state dict, or None.
        frames: ``T``; the context block's temporal conv has ``T`` input channels, so every clip
            (train and test) has ``T`` frames.
        variant: a row of the paper's ablation tables (:data:`VARIANTS`: ``"ctl"`` is the full
            model, ``"basel"``, ``"basel+contre"``, ``"basel+contre+3d"`` Table 3, ...); it sets
            some of the switches below, which may then not be given other values.
        temperature: of the heatmap softmax (``theta``; 1.0 is the literal reading).
        heatmap_sigma: of the rendered heatmaps, in heatmap (1/4 input) pixels.
        graph_layers: 3D-GCLs per scale (``L``; 0 = no graph layers, Table 3's "Basel").
        window: ``tau`` (odd; 1 = frame-level graphs).
        learned_adjacency: include ``A_m``.
        context: the context term ``A_c``: ``"window"`` (per window, the advanced block),
            ``"sample"`` (one per sample; with ``window=1`` the basic block) or None.
        collapse: the 3D-GCL's window-collapse conv + BN + ReLU after each graph conv; False (with
            ``window=1``): the frame-level GCN layers of Table 3's "Basel+ContRe" row (Eq. 4 alone).
        first_layer_shortcut: the identity shortcut on the first graph layer too (``X1 = X0 +
            G1(X0)``); the paper's (default False) has it from the second layer on, so the first
            layer replaces the pooled keypoint features.  Not in the paper: an ablation row.
        cross_scale: ``"graph"`` (the CS-GCLs) or ``"pool"`` (Basel's addition fusion: the source
            features averaged into the 5 parts).
        cross_scale_sources: the scales fused into s3: ``("s1", "s2")``, ``("s1",)``, ``("s2",)``
            or ``()`` (``V_p = X_s3``).
        cross_scale_stages: ``M``, 1 or 2 (2: another fusion of s3 after the first 3D-GCL).
        alpha: the cross-scale weight of Eq. 7.
        embed_dim: ``d`` of the CS-GCL embeddings.
        part_fusion: how ``V_f^a`` combines the five parts before adding ``V_g``: ``"mean"`` or
            ``"sum"`` (the paper's literal form; see the module doc).
        embedding: the eval-mode output: ``"attended"`` (``V_f^a``, the paper's test feature) or
            ``"global"`` (``V_f^g``: the global feature alone, which ignores the keypoints).
        diversity_weight: ``lambda_3``; None: ``C / 2048`` (see the module doc).
        margin, label_smoothing: of the triplet and cross-entropy losses.
        ops_backend: backend of the fused ops (``part_pool``, ``window_graph_conv``).
    """

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0,
                 pretrained: str | None = None, frames: int = 6, variant: str = "ctl", temperature: float = 0.1,
                 heatmap_sigma: float = 2.0, graph_layers: int = 2, window: int = 3,
                 learned_adjacency: bool = True, context: str | None = "window", collapse: bool = True,
                 cross_scale: str = "graph", cross_scale_sources: tuple[str, ...] = ("s1", "s2"),
                 cross_scale_stages: int = 1, alpha: float = 0.3, embed_dim: int = 256,
                 part_fusion: str = "mean", embedding: str = "attended", diversity_weight: float | None = None,
                 margin: float = 0.3, label_smoothing: float = 0.1, ops_backend: str = "auto",
                 first_layer_shortcut: bool = False):
        super().__init__()
        check_choice("CTL", "variant", variant, VARIANTS)
        check_choice("CTL", "part_fusion", part_fusion, _PART_FUSIONS)
        check_choice("CTL", "embedding", embedding, _EMBEDDINGS)
        given = dict(graph_layers=graph_layers, window=window, learned_adjacency=learned_adjacency,
                     context=context, collapse=collapse, cross_scale=cross_scale,
                     cross_scale_sources=tuple(cross_scale_sources), cross_scale_stages=cross_scale_stages)
        defaults = inspect.signature(CTL.__init__).parameters                 # the full model's switches
        for name, value in VARIANTS[variant].items():
            if given[name] != defaults[name].default:
                raise ValueError(f"CTL: variant {variant!r} sets {name} = {value!r}; got {name} = {given[name]!r}")
            given[name] = value
        graph_layers, window, learned_adjacency, context, collapse = (given[k] for k in (
            "graph_layers", "window", "learned_adjacency", "context", "collapse"))
        cross_scale, cross_scale_sources, cross_scale_stages = (given[k] for k in (
            "cross_scale", "cross_scale_sources", "cross_scale_stages"))
        if diversity_weight is not None and (isinstance(diversity_weight, bool)
                                             or not isinstance(diversity_weight, (int, float))
                                             or not math.isfinite(diversity_weight) or diversity_weight < 0):
            raise ValueError(f"CTL: diversity_weight must be None or a finite number >= 0, got {diversity_weight!r}")
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"CTL: frames must be a positive int, got {frames!r}")
        if isinstance(graph_layers, bool) or not isinstance(graph_layers, int) or graph_layers < 0:
            raise ValueError(f"CTL: graph_layers must be an int >= 0, got {graph_layers!r}")
        if not isinstance(first_layer_shortcut, bool):
            raise ValueError(f"CTL: first_layer_shortcut must be a bool, got {first_layer_shortcut!r}")
        if not isinstance(collapse, bool) or (not collapse and graph_layers and window != 1):
            raise ValueError(f"CTL: collapse must be True, or False with window 1 (the frame-level GCN), got "
                             f"collapse={collapse!r} with window {window!r}")
        if cross_scale not in ("graph", "pool"):
            raise ValueError(f"CTL: cross_scale must be 'graph' or 'pool', got {cross_scale!r}")
        sources = tuple(cross_scale_sources)
        if not set(sources) <= {"s1", "s2"} or len(set(sources)) != len(sources):
            raise ValueError(f"CTL: cross_scale_sources must be distinct scales of ('s1', 's2'), got "
                             f"{cross_scale_sources!r}")
        if cross_scale_stages not in (1, 2) or (cross_scale_stages == 2 and graph_layers < 2):
            raise ValueError(f"CTL: cross_scale_stages must be 1, or 2 with graph_layers >= 2 (the "
                             f"second fusion follows the first 3D-GCL), got {cross_scale_stages!r}")
        for name, value in (("temperature", temperature), ("heatmap_sigma", heatmap_sigma)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"CTL: {name} must be a finite number > 0, got {value!r}")
        self.frames, self.temperature, self.heatmap_sigma = frames, float(temperature), float(heatmap_sigma)
        self.cross_scale, self.sources, self.stages = cross_scale, sources, cross_scale_stages
        self.alpha, self.margin, self.label_smoothing = alpha, margin, label_smoothing
        self.part_fusion, self.embedding, self.ops_backend = part_fusion, embedding, ops_backend

        self.backbone = ResNet(depth, last_stride=1, width=width)
        if pretrained is not None:
            load_pretrained(self.backbone, pretrained)
        channels = self.backbone.channels[-1]
        self.register_buffer("groups10", part_groups("ctl10"))          # [10, 17]
        self.register_buffer("groups5", part_groups("ctl5"))            # [5, 17]
        self.register_buffer("groups5_of_10", part_groups("ctl5_of_10"))  # [5, 10]
        self.graph = nn.ModuleDict({
            scale: nn.ModuleList(
                WindowGraphConv3D(channels, channels, graph, window, learned=learned_adjacency,
                                  context=context, frames=frames, residual=layer > 0 or first_layer_shortcut,
                                  collapse=collapse, backend=ops_backend)
                for layer in range(graph_layers))
            for scale, graph in _SCALES.items()})
        self.cross = nn.ModuleList(
            nn.ModuleDict({source: CrossScaleGraphConv(channels, embed_dim) for source in sources})
            for _ in range(cross_scale_stages if cross_scale == "graph" else 0))
        self.reduce = nn.Linear(channels, -(-channels // 5))                # g_c: C -> ceil(C / 5)
        self.necks = nn.ModuleList(BNNeck(channels, num_classes) for _ in range(3))
        self.diversity_weight = channels / 2048 if diversity_weight is None else float(diversity_weight)
        self._stats = RunningMeans()

    def heatmaps(self, keypoints: Tensor, image_size: tuple[int, int],
                 feature_size: tuple[int, int]) -> Tensor:
        """The stand-in of the frozen HRNet: ``[B*T, 17, h, w]`` heatmaps on the feature grid.

        Rendered on HRNet's ``H/4 x W/4`` grid (sigma ``heatmap_sigma``, peak = the keypoint's
        confidence clipped to [0, 1]; a missing keypoint gives a zero map), then resized bilinearly
        (``align_corners=False``) to the feature grid, as docs/models/ctl.md resizes HRNet's output.
        """
        with torch.no_grad():
            size = (image_size[0] // _HEATMAP_STRIDE, image_size[1] // _HEATMAP_STRIDE)
            confidence = keypoints[..., 2].clamp(0.0, 1.0)
            heat = render_heatmaps(keypoints[..., :2] / _HEATMAP_STRIDE, size, self.heatmap_sigma,
                                   valid=confidence > 0) * confidence[..., None, None]
            return F.interpolate(heat.flatten(0, 1), size=feature_size, mode="bilinear",
                                 align_corners=False)

    def scale_features(self, images: Tensor, keypoints: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """``({"s1": V_s1, "s2": V_s2, "s3": V_s3}, V_g)``: ``[B, T, N_s, C]`` each and ``[B, T, C]`` (Eq. 1)."""
        if not isinstance(images, Tensor) or images.dim() != 5 or images.size(2) != 3:
            raise ValueError(f"CTL: images must be [B, T, 3, H, W], got {list(getattr(images, 'shape', []))}")
        batch, frames = images.shape[:2]
        if (not isinstance(keypoints, Tensor) or keypoints.dim() != 4
                or tuple(keypoints.shape) != (batch, frames, 17, 3)):
            raise ValueError(f"CTL: keypoints must be [B, T, 17, 3] = [{batch}, {frames}, 17, 3], got "
                             f"{list(getattr(keypoints, 'shape', []))}")
        if frames != self.frames:
            raise ValueError(f"CTL: images hold T = {frames} frames but the model was built with "
                             f"frames = {self.frames}")
        features = self.backbone(images.flatten(0, 1))[-1]                   # [B*T, C, h, w]
        heat = self.heatmaps(keypoints, tuple(images.shape[-2:]), tuple(features.shape[-2:]))
        v1 = part_pool(features, heat.to(features.dtype), temperature=self.temperature,
                       backend=self.ops_backend)
        v1 = v1.view(batch, frames, *v1.shape[1:])                            # [B, T, 17, C]
        globl = features.mean((2, 3)).view(batch, frames, -1)
        return {"s1": v1, "s2": self.groups10 @ v1, "s3": self.groups5 @ v1}, globl

    def fuse_scales(self, stage: int, xs: dict[str, Tensor]) -> Tensor:
        """``X_s3 + alpha * sum_a X_a3`` over the cross-scale sources (Eq. 7): ``[B, T, 5, C]``."""
        fused = xs["s3"]
        for source in self.sources:
            if self.cross_scale == "graph":
                message = self.cross[stage][source](xs[source], xs["s3"])
            else:
                groups = self.groups5 if source == "s1" else self.groups5_of_10
                message = groups @ xs[source]
            fused = fused + self.alpha * message
        return fused

    def parts(self, xs: dict[str, Tensor]) -> Tensor:
        """``V_p`` ``[B, T, 5, C]``: the 3D-GCL stacks of the three scales, then the cross-scale fusion."""
        for layer in range(len(self.graph["s1"])):
            xs = {scale: self.graph[scale][layer](x) for scale, x in xs.items()}
            if layer == 0 and self.stages == 2:
                xs["s3"] = self.fuse_scales(0, xs)
        return self.fuse_scales(self.stages - 1, xs)

    def forward(self, images: Tensor, keypoints: Tensor) -> dict | Tensor:
        xs, globl = self.scale_features(images, keypoints)
        if not self.training and self.embedding == "global":
            return self.necks[0](globl.mean(1))[1]                            # V_f^g
        vp = self.parts(xs)
        fused_parts = vp.mean(2) if self.part_fusion == "mean" else vp.sum(2)
        attended = (fused_parts + globl).mean(1)                              # V_f^a
        if not self.training:
            return self.necks[1](attended)[1]
        channels = globl.size(-1)
        reduced = self.reduce(vp).flatten(-2)[..., :channels]                 # concat_n g_c(V_p[n])
        vectors = (globl.mean(1), attended, (reduced + globl).mean(1))        # V_f^g, V_f^a, V_f^c
        heads = [neck(v) for neck, v in zip(self.necks, vectors)]
        return {"features": [h[0] for h in heads], "logits": [h[2] for h in heads], "parts": vp.mean(1),
                "fused_parts": fused_parts.mean(1)}

    def loss(self, output: dict, pids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Eq. 9 with ``lambda_1 = lambda_2 = 1``: CE (label smoothing) and batch-hard triplet summed over
        the three vectors, plus ``diversity_weight`` x the diversity loss of ``V_p``.  Returns
        ``(total, {"cross_entropy", "triplet", "diversity"})`` (``diversity``: the weighted term)."""
        ce = sum(cross_entropy_label_smooth(logits, pids, self.label_smoothing) for logits in output["logits"])
        triplet = sum(batch_hard_triplet(f, pids, self.margin) for f in output["features"])
        diversity = diversity_loss(output["parts"])
        self._stats.add(norm_global=output["features"][0].norm(dim=1).mean(),
                        norm_fused_parts=output["fused_parts"].norm(dim=1).mean(), diversity_unweighted=diversity)
        weighted = self.diversity_weight * diversity
        return ce + triplet + weighted, {"cross_entropy": ce, "triplet": triplet, "diversity": weighted}

    def diagnostics(self) -> dict[str, float]:
        """Means over the training steps since the last call: ``norm_global`` (``|V_f^g|``),
        ``norm_fused_parts`` (``|TAP(mean or sum of the parts)|``, the term added to ``V_g`` in
        ``V_f^a``) and ``diversity_unweighted`` (Eq. 8 before ``diversity_weight``: 0 for
        orthogonal parts, 20 for identical ones)."""
        return self._stats.read()

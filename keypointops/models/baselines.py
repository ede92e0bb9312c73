"""Video re-ID baselines: ResNet IDE (``build_model("resnet50", n)``) and PCB-p4 (``build_model("pcb", n)``).

Both are frame-level CNNs applied to every frame of a clip, as the visual branch of KMPNet
(Chen et al., AAAI 2022; ``docs/models/kmpnet.md``), as in the first stage of its training: in training every frame is classified
with its tracklet's identity (``B * T`` samples, label-smoothed cross-entropy, ε = 0.1; the total
is the mean over the model's classifiers); in eval mode the frame embeddings are averaged over the
clip.  Neither uses a fused op; ``ops_backend`` is accepted (and checked) for the common contract.
"""
from __future__ import annotations

from torch import Tensor, nn

from keypointops._opdefs.backend import check_backend
from keypointops.models._common import check_clip, frame_loss
from keypointops.models.backbones import ResNet
from keypointops.models.heads import PCBHead, init_classifier

__all__ = ["VideoBaseline", "ResNet50Video", "PCBVideo"]


class VideoBaseline(nn.Module):
    """A frame-level CNN on every frame of a clip: ``backbone`` plus a head given by the subclass.

    Subclasses define ``logits(f)`` (the named classifier outputs from the last stage's features
    ``[B*T, C, h, w]``) and ``embed(f)`` (the ``[B*T, D]`` test embedding of each frame).
    ``forward(images [B, T, 3, H, W], keypoints=None)``: training -> ``{"logits": {name: [B*T,
    n]}, "frames": T}``; eval -> ``[B, D]``, the mean of the frame embeddings.  ``keypoints`` are
    accepted for the common contract and not used.
    """

    def __init__(self, backbone: ResNet, ops_backend: str = "auto"):
        super().__init__()
        self.backbone = backbone
        self.ops_backend = check_backend(type(self).__name__, ops_backend, "ops_backend")

    def logits(self, f: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def embed(self, f: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, images: Tensor, keypoints: Tensor | None = None):
        check_clip(images, keypoints, type(self).__name__)
        B, T = images.shape[:2]
        f = self.backbone(images.flatten(0, 1))[-1]
        if self.training:
            return {"logits": self.logits(f), "frames": T}
        return self.embed(f).view(B, T, -1).mean(1)

    def loss(self, output: dict, pids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The mean label-smoothed CE over the classifiers, per frame (``frame_loss``)."""
        return frame_loss(output["logits"], pids, output["frames"])


class ResNet50Video(VideoBaseline):
    """IDE baseline (torchreid ``resnet50``): ResNet, global average pooling, ``Linear(C -> num_classes)``.

    Architecture: ResNet-``depth`` (default 50, last stride 2: layer4 at 1/32) -> GAP -> the
    classifier (N(0, 0.01^2), zero bias); no BN-neck, no dropout.  Test embedding: the
    un-normalised GAP feature of each frame (2048-d at full size), averaged over the clip.
    ``depth`` / ``width`` / ``last_stride`` give the small variants; the name says ResNet-50
    because that is the paper's (KMPNet Table 1/2 "ResNet-50") model.
    """

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0, last_stride: int = 2,
                 ops_backend: str = "auto"):
        super().__init__(ResNet(depth, last_stride=last_stride, width=width), ops_backend)
        self.classifier = init_classifier(nn.Linear(self.backbone.channels[-1], num_classes), 0.01)

    def logits(self, f: Tensor) -> dict[str, Tensor]:
        return {"global": self.classifier(self.embed(f))}

    def embed(self, f: Tensor) -> Tensor:
        return f.mean((2, 3))


class PCBVideo(VideoBaseline):
    """PCB-p4 (Sun et al. 2018; torchreid ``pcb_p4``), KMPNet's default visual branch (docs/models/kmpnet.md).

    Architecture: ResNet-``depth`` (default 50) with last stride 1 (layer4 at 1/16) -> 4 horizontal
    stripes (``AdaptiveAvgPool2d((4, 1))``) -> training: Dropout(0.5), shared Conv1x1(C -> 256, no
    bias) + BN + ReLU, one ``Linear(256 -> num_classes)`` per stripe (4 CE terms, averaged); test:
    each stripe's pooled C-d vector L2-normalised, concatenated (8192-d at full size), averaged over
    the clip.  ``parts`` and ``reduced_dim`` are torchreid's; the paper's is p4 / 256.
    """

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0, last_stride: int = 1,
                 parts: int = 4, reduced_dim: int = 256, ops_backend: str = "auto"):
        super().__init__(ResNet(depth, last_stride=last_stride, width=width), ops_backend)
        self.head = PCBHead(self.backbone.channels[-1], num_classes, parts=parts, reduced_dim=reduced_dim)

    def logits(self, f: Tensor) -> dict[str, Tensor]:
        return {f"stripe{i + 1}": x for i, x in enumerate(self.head.classify(self.head.pool(f)))}

    def embed(self, f: Tensor) -> Tensor:
        return self.head.embed(self.head.pool(f))

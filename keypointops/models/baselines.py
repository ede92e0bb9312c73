"""Video re-ID baselines: ResNet IDE (``build_model("resnet50", n)``) and PCB-p4 (``build_model("pcb", n)``).

Both are frame-level CNNs applied to every frame of a clip, as the visual branch of KMPNet
(``../shared/models/kmpnet.md`` §3.1, stage A of §5): in training every frame is classified
with its tracklet's identity (``B * T`` samples, label-smoothed cross-entropy, ε = 0.1; the total
is the mean over the model's classifiers); in eval mode the frame embeddings are averaged over the
clip.  Neither uses a fused op; ``ops_backend`` is accepted (and checked) for the common contract.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from keypointops.losses import cross_entropy_label_smooth
from keypointops.models.backbones import ResNet
from keypointops.models.heads import PCBHead, init_classifier
from keypointops._opdefs.backend import BACKENDS

__all__ = ["VideoBaseline", "ResNet50Video", "PCBVideo", "PRESETS", "check_clip", "frame_loss"]


def check_clip(images: Tensor, keypoints: Tensor | None, fn: str, need_keypoints: bool = False) -> None:
    """Checks a batch against the contract: ``images [B, T, 3, H, W]``, ``keypoints [B, T, 17, 3]``."""
    if not isinstance(images, Tensor) or images.dim() != 5 or images.size(2) != 3:
        raise ValueError(f"{fn}: images must be [B, T, 3, H, W], got {list(getattr(images, 'shape', []))}")
    if keypoints is None:
        if need_keypoints:
            raise ValueError(f"{fn}: keypoints [B, T, 17, 3] are required here, got None")
        return
    if not isinstance(keypoints, Tensor) or keypoints.dim() != 4 or keypoints.shape[2:] != (17, 3) \
            or keypoints.shape[:2] != images.shape[:2]:
        raise ValueError(f"{fn}: keypoints must be [B, T, 17, 3] with the images' B and T "
                         f"{list(images.shape[:2])}, got {list(getattr(keypoints, 'shape', []))}")


def frame_loss(logits: dict[str, Tensor], pids: Tensor, frames: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean of the label-smoothed CE (ε = 0.1) of every classifier, each frame labelled with its clip's pid.

    ``logits`` maps a name to ``[B * T, num_classes]``; returns ``(total, {"ce_<name>": term})``.
    """
    if not isinstance(pids, Tensor) or pids.dim() != 1:
        raise ValueError(f"loss: pids must be an int64 tensor [B], got {list(getattr(pids, 'shape', []))}")
    targets = pids.to(next(iter(logits.values())).device).repeat_interleave(frames)
    parts = {f"ce_{name}": cross_entropy_label_smooth(x, targets, 0.1) for name, x in logits.items()}
    return torch.stack(list(parts.values())).mean(), parts


def _check_backend(ops_backend: str, fn: str) -> str:
    if ops_backend not in BACKENDS:
        raise ValueError(f"{fn}: ops_backend must be one of {BACKENDS}, got {ops_backend!r}")
    return ops_backend


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
        self.ops_backend = _check_backend(ops_backend, type(self).__name__)

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
    """PCB-p4 (Sun et al. 2018; torchreid ``pcb_p4``), KMPNet's default visual branch (kmpnet.md §3.1).

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


def train_preset(**overrides) -> dict:
    """The "train" settings of KMPNet's released configuration (kmpnet.md §5), with ``overrides``."""
    train = dict(frames=16, train_sampling="evenly", test_sampling="evenly", height=256, width=128,
                 batch_size=16, instances=None, optimizer="adam", lr=3e-4, weight_decay=5e-4, momentum=0.9,
                 epochs=60, lr_milestones=[20], lr_gamma=0.1, warmup_epochs=0, flip=True, random_erase=True,
                 grad_clip=None)
    unknown = set(overrides) - set(train)
    if unknown:
        raise ValueError(f"train_preset: unknown train keys {sorted(unknown)}")
    train.update(overrides)
    return train


# The CPU presets (the main job, `keypointops train`): ResNet-18 blocks at quarter width on 128x64
# frames, 4 frames per clip, 16 clips per step, Adam 1e-3, 20 epochs (from scratch: no pretrained
# weights exist here).  KMPNet with it: 57.3% mAP, rank-1 50.8%, on the default synthetic dataset
# (version 2; 18 steps per epoch), 638 s in all with one thread on a busy 2-core machine.
CPU_BACKBONE = dict(depth=18, width=0.25)
CPU_TRAIN = dict(frames=4, height=128, width=64, batch_size=16, lr=1e-3, epochs=20, lr_milestones=[15])

PRESETS = {
    "resnet50": {"paper": {"model": {}, "train": train_preset()},
                 "cpu": {"model": dict(CPU_BACKBONE), "train": train_preset(**CPU_TRAIN)}},
    "pcb": {"paper": {"model": {}, "train": train_preset()},
            "cpu": {"model": dict(CPU_BACKBONE, reduced_dim=64), "train": train_preset(**CPU_TRAIN)}},
}

"""Re-ID heads: BNNeck, the PCB stripe head, and the initialisations the papers use."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BNNeck", "PCBHead", "init_classifier", "init_kaiming_fan_out"]


def init_classifier(linear: nn.Linear, std: float) -> nn.Linear:
    """A classifier's init: weights N(0, std^2), zero bias (torchreid: std 0.01; BNNeck: 0.001)."""
    nn.init.normal_(linear.weight, 0.0, std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


def init_kaiming_fan_out(module: nn.Module) -> nn.Module:
    """Kaiming-normal weights (``mode='fan_out'``, ReLU gain), zero bias, for a Linear or a conv;
    BatchNorm weight 1, bias 0; applied to ``module`` and its children."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


class BNNeck(nn.Module):
    """BNNeck (Luo et al. 2019): ``[Linear(in -> embed)] -> BatchNorm1d (bias frozen at 0) -> Linear(no bias)``.

    ``forward(x [N, in_features])`` returns ``(features, bn_features, logits)``: ``features`` is
    the vector before the BN (the triplet loss reads it), ``bn_features`` the BN output (the
    classifier reads it), ``logits`` ``[N, num_classes]``.  With ``embed_dim`` a
    ``Linear(in_features -> embed_dim)`` (Kaiming fan_out, zero bias) comes first, as KMPNet's
    graph heads.  The classifier starts at N(0, 0.001^2).
    """

    def __init__(self, in_features: int, num_classes: int, embed_dim: int | None = None):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"BNNeck: num_classes must be a positive int, got {num_classes!r}")
        self.embed = None
        if embed_dim is not None:
            self.embed = init_kaiming_fan_out(nn.Linear(in_features, embed_dim))
        dim = in_features if embed_dim is None else embed_dim
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)
        self.classifier = init_classifier(nn.Linear(dim, num_classes, bias=False), 0.001)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = x if self.embed is None else self.embed(x)
        bn_features = self.bn(features)
        return features, bn_features, self.classifier(bn_features)


class PCBHead(nn.Module):
    """PCB's stripe head, torchreid's ``pcb_p4`` (Sun et al. 2018).

    ``pool(f [N, C, H, W])`` averages ``parts`` horizontal stripes (``AdaptiveAvgPool2d((parts, 1))``)
    to ``[N, C, parts]``.  ``classify(pooled)`` is the training path: ``Dropout(0.5)``, a shared
    ``Conv1x1(C -> reduced, no bias) + BN + ReLU``, then one ``Linear(reduced -> num_classes)``
    per stripe; it returns the list of ``parts`` logit tensors.  ``embed(pooled)`` is the test
    embedding: each stripe's C-d pooled vector L2-normalised, concatenated (``parts * C``-d).
    Init as torchreid: Kaiming fan_out conv, BN 1/0, classifiers N(0, 0.01^2) with zero bias.
    """

    def __init__(self, in_channels: int, num_classes: int, parts: int = 4, reduced_dim: int = 256,
                 dropout: float = 0.5):
        super().__init__()
        if not isinstance(parts, int) or parts < 1:
            raise ValueError(f"PCBHead: parts must be a positive int, got {parts!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"PCBHead: num_classes must be a positive int, got {num_classes!r}")
        self.parts = parts
        self.parts_avgpool = nn.AdaptiveAvgPool2d((parts, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.conv5 = init_kaiming_fan_out(nn.Sequential(
            nn.Conv2d(in_channels, reduced_dim, 1, bias=False), nn.BatchNorm2d(reduced_dim), nn.ReLU(inplace=True)))
        self.classifier = nn.ModuleList(init_classifier(nn.Linear(reduced_dim, num_classes), 0.01)
                                        for _ in range(parts))

    def pool(self, f: Tensor) -> Tensor:
        return self.parts_avgpool(f).flatten(2)

    def classify(self, pooled: Tensor) -> list[Tensor]:
        h = self.conv5(self.dropout(pooled).unsqueeze(3)).flatten(2)
        return [classifier(h[:, :, i]) for i, classifier in enumerate(self.classifier)]

    @staticmethod
    def embed(pooled: Tensor) -> Tensor:
        return F.normalize(pooled, p=2, dim=1).flatten(1)

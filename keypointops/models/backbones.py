"""ResNet-18/34/50 backbones with torchvision's parameter names, returning every stage's output.

The module tree is torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layerN.0.downsample.0``,
...; Bottleneck with the stride on the 3x3 conv, "ResNet v1.5"), without the ImageNet ``fc``, so a
torchvision ImageNet state dict loads with :func:`load_pretrained` (``strict=True`` on every other
key).  Nothing is ever downloaded.  ``width`` scales the base widths (64, 128, 256, 512) for the
small variants that train on a CPU; such a model has no pretrained weights.
"""
from __future__ import annotations

import os

from torch import Tensor, nn

from keypointops._checks import check_choice

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet", "load_pretrained", "DEPTHS"]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 convs, stride on the first."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck``: 1x1, 3x3 (with the stride), 1x1 with 4x expansion."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# depth -> (block, blocks per stage), as torchvision
DEPTHS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
    """A ResNet trunk (no pooling, no ``fc``) whose forward returns the 5 stage outputs.

    ``forward(x [N, 3, H, W])`` returns ``[stem, layer1, layer2, layer3, layer4]``: the stem is
    ``maxpool(relu(bn1(conv1(x))))`` (stride 4), then the four residual stages (strides 4, 8, 16
    and 32, or 16 for layer4 with ``last_stride=1``).  ``channels`` and ``strides`` give the
    channel count and the stride (input pixels per feature pixel) of each of the five outputs.

    Args:
        depth: 18, 34 or 50.
        last_stride: stride of layer4's first block, 1 (re-ID's "last stride 1", PCB) or 2.
        width: multiplier of the base widths 64/128/256/512 (rounded, at least 1 channel); 1 is
            torchvision's network.
    """

    def __init__(self, depth: int = 50, *, last_stride: int = 2, width: float = 1.0):
        super().__init__()
        check_choice("ResNet", "depth", depth, sorted(DEPTHS))
        check_choice("ResNet", "last_stride", last_stride, (1, 2))
        if not isinstance(width, (int, float)) or not width > 0:
            raise ValueError(f"ResNet: width must be a positive number, got {width!r}")
        block, layers = DEPTHS[depth]
        self.depth, self.width, self.last_stride = depth, float(width), last_stride
        base = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.inplanes = base[0]
        self.conv1 = nn.Conv2d(3, base[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, base[0], layers[0], 1)
        self.layer2 = self._make_layer(block, base[1], layers[1], 2)
        self.layer3 = self._make_layer(block, base[2], layers[2], 2)
        self.layer4 = self._make_layer(block, base[3], layers[3], last_stride)
        del self.inplanes
        self.channels = (base[0],) + tuple(c * block.expansion for c in base)
        self.strides = (4, 4, 8, 16, 16 * last_stride)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @property
    def stages(self) -> tuple[nn.Module, ...]:
        """The five stages as callables: the stem, then layer1..layer4."""
        return (self.stem, self.layer1, self.layer2, self.layer3, self.layer4)

    def stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: Tensor) -> list[Tensor]:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.size(1) != 3:
            raise ValueError(f"ResNet: input must be images [N, 3, H, W], got {list(getattr(x, 'shape', []))}")
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.width}, last_stride={self.last_stride}"


def resnet(depth: int = 50, *, last_stride: int = 2, width: float = 1.0) -> ResNet:
    """``ResNet(depth, last_stride=..., width=...)``."""
    return ResNet(depth, last_stride=last_stride, width=width)


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> ResNet:
    """Loads a torchvision ImageNet ResNet state dict from the local file ``path`` into a backbone.

    ``model`` is a :class:`ResNet` or a model holding one as ``model.backbone``.  The file is read
    with ``torch.load(weights_only=True)`` (a plain state dict, or a dict with a ``"state_dict"``
    entry); the ImageNet classifier (``fc.*``) is dropped and every other key must match the
    backbone with ``strict=True``.  A shape mismatch (e.g. a ``width != 1`` backbone, or another
    depth) raises a ``ValueError`` naming the first mismatched parameters.  Returns the backbone.
    """
    backbone = model if isinstance(model, ResNet) else getattr(model, "backbone", None)
    if not isinstance(backbone, ResNet):
        raise TypeError(f"load_pretrained: model must be a ResNet or hold one as .backbone, got "
                        f"{type(model).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_pretrained: no such weights file {os.fspath(path)!r} "
                                "(weights are read from a local file, never downloaded)")
    from keypointops.checkpoints import load_weights_file

    state = load_weights_file(path, "load_pretrained: weights file")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"load_pretrained: {os.fspath(path)!r} does not hold a state dict")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    mismatched = [f"{k}: file {list(v.shape)} vs model {list(own[k].shape)}"
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"load_pretrained: {len(mismatched)} tensors of {os.fspath(path)!r} do not fit the "
                         f"ResNet-{backbone.depth} (width={backbone.width}), e.g. {'; '.join(mismatched[:3])}; "
                         "torchvision weights fit only width=1 of the same depth")
    backbone.load_state_dict(state, strict=True)
    return backbone

"""ResNet backbones (torchvision names, stage outputs, width multiplier, local pretrained loading) and heads."""
import functools

import pytest
import torch

from keypointops.models.backbones import ResNet, load_pretrained, resnet
from keypointops.models.heads import BNNeck, PCBHead
from helpers import one_thread  # noqa: F401 (autouse fixture)


def torchvision_resnet_keys(depth):
    """The state-dict keys of torchvision's ``resnet{depth}`` (with ``fc``), written out independently."""
    bottleneck = depth == 50
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}[depth]
    bn = lambda p: [f"{p}.weight", f"{p}.bias", f"{p}.running_mean", f"{p}.running_var",  # noqa: E731
                    f"{p}.num_batches_tracked"]
    keys = ["conv1.weight"] + bn("bn1")
    for stage, count in enumerate(blocks, 1):
        for i in range(count):
            p = f"layer{stage}.{i}"
            for c in range(1, 4 if bottleneck else 3):
                keys += [f"{p}.conv{c}.weight"] + bn(f"{p}.bn{c}")
            if i == 0 and (stage > 1 or bottleneck):
                keys += [f"{p}.downsample.0.weight"] + bn(f"{p}.downsample.1")
    return keys + ["fc.weight", "fc.bias"]


@functools.lru_cache(maxsize=None)
def torchvision_state_dict(depth):
    """A state dict with torchvision's keys and shapes (taken from a width-1 backbone), random values
    (cached: copy it before changing it)."""
    g = torch.Generator().manual_seed(depth)
    own = ResNet(depth).state_dict()
    state = {}
    for key in torchvision_resnet_keys(depth):
        if key.startswith("fc."):
            shape = (1000, 2048 if depth == 50 else 512) if key == "fc.weight" else (1000,)
            state[key] = torch.randn(shape, generator=g)
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(3)
        else:
            state[key] = torch.randn(own[key].shape, generator=g)
    return state


@pytest.mark.parametrize("depth,params", [(18, 11689512 - 513000), (34, 21797672 - 513000),
                                          (50, 25557032 - 2049000)])
def test_parameter_names_and_counts_are_torchvision(depth, params):
    model = ResNet(depth)
    expected = [k for k in torchvision_resnet_keys(depth) if not k.startswith("fc.")]
    assert list(model.state_dict()) == expected
    assert sum(p.numel() for p in model.parameters()) == params        # torchvision's count without fc


@pytest.mark.parametrize("depth", [18, 34, 50])
@pytest.mark.parametrize("last_stride", [1, 2])
def test_stage_outputs(depth, last_stride):
    model = resnet(depth, last_stride=last_stride, width=0.125)
    outs = model(torch.randn(2, 3, 64, 32))
    assert len(outs) == 5
    for out, channels, stride in zip(outs, model.channels, model.strides):
        assert out.shape == (2, channels, 64 // stride, 32 // stride)
    expansion = 4 if depth == 50 else 1
    assert model.channels == (8, 8 * expansion, 16 * expansion, 32 * expansion, 64 * expansion)
    assert model.strides[-1] == 16 * last_stride


def test_stride_on_the_3x3_conv_and_kaiming_init():
    model = ResNet(50, width=0.25)
    assert model.layer2[0].conv1.stride == (1, 1) and model.layer2[0].conv2.stride == (2, 2)
    w = ResNet(50).layer3[0].conv2.weight           # fan_out = 256 * 9
    assert w.std().item() == pytest.approx((2.0 / (256 * 9)) ** 0.5, rel=0.05)
    assert torch.equal(model.bn1.weight, torch.ones(16)) and torch.equal(model.bn1.bias, torch.zeros(16))


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNet(101)
    with pytest.raises(ValueError, match="last_stride"):
        ResNet(18, last_stride=3)
    with pytest.raises(ValueError, match="width"):
        ResNet(18, width=0)
    with pytest.raises(ValueError, match="images"):
        ResNet(18, width=0.125)(torch.randn(2, 1, 32, 32))


@pytest.mark.parametrize("depth", [18, 50])
def test_load_torchvision_state_dict(tmp_path, depth):
    state = torchvision_state_dict(depth)
    path = tmp_path / "tv.pth"
    torch.save(state, path)
    model = ResNet(depth, last_stride=1)             # last stride changes no parameter shape
    assert load_pretrained(model, path) is model
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_load_pretrained_errors(tmp_path):
    path = tmp_path / "tv.pth"
    torch.save(torchvision_state_dict(18), path)
    with pytest.raises(ValueError, match="do not fit the ResNet-18 \\(width=0.5\\).*conv1.weight"):
        load_pretrained(ResNet(18, width=0.5), path)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_pretrained(ResNet(18), tmp_path / "missing.pth")
    with pytest.raises(TypeError, match="hold one as .backbone"):
        load_pretrained(torch.nn.Linear(2, 2), path)
    state = dict(torchvision_state_dict(18))
    del state["layer4.1.bn2.running_var"]
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_pretrained(ResNet(18), path)


def test_state_dict_round_trip():
    a, b = ResNet(18, width=0.25), ResNet(18, width=0.25)
    b.load_state_dict(a.state_dict(), strict=True)
    a.eval(), b.eval()
    x = torch.randn(1, 3, 32, 32)
    assert all(torch.equal(u, v) for u, v in zip(a(x), b(x)))


def test_pcb_head():
    head = PCBHead(64, num_classes=7, parts=4, reduced_dim=16)
    pooled = head.pool(torch.randn(3, 64, 16, 8))
    assert pooled.shape == (3, 64, 4)
    logits = head.classify(pooled)
    assert len(logits) == 4 and all(x.shape == (3, 7) for x in logits)
    emb = head.embed(pooled)
    assert emb.shape == (3, 256)
    torch.testing.assert_close(emb.view(3, 64, 4).norm(dim=1), torch.ones(3, 4))
    # stripe i is the mean over rows 4i..4i+3
    f = torch.randn(1, 64, 16, 8)
    torch.testing.assert_close(head.pool(f)[0, :, 1], f[0, :, 4:8].mean((1, 2)))


def test_bnneck():
    neck = BNNeck(8, num_classes=5, embed_dim=16)
    features, bn_features, logits = neck(torch.randn(6, 8))
    assert features.shape == bn_features.shape == (6, 16) and logits.shape == (6, 5)
    assert not neck.bn.bias.requires_grad and neck.classifier.bias is None
    assert neck.classifier.weight.std().item() < 0.002


def test_untrusted_pretrained_file_is_refused(tmp_path):
    import os

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'code-ran'}",)

    torch.save({"conv1.weight": RunsCode()}, tmp_path / "evil.pth")
    (tmp_path / "random.pth").write_bytes(os.urandom(1000))
    for name in ("evil.pth", "random.pth"):
        with pytest.raises(ValueError, match=name) as err:
            load_pretrained(ResNet(18, width=0.125), tmp_path / name)
        assert "\n" not in str(err.value) and "weights_only=false" not in str(err.value).lower()
    assert not (tmp_path / "code-ran").exists()

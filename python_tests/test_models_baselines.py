"""Video baselines: ResNet IDE (``resnet50``) and PCB-p4 (``pcb``)."""
import io

import pytest
import torch

from keypointops.losses import cross_entropy_label_smooth
from keypointops.models import build_model, get_preset
from keypointops.models.backbones import load_pretrained
from keypointops.models.baselines import PCBVideo, ResNet50Video
from helpers import one_thread, optimisation_step  # noqa: F401 (one_thread: an autouse fixture)
from helpers import AUTOCAST_STEP_CASES, assert_autocast_step_matches_reference
from test_models_backbones import torchvision_state_dict

B, T, H, W, N_CLS = 2, 3, 64, 32, 5


def small(name, **options):
    torch.manual_seed(0)
    options = dict(depth=18, width=0.125, **options)
    if name == "pcb":
        options.setdefault("reduced_dim", 16)
    return build_model(name, N_CLS, **options)


def clip(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 3, H, W, generator=g), torch.zeros(B, T, 17, 3), torch.tensor([0, 4])


@pytest.mark.parametrize("name,cls,terms", [("resnet50", ResNet50Video, ["global"]),
                                            ("pcb", PCBVideo, ["stripe1", "stripe2", "stripe3", "stripe4"])])
def test_train_outputs_and_loss(name, cls, terms):
    images, keypoints, pids = clip()
    model = small(name).train()
    assert isinstance(model, cls)
    out = model(images, keypoints)
    assert list(out["logits"]) == terms and out["frames"] == T
    assert all(x.shape == (B * T, N_CLS) for x in out["logits"].values())
    total, parts = model.loss(out, pids)
    per_frame = pids.repeat_interleave(T)                  # each frame carries its clip's identity
    expected = [cross_entropy_label_smooth(out["logits"][t], per_frame, 0.1) for t in terms]
    torch.testing.assert_close(total, torch.stack(expected).mean())
    assert list(parts) == [f"ce_{t}" for t in terms]


@pytest.mark.parametrize("name", ["resnet50", "pcb"])
def test_eval_embedding_is_the_mean_of_frame_embeddings(name):
    images, _, _ = clip()
    model = small(name).eval()
    emb = model(images)
    dim = model.backbone.channels[-1] * (4 if name == "pcb" else 1)
    assert emb.shape == (B, dim)
    frames = torch.stack([model(images[:, t:t + 1]) for t in range(T)], 1)
    torch.testing.assert_close(emb, frames.mean(1))
    if name == "pcb":   # every stripe of a frame is L2-normalised
        torch.testing.assert_close(frames.view(B, T, -1, 4).norm(dim=2), torch.ones(B, T, 4))


def test_full_size_forward():
    images = torch.randn(1, 2, 3, 256, 128)
    for name, dim, heads, stride in (("resnet50", 2048, 1, 32), ("pcb", 8192, 4, 16)):
        model = build_model(name, 7)
        assert model.backbone.strides[-1] == stride
        out = model.train()(images)
        assert len(out["logits"]) == heads and all(x.shape == (2, 7) for x in out["logits"].values())
        with torch.no_grad():
            assert model.eval()(images).shape == (1, dim)


@pytest.mark.parametrize("name", ["resnet50", "pcb"])
def test_torchvision_weights_and_state_dict_round_trip(tmp_path, name):
    path = tmp_path / "resnet50.pth"
    state = torchvision_state_dict(50)
    torch.save(state, path)
    model = build_model(name, N_CLS)
    load_pretrained(model, path)
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])
    small_model, copy = small(name), small(name)
    buffer = io.BytesIO()
    torch.save(small_model.state_dict(), buffer)
    buffer.seek(0)
    torch.nn.init.zeros_(copy.backbone.conv1.weight)
    copy.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    images, _, _ = clip()
    torch.testing.assert_close(small_model.eval()(images), copy.eval()(images), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet50", "pcb"])
def test_one_optimisation_step_lowers_the_loss(name):
    images, keypoints, pids = clip(seed=2)
    model = small(name).train()
    before, after = optimisation_step(model, images, keypoints, pids, lr=1e-3)
    assert after < before - 1e-3


@pytest.mark.parametrize("name", ["resnet50", "pcb"])
def test_presets_and_bad_input(name):
    for preset in ("cpu", "paper"):
        settings = get_preset(name, preset)
        build_model(name, 3, **settings["model"])
    model = small(name)
    with pytest.raises(ValueError, match="images must be \\[B, T, 3, H, W\\]"):
        model(torch.randn(2, 3, H, W))
    with pytest.raises(ValueError, match="ops_backend must be one of"):
        small(name, ops_backend="fast")
    with pytest.raises(ValueError, match="unknown model 'pcb6'; known models: alignnet, ctl, kmpnet"):
        build_model("pcb6", 3)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        build_model(name, 0)


@pytest.mark.parametrize("device,dtype", AUTOCAST_STEP_CASES)
@pytest.mark.parametrize("name", ["resnet50", "pcb"])
def test_training_step_under_autocast_matches_reference(name, device, dtype):
    """Forward, loss, backward and an optimiser step under autocast: finite, and the fused ops
    agree with the reference ops within the dtype's tolerance."""
    assert_autocast_step_matches_reference(name, dtype, device)

"""AlignNet (keypointops.models.alignnet) against docs/models/alignnet.md, at small sizes on CPU."""
import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from keypointops import parts
from keypointops._extension import has_ops
from keypointops.models import build_model, get_preset
from keypointops.models.alignnet import AlignNet
from helpers import clips, one_thread, optimisation_step  # noqa: F401 (one_thread: an autouse fixture)
from helpers import AUTOCAST_STEP_CASES, assert_autocast_step_matches_reference

needs_ops = pytest.mark.skipif(not has_ops(), reason="keypointops._C not built")

# AlignNet's pose57 index sets (docs/models/alignnet.md), written out here independently of keypointops.parts.
SPEC_SETS = [
    [0, 1, 14, 15, 16, 17, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56],
    [2, 3, 4, 5, 6, 7, 19, 20, 25, 26, 33, 34, 35, 36, 41, 42, 43, 44],
    [8, 9, 10, 11, 12, 13, 21, 22, 23, 24, 27, 28, 29, 30],
]
SMALL = dict(depth=50, width=0.0625, last_stride=1)  # C = 128, a 4 x 2 grid at 64 x 32


def test_grouping_is_the_papers():
    groups = parts.part_groups("alignnet")
    assert groups.shape == (3, 57)
    assert [row.nonzero().flatten().tolist() for row in groups] == SPEC_SETS
    assert [int((row > 0).sum()) for row in groups] == [16, 18, 14]
    torch.testing.assert_close(groups.sum(1), torch.ones(3))
    for row, size in zip(groups, (16, 18, 14)):
        torch.testing.assert_close(row[row > 0], torch.full((size,), 1 / size))
    assert int((groups > 0).any(0).sum()) == 48 and (groups[:, 18] == 0).all()   # no background
    torch.testing.assert_close(AlignNet(3, **SMALL).groups.float(), groups)


@needs_ops
def test_part_pool_path_equals_einsum_reference():
    """The frame descriptor's part slices are docs/models/alignnet.md einsum formulation / (h w)."""
    torch.manual_seed(0)
    model = AlignNet(3, use_tap=False, **SMALL).double().eval()
    images, keypoints, _ = clips(dtype=torch.float64)
    frame_features, weights = model.frames(images, keypoints)
    assert weights is None and frame_features.shape == (4, 2, 4 * 128)
    x = images.flatten(0, 1)
    fa = model.backbone(x)[-1]
    pose57 = F.adaptive_avg_pool2d(model.pose_maps(x, keypoints.flatten(0, 1)), fa.shape[-2:])
    G = torch.tensor([[1 / len(s) if k in s else 0.0 for k in range(57)] for s in SPEC_SETS], dtype=torch.float64)
    r = torch.einsum("qf,nfhw->nqhw", G, pose57)                     # Eq. 2
    p = torch.softmax(r.flatten(2) / 1.0, dim=-1)                    # Eq. 3
    out = torch.einsum("nqs,ncs->nqc", p, fa.flatten(2))             # sum_hw p f_a
    part_vec = out / (fa.shape[-2] * fa.shape[-1])                   # Eq. 5, literal
    expected = torch.cat([fa.mean((2, 3)), part_vec.flatten(1)], 1).view(4, 2, -1)
    torch.testing.assert_close(frame_features, expected, rtol=1e-10, atol=1e-12)
    model.part_norm = "sum"
    torch.testing.assert_close(model.frames(images, keypoints)[0][..., 128:],
                               out.flatten(1).view(4, 2, -1), rtol=1e-10, atol=1e-12)


class _Ones(torch.nn.Module):
    def forward(self, x):
        return x.new_ones(x.size(0))


@needs_ops
@pytest.mark.parametrize("tap_per_part", [False, True])
def test_tap_of_ones_gives_the_frame_mean(tap_per_part):
    torch.manual_seed(0)
    model = AlignNet(3, tap_per_part=tap_per_part, **SMALL)
    images, keypoints, _ = clips()
    model.tap_g = _Ones()
    model.tap_p = torch.nn.ModuleList([_Ones()] * 3) if tap_per_part else _Ones()
    out = model(images, keypoints)
    torch.testing.assert_close(out["features"], out["frame_features"].mean(1))
    assert (out["frame_weights"] == 1).all()
    model.eval()
    frame_features, _ = model.frames(images, keypoints)
    torch.testing.assert_close(model(images, keypoints), frame_features.mean(1))


@needs_ops
def test_eval_descriptor_is_the_mean_of_single_frame_descriptors():
    """docs/models/alignnet.md: any chunk length runs; with tap_agg="mean" each frame is weighted on its own."""
    torch.manual_seed(0)
    model = AlignNet(3, **SMALL).eval()
    images, keypoints, _ = clips(batch=1, frames=7)
    with torch.no_grad():
        clip = model(images, keypoints)
        singles = torch.cat([model(images[:, t:t + 1], keypoints[:, t:t + 1]) for t in range(7)])
    torch.testing.assert_close(clip, singles.mean(0, keepdim=True), rtol=1e-5, atol=1e-6)


@needs_ops
@pytest.mark.parametrize("options,dim", [
    (dict(), 4 * 128),
    (dict(use_tap=False, paf_mode="abs"), 4 * 128),
    (dict(use_parts=False), 128),
    (dict(use_parts=False, use_tap=False), 128),
    (dict(tap_per_part=True, tap_agg="wnorm", paf_mode="magnitude"), 4 * 128),
    (dict(tap_agg="sum", part_norm="sum", temperature=0.5), 4 * 128),
])
def test_shapes_train_and_eval(options, dim):
    torch.manual_seed(0)
    model = AlignNet(5, **SMALL, **options)
    images, keypoints, pids = clips(height=32, width=16)
    out = model(images, keypoints)
    assert out["logits"].shape == (4, 5) and out["features"].shape == (4, dim)
    assert out["frame_features"].shape == out["frame_weights"].shape == (4, 2, dim)
    weights = out["frame_weights"]
    assert ((weights > 0) & (weights <= 1)).all()
    if options.get("use_tap", True) and not options.get("tap_per_part"):
        assert (weights[..., 128:] == weights[..., 128:129]).all()    # one TAP_p weight for all parts
    total, parts = model.loss(out, pids)
    assert set(parts) == {"ce", "triplet"}
    torch.testing.assert_close(total, parts["ce"] + parts["triplet"])
    model.eval()
    with torch.no_grad():
        assert model(images, keypoints).shape == (4, dim)
    assert ("tap_p" in dict(model.named_children())) == (options.get("use_tap", True)
                                                         and options.get("use_parts", True))


@needs_ops
def test_full_size_forward():
    """The paper's model on 1 clip x 2 frames at 256 x 128: an 8 x 4 grid, 8192-d descriptor."""
    torch.manual_seed(0)
    model = AlignNet(625)
    assert sum(p.numel() for p in model.parameters()) == 39_247_025
    assert sum(p.numel() for p in model.tap_g.parameters()) == 5_309_184     # "about 5.31 M per TAP net"
    images, keypoints, _ = clips(batch=1, frames=2, height=256, width=128)
    with torch.no_grad():
        out = model(images, keypoints)
        assert out["logits"].shape == (1, 625) and out["frame_features"].shape == (1, 2, 8192)
        assert model.backbone(images[0])[-1].shape == (2, 2048, 8, 4)
        model.eval()
        assert model(images, keypoints).shape == (1, 8192)


@needs_ops
def test_reference_backend_matches_fused():
    torch.manual_seed(0)
    fused = AlignNet(3, **SMALL).double()
    reference = AlignNet(3, ops_backend="reference", **SMALL).double()
    reference.load_state_dict(fused.state_dict())
    images, keypoints, pids = clips(dtype=torch.float64)
    losses, grads = [], []
    for model in (fused, reference):
        loss, _ = model.loss(model(images, keypoints), pids)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-8)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-7, atol=1e-8, msg=name)


@needs_ops
def test_network_pose_source_trains_end_to_end():
    """pose_source="network": part_pool's heatmap gradient reaches OpenPose's last convs."""
    torch.manual_seed(0)
    model = AlignNet(3, pose_source="network", **SMALL)
    images, keypoints, pids = clips(batch=2, frames=1, height=32, width=16)
    for name, param in model.pose_maps.net.named_parameters():   # (the other 52 M weight gradients
        param.requires_grad_(name.startswith("Mconv7_stage6"))   # are slow on a CPU)
    loss, _ = model.loss(model(images, keypoints), pids)
    loss.backward()
    assert model.pose_maps.net.Mconv7_stage6_L2.weight.grad.abs().sum() > 0   # heatmaps
    assert model.pose_maps.net.Mconv7_stage6_L1.weight.grad.abs().sum() > 0   # PAFs


@needs_ops
def test_training_step_lowers_the_loss():
    torch.manual_seed(0)
    model = build_model("alignnet", 4, **SMALL)
    images, keypoints, pids = clips(batch=8, seed=1)
    before, after = optimisation_step(model, images, keypoints, pids, lr=1e-4)
    assert after < before


@needs_ops
def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = AlignNet(3, **SMALL).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    copy_ = AlignNet(3, **SMALL).eval()
    copy_.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    images, keypoints, _ = clips()
    with torch.no_grad():
        torch.testing.assert_close(copy_(images, keypoints), model(images, keypoints), rtol=0, atol=0)
    assert "groups" in dict(copy.deepcopy(model).named_buffers())


@needs_ops
def test_presets():
    paper = get_preset("alignnet", "paper")["train"]
    assert (paper["frames"], paper["height"], paper["width"], paper["batch_size"], paper["instances"]) == (
        15, 256, 128, 16, 2)
    cpu = get_preset("alignnet", "cpu")
    model = build_model("alignnet", 6, **cpu["model"])
    images, keypoints, _ = clips(batch=2, frames=cpu["train"]["frames"], height=cpu["train"]["height"],
                                 width=cpu["train"]["width"])
    model.eval()
    with torch.no_grad():
        assert model(images, keypoints).shape == (2, 4 * model.channels)


def test_bad_options_name_the_argument():
    for options, match in [(dict(tap_agg="max"), "tap_agg"), (dict(part_norm="l2"), "part_norm"),
                           (dict(paf_mode="sq"), "paf_mode"), (dict(ops_backend="gpu"), "ops_backend"),
                           (dict(temperature=0), "temperature"), (dict(tap_hidden=0), "tap_hidden"),
                           (dict(use_tap=False, tap_per_part=True), "tap_per_part"),
                           (dict(use_parts=False, pose_source="network"), "pose_source"),
                           (dict(pose_source="hrnet"), "source")]:
        with pytest.raises(ValueError, match=match):
            AlignNet(3, **SMALL, **options)
    with pytest.raises(ValueError, match="num_classes"):
        AlignNet(0)
    model = AlignNet(3, **SMALL)
    images, keypoints, _ = clips(batch=2, frames=2)
    with pytest.raises(ValueError, match="keypoints must be"):
        model(images, keypoints[:, :, :12])
    with pytest.raises(ValueError, match="images must be"):
        model(images[0], keypoints)


def test_reference_backend_traces_for_onnx():
    """Eval mode with ops_backend="reference" (what ``keypointops export`` builds) is plain PyTorch
    that the tracer of ``torch.onnx.export`` records, rendered pose maps included (shapes read as
    ints), and the trace reproduces the model on another clip."""
    torch.manual_seed(0)
    model = AlignNet(3, ops_backend="reference", **SMALL).eval()
    images, keypoints, _ = clips(batch=1, height=32, width=16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the tracer's notes on Python-side shape checks
        traced = torch.jit.trace(model, (images, keypoints), check_trace=False)
        assert "keypointops::" not in str(traced.inlined_graph)   # no op of the library
        other = clips(batch=1, height=32, width=16, seed=1)[:2]
        torch.testing.assert_close(traced(*other), model(*other))


@needs_ops
def test_cpu_preset_masks_localise_and_the_embedding_reads_the_keypoints():
    """At the cpu preset's mask settings the parts are not copies of the global feature: the masks of
    upright people are far from uniform, and another clip's keypoints change the part slices of
    the eval embedding (not the global slice); with the paper's temperature 1 and average pooling
    the part slices barely move (the collapse this preset avoids)."""
    options = {k: v for k, v in get_preset("alignnet", "cpu")["model"].items() if k in ("temperature", "part_norm")}
    assert set(options) == {"temperature", "part_norm"}
    images, keypoints, _ = clips(height=128, width=64)
    shuffled = keypoints.roll(1, 0) + torch.tensor([0.0, 20.0, 0.0])   # another clip's keypoints, lower
    changes = {}
    for name, opts in (("preset", options), ("paper", dict(temperature=1.0, part_norm="avg"))):
        torch.manual_seed(0)
        model = AlignNet(5, **SMALL, **opts).eval()
        with torch.no_grad():
            before, after = model(images, keypoints), model(images, shuffled)
        C = model.channels
        assert torch.equal(before[:, :C], after[:, :C])                        # the global slice
        changes[name] = float((after[:, C:] - before[:, C:]).norm() / before[:, C:].norm())
        if name == "preset":
            masks = model.part_masks(images, keypoints)
            assert masks.shape == (4, 2, 3, 8, 4)
            torch.testing.assert_close(masks.sum((-2, -1)), torch.ones(4, 2, 3))
            entropy = -(masks * masks.log()).sum((-2, -1)) / math.log(32)
            assert float(entropy.mean()) <= 0.8
            rows = (masks.sum(-1) * torch.arange(8.0)).sum(-1).mean((0, 1))     # mask centre row per part
            assert rows[0] < rows[1] < rows[2]                                   # head above torso above legs
    assert changes["preset"] > 0.05 and changes["paper"] < 0.01, changes


@needs_ops
def test_diagnostics_are_the_training_masks_entropy_and_part_cosine():
    torch.manual_seed(0)
    model = AlignNet(5, **SMALL, temperature=0.05).train()
    assert model.diagnostics() == {}
    images, keypoints, _ = clips(height=128, width=64)
    model(images, keypoints)
    model(images[:2], keypoints[:2])
    diag = model.diagnostics()
    assert set(diag) == {"mask_entropy", "part_cosine"}
    model.eval()
    masks = model.part_masks(images, keypoints).flatten(-2)
    entropy = -(masks * masks.log()).sum(-1) / math.log(masks.size(-1))               # [4, 2, 3]
    entropy = torch.cat([entropy.flatten(0, 1), entropy[:2].flatten(0, 1)])
    assert diag["mask_entropy"] == pytest.approx(float(entropy.mean()), rel=1e-5)
    assert model.diagnostics() == {}                                                    # reset
    assert AlignNet(5, **SMALL, use_parts=False).diagnostics() == {}


@pytest.mark.parametrize("device,dtype", AUTOCAST_STEP_CASES)
@pytest.mark.parametrize("name", ["alignnet"])
def test_training_step_under_autocast_matches_reference(name, device, dtype):
    """Forward, loss, backward and an optimiser step under autocast: finite, and the fused ops
    agree with the reference ops within the dtype's tolerance."""
    assert_autocast_step_matches_reference(name, dtype, device)

"""CTL (keypointops.models.ctl) and its 3D-GCL against docs/models/ctl.md, at small sizes on CPU."""
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from keypointops._extension import has_ops
from keypointops.graphs import skeleton
from keypointops.models import build_model, get_preset
from keypointops.models.ctl import CTL, VARIANTS
from keypointops.nn import WindowGraphConv3D
from helpers import one_thread  # noqa: F401 (an autouse fixture)
from helpers import AUTOCAST_STEP_CASES, assert_autocast_step_matches_reference, optimisation_step, upright_keypoints
from helpers import clips as pose_clips

needs_ops = pytest.mark.skipif(not has_ops(), reason="keypointops._C not built")

SMALL = dict(depth=18, width=0.125, frames=3, embed_dim=8)   # C = 64, a 4 x 2 grid at 64 x 32
clips = functools.partial(pose_clips, frames=3)   # images, keypoints, pids of 2-clip identities


@pytest.mark.parametrize("row", sorted(VARIANTS))
def test_shapes_train_and_eval(row):
    torch.manual_seed(0)
    model = build_model("ctl", 5, **SMALL, variant=row)
    images, keypoints, pids = clips()
    out = model(images, keypoints)
    assert [f.shape for f in out["features"]] == [(4, 64)] * 3
    assert [logits.shape for logits in out["logits"]] == [(4, 5)] * 3
    assert out["parts"].shape == (4, 5, 64)
    total, parts = model.loss(out, pids)
    assert total.dim() == 0 and set(parts) == {"cross_entropy", "triplet", "diversity"}
    torch.testing.assert_close(total, sum(parts.values()))
    model.eval()
    with torch.no_grad():
        assert model(images, keypoints).shape == (4, 64)


def test_full_size_forward():
    """The paper's model (ResNet-50, C = 2048, tau = 3, L = 2, d = 256) on 1 clip x 6 frames at 256 x 128."""
    torch.manual_seed(0)
    model = CTL(625).eval()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) == 142_613_804                          # docs/models/ctl.md: "about 142 M"
    assert count(model.backbone) == 23_508_032                  # the ResNet-50 trunk: 23.5 M
    assert count(model.graph) == 101_034_834                    # 3D-GCLs (W + collapse ~100.7 M)
    assert count(model.cross) == 13_378_560                     # 2 CS-GCLs, ~6.69 M each
    shapes = {}

    def record(name):
        def hook(module, inputs, output):
            shapes[name] = tuple((output[-1] if name == "backbone" else output).shape)
        return hook

    for name in ("backbone", "graph.s1.1", "graph.s2.1", "graph.s3.1"):
        model.get_submodule(name).register_forward_hook(record(name))
    images, keypoints, _ = clips(batch=1, frames=6, height=256, width=128)
    with torch.no_grad():
        assert model(images, keypoints).shape == (1, 2048)
    assert shapes == {"backbone": (6, 2048, 16, 8), "graph.s1.1": (1, 6, 17, 2048),
                      "graph.s2.1": (1, 6, 10, 2048), "graph.s3.1": (1, 6, 5, 2048)}


def test_keypoint_and_part_features():
    """V_s1 = softmax(heatmap / theta)-weighted sum of the map (Eq. 1), V_s2 / V_s3 averages of V_s1
    over the parts of docs/models/ctl.md, V_g the GAP of the map."""
    torch.manual_seed(0)
    model = CTL(5, **SMALL)
    images, keypoints, _ = clips()
    xs, globl = model.scale_features(images, keypoints)
    fmap = model.backbone(images.flatten(0, 1))[-1]
    heat = model.heatmaps(keypoints, (64, 32), tuple(fmap.shape[-2:]))
    weights = torch.softmax(heat.flatten(2) / 0.1, dim=-1)
    v1 = torch.einsum("bks,bcs->bkc", weights, fmap.flatten(2)).view(4, 3, 17, 64)
    torch.testing.assert_close(xs["s1"], v1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(globl, fmap.mean((2, 3)).view(4, 3, 64))
    torch.testing.assert_close(xs["s2"][:, :, 2], (v1[:, :, 5] + v1[:, :, 7]) / 2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xs["s3"][:, :, 1], (v1[:, :, 5] + v1[:, :, 7] + v1[:, :, 9]) / 3,
                               rtol=1e-4, atol=1e-5)
    # A missing joint's heatmap is zero (uniform weights); a visible one peaks in the grid cell
    # holding it: the ankles of the upright person (x = 19.8 / 12.2, y = 58.9 of 32 x 64) in the
    # bottom row of the 2 x 4 grid, the left one (image right) in column 1.
    missing = (keypoints[..., 2] == 0).flatten(0, 1)
    assert missing.any() and (heat[missing] == 0).all() and (heat[~missing].amax(-1).amax(-1) > 0.3).all()
    upright = upright_keypoints(64, 32).expand(1, 3, 17, 3)
    peaks = model.heatmaps(upright, (64, 32), (4, 2))[0].flatten(1).argmax(-1)
    assert peaks[15] == 3 * 2 + 1 and peaks[16] == 3 * 2 + 0


@pytest.mark.parametrize("scale", ["s1", "s2", "s3"])
def test_physical_adjacency_is_symmetric_with_positive_rows(scale):
    """A_m = 0, no context: D^-1/2 (tile(A_p + I) + I) D^-1/2, built here with np.tile as docs/models/ctl.md."""
    model = CTL(5, **SMALL, context=None)
    layer = model.graph[scale][0]
    adj = layer.adjacency()
    n = layer.num_joints
    a_p = skeleton("coco17").adjacency().numpy() if scale == "s1" else np.zeros((n, n))
    if scale != "s1":
        for a, b in {"s2": [(0, 1), (1, 2), (2, 3), (1, 4), (4, 5), (1, 6), (6, 7), (1, 8), (8, 9)],
                     "s3": [(0, 1), (0, 2), (0, 3), (0, 4)]}[scale]:
            a_p[a, b] = a_p[b, a] = 1
    a_hat = np.tile(a_p + np.eye(n), (3, 3)) + np.eye(3 * n)
    d = a_hat.sum(1) ** -0.5
    torch.testing.assert_close(adj, torch.tensor(d[:, None] * a_hat * d[None, :], dtype=torch.float32))
    torch.testing.assert_close(adj, adj.t())
    assert (adj >= 0).all() and (adj.sum(1) > 0).all()
    assert torch.diagonal(adj).gt(0).all()


def test_alpha_zero_gives_the_s3_features():
    torch.manual_seed(0)
    images, keypoints, _ = clips()
    for alpha in (0.0, 0.3):
        model = CTL(5, **SMALL, alpha=alpha).eval()
        with torch.no_grad():
            xs, _ = model.scale_features(images, keypoints)
            vp = model.parts(dict(xs))
            x3 = xs["s3"]
            for layer in model.graph["s3"]:
                x3 = layer(x3)
        if alpha == 0:
            assert torch.equal(vp, x3)
        else:
            assert not torch.allclose(vp, x3)


def test_diversity_loss_is_zero_for_orthonormal_parts():
    model = CTL(3, **SMALL, diversity_weight=1.0)
    pids = torch.tensor([0, 0, 1, 1])
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 64, 5, generator=g))                 # orthonormal columns
    output = {"features": [torch.randn(4, 64, generator=g)] * 3, "logits": [torch.randn(4, 3, generator=g)] * 3,
              "fused_parts": torch.randn(4, 64, generator=g)}
    _, parts = model.loss(dict(output, parts=q.transpose(1, 2) * 7.0), pids)   # any part norm
    assert parts["diversity"].abs() < 1e-10
    _, parts = model.loss(dict(output, parts=torch.ones(4, 5, 64)), pids)      # identical parts
    torch.testing.assert_close(parts["diversity"], torch.tensor(20.0))      # P (P - 1) cos^2 = 1
    # The default weight is the paper's 1 at C = 2048 scaled to the channel count: 64 / 2048 here.
    model = CTL(3, **SMALL)
    assert model.diversity_weight == 64 / 2048
    total, parts = model.loss(dict(output, parts=torch.ones(4, 5, 64)), pids)
    torch.testing.assert_close(parts["diversity"], torch.tensor(20.0 * 64 / 2048))
    torch.testing.assert_close(total, sum(parts.values()))
    assert model.diagnostics()["diversity_unweighted"] == pytest.approx(20.0)
    assert model.diagnostics() == {}                                           # read once per epoch


@pytest.mark.parametrize("part_fusion", ["mean", "sum"])
def test_attended_feature_fuses_the_parts_with_the_global_feature(part_fusion):
    """V_f^a = TAP(mean_n V_p[n] + V_g) (or the paper's literal sum); V_f^g = TAP(V_g)."""
    torch.manual_seed(0)
    model = CTL(5, **SMALL, part_fusion=part_fusion)
    images, keypoints, pids = clips()
    torch.manual_seed(1)
    out = model(images, keypoints)
    torch.manual_seed(1)
    xs, globl = model.scale_features(images, keypoints)
    vp = model.parts(dict(xs))
    fused = vp.mean(2) if part_fusion == "mean" else vp.sum(2)
    torch.testing.assert_close(out["features"][1], (fused + globl).mean(1))
    torch.testing.assert_close(out["features"][0], globl.mean(1))
    model.loss(out, pids)
    stats = model.diagnostics()
    assert set(stats) == {"norm_global", "norm_fused_parts", "diversity_unweighted"}
    assert stats["norm_fused_parts"] == pytest.approx(fused.mean(1).norm(dim=1).mean().item(), rel=1e-5)


@pytest.mark.parametrize("variant", ["ctl", "basel"])
def test_eval_embedding_follows_the_keypoints(variant):
    """V_f^a (the test feature) changes when the keypoints are shuffled over the batch; V_f^g (the
    ``embedding="global"`` feature of the same weights) does not, and is the first BNNeck's output."""
    torch.manual_seed(0)
    model = CTL(5, **SMALL, variant=variant).eval()
    images, keypoints, _ = clips()
    shuffled = keypoints.flip(0)
    with torch.no_grad():
        attended, again, moved = model(images, keypoints), model(images, keypoints), model(images, shuffled)
        model.embedding = "global"
        global_feature = model(images, keypoints)
        torch.testing.assert_close(model(images, shuffled), global_feature, rtol=0, atol=0)
        fmap = model.backbone(images.flatten(0, 1))[-1].mean((2, 3)).view(4, 3, -1).mean(1)
    torch.testing.assert_close(attended, again, rtol=0, atol=0)
    assert (attended - moved).abs().amax() > 1e-3 * attended.abs().amax()
    torch.testing.assert_close(global_feature, model.necks[0](fmap)[1])


def test_variants_set_the_switches():
    model = CTL(3, **SMALL, variant="basel")
    assert len(model.graph["s1"]) == 0 and model.cross_scale == "pool"
    model = CTL(3, **SMALL, variant="basel+contre", graph_layers=2)   # the full model's value: allowed
    assert model.graph["s1"][0].window == 1 and model.cross_scale == "pool"
    assert model.graph["s1"][0].collapse is None and CTL(3, **SMALL).graph["s1"][0].collapse is not None
    with pytest.raises(ValueError, match="collapse must be True, or False with window 1"):
        CTL(3, **SMALL, collapse=False)
    assert CTL(3, **SMALL, variant="basel", alpha=0.5).alpha == 0.5    # a switch the variant leaves alone
    with pytest.raises(ValueError, match="variant 'basel' sets graph_layers = 0; got graph_layers = 1"):
        CTL(3, **SMALL, variant="basel", graph_layers=1)
    with pytest.raises(ValueError, match=r"variant must be one of \('basel', "):
        CTL(3, **SMALL, variant="full")
    # the paper's shortcut starts at the second graph layer; first_layer_shortcut adds it to the first
    assert [layer.residual for layer in CTL(3, **SMALL).graph["s1"]] == [False, True]
    assert [layer.residual for layer in CTL(3, **SMALL, first_layer_shortcut=True).graph["s1"]] == [True, True]


def dense_3d_gcl(layer, x):
    """docs/models/ctl.md 3D-GCL written densely: zero-pad + unfold the C-channel windows, the context block
    on them, Eq. 3-4's adjacency (the skeleton normalised, A_m and A_c added), einsum, Conv3d(C, C, (1, tau, 1)) collapse, BN, ReLU, shortcut."""
    batch, frames, n, c = x.shape
    tau = layer.window
    padded = F.pad(x, (0, 0, 0, 0, 1, 1))                                        # [B, T + 2, N, C]
    windows = padded.unfold(1, tau, 1).permute(0, 1, 4, 2, 3).reshape(batch, frames, tau * n, c)
    ctx = layer.context
    bn = lambda t, m: F.batch_norm(t, None, None, m.weight, m.bias, training=True, eps=m.eps)  # noqa: E731
    z = ctx.squeeze(windows).view(batch, 1, -1)                                  # 1x1 conv C -> 1
    z = bn(z, ctx.squeeze_norm).relu().view(batch, frames, tau * n)
    z = torch.einsum("st,btl->bsl", ctx.temporal.weight[:, :, 0], z) + ctx.temporal.bias[:, None]
    z = bn(z, ctx.temporal_norm).relu()
    a_c = F.normalize(ctx.expand(z).view(batch, frames, tau * n, tau * n), dim=-1)
    eye = torch.eye(n, dtype=x.dtype)
    a_p = torch.tensor(np.tile((skeleton("coco17").adjacency().double() + eye).numpy(), (tau, tau)))
    fixed = a_p + torch.eye(tau * n, dtype=x.dtype)
    d = fixed.sum(-1).rsqrt()
    a_norm = d[:, None] * fixed * d[None, :] + layer.learned.repeat(tau, tau) + a_c
    h = torch.einsum("btij,btjc->btic", a_norm, windows @ layer.linear.weight.t()).relu()
    h = h.view(batch, frames, tau, n, c).permute(0, 4, 1, 2, 3)                   # [B, C, T, tau, N]
    kernel = layer.collapse.weight.view(c, tau, c).permute(0, 2, 1)[:, :, None, :, None]
    z = bn(F.conv3d(h, kernel).squeeze(3), layer.norm).relu()                     # [B, C, T, N]
    return x + z.permute(0, 2, 3, 1)


def test_3d_gcl_equals_dense_unfold_einsum():
    torch.manual_seed(0)
    layer = WindowGraphConv3D(6, 6, "coco17", 3, context="window", frames=4, residual=True).double()
    with torch.no_grad():
        layer.learned.normal_(0, 0.1)
        for p in layer.context.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 4, 17, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense_3d_gcl(layer, x))


def test_signed_adjacency_terms_are_added_to_the_normalised_skeleton():
    """A_m and A_c are signed: normalising by the degrees of the full adjacency would zero (degree <= 0)
    or blow up (degree near 0) whole nodes.  Here A_m = -0.5 makes every full degree negative; the
    adjacency is still D^-1/2 (tile(A_p + I) + I) D^-1/2 + tile(A_m) + A_c and no node is lost."""
    torch.manual_seed(0)
    layer = WindowGraphConv3D(6, 6, "coco17", 3, context="window", frames=4).double()
    with torch.no_grad():
        layer.learned.fill_(-0.5)
    x = torch.rand(2, 4, 17, 6, dtype=torch.float64)
    fixed = torch.tensor(np.tile(skeleton("coco17").adjacency().double().numpy() + np.eye(17), (3, 3))) \
        + torch.eye(51, dtype=torch.float64)
    d = fixed.sum(-1).rsqrt()
    a_c = layer.context(x)
    expected = d[:, None] * fixed * d[None, :] + layer.learned.repeat(3, 3) + a_c
    adj = layer.adjacency(x)
    torch.testing.assert_close(adj, expected)
    assert (adj.abs().sum(-1) > 0).all() and adj.abs().amax() <= 1.5


def test_contre_row_is_the_frame_level_gcn():
    """Table 3's "Basel+ContRe" adds frame-level graph convs (Eq. 4 with tau = 1) on Eq. 2's adjacency
    to Basel, and nothing else: each layer is relu(Â X W) (+ X from the second layer on) with
    Â = D^-1/2 (A_p + I) D^-1/2 + A_m + A_c, no window-collapse layer or BN; the parameters it adds are
    W, A_m and the basic context block of each layer and scale."""
    torch.manual_seed(0)
    model = CTL(5, **SMALL, variant="basel+contre").double()
    basel = CTL(5, **SMALL, variant="basel")
    c = 64
    added = 0
    for scale, n in (("s1", 17), ("s2", 10), ("s3", 5)):
        for index, layer in enumerate(model.graph[scale]):
            with torch.no_grad():
                layer.learned.normal_(0, 0.1)
            assert layer.window == 1 and layer.collapse is None and layer.norm is None
            x = torch.rand(2, 3, n, c, dtype=torch.float64)
            a_p = layer.physical.new_zeros(n, n)
            if scale == "s1":
                a_p = skeleton("coco17").adjacency().double()
            else:
                for a, b in {"s2": [(0, 1), (1, 2), (2, 3), (1, 4), (4, 5), (1, 6), (6, 7), (1, 8), (8, 9)],
                             "s3": [(0, 1), (0, 2), (0, 3), (0, 4)]}[scale]:
                    a_p[a, b] = a_p[b, a] = 1
            fixed = a_p + torch.eye(n, dtype=torch.float64)
            d = fixed.sum(-1).rsqrt()
            a_hat = d[:, None] * fixed * d[None, :] + layer.learned + layer.context(x)     # [B, N, N]
            expected = torch.einsum("bij,btjc->btic", a_hat, x @ layer.linear.weight.t()).relu()
            if index > 0:
                expected = expected + x
            torch.testing.assert_close(layer(x), expected)
            added += c * c + n * n + sum(p.numel() for p in layer.context.parameters())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) - count(basel) == added


@needs_ops
def test_per_window_adjacency_fused_matches_reference():
    """float64: the model with the fused ops (per-window [B, T, L, L] adjacency) and the plain-PyTorch
    reference give the same loss and gradients."""
    torch.manual_seed(0)
    fused = CTL(3, **SMALL).double()
    reference = CTL(3, **SMALL, ops_backend="reference").double()
    with torch.no_grad():
        # psi(x_i - x_i) sits exactly on the ReLU's kink at BN bias 0 (the BN centres the
        # antisymmetric differences on it), where the last bit decides the gradient; move it off.
        for stage in fused.cross:
            for module in stage.values():
                module.psi.norm.bias.fill_(0.1)
    reference.load_state_dict(fused.state_dict())
    images, keypoints, pids = clips(dtype=torch.float64)
    assert fused.graph["s1"][0].adjacency(torch.randn(4, 3, 17, 64, dtype=torch.float64)).shape == (4, 3, 51, 51)
    losses, grads = [], []
    for model in (fused, reference):
        loss, _ = model.loss(model(images, keypoints), pids)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-8)
    assert grads[0].keys() == grads[1].keys() and "graph.s1.0.learned" in grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-7, atol=1e-8, msg=name)


def test_training_step_lowers_the_loss():
    torch.manual_seed(0)
    model = build_model("ctl", 4, **SMALL)
    images, keypoints, pids = clips(batch=8, seed=1)
    before, after = optimisation_step(model, images, keypoints, pids, lr=3e-4)
    assert after < before


def test_presets():
    for name in ("cpu", "paper"):
        preset = get_preset("ctl", name)
        assert preset["train"]["frames"] == preset["model"]["frames"]
        assert preset["train"]["batch_size"] % preset["train"]["instances"] == 0
    paper = get_preset("ctl", "paper")
    assert paper["model"]["depth"] == 50 and paper["train"]["frames"] == 6
    model = build_model("ctl", 10, **get_preset("ctl", "cpu")["model"])
    assert model.backbone.channels[-1] == 128


def test_bad_input_names_the_argument():
    model = CTL(3, **SMALL)
    images, keypoints, _ = clips()
    with pytest.raises(ValueError, match="built with frames = 3"):
        model(images[:, :2], keypoints[:, :2])
    with pytest.raises(ValueError, match=r"keypoints must be \[B, T, 17, 3\]"):
        model(images, keypoints[..., :2])
    with pytest.raises(ValueError, match="cross_scale must be"):
        CTL(3, **SMALL, cross_scale="sum")
    with pytest.raises(ValueError, match="cross_scale_sources"):
        CTL(3, **SMALL, cross_scale_sources=("s3",))
    with pytest.raises(ValueError, match="cross_scale_stages"):
        CTL(3, **SMALL, graph_layers=1, cross_scale_stages=2)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        CTL(3, **SMALL, temperature=0.0)
    with pytest.raises(ValueError, match="heatmap_sigma must be a finite number > 0"):
        CTL(3, **SMALL, heatmap_sigma=float("nan"))
    with pytest.raises(ValueError, match="embedding must be one of"):
        CTL(3, **SMALL, embedding="concat")
    with pytest.raises(ValueError, match="part_fusion must be one of"):
        CTL(3, **SMALL, part_fusion="max")
    with pytest.raises(ValueError, match="diversity_weight must be None or a finite number >= 0"):
        CTL(3, **SMALL, diversity_weight=-1.0)
    with pytest.raises(ValueError, match="first_layer_shortcut must be a bool"):
        CTL(3, **SMALL, first_layer_shortcut="yes")


@pytest.mark.parametrize("device,dtype", AUTOCAST_STEP_CASES)
@pytest.mark.parametrize("name", ["ctl"])
def test_training_step_under_autocast_matches_reference(name, device, dtype):
    """Forward, loss, backward and an optimiser step under autocast: finite, and the fused ops
    agree with the reference ops within the dtype's tolerance."""
    assert_autocast_step_matches_reference(name, dtype, device)

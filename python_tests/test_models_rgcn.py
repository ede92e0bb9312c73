"""RGCN / LGCN (keypointops.models.rgcn) against docs/models/rgcn.md, at small sizes on CPU."""
import math

import pytest
import torch

from keypointops._extension import has_ops
from keypointops.models import build_model, get_preset
from keypointops.models.rgcn import (DualAttention, RecurrentGraphConv, TemporalAggregator,
                                     pose14_from_coco17)
from keypointops._opdefs.backend import triton_available
from helpers import one_thread, optimisation_step  # noqa: F401 (one_thread: an autouse fixture)
from helpers import AUTOCAST_STEP_CASES, assert_autocast_step_matches_reference

needs_ops = pytest.mark.skipif(not has_ops(), reason="keypointops._C not built")

# docs/models/rgcn.md edge list, written out here independently of graphs.py.
SPEC_EDGES = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
              (12, 13), (1, 0)]
SMALL = dict(depth=18, width=0.125, hidden=8, input_size=(32, 16))


def spec_adjacency() -> torch.Tensor:
    adj = torch.zeros(14, 14, dtype=torch.float64)
    for a, b in SPEC_EDGES:
        adj[a, b] = adj[b, a] = 1.0
    adj += torch.eye(14, dtype=torch.float64)
    d = adj.sum(1).rsqrt()
    return d[:, None] * adj * d[None, :]


def clips(batch=4, frames=3, height=32, width=16, seed=0, dtype=torch.float32):
    """Random images and COCO-17 keypoints (some joints missing), 2 clips per identity."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, frames, 3, height, width, generator=g, dtype=dtype)
    xy = torch.rand(batch, frames, 17, 2, generator=g, dtype=dtype) * torch.tensor([width, height], dtype=dtype)
    conf = (torch.rand(batch, frames, 17, 1, generator=g, dtype=dtype) > 0.2).to(dtype)
    keypoints = torch.cat([xy * conf, conf], -1)
    pids = torch.arange(batch // 2).repeat_interleave(2)
    return images, keypoints, pids


def test_adjacency_matches_spec_values():
    module = RecurrentGraphConv(4).double()
    adj = module.adjacency(torch.float64)
    assert torch.equal(adj, adj.t())
    torch.testing.assert_close(adj, spec_adjacency(), rtol=0, atol=1e-15)
    plus_i = (adj != 0).to(torch.float64)
    assert plus_i.sum(1).tolist() == [2, 6, 3, 3, 2, 3, 3, 2, 3, 3, 2, 3, 3, 2]
    for (i, j), value in {(0, 0): 0.5, (0, 1): 1 / math.sqrt(12), (1, 1): 1 / 6, (1, 2): 1 / math.sqrt(18),
                          (2, 3): 1 / 3, (3, 4): 1 / math.sqrt(6)}.items():
        assert adj[i, j].item() == pytest.approx(value, abs=1e-15)
    rows = [0.7887, 1.3982, 0.9024, 1.0749, 0.9082, 0.9024, 1.0749, 0.9082, 0.9024, 1.0749, 0.9082,
            0.9024, 1.0749, 0.9082]
    torch.testing.assert_close(adj.sum(1), torch.tensor(rows, dtype=torch.float64), rtol=0, atol=5e-5)
    eig = torch.linalg.eigvalsh(adj)
    assert eig[0].item() == pytest.approx(-0.3765, abs=5e-5) and eig[-1].item() == pytest.approx(1.0, abs=1e-12)
    x = torch.randn(1, 1, 14, 3, dtype=torch.float64)
    torch.testing.assert_close(module.aggregate(x)[0, 0], spec_adjacency() @ x[0, 0], rtol=0, atol=1e-15)


def test_pose14_from_coco17_converts_and_synthesises_the_neck():
    kp = torch.zeros(2, 17, 3)
    kp[:, :, 0] = torch.arange(17.0) * 2     # x = 2k, y = 3k, all confident
    kp[:, :, 1] = torch.arange(17.0) * 3
    kp[:, :, 2] = 1.0
    kp[1, 5, 2] = 0.0                        # clip 1: left shoulder missing -> no neck
    out = pose14_from_coco17(kp, size=(60, 40))
    coco = [0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15]
    for j, k in enumerate(coco):
        x, y = (5.5 * 2, 5.5 * 3) if k is None else (2 * k, 3 * k)
        assert out[0, j].tolist() == pytest.approx([x / 40, y / 60])
    assert out[1, 1].tolist() == [0.0, 0.0] and out[1, 5].tolist() == [0.0, 0.0]
    assert out[1, 2].tolist() == pytest.approx([12 / 40, 18 / 60])
    assert torch.equal(pose14_from_coco17(kp)[0, 2], kp[0, 6, :2])       # no size: pixels
    with pytest.raises(ValueError, match="keypoints"):
        pose14_from_coco17(torch.zeros(2, 14, 3))


@needs_ops
@pytest.mark.parametrize("name", ["rgcn", "lgcn"])
def test_shapes_train_and_eval(name):
    images, keypoints, pids = clips()
    model = build_model(name, 5, **SMALL)
    out = model(images, keypoints)
    assert out["logits"].shape == (4, 5) and out["appearance"].shape == (4, 64) and out["pose"].shape == (4, 16)
    assert out["pose"].abs().max() < 1                       # convex combinations of bounded states
    total, parts = model.loss(out, pids)
    assert total.dim() == 0 and set(parts) == {"id", "triplet_appearance", "triplet_pose", "lambda"}
    model.eval()
    with torch.no_grad():
        assert model(images, keypoints).shape == (4, 80)
    assert model.pose.recurrence == {"rgcn": "tanh", "lgcn": "lstm"}[name]


@needs_ops
@pytest.mark.parametrize("options, dim", [(dict(aggregator="attention"), 64 + 16),
                                          (dict(aggregator="lstm", lstm_hidden=12), 12 + 16),
                                          (dict(readout="nam"), 64 + 8), (dict(readout="tam"), 64 + 8),
                                          (dict(readout="mean", gc_layers=2, inner_act=True), 64 + 8)],
                         ids=["AA", "RA", "NAM", "TAM", "mean-2-layers-inner-act"])
def test_variant_shapes(options, dim):
    images, keypoints, _ = clips()
    model = build_model("rgcn", 5, **{**SMALL, **options}).eval()
    with torch.no_grad():
        assert model(images, keypoints).shape == (4, dim)


@needs_ops
def test_full_size_forward():
    torch.manual_seed(0)
    model = build_model("lgcn", 625).eval()
    images, keypoints, _ = clips(batch=1, frames=10, height=256, width=128)
    with torch.no_grad():
        embedding = model(images, keypoints)
    assert embedding.shape == (1, 2560) and torch.isfinite(embedding).all()
    assert embedding[:, 2048:].abs().max() < 1
    assert model.classifier.in_features == 2560
    assert sum(p.numel() for p in model.pose.parameters()) == 265_216
    assert sum(p.numel() for p in model.readout.parameters()) == 512


def test_pose_parameter_counts_match_spec():
    assert sum(p.numel() for p in RecurrentGraphConv(256).parameters()) == 66_304
    assert sum(p.numel() for p in RecurrentGraphConv(256, recurrence="lstm").parameters()) == 265_216
    assert sum(p.numel() for p in RecurrentGraphConv(256, gc_layers=2).parameters()) == 131_840


def loop_reference(module: RecurrentGraphConv, x: torch.Tensor) -> torch.Tensor:
    """Eqs. 6-8 written out per clip and frame with one matrix per gate (docs/models/rgcn.md)."""
    adj, n, gates = spec_adjacency(), module.hidden, module.gates
    weights = list(module.input_weights)
    layers = len(weights)
    out = torch.zeros(*x.shape[:3], n, dtype=x.dtype)
    for b in range(x.size(0)):
        h = torch.zeros(14, n, dtype=x.dtype)
        c = torch.zeros(14, n, dtype=x.dtype)
        for t in range(x.size(1)):
            pre = []
            for g in range(gates):
                if module.inner_act:
                    u = torch.relu(adj @ x[b, t] @ weights[0][:, g])
                    for w in weights[1:]:
                        u = torch.relu(adj @ u @ w[g])
                else:
                    w_all = weights[0][:, g]
                    for w in weights[1:]:
                        w_all = w_all @ w[g]
                    u = torch.relu(torch.linalg.matrix_power(adj, layers) @ x[b, t] @ w_all)
                cols = slice(g * n, (g + 1) * n)
                pre.append(u + h @ module.recurrent_weight[:, cols] + module.bias[cols])
            if gates == 1:
                h = torch.tanh(pre[0])
            else:
                f, i, o, gg = pre
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
                h = torch.sigmoid(o) * torch.tanh(c)
            out[b, t] = h
    return out


@needs_ops
@pytest.mark.parametrize("recurrence", ["tanh", "lstm"])
@pytest.mark.parametrize("gc_layers, inner_act", [(1, False), (2, False), (2, True)])
def test_recurrence_equals_step_by_step_loop(recurrence, gc_layers, inner_act):
    torch.manual_seed(1)
    module = RecurrentGraphConv(6, recurrence=recurrence, gc_layers=gc_layers, inner_act=inner_act).double()
    with torch.no_grad():
        module.bias.normal_()
    x = torch.rand(2, 4, 14, 2, dtype=torch.float64)
    x[0, 1, 3] = 0.0                                         # a missing joint still gets a state
    out = module(x)
    torch.testing.assert_close(out, loop_reference(module, x), rtol=1e-12, atol=1e-12)
    assert (out[0, 1, 3] != 0).all()


@needs_ops
def test_fused_graph_conv_equals_plain():
    module = RecurrentGraphConv(4).double()
    x = torch.randn(3, 5, 14, 7, dtype=torch.float64, requires_grad=True)
    fused = module.aggregate(x)
    plain = torch.einsum("ij,btjc->btic", spec_adjacency(), x)
    torch.testing.assert_close(fused, plain, rtol=1e-13, atol=1e-13)
    grad = torch.randn_like(fused)
    torch.testing.assert_close(torch.autograd.grad(fused, x, grad)[0], torch.autograd.grad(plain, x, grad)[0],
                               rtol=1e-13, atol=1e-13)


def plain_attention(states, w, dim):
    """docs/models/rgcn.md DAM sketch: mean over ``dim``, softmax scores, weighted sum."""
    pooled = states.mean(dim)
    return (torch.softmax(pooled @ w, 1).unsqueeze(-1) * pooled).sum(1)


@needs_ops
def test_fused_attentions_equal_plain():
    torch.manual_seed(2)
    dam = DualAttention(6).double()
    states = torch.randn(3, 5, 14, 6, dtype=torch.float64, requires_grad=True)
    fused = dam(states)
    plain = torch.cat([plain_attention(states, dam.node_score, 1), plain_attention(states, dam.time_score, 2)], 1)
    torch.testing.assert_close(fused, plain, rtol=1e-13, atol=1e-13)
    grad = torch.randn_like(fused)
    inputs = (states, dam.node_score, dam.time_score)
    for a, b in zip(torch.autograd.grad(fused, inputs, grad), torch.autograd.grad(plain, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    aa = TemporalAggregator(6, aggregator="attention", map_size=(2, 1)).double()
    maps = torch.randn(3, 5, 6, 2, 1, dtype=torch.float64)
    scores = aa.temporal(torch.relu(aa.spatial(maps.flatten(0, 1))).view(3, 5, -1).transpose(1, 2))[:, 0]
    expected = (torch.softmax(scores, 1).unsqueeze(-1) * maps.mean((3, 4))).sum(1)
    torch.testing.assert_close(aa(maps), expected, rtol=1e-13, atol=1e-13)


@needs_ops
@pytest.mark.parametrize("name, other", [
    ("rgcn", "reference"), ("lgcn", "reference"),
    pytest.param("lgcn", "triton", marks=pytest.mark.skipif(not triton_available(torch.device("cpu")),
                                                            reason="triton not installed"))])
def test_reference_backend_agrees(name, other):
    """The compiled ops against ``ops_backend="reference"`` (and the Triton kernels, interpreted)."""
    torch.manual_seed(3)
    fused = build_model(name, 5, **SMALL, aggregator="attention").double()
    plain = build_model(name, 5, **SMALL, aggregator="attention", ops_backend=other).double()
    plain.load_state_dict(fused.state_dict())
    images, keypoints, pids = clips(dtype=torch.float64)
    losses = [model.loss(model(images, keypoints), pids)[0] for model in (fused, plain)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    for model, loss in zip((fused, plain), losses):
        loss.backward()
    for (key, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12, msg=key)
    fused.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(images, keypoints), plain(images, keypoints), rtol=1e-12, atol=1e-12)


@needs_ops
def test_lambda_carries_no_gradient():
    torch.manual_seed(4)
    model = build_model("rgcn", 5, **SMALL)
    images, keypoints, pids = clips()
    out = model(images, keypoints)
    total, parts = model.loss(out, pids)
    lam = parts["lambda"]
    assert not lam.requires_grad and 0 < lam.item() < 1
    assert lam.item() == pytest.approx(parts["triplet_appearance"].item()
                                       / (parts["triplet_appearance"].item() + parts["triplet_pose"].item()))
    # The gradient equals that of the same loss with lambda a constant number.
    c = lam.item()
    as_constant = parts["id"] + c * parts["triplet_appearance"] + (1 - c) * parts["triplet_pose"]
    feats = (out["appearance"], out["pose"])
    for a, b in zip(torch.autograd.grad(total, feats, retain_graph=True), torch.autograd.grad(as_constant, feats, retain_graph=True)):
        torch.testing.assert_close(a, b)
    # A fixed lambda = 1 leaves the pose features only the ID loss's gradient.
    model.triplet_weight = 1.0
    total, parts = model.loss(out, pids)
    assert parts["lambda"].item() == 1.0
    torch.testing.assert_close(torch.autograd.grad(total, out["pose"], retain_graph=True)[0],
                               torch.autograd.grad(parts["id"], out["pose"])[0])


@needs_ops
@pytest.mark.parametrize("name", ["rgcn", "lgcn"])
def test_one_optimisation_step_lowers_the_loss(name):
    torch.manual_seed(5)
    model = build_model(name, 4, **SMALL)
    images, keypoints, pids = clips(batch=8, seed=5)
    before, after = optimisation_step(model, images, keypoints, pids, lr=1e-3)
    for key, parameter in [*model.pose.named_parameters(), *model.readout.named_parameters()]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, key   # the pose branch trains
    assert after < before


@needs_ops
@pytest.mark.parametrize("name", ["rgcn", "lgcn"])
def test_eval_embedding_follows_the_keypoints(name):
    """Shuffling the keypoints over the batch changes f^p and so the test embedding [f^a; f^p], not
    f^a; embedding="appearance" / "pose" are the two halves of the same weights' embedding."""
    torch.manual_seed(0)
    model = build_model(name, 5, **SMALL).eval()
    images, keypoints, _ = clips()
    shuffled = keypoints.flip(0)
    with torch.no_grad():
        both, moved = model(images, keypoints), model(images, shuffled)
        halves = {}
        for embedding in ("appearance", "pose"):
            model.embedding = embedding
            halves[embedding] = model(images, keypoints)
    torch.testing.assert_close(torch.cat([halves["appearance"], halves["pose"]], 1), both, rtol=0, atol=0)
    torch.testing.assert_close(moved[:, :64], both[:, :64], rtol=0, atol=0)
    assert (moved[:, 64:] - both[:, 64:]).abs().amax() > 1e-3 * both[:, 64:].abs().amax()


@needs_ops
def test_appearance_only_model():
    """pose_branch=False: the same appearance network, no pose network, the classifier on f^a and
    L_id + L_tri(f^a); its embedding is f^a, whatever the keypoints."""
    torch.manual_seed(0)
    full = build_model("rgcn", 5, **SMALL)
    torch.manual_seed(0)
    model = build_model("rgcn", 5, **SMALL, pose_branch=False)
    appearance_keys = {k for k in full.state_dict() if not k.startswith(("pose.", "readout.", "classifier."))}
    assert set(model.state_dict()) == appearance_keys | {"classifier.weight", "classifier.bias"}
    assert model.classifier.in_features == 64
    images, keypoints, pids = clips()
    out = model(images, keypoints)
    assert set(out) == {"logits", "appearance"}
    total, parts = model.loss(out, pids)
    assert set(parts) == {"id", "triplet_appearance"}
    torch.testing.assert_close(total, parts["id"] + parts["triplet_appearance"])
    model.eval()
    with torch.no_grad():
        embedding = model(images, keypoints)
        torch.testing.assert_close(embedding, model(images, keypoints.flip(0)), rtol=0, atol=0)
        torch.testing.assert_close(embedding, model.features(images, keypoints)[0], rtol=0, atol=0)
    assert model.diagnostics().keys() == {"norm_appearance"}
    with pytest.raises(ValueError, match=r"embedding must be one of \('both', 'appearance'\)"):
        build_model("rgcn", 5, **SMALL, pose_branch=False, embedding="pose")


@needs_ops
def test_diagnostics_log_lambda_and_the_branch_scales():
    torch.manual_seed(4)
    model = build_model("lgcn", 5, **SMALL)
    images, keypoints, pids = clips()
    logged = []
    for seed in (1, 2):
        out = model(*clips(seed=seed)[:2])
        logged.append((model.loss(out, pids)[1]["lambda"].item(), out["appearance"].norm(dim=1).mean().item(),
                       out["pose"].norm(dim=1).mean().item()))
    stats = model.diagnostics()
    expected = [sum(values) / 2 for values in zip(*logged)]
    assert list(stats) == ["norm_appearance", "norm_pose", "lambda"]
    assert [stats["lambda"], stats["norm_appearance"], stats["norm_pose"]] == pytest.approx(expected, rel=1e-5)
    assert model.diagnostics() == {}


def test_presets_and_bad_options():
    for name in ("rgcn", "lgcn"):
        cpu = get_preset(name, "cpu")
        assert tuple(cpu["model"]["input_size"]) == (cpu["train"]["height"], cpu["train"]["width"])
    for options, match in [(dict(recurrence="gru"), "recurrence"), (dict(readout="max"), "readout"),
                           (dict(aggregator="max"), "aggregator"), (dict(triplet_weight=2.0), "triplet_weight"),
                           (dict(coord_norm="crop"), "coord_norm"), (dict(hidden=0), "hidden"),
                           (dict(embedding="concat"), "embedding"), (dict(pose_branch="no"), "pose_branch")]:
        with pytest.raises(ValueError, match=match):
            build_model("rgcn", 5, **SMALL | options)
    with pytest.raises(ValueError, match="recurrence"):
        build_model("lgcn", 5, recurrence="tanh")
    model = build_model("rgcn", 5, **SMALL)
    images, keypoints, _ = clips()
    with pytest.raises(ValueError, match="keypoints"):
        model(images, keypoints[:, :, :14])
    with pytest.raises(ValueError, match="images"):
        model(images[:, 0], keypoints)


@pytest.mark.parametrize("device,dtype", AUTOCAST_STEP_CASES)
@pytest.mark.parametrize("name", ["rgcn", "lgcn"])
def test_training_step_under_autocast_matches_reference(name, device, dtype):
    """Forward, loss, backward and an optimiser step under autocast: finite, and the fused ops
    agree with the reference ops within the dtype's tolerance."""
    assert_autocast_step_matches_reference(name, dtype, device)

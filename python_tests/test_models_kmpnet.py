"""KMPNet: architecture, graph, fusion, losses, inference without the graph branch, backends."""
import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from keypointops import reference
from keypointops.data.keypoint_files import COCO17_FLIP
from keypointops.models import build_model, get_preset
from keypointops.models.backbones import load_pretrained
from keypointops.models.kmpnet import JRPP_GROUPS, KMPNet, flip_frames, headless_keypoints
from keypointops.nn import GENConv, KeypointGather
from helpers import one_thread, optimisation_step  # noqa: F401 (one_thread: an autouse fixture)
from helpers import AUTOCAST_STEP_CASES, assert_autocast_step_matches_reference
from test_models_backbones import torchvision_state_dict

B, T, H, W, N_CLS = 2, 3, 64, 32, 5



def small(**options):
    torch.manual_seed(0)
    if options.get("visual", "pcb") == "pcb":
        options.setdefault("reduced_dim", 16)
    return KMPNet(N_CLS, depth=18, width=0.125, **options)


def batch(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, T, 3, H, W, generator=g, dtype=dtype)
    keypoints = torch.rand(B, T, 17, 3, generator=g, dtype=dtype) * torch.tensor([W, H, 1.0], dtype=dtype)
    keypoints[..., 2] += 0.1
    keypoints[0, 1, 9] = 0.0                          # a missing joint (COCO 9 = node 4, L-wrist)
    return images, keypoints, torch.tensor([1, 3])


class OpSpy(TorchDispatchMode):
    """Records the namespaces of every aten / custom op that runs."""

    def __init__(self):
        super().__init__()
        self.namespaces = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.namespaces.add(func.namespace)
        return func(*args, **(kwargs or {}))


def test_architecture_and_parameter_counts():
    model = KMPNet(625)                               # full size, the paper's model
    convs = [m for m in model.modules() if isinstance(m, GENConv)]
    assert len(convs) == 27 and [len(part) for part in model.gcn] == [5, 7, 11, 4]
    assert all(conv.aggr_module.t.shape == (1,) and conv.aggr_module.learn for conv in convs)
    # docs/models/kmpnet.md: blocks 457,947; W_up 249,600; W_down 250,176; post-LN 128; 5 heads 85,760
    count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    assert count(model.gcn.parameters()) == 457947
    assert count(model.up.parameters()) == 249600 and count(model.down.parameters()) == 250176
    classifiers = sum(h.classifier.weight.numel() for h in model.heads)
    assert count(model.graph_parameters()) - classifiers == 1043611
    assert model.backbone.strides == (4, 4, 8, 16, 16)
    assert [g.spatial_scale for g in model.gather] == [1 / 4, 1 / 4, 1 / 8, 1 / 16, 1 / 16]
    assert all((g.roi_size, g.sampling_ratio, g.aligned) == (0.0, 1, True) for g in model.gather)
    released = KMPNet(625, gather="released").gather
    assert all((g.roi_size, g.sampling_ratio, g.aligned) == (1.0, 1, False) for g in released)
    assert KMPNet(625, visual="resnet50", depth=18, width=0.125).gather[-1].spatial_scale == 1 / 32


def test_per_clip_graph():
    model = small()
    graph = model.graph(1, 16, torch.device("cpu"))
    assert graph.num_nodes == 192 and graph.num_edges == 712
    edges = set(map(tuple, graph.edge_index.t().tolist()))
    assert len(edges) == 712 and all(u != v for u, v in edges) and all((v, u) in edges for u, v in edges)
    degree = graph.in_degree().view(16, 12)
    spatial = torch.tensor([3, 3, 2, 2, 1, 1, 2, 2, 2, 2, 1, 1])
    assert torch.equal(degree[0], spatial + 1) and torch.equal(degree[15], spatial + 1)
    assert torch.equal(degree[1:15], (spatial + 2).expand(14, 12))
    assert model.graph(1, 16, torch.device("cpu")) is graph            # cached
    assert small(graph="spatial").graph(1, 16, "cpu").num_edges == 352
    temporal = small(graph="temporal").graph(2, 16, "cpu")
    assert temporal.num_edges == 2 * 360 and bool((temporal.in_degree() >= 1).all())


def test_train_and_eval_shapes():
    images, keypoints, pids = batch()
    model = small().train()
    out = model(images, keypoints)
    names = [f"stripe{i}" for i in range(1, 5)] + [f"graph_{g}" for g in JRPP_GROUPS]
    assert list(out["logits"]) == names
    assert all(x.shape == (B * T, N_CLS) for x in out["logits"].values())
    total, parts = model.loss(out, pids)
    assert list(parts) == [f"ce_{n}" for n in names]
    torch.testing.assert_close(total, torch.stack(list(parts.values())).mean())
    model.eval()
    assert model(images, keypoints).shape == (B, 4 * model.backbone.channels[-1])
    assert model(images).shape == (B, 4 * model.backbone.channels[-1])      # no keypoints needed
    x_g = small(embedding="x_g").eval()(images, keypoints)
    assert x_g.shape == (B, 5 * 256)
    r50 = small(visual="resnet50").train()
    out = r50(images, keypoints)
    assert list(out["logits"])[0] == "global" and len(out["logits"]) == 6
    assert r50.eval()(images).shape == (B, r50.backbone.channels[-1])


def test_full_size_forward():
    model = build_model("kmpnet", 7).train()
    images = torch.randn(1, 2, 3, 256, 128)
    keypoints = torch.rand(1, 2, 17, 3) * torch.tensor([128.0, 256.0, 1.0])
    out = model(images, keypoints)
    assert len(out["logits"]) == 9 and all(x.shape == (2, 7) for x in out["logits"].values())
    with torch.no_grad():
        emb = model.eval()(images, keypoints)
    assert emb.shape == (1, 8192)


def test_eval_runs_no_fused_op_and_no_graph_parameter(monkeypatch):
    images, keypoints, _ = batch()
    model = small().eval()
    expected = model.visual.eval()(images)
    called = []
    for module in [*model.gather, *model.up, *model.down, *model.gcn.modules(), *model.heads, model.post_norm]:
        module.register_forward_pre_hook(lambda m, args: called.append(type(m).__name__))

    def forbidden(*args, **kwargs):
        raise AssertionError("a keypointops op ran in eval mode")
    monkeypatch.setattr("keypointops.nn.keypoint_gather.keypoint_gather", forbidden)
    monkeypatch.setattr("keypointops.nn.gen_conv.msg_pass", forbidden)
    spy = OpSpy()
    with spy:
        emb = model(images, keypoints)
    assert "keypointops" not in spy.namespaces and "aten" in spy.namespaces
    assert called == []
    torch.testing.assert_close(emb, expected)
    emb.sum().backward()
    assert all(p.grad is None for p in model.graph_parameters())
    assert model.backbone.conv1.weight.grad is not None
    # each stripe of each frame is unit norm before the clip average: T = 1 keeps it
    one = model(images[:, :1]).view(B, -1, 4).norm(dim=1)
    torch.testing.assert_close(one, torch.ones(B, 4))


def test_graph_loss_reaches_stage1_through_keypoint_gather(monkeypatch):
    images, keypoints, pids = batch()

    def graph_loss_grad(model):
        out = model.train()(images, keypoints)
        _, parts = model.loss(out, pids)
        torch.stack([v for k, v in parts.items() if k.startswith("ce_graph")]).mean().backward()
        return model.backbone.conv1.weight.grad

    model = small()
    grad = graph_loss_grad(model)
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in model.visual.head.parameters())     # the PCB head is not involved
    forward = KeypointGather.forward
    monkeypatch.setattr(KeypointGather, "forward", lambda self, f, *a: forward(self, f.detach(), *a))
    model = small()
    # without the gather's gradient only the invalid joints' global means would connect the CNN:
    # with every joint valid, nothing reaches it
    keypoints[0, 1, 9] = torch.tensor([3.0, 4.0, 1.0])
    grad = graph_loss_grad(model)
    assert grad is None or not grad.any()



def test_graph_gradient_false_trains_the_graph_branch_but_not_the_cnn():
    images, keypoints, pids = batch()
    keypoints[0, 1, 9] = torch.tensor([0.0, 0.0, 0.0])    # a missing joint: its node is the map's mean
    results = {}
    for graph_gradient in (True, False):
        model = small(graph_gradient=graph_gradient).train()
        total, parts = model.loss(model(images, keypoints), pids)
        torch.stack([v for k, v in parts.items() if k.startswith("ce_graph")]).mean().backward()
        results[graph_gradient] = (total.detach(), model.backbone.conv1.weight.grad,
                                   [p.grad for p in model.graph_parameters() if p.requires_grad])
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)  # the same forward
    assert results[True][1].abs().sum() > 0
    assert results[False][1] is None                       # no graph loss reaches the CNN
    assert all(g is not None for g in results[False][2]) and any(g.abs().sum() > 0 for g in results[False][2])


def spy_gather(monkeypatch):
    calls = []
    forward = KeypointGather.forward

    def record(self, features, kp, valid=None):
        out = forward(self, features, kp, valid)
        calls.append((features, kp, valid, out))
        return out
    monkeypatch.setattr(KeypointGather, "forward", record)
    return calls


def test_keypoint_sampling_and_invalid_joints(monkeypatch):
    images, keypoints, pids = batch()
    keypoints[1, 2, 5] = torch.tensor([0.0, 7.0, 1.0])      # only x <= 0: valid (released rule)
    keypoints[1, 2, 6] = torch.tensor([-2.0, -1.0, 1.0])    # x <= 0 and y <= 0: invalid
    keypoints[1, 2, 7] = torch.tensor([5.0, 9.0, 0.0])      # confidence 0: a missing joint, invalid
    xy, valid = headless_keypoints(keypoints)
    assert valid.shape == (B * T, 12) and int((~valid).sum()) == 3
    assert not valid[1, 4] and valid[5, 0] and not valid[5, 1] and not valid[5, 2]
    calls = spy_gather(monkeypatch)
    model = small().train()
    stem = []
    model.backbone.maxpool.register_forward_hook(lambda m, i, o: stem.append(o))
    nodes = []
    model.down[0].register_forward_pre_hook(lambda m, args: nodes.append(args[0]))
    model(images, keypoints)
    assert len(calls) == 5
    features, kp, passed_valid, _ = calls[0]
    assert features is stem[0]
    torch.testing.assert_close(kp, xy)
    assert torch.equal(passed_valid, valid)
    expected = reference.keypoint_gather(stem[0], xy, 0.25, roi_size=0.0, sampling_ratio=1, aligned=True)
    expected = torch.where(valid[..., None], expected, stem[0].mean((2, 3))[:, None])
    torch.testing.assert_close(nodes[0], expected.flatten(0, 1))
    torch.testing.assert_close(nodes[0].view(B * T, 12, -1)[1, 4], stem[0][1].mean((1, 2)))


@pytest.mark.parametrize("mirror", [True, False])
def test_flipped_frames_have_mirrored_keypoints(monkeypatch, mirror):
    images, keypoints, _ = batch()
    flipped = torch.tensor([True, False, True, False, False, True])
    x, xy = flip_frames(images.flatten(0, 1), keypoints[:, :, 5:, :2].flatten(0, 1), flipped, mirror)
    assert torch.equal(x[0], images[0, 0].flip(-1)) and torch.equal(x[1], images[0, 1])
    if mirror:
        torch.testing.assert_close(xy[0, :, 0], W - keypoints[0, 0, 5:, 0])
    else:
        torch.testing.assert_close(xy[0], keypoints[0, 0, 5:, :2])
    torch.testing.assert_close(xy[1], keypoints[0, 1, 5:, :2])
    # inside the model (frame_flip=1: every training frame): the joints sampled are mirrored and the
    # missing joint stays invalid
    calls = spy_gather(monkeypatch)
    small(frame_flip=1.0, flip_keypoints=mirror).train()(images, keypoints)
    _, kp, valid, _ = calls[0]
    xy, expected_valid = headless_keypoints(keypoints)
    expected = torch.stack([W - xy[..., 0], xy[..., 1]], -1) if mirror else xy
    torch.testing.assert_close(kp, expected)
    assert torch.equal(valid, expected_valid) and not valid[1, 4]


def test_reference_backend_gives_the_same_loss_and_gradients():
    images, keypoints, pids = batch(torch.float64)
    results = []
    for backend in ("auto", "reference"):
        model = small(ops_backend=backend).double().train()
        assert all(g.backend == backend for g in model.gather)
        assert all(m.backend == backend for m in model.modules() if isinstance(m, GENConv))
        torch.manual_seed(1)
        total, _ = model.loss(model(images, keypoints), pids)
        total.backward()
        results.append((total, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-8)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 100
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-8, atol=1e-8, msg=name)


def test_state_dict_round_trip():
    images, keypoints, pids = batch()
    a, b = small(), small(graph="spatial")
    b.load_state_dict(a.state_dict())            # fresh b has other random weights until loaded
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    c = KMPNet(N_CLS, depth=18, width=0.125, reduced_dim=16)
    c.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    for model in (a, c):
        model.eval()
    torch.testing.assert_close(a(images), c(images), rtol=0, atol=0)
    torch.manual_seed(3)
    la, _ = a.train().loss(a(images, keypoints), pids)
    torch.manual_seed(3)
    lc, _ = c.train().loss(c(images, keypoints), pids)
    assert la.item() == lc.item()


def test_torchvision_resnet50_weights_load(tmp_path):
    path = tmp_path / "resnet50.pth"
    state = torchvision_state_dict(50)
    torch.save(state, path)
    model = KMPNet(N_CLS)
    load_pretrained(model, path)
    assert torch.equal(model.visual.backbone.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])
    with pytest.raises(ValueError, match="do not fit"):
        load_pretrained(small(), path)


def test_one_optimisation_step_lowers_the_loss():
    images, keypoints, pids = batch(seed=4)
    model = small().train()
    before, after = optimisation_step(model, images, keypoints, pids, lr=1e-3)
    assert after < before - 1e-3


def test_presets_and_bad_options():
    for preset in ("cpu", "paper"):
        settings = get_preset("kmpnet", preset)
        model = build_model("kmpnet", 3, **settings["model"])
        assert isinstance(model, KMPNet)
    assert get_preset("kmpnet", "paper")["train"]["frames"] == 16
    with pytest.raises(ValueError, match="graph must be one of"):
        small(graph="none")
    with pytest.raises(ValueError, match="visual must be one of"):
        small(visual="mgh")
    with pytest.raises(ValueError, match="embedding"):
        small(embedding="both")
    with pytest.raises(ValueError, match="ops_backend"):
        small(ops_backend="gpu")
    with pytest.raises(ValueError, match="keypoints \\[B, T, 17, 3\\] are required"):
        small().train()(torch.randn(1, 2, 3, H, W))
    with pytest.raises(ValueError, match="keypoints must be"):
        small().train()(torch.randn(1, 2, 3, H, W), torch.zeros(1, 2, 12, 3))


def _bilinear(feature: torch.Tensor, u: float, v: float) -> torch.Tensor:
    """The bilinear sample of ``feature [C, h, w]`` at column ``u``, row ``v`` (feature cells, centres
    at integers), written out by hand for an interior point."""
    j, i = int(u // 1), int(v // 1)
    a, b = u - j, v - i
    return ((1 - a) * (1 - b) * feature[:, i, j] + a * (1 - b) * feature[:, i, j + 1]
            + (1 - a) * b * feature[:, i + 1, j] + a * b * feature[:, i + 1, j + 1])


@pytest.mark.parametrize("gather,shift", [("keypoint", -0.5), ("released", 0.5)])
def test_node_feature_is_read_at_the_keypoint(gather, shift):
    """A keypoint at input pixel (x, y) (pixel i covers [i, i + 1)) lies at feature coordinates
    (x / s - 0.5, y / s - 0.5) of a stride-s map: the default gather reads there; the released
    code's sampling reads one feature cell further right and down."""
    model = small(gather=gather)
    strides = model.backbone.strides
    height, width = 128, 64
    for k, stride in enumerate(strides):
        features = torch.randn(1, 3, height // stride, width // stride)
        x, y = 0.37 * width + 1.3, 0.41 * height + 2.9
        u, v = x / stride + shift, y / stride + shift
        xy = torch.tensor([[[x, y]]])
        nodes = model.gather[k](features, xy + model.gather_shift, torch.ones(1, 1, dtype=torch.bool))
        torch.testing.assert_close(nodes[0, 0], _bilinear(features[0], u, v))


def _corruptions(keypoints):
    """The keypoint-corruption settings applied to a clip batch (as the evaluation's controls)."""
    shuffled = keypoints.roll(1, 0)
    zeroed = torch.zeros_like(keypoints)
    swapped = keypoints[:, :, list(COCO17_FLIP)]
    shifted = keypoints + torch.tensor([0.0, H / 4, 0.0])
    return {"shuffled": shuffled, "zeroed": zeroed, "swapped": swapped, "shifted": shifted}


def test_x_c_ignores_keypoints_while_the_graph_loss_reads_them():
    """The graph branch is dropped at inference: x_c is bit-identical under every keypoint
    corruption; in training the graph heads' losses change with the keypoints (swapped labels are
    a symmetry of the graph and of three of the five JRPP groups, so only shuffled, zeroed and
    shifted keypoints are asked to change every head), the PCB stripes' losses do not."""
    images, keypoints, pids = batch()
    model = small().eval()
    with torch.no_grad():
        x_c = model(images, keypoints)
        assert torch.equal(model(images), x_c)
        for name, corrupted in _corruptions(keypoints).items():
            assert torch.equal(model(images, corrupted), x_c), name
    model.train()

    def losses(kp):
        torch.manual_seed(0)
        return model.loss(model(images, kp), pids)[1]
    clean = losses(keypoints)
    for name in ("shuffled", "zeroed", "shifted"):
        parts = losses(_corruptions(keypoints)[name])
        for head, value in parts.items():
            if head.startswith("ce_graph_"):
                assert not torch.equal(value, clean[head]), (name, head)
            else:   # the visual branch's stripes never see the keypoints
                assert torch.equal(value, clean[head]), (name, head)


def test_init_from_stage_a_fills_the_visual_branch_only():
    torch.manual_seed(1)
    stage_a = build_model("pcb", N_CLS, depth=18, width=0.125, reduced_dim=16)
    model = small()
    graph = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("visual.")}
    model.init_from_state(stage_a.state_dict(), "pcb")
    for key, value in stage_a.state_dict().items():
        assert torch.equal(model.visual.state_dict()[key], value), key
    for key, value in graph.items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(ValueError, match="starts from a 'pcb' \\(stage A\\) checkpoint, not a 'ctl' one"):
        model.init_from_state(stage_a.state_dict(), "ctl")
    with pytest.raises(ValueError, match="starts from a 'resnet50'"):
        small(visual="resnet50").init_from_state(stage_a.state_dict(), "pcb")


@pytest.mark.parametrize("device,dtype", AUTOCAST_STEP_CASES)
@pytest.mark.parametrize("name", ["kmpnet"])
def test_training_step_under_autocast_matches_reference(name, device, dtype):
    """Forward, loss, backward and an optimiser step under autocast: finite, and the fused ops
    agree with the reference ops within the dtype's tolerance."""
    assert_autocast_step_matches_reference(name, dtype, device)

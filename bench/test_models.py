"""Whole re-ID models: a training step and the eval-mode forward, fused ops against the usual build.

Models: KMPNet, CTL, AlignNet and RGCN (``keypointops.models.build_model``), each built twice from
the same seed: ``ops_backend="auto"`` (impl ``keypointops``: the fused ops) and
``ops_backend="reference"`` (impl ``reference``: plain PyTorch, the baseline).  KMPNet also as
built with PyTorch Geometric (impl ``pyg``, the baseline of KMPNet's groups as in the authors'
released code): the reference-backend model with each of its 27 ``keypointops.nn`` GENConv /
DeepGCNLayer blocks replaced by ``torch_geometric.nn.GENConv`` / ``DeepGCNLayer`` built with the same
arguments and loaded with the same state dict (``strict=True``), run on the graph's ``edge_index``.

Passes: ``train step`` (forward + ``model.loss`` + backward + Adam step, train mode) and
``eval fwd`` (eval mode, no_grad: the clip embedding ``[B, D]``).  For KMPNet also ``graph branch``:
the 27 res+ GENConv blocks alone on fixed keypoint features ``[B*T*12, 64]`` (train mode, forward
and forward+backward): the part of the model that ``msg_pass`` speeds up, without the CNN around it.

Sizes: the ``cpu`` preset of each model (``get_preset(name, "cpu")``: batch 16 clips x 4 frames,
128 x 64, ResNet-18 at width 0.25); ``KEYPOINTOPS_BENCH_SMALL=1``: 2 clips x 2 frames, 64 x 32,
backbone width 0.125 (a smoke run of every path).  Inputs: fixed seed, random images, keypoints
inside the frame with confidence in (0.3, 1), pids ``arange(B) // 2`` (two clips per identity, so
triplet losses have positives).  On a shared machine: ``--kp-threads 1 --kp-interleave 7
--benchmark-timer time.process_time`` (one thread, CPU time, each group's implementations timed in
turn; see ``bench/conftest.py``).
"""
import copy

import pytest
import torch

from keypointops.models import build_model, get_preset

from conftest import SMALL, timed_pass

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MODELS = ["kmpnet", "ctl", "alignnet", "rgcn"]
IMPLS = ["keypointops", "reference", "pyg"]
BACKENDS = {"keypointops": "auto", "reference": "reference", "pyg": "reference"}
PASSES = ["train step", "eval fwd"]


def case_of(name: str) -> dict:
    """Model options and input sizes of ``name``: its cpu preset, or the smoke sizes."""
    preset = get_preset(name, "cpu")
    options, train = copy.deepcopy(preset["model"]), preset["train"]
    if SMALL:
        batch, frames, height, width = 2, 2, 64, 32
        options["width"] = 0.125
    else:
        batch, frames, height, width = train["batch_size"], train["frames"], train["height"], train["width"]
    if "frames" in options:          # CTL: the temporal conv is built for T frames
        options["frames"] = frames
    if "input_size" in options:      # RGCN: keypoint coordinates normalised by the input size
        options["input_size"] = (height, width)
    return dict(options=options, batch=batch, frames=frames, height=height, width=width)


def make_inputs(case: dict, device: str):
    gen = torch.Generator().manual_seed(0)
    B, T, H, W = case["batch"], case["frames"], case["height"], case["width"]
    images = torch.randn(B, T, 3, H, W, generator=gen)
    u = torch.rand(B, T, 17, 3, generator=gen)
    keypoints = torch.stack([(0.05 + 0.9 * u[..., 0]) * W, (0.05 + 0.9 * u[..., 1]) * H,
                             0.3 + 0.7 * u[..., 2]], -1)
    pids = torch.arange(B) // 2
    return images.to(device), keypoints.to(device), pids.to(device)


def pyg_block(block):
    """A ``torch_geometric.nn.DeepGCNLayer(GENConv)`` equal to KMPNet's ``keypointops.nn`` block."""
    pyg_nn = pytest.importorskip("torch_geometric.nn")
    conv = block.conv
    c = conv.out_channels
    # KMPNet._block's GENConv arguments (checked by the strict state-dict load below)
    new_conv = pyg_nn.GENConv(c, c, aggr="softmax", t=1.0, learn_t=True, num_layers=2, norm="layer",
                              bias=True)
    new = pyg_nn.DeepGCNLayer(new_conv, copy.deepcopy(block.norm), copy.deepcopy(block.act),
                              block=block.block, dropout=block.dropout, ckpt_grad=block.ckpt_grad)
    new.load_state_dict(block.state_dict(), strict=True)
    return new.to(next(block.parameters()).device)


def to_pyg(model):
    """Replaces every graph block of a KMPNet by its PyG twin and feeds the blocks ``edge_index``."""
    for k, blocks in enumerate(model.gcn):
        model.gcn[k] = torch.nn.ModuleList(pyg_block(block) for block in blocks)
    graph_of = model.graph
    model.graph = lambda clips, frames, device: graph_of(clips, frames, device).edge_index
    return model


def make_model(name: str, impl: str, case: dict, num_classes: int, device: str):
    torch.manual_seed(0)
    model = build_model(name, num_classes, ops_backend=BACKENDS[impl], **case["options"]).to(device)
    if impl == "pyg":
        model = to_pyg(model)
    return model


def make_fn(model, pass_: str, images, keypoints, pids):
    if pass_ == "eval fwd":
        model.eval()

        def fn():
            with torch.no_grad():
                return model(images, keypoints)
        return fn

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def fn():
        optimizer.zero_grad(set_to_none=True)
        total, _ = model.loss(model(images, keypoints), pids)
        total.backward()
        optimizer.step()
        return total
    return fn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", MODELS)
def test_model(measure, name, impl, pass_, device):
    if impl == "pyg" and name != "kmpnet":
        pytest.skip("the PyG-built variant is KMPNet's (GENConv / DeepGCNLayer graph branch)")
    if impl == "pyg" and pass_ == "eval fwd":
        pytest.skip("KMPNet's eval-mode embedding (x_c) runs the visual branch only: no graph branch")
    if impl == "pyg":
        pytest.importorskip("torch_geometric.nn")
    case = case_of(name)
    images, keypoints, pids = make_inputs(case, device)
    model = make_model(name, impl, case, max(1, case["batch"] // 2), device)
    fn = make_fn(model, pass_, images, keypoints, pids)
    if pass_ == "train step":
        loss = fn()
        assert torch.isfinite(loss), f"{name} {impl}: non-finite loss {loss}"
    # KMPNet's graph branch is compared against PyG (the authors' code), the others against the reference
    baseline = impl == ("pyg" if name == "kmpnet" and pass_ == "train step" else "reference")
    measure(fn, group=f"{name} {pass_} {device}", impl=impl, device=device, baseline=baseline)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("impl", IMPLS)
def test_kmpnet_graph_branch(measure, impl, backward, device):
    """KMPNet's 27 res+ GENConv blocks on fixed keypoint features (the GCN part of the graph branch)."""
    if impl == "pyg":
        pytest.importorskip("torch_geometric.nn")
    case = case_of("kmpnet")
    model = make_model("kmpnet", impl, case, max(1, case["batch"] // 2), device).train()
    B, T = case["batch"], case["frames"]
    graph = model.graph(B, T, torch.device(device))   # a Graph, or its edge_index for PyG
    blocks = [block for blocks in model.gcn for block in blocks]
    channels = model.post_norm.normalized_shape[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B * T * 12, channels, generator=gen).to(device).requires_grad_(backward)

    def forward():
        h = x
        for block in blocks:
            h = block(h, graph)
        return h

    fn = timed_pass(forward, [x], backward)
    measure(fn, group=f"kmpnet graph branch {'fwd+bwd' if backward else 'fwd'} {device}",
            impl=impl, device=device, baseline=impl == "pyg")

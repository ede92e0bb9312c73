"""Engine: exact resume after kill -9, two-process DDP gradients, atomic and checked checkpoints.

Tiny sizes throughout: a synthetic dataset of a few identities, KMPNet at 1/8 width on 64 x 32
frames, 2 frames per clip; the command's runs give KMPNet one graph block per fusion instead of 27
(every kind of layer is still run, and a torch.compile capture's time grows with the layers)."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from helpers import without_run_plots  # noqa: F401 (the fixture)
from keypointops import engine
from keypointops.checkpoints import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from keypointops.models.presets import TrainSettings

TINY_DATA = dict(num_train_ids=6, num_test_ids=5, frames=6, size=[64, 32], progress=False)
TINY_TRAIN = dict(batch_size=4, frames=2, height=64, width=32)
CLI_ARGS = ["--workers", "0", "--threads", "1", "--max-steps", "2", "--batch-size", "4", "--frames", "2", "--height", "64",
            "--width", "32", "--model-option", "width=0.125", "--model-option", "gcn_split=[1,1,1,1]", "--no-baselines"]
CLI_ARGS += [f"--data-option={k}={v}" for k, v in TINY_DATA.items() if k != "progress"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One synthetic dataset for the module (KEYPOINTOPS_CACHE, so subprocesses reuse it)."""
    path = tmp_path_factory.getbasetemp() / "keypointops-cache"
    saved = os.environ.get("KEYPOINTOPS_CACHE")
    os.environ["KEYPOINTOPS_CACHE"] = str(path)
    from keypointops.data import build_dataset
    build_dataset("synthetic", **TINY_DATA)
    yield path
    if saved is None:
        del os.environ["KEYPOINTOPS_CACHE"]
    else:
        os.environ["KEYPOINTOPS_CACHE"] = saved


def tiny_config(**overrides):
    return engine.make_config("kmpnet", "cpu", "synthetic", workers=0, train_overrides={**TINY_TRAIN, **overrides},
                              model_overrides=dict(width=0.125), data_options=dict(TINY_DATA))


def run_cli(args, env):
    return subprocess.Popen([sys.executable, "-m", "keypointops", "train", *CLI_ARGS, *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_kill_and_resume_equals_uninterrupted(cache, tmp_path):
    env = dict(os.environ, KEYPOINTOPS_CACHE=str(cache), OMP_NUM_THREADS="1")
    # Uninterrupted: 3 epochs.
    full = run_cli(["--epochs", "3", "--out", str(tmp_path / "full")], env)
    # Killed with SIGKILL as soon as the checkpoint of epoch 1 exists, then resumed.
    killed = run_cli(["--epochs", "3", "--out", str(tmp_path / "killed")], env)
    ckpt = tmp_path / "killed" / "model.pt"
    while not ckpt.exists() and killed.poll() is None:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert load_checkpoint(ckpt)["epoch"] < 3
    resumed = run_cli(["--epochs", "3", "--out", str(tmp_path / "killed"), "--resume"], env)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert full.wait(timeout=300) == 0, full.stderr.read()
    a = load_checkpoint(tmp_path / "full" / "model.pt")
    b = load_checkpoint(ckpt)
    assert a["epoch"] == b["epoch"] == 3
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # the epochs redone after the kill are not logged twice


def save_stub_checkpoint(path, config, num_classes=6):
    """A checkpoint of ``config`` with empty state dicts (enough for the checks before a resume)."""
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "config": config, "num_classes": num_classes, "epoch": 1,
                           "model": {}, "optimizer": {}, "scheduler": {}})


def test_resume_refuses_other_settings(tmp_path):
    save_stub_checkpoint(tmp_path / "model.pt", tiny_config())
    with pytest.raises(CheckpointError, match="train.lr"):
        engine.train(tiny_config(epochs=2, lr=0.5), tmp_path, resume=True)


DDP_SCRIPT = """
import sys, torch
from keypointops import distributed, engine
from test_engine import tiny_config
rank, world_size = distributed.dist_info()
device = distributed.device_for_rank()
distributed.init_distributed(world_size, device)
config = tiny_config()
dataset, loader, core = engine.build_run(config, rank=rank, world_size=world_size)
model = distributed.wrap_ddp(core, device) if world_size > 1 else core
model.train()
loader.batch_sampler.set_epoch(0)
batch = next(iter(loader))
torch.manual_seed(engine.epoch_seed(config["seed"], 0, rank))
engine.forward_backward(model, core, batch, device)
grads = {n: p.grad for n, p in core.named_parameters() if p.grad is not None}
torch.save({"batch": batch, "grads": grads}, f"{sys.argv[1]}/rank{rank}.pt")
"""


def test_ddp_two_processes_first_step_gradients(cache, tmp_path):
    """Two gloo ranks, each on its shard of the first global batch: the averaged gradients equal
    one process's gradients for the same two batches (each batch a forward of its own, as each
    rank's batch-norm statistics are its own), averaged."""
    script = tmp_path / "ddp_step.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = dict(os.environ, KEYPOINTOPS_CACHE=str(cache), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # The ranks saw disjoint tracklets.
    assert not set(ranks[0]["batch"]["index"].tolist()) & set(ranks[1]["batch"]["index"].tolist())
    # One process: the same two batches, gradients averaged.
    config = tiny_config()
    _, _, core = engine.build_run(config)
    core.train()
    total = {}
    for r, saved in enumerate(ranks):
        core.zero_grad(set_to_none=True)
        torch.manual_seed(engine.epoch_seed(config["seed"], 0, r))
        engine.forward_backward(core, core, saved["batch"], torch.device("cpu"))
        for n, p in core.named_parameters():
            if p.grad is not None:
                total[n] = total.get(n, 0) + p.grad / 2
    assert set(total) == set(ranks[0]["grads"])
    for n, g in total.items():
        torch.testing.assert_close(ranks[0]["grads"][n], g, rtol=1e-5, atol=1e-6, msg=n)
        torch.testing.assert_close(ranks[1]["grads"][n], g, rtol=1e-5, atol=1e-6, msg=n)


def test_lr_schedule():
    t = TrainSettings(warmup_epochs=2, lr_gamma=0.1, lr_milestones=[3, 5])
    assert [round(engine.lr_factor(e, t), 6) for e in range(6)] == [0.1, 0.55, 1.0, 0.1, 0.1, 0.01]


def test_clip_shape_overrides_reach_the_model_options():
    ctl = engine.make_config("ctl", "cpu", train_overrides=dict(frames=6))
    assert ctl["model_options"]["frames"] == 6
    rgcn = engine.make_config("rgcn", "cpu", train_overrides=dict(height=64, width=32))
    assert rgcn["model_options"]["input_size"] == [64, 32]
    assert "frames" not in engine.make_config("kmpnet", "cpu", train_overrides=dict(frames=2))["model_options"]


def test_failing_evaluation_keeps_the_trained_checkpoint(cache, tmp_path, monkeypatch):
    def unreadable_test_image(*args, **kwargs):
        raise ValueError("cannot decode image bbox_test/0001/0001C1T0001F001.jpg")

    monkeypatch.setattr(engine, "evaluate_models", unreadable_test_image)
    config = tiny_config(epochs=1)
    config["max_steps"] = 1
    with pytest.raises(ValueError, match="cannot decode image"):
        engine.train(config, tmp_path, log=lambda line: None)
    assert load_checkpoint(tmp_path / "model.pt")["epoch"] == 1  # the training is kept
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_resume_refuses_changed_identities(cache, tmp_path):
    config = tiny_config()
    save_stub_checkpoint(tmp_path / "model.pt", config, num_classes=99)
    with pytest.raises(CheckpointError, match="trained on 99 training identities, the dataset .* now has 6"):
        engine.train(config, tmp_path, resume=True)


def test_root_is_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = engine.make_config("kmpnet", "cpu", "synthetic", "data/synthetic")
    assert config["root"] == str(tmp_path / "data" / "synthetic")


@pytest.mark.parametrize("grad_clip", [-1.0, 0.0, float("nan")])
def test_grad_clip_must_be_positive(grad_clip):
    with pytest.raises(ValueError, match="grad_clip must be > 0"):
        tiny_config(grad_clip=grad_clip)


def test_run_folder_of_a_run_killed_before_its_first_checkpoint_is_reused(cache, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("")
    engine._prepare_run_folder(tmp_path, resume=False, overwrite=False)  # nothing trained is lost
    assert not (tmp_path / "config.json").exists()
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(FileExistsError, match="metrics.jsonl"):
        engine._prepare_run_folder(tmp_path, resume=False, overwrite=False)


def first_conv_inputs_and_outputs(model):
    """Records (input, output) of the model's first convolution on each forward."""
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    return seen


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_forward_backward_amp_and_channels_last(cache, amp):
    """--amp: the convolutions run in the autocast dtype, the gradients stay float32 and follow the
    float32 step's within that dtype's precision; fp16 scales the loss (GradScaler).
    --channels-last: the images reach the first convolution in channels_last."""
    config = tiny_config()
    torch.manual_seed(0)
    dataset, loader, model = engine.build_run(config)
    batch = next(iter(loader))
    reference = engine.build_run(config)[2]
    reference.load_state_dict(model.state_dict())
    for module in (*model.modules(), *reference.modules()):
        if isinstance(module, torch.nn.Dropout):  # its mask follows the memory layout
            module.eval()
    model.to(memory_format=torch.channels_last)
    seen = first_conv_inputs_and_outputs(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4) if amp == "fp16" else None
    torch.manual_seed(1)
    loss, _ = engine.forward_backward(model, model, batch, torch.device("cpu"), amp, scaler, channels_last=True)
    torch.manual_seed(1)
    ref_loss, _ = engine.forward_backward(reference, reference, batch, torch.device("cpu"))
    images, output = seen[0]
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    assert output.dtype == {"off": torch.float32, **engine.AMP_DTYPES}[amp]
    # against the contiguous float32 step: channels_last convolutions sum in another order, which
    # moves float32 gradients by ~2e-4 (relative norm) through the network; bf16 moves them ~11 %
    rtol = {"off": 1e-3, "bf16": 0.2, "fp16": 0.05}[amp]
    assert abs(loss.item() - ref_loss.item()) <= rtol * abs(ref_loss.item())
    scale = scaler.get_scale() if scaler is not None else 1.0
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]) / scale
    ref_grad = torch.cat([p.grad.flatten() for p in reference.parameters() if p.grad is not None])
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    assert (grad - ref_grad).norm() <= rtol * ref_grad.norm()


def test_train_with_amp_channels_last_and_compile(cache, tmp_path, without_run_plots):
    """The speed settings through `keypointops train` at a tiny size: one step each of fp16 with
    its gradient scaler, bf16 with channels_last, and torch.compile (the aot_eager backend: the
    graph capture of the model and its ops; inductor would spend minutes generating code here).
    The runs' plots are not drawn (test_cli.py's train run checks them)."""
    from keypointops import cli
    for name, flags in (("fp16", ["--amp", "fp16"]), ("bf16-nhwc", ["--amp", "bf16", "--channels-last"]),
                        ("compiled", ["--compile", "aot_eager"])):
        out = tmp_path / name
        cli.main(["train", *CLI_ARGS, "--epochs", "1", "--max-steps", "1", "--out", str(out), *flags])
        saved = load_checkpoint(out / "model.pt", "kmpnet")["config"]
        assert (saved["amp"], saved["channels_last"], saved["compile"]) == {
            "fp16": ("fp16", False, None), "bf16-nhwc": ("bf16", True, None), "compiled": (None, False, "aot_eager")}[name]
        record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        assert record["steps"] == 1 and math.isfinite(record["loss"])

"""The training presets (keypointops.models.presets) and get_preset."""
import dataclasses
import json

import pytest

from keypointops.models import MODELS, PRESET_NAMES, PRESETS, build_model, get_preset, preset_of
from keypointops.models.presets import Preset, TrainSettings


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_has_json_presets_with_every_train_setting(name):
    assert set(PRESETS[name]) == set(PRESET_NAMES)
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    for preset in PRESET_NAMES:
        settings = get_preset(name, preset)
        assert set(settings) == {"model", "train"} and set(settings["train"]) == fields
        assert json.loads(json.dumps(settings))["train"] == settings["train"]
        assert TrainSettings.from_dict(settings["train"]) == PRESETS[name][preset].train
        t = TrainSettings.from_dict(settings["train"])
        assert t.instances is None or t.batch_size % t.instances == 0


def test_get_preset_returns_fresh_copies():
    settings = get_preset("kmpnet", "cpu")
    settings["train"]["lr_milestones"].append(99)
    settings["model"]["depth"] = 101
    assert get_preset("kmpnet", "cpu")["train"]["lr_milestones"] == [15]
    assert get_preset("kmpnet", "cpu")["model"]["depth"] == 18


def test_kmpnet_paper_preset_is_the_paper_s_training():
    """docs/models/kmpnet.md: T = 16 evenly sampled frames of 256 x 128, 16 random clips a batch (no
    P x K sampling), Adam 3e-4 with weight decay 5e-4, x0.1 at epoch 20 of 60, per-clip flip and
    random erasing; no warmup, gradient clipping or periodic evaluation (momentum is SGD's only)."""
    assert get_preset("kmpnet", "paper")["train"] == {
        "frames": 16, "train_sampling": "evenly", "test_sampling": "evenly", "height": 256, "width": 128,
        "batch_size": 16, "instances": None, "optimizer": "adam", "lr": 3e-4, "weight_decay": 5e-4,
        "momentum": 0.9, "epochs": 60, "lr_milestones": [20], "lr_gamma": 0.1, "warmup_epochs": 0,
        "flip": True, "random_erase": True, "grad_clip": None, "eval_every": 0}


def test_presets_share_the_defaults_and_name_only_what_differs():
    paper = TrainSettings()
    cpu = get_preset("resnet50", "cpu")["train"]
    assert {k for k, v in cpu.items() if v != getattr(paper, k)} == {"frames", "height", "width", "lr", "epochs",
                                                                    "lr_milestones"}


def test_clip_following_options():
    preset = preset_of("ctl", "cpu")
    assert preset.model_options(preset.train.replace(frames=7))["frames"] == 7
    rgcn = preset_of("rgcn", "cpu")
    assert rgcn.model_options(rgcn.train.replace(height=64, width=32))["input_size"] == [64, 32]
    assert preset_of("kmpnet", "cpu").model_options(TrainSettings(frames=2)) == preset_of("kmpnet", "cpu").model
    with pytest.raises(ValueError, match="clip_follows"):
        Preset({}, TrainSettings(), clip_follows=("depth",))


def test_bad_names():
    with pytest.raises(ValueError, match="unknown preset 'gpu'"):
        get_preset("pcb", "gpu")
    with pytest.raises(ValueError, match="unknown model 'pcb6'"):
        get_preset("pcb6", "cpu")
    with pytest.raises(ValueError, match="unknown train setting 'lr_decay'"):
        TrainSettings().replace(lr_decay=0.5)
    with pytest.raises(ValueError, match="unknown train setting 'lr_decay'"):
        TrainSettings.from_dict({"lr_decay": 0.5})


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cpu_preset_builds(name):
    build_model(name, 3, **get_preset(name, "cpu")["model"])


def test_cpu_presets_share_the_test_protocol_and_learning_rate():
    from keypointops.models import MODELS

    for name in MODELS:
        train = get_preset(name, "cpu")["train"]
        assert (train["test_sampling"], train["frames"], train["lr"]) == ("evenly", 4, 1e-3), name

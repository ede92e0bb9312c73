"""Training configuration: the typed train settings (:class:`TrainSettings`) and every model's presets.

A preset is the model's build options plus its train settings.  ``"paper"`` is the paper's setting
(see ``docs/models/<model>.md``); ``"cpu"`` is a small variant that trains from scratch on a 2-core
CPU: every model shares one backbone there (ResNet-18 blocks at a quarter width on 128 x 64 frames,
so that the methods compare on equal trunks), one budget (4 frames per clip, 16 clips per step,
Adam 1e-3, 20 epochs) and one test protocol (4 evenly spaced frames per tracklet), except where a
model's own comment says otherwise.  The settings are built
from shared defaults; each preset names only what differs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["TrainSettings", "Preset", "PRESETS", "PRESET_NAMES", "CPU_BACKBONE"]


@dataclass
class TrainSettings:
    """How a model is trained and evaluated.  The defaults are KMPNet's released configuration
    (Chen et al., AAAI 2022; ``docs/models/kmpnet.md``), the base of the other presets.

    ``frames`` per clip, sampled with ``train_sampling`` / ``test_sampling``
    (:data:`keypointops.data.sampling.SAMPLING_METHODS`); ``height`` x ``width`` input images;
    ``batch_size`` clips per step, ``instances`` clips per identity (None: random batches);
    ``optimizer`` ``"adam"`` or ``"sgd"`` (``momentum`` is used by SGD only); the learning rate
    ``lr`` is multiplied by ``lr_gamma`` at every epoch of ``lr_milestones`` after a linear warmup
    over ``warmup_epochs``; ``flip`` / ``random_erase`` augmentations; ``grad_clip`` the maximum
    gradient norm (None: no clipping); ``eval_every`` N epochs (0: after the last one only).
    """

    frames: int = 16
    train_sampling: str = "evenly"
    test_sampling: str = "evenly"
    height: int = 256
    width: int = 128
    batch_size: int = 16
    instances: int | None = None
    optimizer: str = "adam"
    lr: float = 3e-4
    weight_decay: float = 5e-4
    momentum: float = 0.9
    epochs: int = 60
    lr_milestones: list[int] = field(default_factory=lambda: [20])
    lr_gamma: float = 0.1
    warmup_epochs: int = 0
    flip: bool = True
    random_erase: bool = True
    grad_clip: float | None = None
    eval_every: int = 0

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}: there is nothing to train")
        # clip_grad_norm_ with a negative norm flips every gradient's sign (the loss would climb).
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 (the maximum gradient norm) or None, got {self.grad_clip}")

    def replace(self, **overrides) -> TrainSettings:
        """A copy with ``overrides``; an unknown name raises ValueError listing the known ones."""
        unknown = sorted(set(overrides) - set(self.to_dict()))
        if unknown:
            raise ValueError(f"unknown train setting {unknown[0]!r}; the settings are {sorted(self.to_dict())}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        """The JSON-serialisable dict of the settings (as saved in configs and checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, settings: dict) -> TrainSettings:
        """The settings of a saved dict (a config's ``"train"``)."""
        return cls().replace(**settings)


# Model options that follow the clip shape of the train settings (see Preset.clip_follows).
_CLIP_SHAPE = {"frames": lambda t: t.frames, "input_size": lambda t: [t.height, t.width]}


@dataclass
class Preset:
    """A model's build options (``model``, keyword arguments of :func:`keypointops.models.build_model`)
    and its train settings (``train``).

    ``clip_follows`` names the model options that mirror the clip shape (``"frames"``: the clip
    length; ``"input_size"``: ``[height, width]``), so that a run that changes the train settings'
    clip shape builds a model for it (:meth:`model_options`).
    """

    model: dict
    train: TrainSettings
    clip_follows: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = set(self.clip_follows) - set(_CLIP_SHAPE)
        if unknown:
            raise ValueError(f"Preset: clip_follows must name options of {sorted(_CLIP_SHAPE)}, got {sorted(unknown)}")

    def model_options(self, train: TrainSettings) -> dict:
        """The build options with the clip-shape options set from ``train``."""
        return {**self.model, **{name: _CLIP_SHAPE[name](train) for name in self.clip_follows}}

    def to_dict(self) -> dict:
        """``{"model": {...build options...}, "train": {...train settings...}}`` (fresh copies)."""
        return {"model": dict(self.model), "train": self.train.to_dict()}


PRESET_NAMES = ("cpu", "paper")

PAPER_TRAIN = TrainSettings()
CPU_TRAIN = PAPER_TRAIN.replace(frames=4, height=128, width=64, batch_size=16, lr=1e-3, epochs=20, lr_milestones=[15])
CPU_BACKBONE = dict(depth=18, width=0.25)

# CTL (Liu et al., CVPR 2021; docs/models/ctl.md): "paper" P x K = 8 x 4 restricted-random clips of
# T = 6, every test frame, 240 epochs.  "cpu": CS-GCL width d = C / 8 = 16 as the paper's
# 256 = 2048 / 8, T = 4 (two frames of temporal context in every inner window), 16 clips = 8 ids x 2.
_CTL_PAPER = PAPER_TRAIN.replace(frames=6, train_sampling="restricted_random", test_sampling="all", batch_size=32,
                                 instances=4, epochs=240, lr_milestones=[60, 120, 180])

# AlignNet (Rambhatla & Jones, BMVC 2019; docs/models/alignnet.md): "paper" T = 15 consecutive frames, P x K =
# 8 x 2, SGD 1e-2, ~300 epochs, no augmentation; the paper's plateau schedule becomes fixed
# milestones, and its "all" test sampling pads the last chunk (the loader's contract).  "cpu": last
# stride 1 (an 8 x 4 grid at 128 x 64, so the part masks have 32 cells instead of 8), 16 clips = 8
# ids x 2 (batch-hard mining needs K >= 2), flip on (safe for AlignNet), Adam rather than SGD 1e-2:
# it trains from scratch, where a first SGD 1e-2 step from a random init can raise the loss; part
# masks sharpened by temperature 0.03 and parts summed, not averaged (the AlignNet docstring says why).
_ALIGNNET_PAPER = PAPER_TRAIN.replace(frames=15, train_sampling="random_consecutive", test_sampling="all",
                                      instances=2, optimizer="sgd", lr=1e-2, epochs=300, lr_milestones=[150, 250],
                                      flip=False, random_erase=False)

# RGCN / LGCN (docs/models/rgcn.md): "paper" Adam 3e-4, x0.1 every 200 of 800 epochs, 32 clips =
# 8 ids x 4, T = 10, 256 x 128, flip only.  "cpu": n = 64 hidden channels and the budget, learning
# rate and test sampling every cpu preset shares (from scratch, the paper's 3e-4 is too slow), with
# the paper's consecutive training clips, 16 clips = 4 ids x 4 and no random erasing.
_RGCN_PAPER = PAPER_TRAIN.replace(frames=10, train_sampling="random_consecutive", test_sampling="all",
                                  batch_size=32, instances=4, epochs=800, lr_milestones=[200, 400, 600],
                                  random_erase=False)


def _rgcn_presets() -> dict[str, Preset]:
    return {"paper": Preset({}, _RGCN_PAPER),
            "cpu": Preset(dict(CPU_BACKBONE, hidden=64, input_size=(128, 64)),
                          CPU_TRAIN.replace(train_sampling="random_consecutive", instances=4, random_erase=False),
                          clip_follows=("input_size",))}


_PCB_CPU = Preset(dict(CPU_BACKBONE, reduced_dim=64), CPU_TRAIN)

PRESETS: dict[str, dict[str, Preset]] = {
    "resnet50": {"paper": Preset({}, PAPER_TRAIN), "cpu": Preset(dict(CPU_BACKBONE), CPU_TRAIN)},
    "pcb": {"paper": Preset({}, PAPER_TRAIN), "cpu": _PCB_CPU},
    # the visual branch of the pcb cpu preset, the full graph branch
    "kmpnet": {"paper": Preset({}, PAPER_TRAIN), "cpu": _PCB_CPU},
    "ctl": {"paper": Preset(dict(depth=50, width=1.0, frames=6), _CTL_PAPER, clip_follows=("frames",)),
            "cpu": Preset(dict(CPU_BACKBONE, frames=4, embed_dim=16),
                          CPU_TRAIN.replace(train_sampling="restricted_random", instances=2),
                          clip_follows=("frames",))},
    "alignnet": {"paper": Preset({}, _ALIGNNET_PAPER),
                 "cpu": Preset(dict(CPU_BACKBONE, last_stride=1, temperature=0.03, part_norm="sum"),
                               CPU_TRAIN.replace(train_sampling="random_consecutive", instances=2,
                                                 random_erase=False))},
    "rgcn": _rgcn_presets(),
    "lgcn": _rgcn_presets(),
}

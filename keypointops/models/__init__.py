"""Re-ID models on top of the ops: ``build_model(name, num_classes, **options)`` and ``get_preset``.

Every model follows one contract: ``forward(images [B, T, 3, H, W], keypoints [B, T, 17, 3])``
returns a model-specific dict in training mode (read only by ``model.loss(output, pids) -> (total,
parts)``) and the clip embedding ``[B, D]`` in eval mode; every model takes ``ops_backend=`` and
passes it to every fused op.  Each model's architecture, its deviations from its paper and the
paper's citation: ``docs/models/<model>.md``; training presets: :mod:`keypointops.models.presets`.  A model's module is
imported only when that model is built, so one module failing to import does not affect the others.
"""
from __future__ import annotations

import importlib

from torch import nn

from keypointops.models.presets import PRESET_NAMES, PRESETS, Preset, TrainSettings

__all__ = ["MODELS", "PRESET_NAMES", "PRESETS", "Preset", "TrainSettings", "build_model", "get_preset", "model_class",
           "preset_of"]

# model name -> (module under keypointops.models, class name)
MODELS: dict[str, tuple[str, str]] = {
    "resnet50": ("baselines", "ResNet50Video"),
    "pcb": ("baselines", "PCBVideo"),
    "kmpnet": ("kmpnet", "KMPNet"),
    "alignnet": ("alignnet", "AlignNet"),
    "ctl": ("ctl", "CTL"),
    "rgcn": ("rgcn", "RGCN"),
    "lgcn": ("rgcn", "LGCN"),
}


def _check_model(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")


def _module(name: str):
    _check_model(name)
    return importlib.import_module(f"keypointops.models.{MODELS[name][0]}")


def model_class(name: str) -> type[nn.Module]:
    """The class of model ``name`` (imports its module)."""
    return getattr(_module(name), MODELS[name][1])


def build_model(name: str, num_classes: int, **options) -> nn.Module:
    """Builds model ``name`` (one of :data:`MODELS`) for ``num_classes`` training identities.

    ``options`` go to the model's constructor (e.g. ``ops_backend``, depth, width); the defaults
    are the paper's full-size model.  An unknown name raises ``ValueError`` listing the known ones.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"build_model: num_classes must be a positive int, got {num_classes!r}")
    return model_class(name)(num_classes, **options)


def get_preset(name: str, preset: str) -> dict:
    """The settings ``{"model": {...build_model options...}, "train": {...}}`` of ``preset`` for model ``name``.

    ``preset`` is ``"cpu"`` (small enough to train on a 2-core CPU) or ``"paper"`` (the paper's
    settings); see :mod:`keypointops.models.presets`.  Returns fresh dicts (JSON-serialisable).
    """
    return preset_of(name, preset).to_dict()


def preset_of(name: str, preset: str) -> Preset:
    """The :class:`~keypointops.models.presets.Preset` ``preset`` of model ``name``."""
    _check_model(name)
    if preset not in PRESET_NAMES:
        raise ValueError(f"get_preset: unknown preset {preset!r}; known presets: {', '.join(PRESET_NAMES)}")
    return PRESETS[name][preset]

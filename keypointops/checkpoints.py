"""Training checkpoints: an atomic write, a checked read, and the model of a checkpoint.

A checkpoint is a dict saved with ``torch.save``: ``format`` (:data:`CHECKPOINT_FORMAT`), the run's
``config`` (JSON-serialisable), ``num_classes``, ``epoch`` and the ``model``, ``optimizer`` and
``scheduler`` state dicts.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["init_from_checkpoint", "CHECKPOINT_FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "load_weights_file", "model_from_checkpoint"]

CHECKPOINT_FORMAT = "keypointops-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (missing, corrupt, not a keypointops checkpoint, or one
    of another model)."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Writes ``state`` to ``path`` atomically: a temporary file in the same folder, flushed to disk,
    then renamed over ``path`` (a reader never sees a half-written checkpoint)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_CHECKPOINT_KEYS = ("config", "num_classes", "epoch", "model", "optimizer", "scheduler")


def load_weights_file(path: str | os.PathLike, what: str, error: type[Exception] = ValueError):
    """``torch.load(path, weights_only=True)`` of a file that may be damaged or untrusted: any
    failure raises ``error`` with a one-line reason naming ``what`` and the file. The unpickler
    refuses everything but tensors and plain containers (a file that would run code is refused
    here, never loaded another way)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # torch's advice to load untrusted files with weights_only=False would run their code
        reason = next((line for line in lines if "weights_only" not in line.lower()
                       and not line.lower().startswith("please file an issue")), "")
        raise error(f"{what} {os.fspath(path)!r} is corrupt, not a torch file, or holds objects other than "
                    f"tensors ({type(err).__name__}: {reason[:200]})") from None


def load_checkpoint(path: str | os.PathLike, model: str | None = None) -> dict:
    """Reads a checkpoint with ``torch.load(weights_only=True)``; raises :class:`CheckpointError`
    with a one-line reason when the file is missing, corrupt, not a keypointops checkpoint, or (when
    ``model`` is given) holds another model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    state = load_weights_file(path, "checkpoint", CheckpointError)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a keypointops training checkpoint")
    if not isinstance(state.get("config"), dict) or "model" not in state["config"]:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: it holds no run config naming its model")
    if model is not None and state["config"]["model"] != model:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {state['config']['model']!r} model, "
                              f"not {model!r}")
    missing = [key for key in _CHECKPOINT_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: it lacks {', '.join(missing)}")
    return state


def model_from_checkpoint(state: dict, **options) -> nn.Module:
    """The model of a checkpoint (eval mode, CPU); ``options`` override its build options (e.g.
    ``ops_backend="reference"``)."""
    from keypointops.models import build_model

    config = state["config"]
    model = build_model(config["model"], state["num_classes"], **{**config["model_options"], **options})
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        details = " ".join(line.strip() for line in str(err).splitlines()[1:] if line.strip())
        raise CheckpointError(f"the checkpoint's weights do not fit model {config['model']!r}: {details}") from None
    return model.eval()


def init_from_checkpoint(model: nn.Module, model_name: str, path: str | os.PathLike) -> None:
    """Initialises ``model`` (a ``model_name``) with the weights of another run's checkpoint.

    A checkpoint of the same model loads whole (strict). A checkpoint of another model loads through
    the model's ``init_from_state(state_dict, source_model)`` when it defines one (KMPNet takes a
    PCB or ResNet checkpoint into its visual branch: its paper's stage B), which raises
    ``ValueError`` for a source it cannot use; anything else is a :class:`CheckpointError`.
    """
    state = load_checkpoint(path)
    source = state["config"]["model"]
    hook = getattr(model, "init_from_state", None)
    try:
        if source == model_name:
            model.load_state_dict(state["model"])
        elif hook is not None:
            hook(state["model"], source)
        else:
            raise ValueError(f"a {model_name!r} model can only start from a {model_name!r} checkpoint")
    except (ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot initialise {model_name!r} from {str(path)!r} (a {source!r} checkpoint): "
                              f"{str(err).splitlines()[0]}") from None

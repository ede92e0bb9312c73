"""Serving a trained model: an inference model exported to ONNX or as a ``torch.export`` program,
checked against PyTorch, and one embedding per tracklet of a dataset (``keypointops embed``).

The exported model is the eval-mode model built with ``ops_backend="reference"``, so it holds only
standard operators (no op of this library) and runs wherever ONNX Runtime or PyTorch runs.  Its
inputs are ``images float32 [B, T, 3, H, W]`` (ImageNet-normalised) and, for the models whose
embedding depends on them, ``keypoints float32 [B, T, 17, 3]`` (COCO-17 ``(x, y, confidence)`` in
input pixels, missing joints 0); its output is ``embedding float32 [B, D]``.  The batch axis ``B``
is dynamic; the frame axis ``T`` is too where the model accepts any clip length (CTL is built for
one ``T``).  ``H x W`` are the training input size.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["EXPORT_FORMATS", "InferenceModel", "export_model", "embed_dataset"]

EXPORT_FORMATS = ("onnx", "exported")

#: the batch sizes at which an export is compared with PyTorch
CHECK_BATCHES = (1, 5)


class InferenceModel(nn.Module):
    """The eval-mode embedding of ``model`` with only the inputs it reads.

    ``forward(images)`` when ``uses_keypoints`` is False (the keypoints are then all-zero inside, a
    constant the exporters fold away), else ``forward(images, keypoints)``.  The model is a child
    (``self.model``), so its parameter names cannot collide with attributes of an exported program.
    """

    def __init__(self, model: nn.Module, uses_keypoints: bool):
        super().__init__()
        self.model, self.uses_keypoints = model, uses_keypoints
        self.eval()

    def forward(self, images: Tensor, keypoints: Tensor | None = None) -> Tensor:
        if keypoints is None:
            keypoints = images.new_zeros(images.shape[0], images.shape[1], 17, 3)
        return self.model(images, keypoints)


def example_clip(batch: int, frames: int, height: int, width: int, seed: int) -> tuple[Tensor, Tensor]:
    """A random clip ``(images [B, T, 3, H, W], keypoints [B, T, 17, 3])``: keypoints inside the
    frame, about one in five missing."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, frames, 3, height, width, generator=g)
    keypoints = torch.rand(batch, frames, 17, 3, generator=g) * torch.tensor([width - 1.0, height - 1.0, 1.0])
    keypoints = torch.where(keypoints[..., 2:] < 0.2, 0.0, keypoints)
    return images, keypoints


@torch.no_grad()
def reads_keypoints(model: nn.Module, frames: int, height: int, width: int) -> bool:
    """Whether the eval-mode embedding of ``model`` changes with the keypoints (two random
    keypoint sets on the same images)."""
    images, first = example_clip(2, frames, height, width, seed=11)
    second = example_clip(2, frames, height, width, seed=12)[1]
    return not torch.equal(model(images, first), model(images, second))


@torch.no_grad()
def accepts_other_frame_counts(model: nn.Module, frames: int, height: int, width: int) -> bool:
    """Whether the model embeds a clip of another length than ``frames`` (CTL raises: it is built for one T)."""
    try:
        model(*example_clip(1, frames + 1, height, width, seed=13))
    except ValueError:
        return False
    return True


def export_model(model: nn.Module, paths: dict[str, str | os.PathLike], *, frames: int, height: int,
                 width: int) -> dict:
    """Exports the eval-mode ``model`` (built with ``ops_backend="reference"``) and checks every copy.

    ``paths`` maps formats to files: ``"onnx"`` (``torch.onnx.export`` of the program; run back in
    ONNX Runtime) and / or ``"exported"`` (``torch.export.save``; loaded back with
    ``torch.export.load``).  The model is captured once with ``torch.export``: batch axis dynamic,
    frame axis too where the model accepts any clip length and the capture holds for every length
    (a recurrence unrolled over the frames does not).  Each copy is compared with PyTorch on clips
    other than the captured one, at batch sizes :data:`CHECK_BATCHES` and, where the frame axis is
    dynamic, at another clip length.

    Returns ``{"inputs": input names, "dynamic": {input: {axis: name}}, "errors": {format: {"batch
    1": max abs error, ...}}, "runtime": {format: what ran the copy}}``.
    """
    unknown = set(paths) - set(EXPORT_FORMATS)
    if unknown or not paths:
        raise ValueError(f"export_model: paths must map formats of {EXPORT_FORMATS} to files, got {sorted(paths)}")
    model = model.eval()
    wrapped = InferenceModel(model, reads_keypoints(model, frames, height, width))
    inputs = ("images", "keypoints") if wrapped.uses_keypoints else ("images",)
    example = example_clip(2, frames, height, width, seed=0)[:len(inputs)]
    report = {"inputs": inputs, "errors": {}, "runtime": {}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' notes
        program, axes = _capture(wrapped, example, accepts_other_frame_counts(model, frames, height, width))
        if "keypointops" in str(program.graph):
            raise RuntimeError("the exported graph still holds a keypointops op")
        report["dynamic"] = {name: axes for name in inputs}
        checks = {f"batch {b}": example_clip(b, frames, height, width, seed=b)[:len(inputs)] for b in CHECK_BATCHES}
        if "frames" in axes.values():
            checks[f"batch 2 of {frames + 1} frames"] = example_clip(2, frames + 1, height, width, seed=7)[:len(inputs)]
        expected = {name: wrapped(*clip) for name, clip in checks.items()}
        for fmt, path in paths.items():
            run, report["runtime"][fmt] = (_to_onnx if fmt == "onnx" else _save_program)(program, inputs, Path(path))
            report["errors"][fmt] = {name: float((run(clip) - expected[name]).abs().max())
                                     for name, clip in checks.items()}
    return report


def _capture(wrapped: InferenceModel, example: tuple, try_frames: bool):
    """``(torch.export program, {axis: name} of the dynamic axes)``: batch and frames when
    ``try_frames`` and the model's code holds for every clip length (a recurrence unrolled over the
    frames does not), else batch only."""
    from torch._dynamo.exc import UserError
    from torch.export import Dim

    batch, frames = Dim("batch", min=1, max=4096), Dim("frames", min=1, max=4096)
    if try_frames:
        try:
            return torch.export.export(wrapped, example, dynamic_shapes=tuple({0: batch, 1: frames} for _ in example)), \
                {0: "batch", 1: "frames"}
        except UserError:  # the capture specialised on the clip length
            pass
    return torch.export.export(wrapped, example, dynamic_shapes=tuple({0: batch} for _ in example)), {0: "batch"}


def _to_onnx(program, inputs: tuple, path: Path):
    import onnxruntime

    torch.onnx.export(program, input_names=list(inputs), output_names=["embedding"], f=path, dynamo=True,
                      external_data=False, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(clip):
        return torch.from_numpy(session.run(None, {name: x.numpy() for name, x in zip(inputs, clip)})[0])
    return run, f"ONNX Runtime {onnxruntime.__version__}"


def _save_program(program, inputs: tuple, path: Path):
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    return (lambda clip: loaded(*clip)), "torch.export.load"


def embed_dataset(model: nn.Module, dataset, config: dict, device: torch.device) -> dict[str, np.ndarray]:
    """One embedding per query and gallery tracklet of ``dataset``, with the clips and averaging of
    evaluation (:func:`keypointops.engine.evaluate_models`).

    Returns arrays ``{split}_features float32 [N, D]``, ``{split}_pids``, ``{split}_camids`` (int64)
    and ``{split}_paths`` (the tracklet's first frame, ``..`` and its last frame's name) for
    ``split`` in ``query``, ``gallery``: what ``np.savez`` writes, for
    :func:`keypointops.evaluation.evaluate` or one's own retrieval.
    """
    from keypointops.engine import evaluate_models

    result = evaluate_models({"model": model}, dataset, config, device)["model"]
    out = {}
    for split, tracklets, features in (("query", dataset.query, result["qf"]), ("gallery", dataset.gallery, result["gf"])):
        out[f"{split}_features"] = features.numpy().astype(np.float32)
        out[f"{split}_pids"] = np.array([t.pid for t in tracklets], np.int64)
        out[f"{split}_camids"] = np.array([t.camid for t in tracklets], np.int64)
        out[f"{split}_paths"] = np.array([_tracklet_path(t) for t in tracklets])
    return out


def _tracklet_path(tracklet) -> str:
    first, last = Path(tracklet.frames[0]), Path(tracklet.frames[-1])
    return str(first) if first == last else f"{first}..{last.name}"

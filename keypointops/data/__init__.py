"""Video re-ID data: tracklets, dataset readers, the synthetic dataset, keypoint files, sampling,
clip transforms and the loader.

``build_dataset(name, root=None, **options)`` -> a dataset with ``train`` / ``query`` / ``gallery``
(lists of :class:`Tracklet`), ``num_train_pids``, ``num_train_cams``;
``build_loader(tracklets, ...)`` -> a DataLoader of dict batches (see :func:`build_loader`).
"""
from __future__ import annotations

from pathlib import Path

from keypointops.data.datasets import (DATASETS, MARS, PRID2011, DatasetNotFoundError, DukeMTMCVideoReID,
                                       PoseTrackReID, Tracklet, VideoReIDDataset, hold_out_validation, iLIDSVID)
from keypointops.data.keypoint_files import load_keypoints
from keypointops.data.loader import VideoDataset, build_loader
from keypointops.data.sampling import PKBatchSampler, RandomBatchSampler, sample_frames
from keypointops.data.synthetic import DEFAULTS as _SYNTHETIC_DEFAULTS
from keypointops.data.synthetic import HARD as _SYNTHETIC_HARD
from keypointops.data.synthetic import ensure_synthetic

__all__ = ["Tracklet", "build_dataset", "hold_out_validation", "build_loader", "DATASETS", "DATASET_NAMES",
           "DatasetNotFoundError", "MARS", "iLIDSVID",
           "PRID2011", "DukeMTMCVideoReID", "PoseTrackReID", "VideoReIDDataset", "VideoDataset",
           "PKBatchSampler", "RandomBatchSampler", "sample_frames", "load_keypoints", "ensure_synthetic"]

#: The generated datasets: name -> generator parameters.
SYNTHETIC_DATASETS = {"synthetic": _SYNTHETIC_DEFAULTS, "synthetic-hard": _SYNTHETIC_HARD}
DATASET_NAMES = tuple(SYNTHETIC_DATASETS) + tuple(DATASETS)


def build_dataset(name: str, root=None, **options) -> VideoReIDDataset:
    """The dataset ``name``: ``synthetic`` and ``synthetic-hard`` (the generator's default and hard
    variant, :data:`keypointops.data.synthetic.DEFAULTS` / ``HARD``; generated on first use into
    ``root``, default a cache folder, see :func:`keypointops.data.synthetic.ensure_synthetic`;
    options: generator parameters overriding the variant's, ``progress``, and
    ``drop_distractors``; a ``root`` written by ``keypointops synth`` is read as it is unless
    generator parameters are given), ``mars``, ``ilidsvid``, ``prid2011``,
    ``dukev``, ``posetrackreid`` (``root`` required; options go to the reader).  Every dataset
    also takes ``validation_ids=N``: query / gallery are then N identities held out of the training
    set, never the test split (:func:`~keypointops.data.datasets.hold_out_validation`)."""
    validation_ids = options.pop("validation_ids", None)
    dataset = _build_dataset(name, root, **options)
    return dataset if validation_ids is None else hold_out_validation(dataset, int(validation_ids))


def _build_dataset(name: str, root=None, **options) -> VideoReIDDataset:
    key = name.lower()
    if key in SYNTHETIC_DATASETS:
        reader = {k: options.pop(k) for k in ("drop_distractors",) if k in options}
        if root is not None and not set(options) - {"progress"} and (Path(root) / "synthetic.json").is_file():
            return MARS(root, **reader)  # a folder written by `keypointops synth`, whatever its parameters
        return MARS(ensure_synthetic(root, **{**SYNTHETIC_DATASETS[key], **options}), **reader)
    if key not in DATASETS:
        raise ValueError(f"build_dataset: unknown dataset {name!r}; known: {DATASET_NAMES}")
    if root is None:
        raise ValueError(f"build_dataset: dataset {name!r} needs root (the folder holding it)")
    return DATASETS[key](root, **options)

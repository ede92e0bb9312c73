"""Keypoint files: KMPNet ``.pose``, OpenPose JSON, the per-tracklet ``.npz`` cache, skeleton
conversion.

Every keypoint array here is canonical COCO-17 ``float32 [..., 17, 3]`` = ``(x, y, confidence)``
in pixels of the frame the keypoints were estimated on.  A missing joint is ``(0, 0, 0)``; NaN,
a negative or zero confidence and the pose estimators' ``(0, 0)`` / ``(-1, -1)`` conventions
(KMPNet's rule: ``x <= 0 and y <= 0``) all become missing (:func:`sanitize`).

No reader runs code: ``.pose`` files (a one-line Python-literal list of 17 ``[x, y, score]``) are
parsed as JSON after a small rewrite of the Python spellings (``nan``, ``inf``, tuples), and a file
that does not parse to 17 triples raises a ``ValueError`` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from keypointops.graphs import SKELETONS

__all__ = ["NUM_JOINTS", "COCO17_FLIP", "sanitize", "read_pose", "write_pose", "read_openpose",
           "write_openpose", "to_coco17", "from_coco17", "from_coco17_tensor", "read_keypoint_file", "read_cache",
           "write_cache", "load_keypoints", "cache_tracklet_keypoints"]

logger = logging.getLogger("keypointops.data")

NUM_JOINTS = 17
_COCO17 = SKELETONS["coco17"].joints


def _mirror_name(name: str) -> str:
    if name.startswith("left_"):
        return "right_" + name[5:]
    if name.startswith("right_"):
        return "left_" + name[6:]
    return name


#: ``COCO17_FLIP[k]`` is the joint that joint ``k`` becomes in a horizontally mirrored image.
COCO17_FLIP = tuple(_COCO17.index(_mirror_name(name)) for name in _COCO17)


def sanitize(keypoints: np.ndarray) -> np.ndarray:
    """A float32 copy of ``keypoints [..., 3]`` in which every missing joint is ``(0, 0, 0)``:
    any NaN / infinite value, confidence <= 0, or ``x <= 0 and y <= 0`` (the (0, 0) and (-1, -1)
    conventions)."""
    kp = np.array(keypoints, dtype=np.float32)
    if kp.shape[-1] != 3:
        raise ValueError(f"sanitize: keypoints must end in (x, y, confidence), got shape {kp.shape}")
    missing = (~np.isfinite(kp).all(-1)) | ~(kp[..., 2] > 0) | ((kp[..., 0] <= 0) & (kp[..., 1] <= 0))
    kp[missing] = 0.0
    return kp


# --------------------------------------------------------------------------------------------
# KMPNet .pose files
# --------------------------------------------------------------------------------------------
_PY_SPELLINGS = [(re.compile(r"(?<![A-Za-z])-?inf(?![A-Za-z])"), lambda m: m.group(0).replace("inf", "Infinity")),
                 (re.compile(r"(?<![A-Za-z])nan(?![A-Za-z])"), lambda m: "NaN")]


def read_pose(path: str | os.PathLike) -> np.ndarray:
    """Reads a KMPNet ``.pose`` file (first line: 17 ``[x, y, score]``) -> sanitised ``[17, 3]``."""
    try:
        with open(path, "r", encoding="ascii", errors="strict") as f:
            line = f.readline().strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: malformed .pose file (not ASCII text): {e}") from None
    text = line.replace("(", "[").replace(")", "]")
    for pattern, repl in _PY_SPELLINGS:
        text = pattern.sub(repl, text)
    try:
        values = json.loads(text)
        kp = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        raise ValueError(f"{path}: malformed .pose file, expected one line holding a list of "
                         f"{NUM_JOINTS} [x, y, score] triples: {e}") from None
    if kp.shape != (NUM_JOINTS, 3):
        raise ValueError(f"{path}: malformed .pose file, expected {NUM_JOINTS} [x, y, score] "
                         f"triples, got an array of shape {kp.shape}")
    return sanitize(kp)


def write_pose(path: str | os.PathLike, keypoints: np.ndarray) -> None:
    """Writes ``keypoints [17, 3]`` as a one-line KMPNet ``.pose`` file (missing joints as 0)."""
    kp = sanitize(keypoints)
    if kp.shape != (NUM_JOINTS, 3):
        raise ValueError(f"write_pose: keypoints must be [{NUM_JOINTS}, 3], got {kp.shape}")
    body = ", ".join(f"[{x:.2f}, {y:.2f}, {s:.4f}]" for x, y, s in kp.tolist())
    with open(path, "w", encoding="ascii") as f:
        f.write(f"[{body}]\n")


# --------------------------------------------------------------------------------------------
# OpenPose JSON and skeleton conversion
# --------------------------------------------------------------------------------------------
_OPENPOSE_BY_SIZE = {len(SKELETONS[name].joints): name for name in ("body25", "openpose18")}


def _names(skeleton: str) -> tuple[str, ...]:
    if skeleton not in ("coco17", "openpose18", "body25"):
        raise ValueError(f"unknown keypoint skeleton {skeleton!r}; known: coco17, openpose18, body25")
    return SKELETONS[skeleton].joints


def to_coco17(keypoints: np.ndarray, skeleton: str) -> np.ndarray:
    """Converts ``[..., K, 3]`` keypoints of ``skeleton`` (``coco17``, ``openpose18`` = COCO-18,
    ``body25``) to COCO-17 by joint name (OpenPose's neck, mid-hip, feet are dropped)."""
    names = _names(skeleton)
    kp = sanitize(keypoints)
    if kp.shape[-2] != len(names):
        raise ValueError(f"to_coco17: {skeleton} has {len(names)} joints, got shape {kp.shape}")
    return kp[..., [names.index(name) for name in _COCO17], :]


# The joints COCO-17 lacks that are the mid-point of two of its joints.
_MIDPOINTS = {"neck": ("left_shoulder", "right_shoulder"), "mid_hip": ("left_hip", "right_hip")}


def from_coco17_tensor(keypoints: Tensor, skeleton: str) -> Tensor:
    """``skeleton``'s joints ``[..., K, 3]`` from COCO-17 keypoints ``[..., 17, 3]`` (a tensor of any
    floating dtype, on any device; not sanitised), by joint name.  OpenPose's neck (mid-shoulder) and
    BODY-25's mid-hip are the mean of the two joints with the smaller of their confidences, so they
    are valid (``> 0``) only where both joints are; BODY-25's feet are ``(0, 0, 0)``."""
    def joint(name: str) -> Tensor:
        if name in _COCO17:
            return keypoints[..., _COCO17.index(name), :]
        if name in _MIDPOINTS:
            a, b = (keypoints[..., _COCO17.index(end), :] for end in _MIDPOINTS[name])
            return torch.cat([(a[..., :2] + b[..., :2]) * 0.5, torch.minimum(a[..., 2:], b[..., 2:])], -1)
        return keypoints.new_zeros(keypoints.shape[:-2] + (3,))

    return torch.stack([joint(name) for name in _names(skeleton)], -2)


def from_coco17(keypoints: np.ndarray, skeleton: str) -> np.ndarray:
    """Converts COCO-17 ``[..., 17, 3]`` to ``skeleton`` (:func:`from_coco17_tensor` of the sanitised
    keypoints); a mid-point joint missing one of its ends is ``(0, 0, 0)``, as every missing joint."""
    kp = sanitize(keypoints)
    if kp.shape[-2] != NUM_JOINTS:
        raise ValueError(f"from_coco17: expected [..., {NUM_JOINTS}, 3], got shape {kp.shape}")
    out = from_coco17_tensor(torch.from_numpy(kp), skeleton).numpy()
    out[~(out[..., 2] > 0)] = 0
    return out


def read_openpose(path: str | os.PathLike) -> np.ndarray:
    """Reads a frame's JSON keypoint file and returns the COCO-17 ``[17, 3]`` keypoints of its most
    confident person (all missing when the file has no person).

    Two layouts: OpenPose's (an object with ``people[i].pose_keypoints_2d``, BODY-25 or COCO-18),
    and the COCO keypoint results format that most other estimators write (a list of objects with
    ``keypoints``: 17 x 3 values ``x, y, score`` in COCO-17 order, optionally ``score`` and
    ``image_id``; the entry with the highest ``score``, else the highest summed joint score, wins).
    """
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, list):
            return _coco_results_person(path, data)
        people = data["people"]
        flat = [np.asarray(p["pose_keypoints_2d"], dtype=np.float64) for p in people]
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
        raise ValueError(f"{path}: malformed keypoint JSON (expected OpenPose's people[].pose_keypoints_2d or "
                         f"a list of COCO results with keypoints): {e!r}") from None
    if not flat:
        return np.zeros((NUM_JOINTS, 3), np.float32)
    best = None
    for values in flat:
        if values.ndim != 1 or values.size % 3 or values.size // 3 not in _OPENPOSE_BY_SIZE:
            raise ValueError(f"{path}: pose_keypoints_2d must hold 25 (BODY-25) or 18 (COCO-18) "
                             f"x, y, c triples, got {values.size} numbers")
        kp = to_coco17(values.reshape(-1, 3), _OPENPOSE_BY_SIZE[values.size // 3])
        if best is None or kp[:, 2].sum() > best[:, 2].sum():
            best = kp
    return best


def _coco_results_person(path, results: list) -> np.ndarray:
    """The most confident person of a list of COCO keypoint results (see :func:`read_openpose`)."""
    best, best_score = np.zeros((NUM_JOINTS, 3), np.float32), -np.inf
    for entry in results:
        values = np.asarray(entry["keypoints"], dtype=np.float64)
        if values.shape != (NUM_JOINTS * 3,):
            raise ValueError(f"{path}: a COCO result's keypoints must hold {NUM_JOINTS} x, y, score triples "
                             f"({NUM_JOINTS * 3} numbers), got shape {values.shape}")
        kp = sanitize(values.reshape(NUM_JOINTS, 3))
        score = float(entry["score"]) if "score" in entry else float(kp[:, 2].sum())
        if score > best_score:
            best, best_score = kp, score
    return best


def write_openpose(path: str | os.PathLike, keypoints: np.ndarray, skeleton: str = "body25") -> None:
    """Writes COCO-17 ``keypoints [17, 3]`` (one person) as OpenPose JSON in ``skeleton``
    (``body25`` or ``openpose18``)."""
    if skeleton not in _OPENPOSE_BY_SIZE.values():
        raise ValueError(f"write_openpose: skeleton must be 'body25' or 'openpose18', got {skeleton!r}")
    values = from_coco17(keypoints, skeleton).reshape(-1)
    data = {"version": 1.3, "people": [{"person_id": [-1], "pose_keypoints_2d": [round(float(v), 4) for v in values]}]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def read_keypoint_file(path: str | os.PathLike) -> np.ndarray:
    """Reads one frame's keypoint file by its suffix: ``.pose`` (KMPNet) or ``.json`` (OpenPose)."""
    suffix = Path(path).suffix
    if suffix == ".pose":
        return read_pose(path)
    if suffix == ".json":
        return read_openpose(path)
    raise ValueError(f"{path}: unknown keypoint file type {suffix!r} (expected .pose or .json)")


# --------------------------------------------------------------------------------------------
# Per-tracklet cache
# --------------------------------------------------------------------------------------------
def write_cache(path: str | os.PathLike, keypoints: np.ndarray, missing_files: int = 0, source: str = "") -> None:
    """Writes a tracklet's ``[F, 17, 3]`` keypoints to ``path`` (.npz) atomically (temp + rename),
    so that concurrent processes building the same cache never read a partial file.
    ``missing_files`` (frames that had no keypoint file) and ``source`` (the fingerprint of the
    keypoint files the cache was built from, :func:`source_fingerprint`) are stored beside them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, keypoints=sanitize(keypoints), missing_files=np.int64(missing_files), source=np.str_(source))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_cache(path: str | os.PathLike) -> np.ndarray:
    """Reads a tracklet's ``[F, 17, 3]`` keypoints from a cache written by :func:`write_cache`."""
    return _read_cache_entries(path)[0]


def _read_cache_entries(path: str | os.PathLike) -> tuple[np.ndarray, int, str | None]:
    """``(keypoints [F, 17, 3], missing_files, source fingerprint or None)`` of a cache file; any
    damage raises a one-line ``ValueError`` naming the file."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with data:
            kp = data["keypoints"]
            missing = data["missing_files"] if "missing_files" in data.files else np.int64(0)
            source = data["source"] if "source" in data.files else None
    # np.load hands a damaged archive to zipfile, zlib and the .npy header parser, which raise
    # many types (BadZipFile, zlib.error, EOFError, ...): every one is a damaged cache.
    except Exception as e:
        raise ValueError(f"{path}: unreadable keypoint cache: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}") from None
    if kp.dtype.kind not in "fiu" or kp.ndim != 3 or kp.shape[1:] != (NUM_JOINTS, 3):
        raise ValueError(f"{path}: keypoint cache must hold numbers [F, {NUM_JOINTS}, 3], got {kp.dtype} {kp.shape}")
    if missing.dtype.kind not in "iu" or missing.shape != () or not 0 <= int(missing) <= len(kp):
        raise ValueError(f"{path}: keypoint cache holds a bad missing_files entry ({missing.dtype} {missing.shape})")
    if source is not None and (source.dtype.kind != "U" or source.shape != ()):
        raise ValueError(f"{path}: keypoint cache holds a bad source entry ({source.dtype} {source.shape})")
    return sanitize(kp), int(missing), None if source is None else str(source)


def load_keypoints(tracklet) -> np.ndarray:
    """The ``float32 [F, 17, 3]`` keypoints of ``tracklet`` (F = number of frames).

    ``tracklet.keypoints`` may be an array, a ``.npz`` cache, a folder holding one
    ``<frame stem>.pose`` (or OpenPose ``<frame stem>_keypoints.json``) per frame, or None
    (every joint missing).  A frame whose file is missing in a folder has every joint missing.
    """
    frames = tracklet.frames
    source = tracklet.keypoints
    if source is None:
        return np.zeros((len(frames), NUM_JOINTS, 3), np.float32)
    if isinstance(source, np.ndarray):
        kp = sanitize(source)
    elif Path(source).suffix == ".npz":
        kp = read_cache(source)
    else:
        kp, _ = _read_frames([_frame_file(Path(source), frame) for frame in frames])
    if kp.shape != (len(frames), NUM_JOINTS, 3):
        raise ValueError(f"keypoints of the tracklet starting at {frames[0] if frames else '?'} "
                         f"must be [{len(frames)}, {NUM_JOINTS}, 3], got {kp.shape}")
    return kp


def _frame_file(folder: Path, frame: str) -> Path | None:
    stem = Path(frame).stem
    for name in (stem + ".pose", stem + "_keypoints.json"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_frames(paths: Sequence[Path | None]) -> tuple[np.ndarray, int]:
    """Reads one keypoint file per frame (None or a missing file: all joints missing) ->
    ``([F, 17, 3], number of missing files)``."""
    kp = np.zeros((len(paths), NUM_JOINTS, 3), np.float32)
    missing = 0
    for i, path in enumerate(paths):
        if path is None or not os.path.isfile(path):
            missing += 1
        else:
            kp[i] = read_keypoint_file(path)
    return kp, missing


def source_fingerprint(paths: Sequence[Path | None]) -> str:
    """A digest of the name, size and modification time of each frame's keypoint file (in frame
    order; a frame without a file counts as such): it changes when a file is replaced, added or
    removed, so a cache built from other files is noticed."""
    digest = hashlib.sha1()
    for path in paths:
        try:
            stat = os.stat(path) if path is not None else None
        except OSError:
            stat = None
        entry = "-" if stat is None else f"{os.path.basename(path)}\0{stat.st_size}\0{stat.st_mtime_ns}"
        digest.update(entry.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def cache_tracklet_keypoints(tracklets: list, frame_file: Callable[[str], Path | None],
                             cache_dir: Path, label: str) -> tuple[list, int, int]:
    """Attaches keypoints to ``tracklets`` through a per-tracklet ``.npz`` cache in ``cache_dir``;
    returns ``(tracklets, frames without a keypoint file, frames)`` (the dataset reports the count).

    ``frame_file(frame_path)`` gives the keypoint file of a frame (None when it has none).  Each
    tracklet's files are parsed once into ``cache_dir/<first frame stem>_<F>.npz``; later calls
    reuse the cache while the files' :func:`source_fingerprint` is the one stored in it, and
    rebuild it (one warning per call) when a file was changed, added or removed, or the cache is
    unreadable.  Frames without a file have every joint missing.  When ``cache_dir`` cannot be
    written the arrays stay in memory.  ``label`` names the progress bar and messages.
    """
    from tqdm import tqdm

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        writable = os.access(cache_dir, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        logger.warning("%s: cannot write the keypoint cache %s; keeping keypoints in memory",
                       label, cache_dir)
    out, missing, total, rebuilt = [], 0, 0, 0
    for tracklet in tqdm(tracklets, desc=f"{label} keypoints", unit="tracklet", leave=False,
                         disable=len(tracklets) < 200):
        total += len(tracklet.frames)
        path = cache_dir / f"{Path(tracklet.frames[0]).stem}_{len(tracklet.frames)}.npz"
        files = [frame_file(frame) for frame in tracklet.frames]
        source = source_fingerprint(files) if writable else ""
        if writable and path.is_file():
            try:
                _, cached_missing, cached_source = _read_cache_entries(path)
            except ValueError:
                cached_source = None
            if cached_source == source:
                missing += cached_missing
                out.append(tracklet._replace(keypoints=str(path)))
                continue
            rebuilt += 1
        kp, tracklet_missing = _read_frames(files)
        missing += tracklet_missing
        if writable:
            write_cache(path, kp, tracklet_missing, source)
            out.append(tracklet._replace(keypoints=str(path)))
        else:
            out.append(tracklet._replace(keypoints=kp))
    if rebuilt:
        logger.warning("%s: rebuilt %d of %d keypoint caches in %s: their keypoint files changed since "
                       "the cache was written (or the cache was damaged)", label, rebuilt, len(tracklets), cache_dir)
    return out, missing, total

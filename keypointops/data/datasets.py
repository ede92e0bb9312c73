"""Video re-ID dataset readers: MARS, iLIDS-VID, PRID2011, DukeMTMC-VideoReID, PoseTrackReID.

Each reader exposes ``train``, ``query``, ``gallery`` (lists of :class:`Tracklet`),
``num_train_pids`` and ``num_train_cams``, with torchreid's conventions: camids start at 0, train
pids are relabelled ``0..n-1`` (in increasing order of the pid on disk), query / gallery pids are
kept as on disk.  A missing folder or file raises :class:`DatasetNotFoundError`, which names it and
says where the data comes from.  Keypoint files found beside a dataset are parsed once into a
per-tracklet ``.npz`` cache (``keypoint_files.cache_tracklet_keypoints``).
"""
from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from keypointops.data.keypoint_files import cache_tracklet_keypoints
from keypointops.data.mat_files import read_mat

__all__ = ["Tracklet", "DatasetNotFoundError", "VideoReIDDataset", "hold_out_validation", "MARS", "iLIDSVID",
           "PRID2011", "DukeMTMCVideoReID", "PoseTrackReID", "DATASETS"]

logger = logging.getLogger("keypointops.data")


class Tracklet(NamedTuple):
    """One tracklet: frame image paths, person id, camera id (0-based), keypoints (a ``.npz``
    cache path, a folder of per-frame keypoint files, a ``[F, 17, 3]`` array, or None)."""

    frames: tuple[str, ...]
    pid: int
    camid: int
    keypoints: Any = None


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder or file is missing (the message names it and the data's source)."""


def _require(dataset: str, root: Path, paths: Sequence[str], source: str) -> None:
    for rel in paths:
        if not (root / rel).exists():
            raise DatasetNotFoundError(f"{dataset}: missing {root / rel}. {source}")


class VideoReIDDataset:
    """Base class: ``train`` / ``query`` / ``gallery`` and the training set's counts.
    ``evaluation_split`` says what query / gallery hold: ``"test"`` (the dataset's test split) or,
    for :func:`hold_out_validation`, ``"validation"``."""

    name = "dataset"
    evaluation_split = "test"

    def __init__(self, train: list[Tracklet], query: list[Tracklet], gallery: list[Tracklet]):
        self._set_splits(train, query, gallery)
        missing, total = getattr(self, "_keypoint_files", (0, 0))
        if missing:
            logger.warning("%s: %d of %d frames have no keypoint file; their joints are missing",
                           type(self).__name__, missing, total)

    def _set_splits(self, train: list[Tracklet], query: list[Tracklet], gallery: list[Tracklet]) -> None:
        self.train, self.query, self.gallery = train, query, gallery
        self.num_train_pids = len({t.pid for t in train})
        self.num_train_cams = len({t.camid for t in train})

    def _with_keypoints(self, tracklets: list[Tracklet], frame_file: Callable[[str], Path | None],
                        cache_dir: Path, label: str) -> list[Tracklet]:
        """Keypoints through the per-tracklet cache; frames without a file are counted for the
        dataset's one report."""
        if not tracklets:
            return tracklets
        tracklets, missing, total = cache_tracklet_keypoints(tracklets, frame_file, cache_dir, label)
        counted = getattr(self, "_keypoint_files", (0, 0))
        self._keypoint_files = (counted[0] + missing, counted[1] + total)
        return tracklets

    def _sidecar_keypoints(self, tracklets: list[Tracklet], split: str) -> list[Tracklet]:
        """Keypoints from the files beside the frames, when the first frame has one (else None)."""
        if not tracklets or _sidecar(tracklets[0].frames[0]) is None:
            return tracklets
        return self._with_keypoints(tracklets, _sidecar, self.root / "keypoints_cache" / split,
                                    f"{type(self).__name__} {split}")

    def statistics(self) -> str:
        """The table of identities, tracklets and images per split (as torchreid prints it), headed
        by the reader and the folder it read."""
        rows = [(name, len({t.pid for t in split}), len(split), sum(len(t.frames) for t in split))
                for name, split in (("train", self.train), ("query", self.query), ("gallery", self.gallery))]
        rule = "  " + "-" * 44
        lines = [f"=> {type(self).__name__} from {getattr(self, 'root', '?')}, query / gallery: "
                 f"{self.evaluation_split}", rule,
                 "  subset   | # ids | # tracklets | # images", rule]
        lines += [f"  {name:<8} | {ids:5d} | {tracklets:11d} | {images:8d}" for name, ids, tracklets, images in rows]
        return "\n".join(lines + [rule])

    def __repr__(self) -> str:
        def stats(split):
            return f"{len(split)} tracklets, {len({t.pid for t in split})} ids, " \
                   f"{sum(len(t.frames) for t in split)} frames"
        return (f"{type(self).__name__}(train: {stats(self.train)}, {self.num_train_cams} cameras; "
                f"query: {stats(self.query)}; gallery: {stats(self.gallery)})")


def hold_out_validation(dataset: VideoReIDDataset, num_ids: int, seed: int = 0) -> VideoReIDDataset:
    """A validation split carved out of ``dataset``'s training set, for choosing settings without
    looking at the test split: ``num_ids`` training identities (drawn with ``seed``) leave the
    training set, which is relabelled ``0..n-1``, and all their tracklets form the gallery; every
    one of them whose identity is seen by two cameras or more is also a query.  The evaluation's
    rules stay the test split's: a gallery tracklet of the query's identity and camera, the query
    itself included, is not counted, so each query is matched against its identity's tracklets of
    the other cameras, among all the others (more queries than one per identity, hence a steadier
    mAP on a few identities).  The test split is left out: query and gallery hold none of it.
    Raises ``ValueError`` unless 0 < ``num_ids`` < the training identities and at least one drawn
    identity is seen by two cameras."""
    pids = sorted({t.pid for t in dataset.train})
    if not 0 < num_ids < len(pids):
        raise ValueError(f"validation_ids={num_ids}: must be between 1 and {len(pids) - 1} "
                         f"(the dataset has {len(pids)} training identities)")
    held_out = set(np.random.default_rng(seed).choice(pids, size=num_ids, replace=False).tolist())
    cameras: dict[int, set] = {}
    for tracklet in dataset.train:
        cameras.setdefault(tracklet.pid, set()).add(tracklet.camid)
    gallery = [t for t in dataset.train if t.pid in held_out]
    query = [t for t in gallery if len(cameras[t.pid]) > 1]
    if not query:
        raise ValueError(f"validation_ids={num_ids}: none of the {num_ids} identities drawn is seen by two "
                         "cameras, so no query has a match; hold out more")
    validation = copy.copy(dataset)  # the same reader and folder, other splits
    validation._set_splits(_relabel([t for t in dataset.train if t.pid not in held_out]), query, gallery)
    validation.evaluation_split = "validation"
    return validation


def _relabel(tracklets: list[Tracklet]) -> list[Tracklet]:
    """Train pids -> 0..n-1 in increasing order of the original pid."""
    label = {pid: i for i, pid in enumerate(sorted({t.pid for t in tracklets}))}
    return [t._replace(pid=label[t.pid]) for t in tracklets]


def _sidecar(frame: str) -> Path | None:
    """A frame's keypoint file beside its image: ``<stem>.pose`` or OpenPose ``<stem>_keypoints.json``."""
    image = Path(frame)
    for candidate in (image.with_suffix(".pose"), image.with_name(image.stem + "_keypoints.json")):
        if candidate.is_file():
            return candidate
    return None


# --------------------------------------------------------------------------------------------
# MARS
# --------------------------------------------------------------------------------------------
MARS_SOURCE = ("MARS comes from http://zheng-lab.cecs.anu.edu.au/Project/project_mars.html "
               "(bbox_train.zip, bbox_test.zip) with the info/ files of "
               "https://github.com/liangzheng06/MARS-evaluation; KMPNet's keypoint files "
               "(bbox_{train,test}_keypoints/) are linked from "
               "https://github.com/dichen-cd/KeypointMessagePassing. "
               "`keypointops synth --out DIR` writes a synthetic dataset in this layout.")


def mars_pid_folder(pid: int) -> str:
    """MARS's 4-character pid folder / frame-name prefix: ``0001``, distractors ``0000``, junk ``00-1``."""
    return "00-1" if pid == -1 else f"{pid:04d}"


class MARS(VideoReIDDataset):
    """MARS (Zheng et al., ECCV 2016), the protocol of torchreid's reader.

    ``root`` holds ``info/`` (``train_name.txt``, ``test_name.txt``, ``tracks_train_info.mat``,
    ``tracks_test_info.mat``, ``query_IDX.mat``), ``bbox_train/`` and ``bbox_test/`` (or ``root/mars``
    does).  Query = the test rows of ``query_IDX``, gallery = every other test row; junk tracklets
    (pid -1) are dropped, distractors (pid 0) stay in the gallery (9,330 gallery tracklets on the
    real data) unless ``drop_distractors`` (KMPNet's 6,082).  KMPNet keypoint files
    ``bbox_{train,test}_keypoints/<pid>/<frame>.pose`` are used when the folder exists.
    """

    name = "mars"

    def __init__(self, root: str | Path, drop_distractors: bool = False):
        root = Path(root).expanduser()
        if not (root / "info").is_dir() and (root / "mars").is_dir():
            root = root / "mars"
        info = ["info/train_name.txt", "info/test_name.txt", "info/tracks_train_info.mat",
                "info/tracks_test_info.mat", "info/query_IDX.mat"]
        _require("MARS", root, info + ["bbox_train", "bbox_test"], MARS_SOURCE)
        self.root = root
        train_names = self._names(root / "info/train_name.txt")
        test_names = self._names(root / "info/test_name.txt")
        train_info = self._mat(root / "info/tracks_train_info.mat", "track_train_info", columns=4)
        test_info = self._mat(root / "info/tracks_test_info.mat", "track_test_info", columns=4)
        query_idx = self._mat(root / "info/query_IDX.mat", "query_IDX").reshape(-1).astype(np.int64) - 1
        if query_idx.size and (query_idx.min() < 0 or query_idx.max() >= len(test_info)):
            raise ValueError(f"{root / 'info/query_IDX.mat'}: query indices out of range 1..{len(test_info)}")
        is_query = np.zeros(len(test_info), bool)
        is_query[query_idx] = True
        train = self._tracklets(train_info, train_names, "train", keep_distractors=True)
        query = self._tracklets(test_info[query_idx], test_names, "test", keep_distractors=not drop_distractors)
        gallery = self._tracklets(test_info[~is_query], test_names, "test",
                                  keep_distractors=not drop_distractors)
        train, query, gallery = (self._keypoints(split, folder) for split, folder in
                                 ((train, "train"), (query, "test"), (gallery, "test")))
        super().__init__(_relabel(train), query, gallery)

    @staticmethod
    def _names(path: Path) -> list[str]:
        """The frame names of a name file (one ASCII name a line)."""
        try:
            with open(path, encoding="ascii") as f:
                return [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: malformed name file (not ASCII text): {e}") from None

    @staticmethod
    def _mat(path: Path, key: str, columns: int | None = None) -> np.ndarray:
        """The numeric array ``key`` of a .mat file (of ``columns`` columns when given), integers
        stored as any numeric type."""
        data = read_mat(path)
        if key not in data:
            raise ValueError(f"{path}: has no variable {key!r} (found {[k for k in data if not k.startswith('__')]})")
        array = np.asarray(data[key])
        if array.dtype.kind not in "biuf" or not (np.abs(array) < 2**31).all() or (array != np.round(array)).any():
            raise ValueError(f"{path}: {key} must hold integers, got {array.dtype} values")
        if columns is not None and (array.ndim != 2 or array.shape[1] != columns):
            raise ValueError(f"{path}: {key} must be [N, {columns}], got {array.shape}")
        return array

    def _tracklets(self, info: np.ndarray, names: list[str], split: str, keep_distractors: bool) -> list[Tracklet]:
        """The tracklets of ``info`` rows ``(start, end, pid, camid)`` (1-based rows of the split's
        name file)."""
        info_file, names_file = self.root / "info" / f"tracks_{split}_info.mat", self.root / "info" / f"{split}_name.txt"
        out = []
        for start, end, pid, camid in info.astype(np.int64).tolist():
            if pid == -1 or (pid == 0 and not keep_distractors):
                continue
            if not 1 <= start <= end <= len(names):
                raise ValueError(f"{info_file}: tracklet rows {start}..{end} outside the {len(names)} names of "
                                 f"{names_file}")
            frame_names = names[start - 1:end]
            prefix = mars_pid_folder(pid)
            for name in frame_names:
                if name[:4] != prefix or name[5:6] != str(camid):
                    raise ValueError(f"{info_file}: frame {name!r} of {names_file} does not belong to the "
                                     f"tracklet of pid {pid}, camera {camid}")
            frames = tuple(str(self.root / f"bbox_{split}" / prefix / name) for name in frame_names)
            out.append(Tracklet(frames, pid, camid - 1))
        return out

    def _keypoints(self, tracklets: list[Tracklet], split: str) -> list[Tracklet]:
        folder = self.root / f"bbox_{split}_keypoints"
        if not folder.is_dir():
            return tracklets

        def frame_file(frame: str) -> Path | None:
            path = folder / Path(frame).parent.name / (Path(frame).stem + ".pose")
            return path if path.is_file() else None

        return self._with_keypoints(tracklets, frame_file, self.root / "keypoints_cache" / split, f"MARS {split}")


# --------------------------------------------------------------------------------------------
# Two-camera datasets with 10 splits: iLIDS-VID and PRID2011
# --------------------------------------------------------------------------------------------
def _frames_in(folder: Path, suffix: str) -> tuple[str, ...]:
    return tuple(str(p) for p in sorted(folder.glob(f"*{suffix}")))


def _store_splits(path: Path, splits: list[dict], dataset: str) -> None:
    try:
        with open(path, "w") as f:
            json.dump(splits, f, indent=1)
    except OSError as e:
        logger.warning("%s: cannot store the splits beside the data (%s); they are rebuilt each time "
                       "from the same seed", dataset, e)


def _load_splits(path: Path, dataset: str) -> list[dict] | None:
    if not path.is_file():
        return None
    with open(path) as f:
        try:
            splits = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: malformed splits file: {e}") from None
    if not isinstance(splits, list) or not all(isinstance(s, dict) and "train" in s and "test" in s for s in splits):
        raise ValueError(f"{path}: expected a list of {{'train': [...], 'test': [...]}} splits ({dataset})")
    return splits


def _random_splits(people: list[str], num_splits: int = 10, seed: int = 0) -> list[dict]:
    """``num_splits`` random halvings of ``people`` (train: the first half, test: the second)."""
    rng = np.random.default_rng(seed)
    half = len(people) // 2
    splits = []
    for _ in range(num_splits):
        order = rng.permutation(len(people))
        splits.append({"train": sorted(people[i] for i in order[:half]),
                       "test": sorted(people[i] for i in order[half:2 * half])})
    return splits


class _TwoCameraDataset(VideoReIDDataset):
    """Query = camera 0 of the test people, gallery = camera 1, train = both cameras of the train
    people, for one of 10 train/test splits of the people (made once by ``_make_splits`` and stored
    as ``split_file`` beside the data).  Subclasses set the class attributes below."""

    label: str              # the dataset's name in messages
    subdir: str             # root may be the folder above the dataset, which holds it under this name
    cam_dirs: tuple[str, str]
    split_file: str
    person_prefix: str      # person folder = prefix + number (the pid)
    source: str

    def __init__(self, root: str | Path, split_id: int = 0):
        root = Path(root).expanduser()
        if not (root / self.cam_dirs[0]).is_dir() and (root / self.subdir).is_dir():
            root = root / self.subdir
        _require(self.label, root, list(self.cam_dirs), self.source)
        self.root = root
        cams = tuple(root / c for c in self.cam_dirs)
        splits = _load_splits(root / self.split_file, self.label)
        if splits is None:
            splits = self._make_splits(cams)
            _store_splits(root / self.split_file, splits, self.label)
        if not 0 <= split_id < len(splits):
            raise ValueError(f"{self.label}: split_id must be in [0, {len(splits)}), got {split_id}")

        def tracklets(people, camids):
            out = []
            for person in people:
                for camid in camids:
                    frames = _frames_in(cams[camid] / person, ".png")
                    if not frames:
                        raise DatasetNotFoundError(f"{self.label}: no .png frames in {cams[camid] / person}")
                    out.append(Tracklet(frames, int(person[len(self.person_prefix):]), camid))
            return out

        split = splits[split_id]
        train, query, gallery = (
            self._sidecar_keypoints(tracklets(people, camids), name)
            for people, camids, name in ((split["train"], (0, 1), "train"), (split["test"], (0,), "query"),
                                         (split["test"], (1,), "gallery")))
        super().__init__(_relabel(train), query, gallery)

    def _make_splits(self, cams: tuple[Path, Path]) -> list[dict]:
        raise NotImplementedError


class iLIDSVID(_TwoCameraDataset):  # noqa: N801 (the dataset's own spelling)
    """iLIDS-VID (Wang et al., ECCV 2014): 300 people, 2 cameras, ``root`` holding ``i-LIDS-VID/
    sequences/cam{1,2}/personNNN/*.png`` (or ``root/ilids-vid``).  The 10 standard splits come from
    ``train-test people splits/train_test_splits_ilidsvid.mat`` (test = the first half of each row of
    ``ls_set``, as torchreid); they are stored once as ``splits.json`` beside the data."""

    name = "ilidsvid"
    label, subdir, split_file, person_prefix = "iLIDS-VID", "ilids-vid", "splits.json", "person"
    cam_dirs = ("i-LIDS-VID/sequences/cam1", "i-LIDS-VID/sequences/cam2")
    source = ("iLIDS-VID comes from https://xiatian-zhu.github.io/downloads_qmul_iLIDS-VID_ReID_dataset.html "
              "(i-LIDS-VID.tar with its 'train-test people splits' folder).")

    def _make_splits(self, cams):
        mat = "train-test people splits/train_test_splits_ilidsvid.mat"
        _require(self.label, self.root, [mat], self.source)
        people = sorted(p.name for p in cams[0].iterdir() if p.is_dir())
        ls_set = MARS._mat(self.root / mat, "ls_set").astype(np.int64) - 1
        if ls_set.ndim != 2 or ls_set.min() < 0 or ls_set.max() >= len(people):
            raise ValueError(f"{self.root / mat}: ls_set must be [splits, people] of indices 1..{len(people)} "
                             f"(the person folders of cam1), got shape {ls_set.shape}")
        half = ls_set.shape[1] // 2
        return [{"train": sorted(people[i] for i in row[half:]), "test": sorted(people[i] for i in row[:half])}
                for row in ls_set]


class PRID2011(_TwoCameraDataset):
    """PRID2011 (Hirzer et al., SCIA 2011): ``root`` holding ``prid_2011/multi_shot/cam_{a,b}/
    person_NNNN/*.png`` (or ``root/prid2011``).  The standard protocol keeps the people seen by both
    cameras with more than ``min_frames`` (21) frames in each (178 on the real data) and halves
    them at random 10 times; the splits are made once (seed 0) and stored as
    ``splits_prid2011.json`` beside the data (torchreid's file is used when present)."""

    name = "prid2011"
    label, subdir, split_file, person_prefix = "PRID2011", "prid2011", "splits_prid2011.json", "person_"
    cam_dirs = ("prid_2011/multi_shot/cam_a", "prid_2011/multi_shot/cam_b")
    source = ("PRID2011 comes from https://www.tugraz.at/institute/icg/research/team-bischof/"
              "learning-recognition-surveillance/downloads/prid11 (prid_2011.zip).")

    def __init__(self, root: str | Path, split_id: int = 0, min_frames: int = 21):
        self.min_frames = min_frames
        super().__init__(root, split_id)

    def _make_splits(self, cams):
        people = [p.name for p in sorted(cams[0].iterdir()) if p.is_dir() and (cams[1] / p.name).is_dir()
                  and all(len(_frames_in(cam / p.name, ".png")) > self.min_frames for cam in cams)]
        if len(people) < 2:
            raise ValueError(f"{self.label}: fewer than 2 people in {cams[0].parent} are seen by both cameras "
                             f"with more than {self.min_frames} frames")
        return _random_splits(people)


# --------------------------------------------------------------------------------------------
# DukeMTMC-VideoReID
# --------------------------------------------------------------------------------------------
DUKEV_SOURCE = ("DukeMTMC-VideoReID comes from https://github.com/Yu-Wu/DukeMTMC-VideoReID "
                "(DukeMTMC-VideoReID.zip).")


class DukeMTMCVideoReID(VideoReIDDataset):
    """DukeMTMC-VideoReID (Wu et al., CVPR 2018): ``root`` holding ``{train,query,gallery}/<pid>/
    <tracklet>/<pid>_C<cam>_F<frame>_X<n>.jpg`` (or ``root/DukeMTMC-VideoReID``, or
    ``root/dukemtmc-vidreid/DukeMTMC-VideoReID``); frames ordered by their F number, the camera
    from the name (old names ``0001C6F0099X30823.jpg`` too).  Keypoint files beside the frames
    (``.pose``, OpenPose ``_keypoints.json``) are used when present."""

    name = "dukev"
    _NAME = re.compile(r"^(-?\d+)_?C(\d+)_?F(\d+)")

    def __init__(self, root: str | Path):
        root = Path(root).expanduser()
        for sub in ("DukeMTMC-VideoReID", "dukemtmc-vidreid/DukeMTMC-VideoReID"):
            if not (root / "train").is_dir() and (root / sub).is_dir():
                root = root / sub
        _require("DukeMTMC-VideoReID", root, ["train", "query", "gallery"], DUKEV_SOURCE)
        self.root = root
        parts = [self._split(name) for name in ("train", "query", "gallery")]
        super().__init__(_relabel(parts[0]), parts[1], parts[2])

    def _split(self, name: str) -> list[Tracklet]:
        out = []
        for pid_dir in sorted(p for p in (self.root / name).iterdir() if p.is_dir()):
            for track_dir in sorted(p for p in pid_dir.iterdir() if p.is_dir()):
                parsed = []
                for path in track_dir.glob("*.jpg"):
                    match = self._NAME.match(path.name)
                    if match is None:
                        raise ValueError(f"{path}: not a DukeMTMC-VideoReID frame name "
                                         f"(<pid>_C<cam>_F<frame>_X<n>.jpg)")
                    parsed.append((int(match.group(3)), int(match.group(2)), str(path)))
                if not parsed:
                    continue
                parsed.sort()
                cams = {cam for _, cam, _ in parsed}
                if len(cams) != 1:
                    raise ValueError(f"{track_dir}: frames of one tracklet from several cameras {sorted(cams)}")
                out.append(Tracklet(tuple(p for _, _, p in parsed), int(pid_dir.name), parsed[0][1] - 1))
        return self._sidecar_keypoints(out, name)


# --------------------------------------------------------------------------------------------
# PoseTrackReID
# --------------------------------------------------------------------------------------------
POSETRACKREID_SOURCE = ("PoseTrackReID (KMPNet, AAAI 2022) is built from PoseTrack 2018 and is not "
                        "public; ask the KMPNet authors (https://github.com/dichen-cd/KeypointMessagePassing).")


class PoseTrackReID(VideoReIDDataset):
    """PoseTrackReID as KMPNet's reader: ``root/posetrack-reid/`` (or ``root``) holding
    ``train_names.json``, ``query_names.json``, ``gallery_names.json`` (entries ``[frame names
    ending .pose, pid, video id]``), images ``{train,val}/<pid>/<name>.jpg`` and keypoints
    ``{train,val}_keypoints/<pid>/<name>.pose`` (query and gallery under ``val``).  The video id is
    the camera id."""

    name = "posetrackreid"

    def __init__(self, root: str | Path):
        root = Path(root).expanduser()
        if not (root / "train_names.json").is_file() and (root / "posetrack-reid").is_dir():
            root = root / "posetrack-reid"
        files = ["train_names.json", "query_names.json", "gallery_names.json"]
        _require("PoseTrackReID", root, files + ["train", "val"], POSETRACKREID_SOURCE)
        self.root = root
        parts = [self._split(split, folder) for split, folder in (("train", "train"), ("query", "val"),
                                                                   ("gallery", "val"))]
        super().__init__(_relabel(parts[0]), parts[1], parts[2])

    def _split(self, split: str, folder: str) -> list[Tracklet]:
        path = self.root / f"{split}_names.json"
        with open(path) as f:
            try:
                entries = json.load(f)
            except ValueError as e:
                raise ValueError(f"{path}: malformed json: {e}") from None
        out = []
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], list) and entry[0]):
                raise ValueError(f"{path}: each entry must be [frame names, pid, video id], got {entry!r:.80}")
            names, pid, vid = entry
            frames = tuple(str(self.root / folder / str(pid) / (Path(n).stem + ".jpg")) for n in names)
            out.append(Tracklet(frames, int(pid), int(vid)))
        pose_root = self.root / f"{folder}_keypoints"

        def frame_file(frame: str) -> Path | None:
            p = pose_root / Path(frame).parent.name / (Path(frame).stem + ".pose")
            return p if p.is_file() else None

        return self._with_keypoints(out, frame_file, self.root / "keypoints_cache" / split, f"PoseTrackReID {split}")


DATASETS: dict[str, type[VideoReIDDataset]] = {
    "mars": MARS, "ilidsvid": iLIDSVID, "prid2011": PRID2011, "dukev": DukeMTMCVideoReID,
    "posetrackreid": PoseTrackReID,
}

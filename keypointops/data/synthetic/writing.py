"""Writing the synthetic dataset in the MARS layout (frames, ``.pose`` keypoints, ``info/``) with
parallel rendering, and its cache folder (generated once, atomically)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from keypointops._checks import check_choice
from keypointops.data.keypoint_files import write_pose
from keypointops.data.synthetic.appearance import FAMILIES, _identities, make_camera
from keypointops.data.synthetic.rendering import Framing, render_tracklet

__all__ = ["VERSION", "DEFAULTS", "HARD", "NEUTRAL", "generate", "default_root", "ensure_synthetic", "gait_twins"]

#: Bumped whenever the rendering changes, so cached datasets of an older version are not reused.
VERSION = 2

#: The default parameters: 12,934 frames of 128 x 64 (39 MB).
DEFAULTS = dict(num_train_ids=80, num_test_ids=80, seed=0, num_cameras=6, frames=20, size=(128, 64),
                distractors=0.08, junk=0.04, occluders=0.3)

#: The variation knobs (see :func:`generate`) at their neutral values, which render the default
#: dataset.  A description (``synthetic.json``) and a cache key list only the knobs that differ
#: from these, so a new knob leaves every existing dataset's description and cache folder as it is.
NEUTRAL = dict(families="colours", person_height=None, feet=None, box_jitter=1.0, shift=0.0, gait_twins=0.0,
               body_spread=1.0)

#: The hard variant (``synthetic-hard``): where a body part lands in the crop varies from tracklet
#: to tracklet and only the keypoints say where; family members differ only in where their colours
#: are; half the tracklets occluded; gait twins.  The training split is the default one's size, the
#: test split larger (more queries, so that small differences in mAP are resolvable).
HARD = dict(DEFAULTS, num_test_ids=400, frames=16, occluders=0.5, families="placement", person_height=(0.55, 1.0),
            feet=(0.65, 1.05), box_jitter=2.0, shift=0.2, gait_twins=0.15)

def _normalise_params(*, num_train_ids, num_test_ids, seed, num_cameras, frames, size, distractors, junk,
                      occluders, **variation) -> dict:
    if isinstance(size, int):
        size = (size, size // 2)
    size = tuple(int(v) for v in size)
    if len(size) != 2 or size[0] < 16 or size[1] < 8:
        raise ValueError(f"synthetic: size must be (height, width) >= (16, 8) or a height, got {size}")
    if num_train_ids < 2 or num_test_ids < 2:
        raise ValueError(f"synthetic: num_train_ids and num_test_ids must be >= 2, got "
                         f"{num_train_ids}, {num_test_ids}")
    if not 2 <= num_cameras <= 9:
        raise ValueError(f"synthetic: num_cameras must be in [2, 9] (MARS names hold one digit), got {num_cameras}")
    if frames < 2:
        raise ValueError(f"synthetic: frames (mean tracklet length) must be >= 2, got {frames}")
    params = dict(num_train_ids=int(num_train_ids), num_test_ids=int(num_test_ids), seed=int(seed),
                  num_cameras=int(num_cameras), frames=int(frames), size=list(size),
                  distractors=float(distractors), junk=float(junk), occluders=float(occluders))
    unknown = sorted(set(variation) - set(NEUTRAL))
    if unknown:
        raise ValueError(f"synthetic: unknown parameter(s) {unknown}; known: {sorted(DEFAULTS) + sorted(NEUTRAL)}")
    variation = {**NEUTRAL, **variation}
    check_choice("synthetic", "families", variation["families"], FAMILIES)
    for key, lo_min, hi_max in (("person_height", 0.1, 2.0), ("feet", 0.2, 1.5)):
        value = variation[key]
        if value is not None:
            value = [float(v) for v in value]
            if len(value) != 2 or not lo_min <= value[0] <= value[1] <= hi_max:
                raise ValueError(f"synthetic: {key} must be None or (low, high) with {lo_min} <= low <= high "
                                 f"<= {hi_max}, got {variation[key]}")
            variation[key] = value
    for key, hi in (("box_jitter", 10.0), ("shift", 0.5), ("gait_twins", 1.0)):
        variation[key] = float(variation[key])
        if not 0.0 <= variation[key] <= hi:
            raise ValueError(f"synthetic: {key} must be in [0, {hi}], got {variation[key]}")
    variation["body_spread"] = float(variation["body_spread"])
    if not 0.0 < variation["body_spread"] <= 2.0:  # beyond 2 the tallest outgrow the crop (stature 0.98 at 2)
        raise ValueError(f"synthetic: body_spread must be in (0, 2], got {variation['body_spread']}")
    params.update((key, value) for key, value in variation.items() if value != NEUTRAL[key])
    return params


def _variation(params: dict) -> dict:
    """The variation knobs of normalised ``params``, neutral where not given."""
    return {key: params.get(key, value) for key, value in NEUTRAL.items()}


def _framing(params: dict, split: str, number: int, side_view: bool) -> Framing:
    """Tracklet ``number`` of ``split``'s :class:`Framing`, drawn from its own random stream (the
    tracklet's rendering stream is the same whatever the knobs)."""
    knobs = _variation(params)
    rng = np.random.default_rng((params["seed"], 4, 0 if split == "train" else 1, number))
    height = None if knobs["person_height"] is None else float(rng.uniform(*knobs["person_height"]))
    feet = Framing.feet if knobs["feet"] is None else float(rng.uniform(*knobs["feet"]))
    shift = float(rng.uniform(-knobs["shift"], knobs["shift"])) if knobs["shift"] else 0.0
    view = float(rng.choice([-math.pi / 2, math.pi / 2])) if side_view else None
    return Framing(height=height, feet=feet, shift=shift, jitter=knobs["box_jitter"], view=view)


def _plan(params: dict) -> dict[str, list[dict]]:
    """Which tracklets to render: per split, dicts (pid, cam 1-based, tracklet no., length, role,
    identity key); pids 1..num_train_ids are train, the next num_test_ids test."""
    rng = np.random.default_rng((params["seed"], 1))
    lo, hi = max(2, params["frames"] * 3 // 4), max(2, params["frames"] * 5 // 4)
    plan = {"train": [], "test": []}
    num_train = params["num_train_ids"]
    for pid in range(1, num_train + params["num_test_ids"] + 1):
        split = "train" if pid <= num_train else "test"
        cams = sorted(int(c) + 1 for c in rng.choice(params["num_cameras"], int(rng.integers(2, min(4, params["num_cameras"]) + 1)), replace=False))
        rows = []
        for cam in cams:
            for t in range(1 + int(rng.random() < 0.3)):
                rows.append(dict(pid=pid, cam=cam, tracklet=t + 1, length=int(rng.integers(lo, hi + 1)),
                                 role="gallery", identity=pid))
        if split == "test":
            query_cams = rng.choice(cams, int(rng.integers(1, len(cams))), replace=False)
            for cam in query_cams:
                next(r for r in rows if r["cam"] == cam)["role"] = "query"
        plan[split].extend(rows)
    num_test_tracklets = len(plan["test"])
    counters = {}
    extra_identity = num_train + params["num_test_ids"] + 1
    for pid, count in ((0, params["distractors"]), (-1, params["junk"])):
        for _ in range(int(round(count * num_test_tracklets))):
            cam = int(rng.integers(1, params["num_cameras"] + 1))
            counters[pid, cam] = counters.get((pid, cam), 0) + 1
            plan["test"].append(dict(pid=pid, cam=cam, tracklet=counters[pid, cam],
                                     length=int(rng.integers(lo, hi + 1)), role="gallery", identity=extra_identity))
            extra_identity += 1
    for split in plan:
        plan[split].sort(key=lambda r: (r["pid"] if r["pid"] > 0 else 10**9 - r["pid"], r["cam"], r["tracklet"]))
    return plan


_STATE: tuple = ()


def _set_state(state: tuple) -> None:
    """Sets what :func:`_write_tracklet` needs (root, parameters, cameras, people, the identity
    numbers of gait twins) in a process."""
    global _STATE
    _STATE = state


def _write_tracklet(job: tuple[str, int, dict]) -> list[str]:
    """Renders tracklet ``number`` of ``split`` and writes its frames and .pose files; returns the
    frame names.  Its randomness depends only on (seed, split, number): any process may render it."""
    split, number, row = job
    root, params, cameras, people, twins = _STATE
    pid, cam = row["pid"], row["cam"]
    folder = _folder(pid)
    rng = np.random.default_rng((params["seed"], 3, 0 if split == "train" else 1, number))
    framing = _framing(params, split, number, side_view=row["identity"] in twins)
    images, keypoints, _ = render_tracklet(rng, people[row["identity"] - 1], cameras[cam - 1], row["length"],
                                           tuple(params["size"]), occluders=params["occluders"], junk=pid == -1,
                                           framing=framing)
    names = []
    for f, (image, kp) in enumerate(zip(images, keypoints)):
        name = f"{folder}C{cam}T{row['tracklet']:04d}F{f + 1:03d}"
        image.save(root / f"bbox_{split}" / folder / f"{name}.jpg", quality=90)
        write_pose(root / f"bbox_{split}_keypoints" / folder / f"{name}.pose", kp)
        names.append(f"{name}.jpg")
    return names


def _folder(pid: int) -> str:
    return "00-1" if pid == -1 else f"{pid:04d}"


def _savemat(path: Path, name: str, array: np.ndarray) -> None:
    """``scipy.io.savemat`` with a fixed header text (scipy writes the creation time there), so the
    files are byte-identical for the same content."""
    from scipy.io import savemat

    buffer = io.BytesIO()
    savemat(buffer, {name: array}, do_compression=False)
    data = bytearray(buffer.getvalue())
    header = b"MATLAB 5.0 MAT-file, written by keypointops.data.synthetic"
    data[:116] = header.ljust(116, b" ")
    path.write_bytes(bytes(data))


def generate(root: str | os.PathLike, *, num_train_ids: int = DEFAULTS["num_train_ids"],
             num_test_ids: int = DEFAULTS["num_test_ids"], seed: int = DEFAULTS["seed"],
             num_cameras: int = DEFAULTS["num_cameras"], frames: int = DEFAULTS["frames"],
             size=DEFAULTS["size"], distractors: float = DEFAULTS["distractors"],
             junk: float = DEFAULTS["junk"], occluders: float = DEFAULTS["occluders"],
             families: str = NEUTRAL["families"], person_height=NEUTRAL["person_height"], feet=NEUTRAL["feet"],
             box_jitter: float = NEUTRAL["box_jitter"], shift: float = NEUTRAL["shift"],
             gait_twins: float = NEUTRAL["gait_twins"], body_spread: float = NEUTRAL["body_spread"],
             workers: int = 2, progress: bool = True) -> dict:
    """Writes the synthetic dataset (MARS layout, see the module docstring) into ``root`` and
    returns its description (also written to ``root/synthetic.json``).

    Args:
        num_train_ids, num_test_ids: identities of each split (each seen by 2-4 cameras, 1-2
            tracklets per camera).
        seed: everything is a function of the parameters: same parameters, byte-identical files.
        num_cameras: 2..9.
        frames: mean tracklet length (lengths uniform in [3/4, 5/4] of it).
        size: frame (height, width) in pixels, or a height (width = height / 2).
        distractors, junk: pid-0 / pid-(-1) test tracklets, as a fraction of the test tracklets.
        occluders: fraction of tracklets with an occluder over a run of frames.
        families: ``"colours"`` (members of a family wear the same colours on different garments,
            patterns and areas) or ``"placement"`` (members differ only in where their colours
            are: upper garment and high-waisted trousers of about equal areas swapped, an accent
            colour on the left or the right sleeve, trouser leg or side bag; trousers only, plain
            tops, no backpack).
        person_height: None (the identity's stature, about 0.86 of the crop height, within 5%
            across tracklets) or (low, high): each tracklet's person height drawn uniformly, as
            a detector's loose or tight boxes give (stature is then no cue).
        feet: None (the feet at 0.965 of the crop height) or (low, high): each tracklet's feet
            line drawn uniformly; above 1 the box cuts the feet off, and a tall person with high
            feet loses the head at the top (the person is rendered and cut at the border).
        box_jitter: the per-frame box jitter (position and scale, a first-order autoregressive
            walk) relative to the default detector's (2-3% of the crop).
        shift: each tracklet's horizontal offset of the person, uniform in [-shift, shift] crop
            widths (a box centred off the person).
        gait_twins: the probability that a family is a pair of gait twins: two people of one
            appearance (the same colours exactly) whose proportions (build, leg length) and gait
            (stride, cadence, arm swing) differ, always seen from the side, where gait shows
            best; only the body's shape and motion tell them apart.  The pairs are listed in
            the description (``gait_twins``, by split, pairs of pids; see :func:`gait_twins`).
        body_spread: how far apart people's bodies and gaits are: the ranges of stature, build,
            leg length, stride and arm swing (not cadence) widened about their centres by this
            factor, in (0, 2] (1: the default people; 2: twice as wide, for a stronger pose cue).
        workers: processes rendering in parallel (the files do not depend on it).
        progress: show a progress bar.
    """
    from tqdm import tqdm

    params = _normalise_params(num_train_ids=num_train_ids, num_test_ids=num_test_ids, seed=seed,
                               num_cameras=num_cameras, frames=frames, size=size, distractors=distractors,
                               junk=junk, occluders=occluders, families=families, person_height=person_height,
                               feet=feet, box_jitter=box_jitter, shift=shift, gait_twins=gait_twins,
                               body_spread=body_spread)
    knobs = _variation(params)
    size = tuple(params["size"])
    root = Path(root)
    rng = np.random.default_rng((params["seed"], 0))
    cameras = [make_camera(rng, size) for _ in range(params["num_cameras"])]
    plan = _plan(params)
    num_identities = max(r["identity"] for rows in plan.values() for r in rows)
    people, twin_pairs = _identities(np.random.default_rng((params["seed"], 2)), num_identities,
                                     knobs["families"], knobs["gait_twins"], knobs["body_spread"])
    twin_pairs = [(first + 1, second + 1) for first, second in twin_pairs]  # identity numbers
    (root / "info").mkdir(parents=True, exist_ok=True)
    for split, rows in plan.items():
        for folder in {_folder(r["pid"]) for r in rows}:
            (root / f"bbox_{split}" / folder).mkdir(parents=True, exist_ok=True)
            (root / f"bbox_{split}_keypoints" / folder).mkdir(parents=True, exist_ok=True)
    jobs = [(split, number, row) for split, rows in plan.items() for number, row in enumerate(rows)]
    state = (root, params, cameras, people, {number for pair in twin_pairs for number in pair})
    workers = max(1, min(int(workers), len(jobs)))
    names = {split: [] for split in plan}
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=sum(r["length"] for _, _, r in jobs), desc="synthetic frames",
                                       unit="frame", disable=not progress))
        if workers > 1:
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(
                workers, initializer=_set_state, initargs=(state,)))
            results = pool.imap(_write_tracklet, jobs, chunksize=4)
        else:
            _set_state(state)
            results = map(_write_tracklet, jobs)
        for (split, _, row), tracklet_names in zip(jobs, results):
            row["frames"] = (len(names[split]) + 1, len(names[split]) + len(tracklet_names))
            names[split].extend(tracklet_names)
            bar.update(row["length"])
    counts = {}
    for split, rows in plan.items():
        info = [(r["frames"][0], r["frames"][1], r["pid"], r["cam"]) for r in rows]
        query_rows = [number + 1 for number, r in enumerate(rows) if r["role"] == "query"]
        (root / "info" / f"{split}_name.txt").write_text("".join(n + "\n" for n in names[split]))
        _savemat(root / "info" / f"tracks_{split}_info.mat", f"track_{split}_info", np.array(info, np.float64))
        if split == "test":
            _savemat(root / "info" / "query_IDX.mat", "query_IDX", np.array([query_rows], np.float64))
        counts[split] = dict(tracklets=len(rows), frames=len(names[split]),
                             ids=len({r["pid"] for r in rows if r["pid"] > 0}),
                             query=len(query_rows), distractors=sum(r["pid"] == 0 for r in rows),
                             junk=sum(r["pid"] == -1 for r in rows))
    description = dict(version=VERSION, params=params, counts=counts)
    if knobs["gait_twins"]:
        # Identity numbers are the pids of the train and test identities.
        num_train = params["num_train_ids"]
        last = num_train + params["num_test_ids"]
        description["gait_twins"] = {
            "train": [list(pair) for pair in twin_pairs if pair[1] <= num_train],
            "test": [list(pair) for pair in twin_pairs if pair[0] > num_train and pair[1] <= last]}
    (root / "synthetic.json").write_text(json.dumps(description, indent=1) + "\n")
    return description


def gait_twins(root: str | os.PathLike, split: str = "test") -> list[tuple[int, int]]:
    """The pairs of gait twins (pids) of ``split`` of the synthetic dataset in ``root`` (none when
    it was generated without ``gait_twins``), e.g. to evaluate on the queries of twins only."""
    if split not in ("train", "test"):
        raise ValueError(f"gait_twins: split must be 'train' or 'test', got {split!r}")
    description = json.loads((Path(root) / "synthetic.json").read_text())
    return [tuple(pair) for pair in description.get("gait_twins", {}).get(split, [])]


def _params_key(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def default_root(**params) -> Path:
    """The cache folder of the dataset with ``params`` (defaults: :data:`DEFAULTS`):
    ``$KEYPOINTOPS_CACHE`` (else ``~/.cache/keypointops``) ``/synthetic-v<VERSION>-<params hash>``."""
    params = _normalise_params(**{**DEFAULTS, **params})
    base = Path(os.environ.get("KEYPOINTOPS_CACHE") or Path.home() / ".cache" / "keypointops")
    return base / f"synthetic-v{VERSION}-{_params_key(params)}"


def ensure_synthetic(root: str | os.PathLike | None = None, *, progress: bool = True, workers: int = 2,
                     **params) -> Path:
    """The synthetic dataset's folder, generated on first use: ``root`` (default
    :func:`default_root`) is reused when it holds a complete dataset (``synthetic.json``), else it is
    generated into a temporary sibling folder and renamed into place, so an interrupted or concurrent
    generation never leaves a partial dataset there."""
    root = Path(root) if root is not None else default_root(**params)
    if (root / "synthetic.json").is_file():
        stored = json.loads((root / "synthetic.json").read_text())
        wanted = _normalise_params(**{**DEFAULTS, **params})
        if stored.get("version") != VERSION or stored.get("params") != wanted:
            raise ValueError(f"synthetic: {root} holds a dataset of other parameters or version "
                             f"({stored.get('version')}, {stored.get('params')}); asked for "
                             f"({VERSION}, {wanted}); remove it or choose another folder")
        return root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"synthetic: {root} exists but holds no complete synthetic dataset "
                              f"(no synthetic.json); remove it or choose another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        generate(tmp, progress=progress, workers=workers, **params)
        if root.exists():
            root.rmdir()
        os.rename(tmp, root)
    except OSError:
        if (root / "synthetic.json").is_file():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return root
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
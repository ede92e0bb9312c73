"""How much identity the keypoints alone carry: a no-image check of a dataset's pose cue.

RGCN/LGCN's pose branch (and any pose-only re-ID feature) can only learn what the keypoint
sequences tell apart.  This script measures that without training a re-ID model, on the test split
(4 frames per tracklet sampled ``evenly``, the ``cpu`` presets' test sampling) and, for a synthetic
dataset with gait twins, on the twins: for each twin query the gallery is restricted to the
tracklets of its pair (same appearance, different body and gait), so a feature that ranks the
query's own identity first gets AP 1 and a random one gets the chance level printed beside it.

Features compared (each a clip embedding ranked by Euclidean distance):

* **random**: Gaussian noise, ``--draws`` independent draws: the chance level (their mean) and the
  spread of chance on the twins (the 95th percentile of the draws' twin-pair AP).  Every other row
  gives the share of the draws whose twin-pair AP it exceeds: above 95 % is above chance at the 5 %
  level.
* **limb ratios** (hand-made, no learning): per frame, the lengths of thigh, shin, torso,
  upper arm, forearm, shoulder width and hip width divided by the frame's visible body height
  (left and right averaged where both are seen), then the median over the clip's frames.
* **learned MLP**: a 2-layer MLP on the clip's body-normalised coordinates (each frame's visible
  joints centred on their box and divided by its height; missing joints 0), trained with
  cross-entropy on the training identities for ``--steps`` steps of 16 clips (random frames, one
  per quarter of the tracklet, ``restricted_random``: the test frames' distribution).  It prints the
  training cross-entropy at the start (``ln(training ids)``) and at the end: how far the keypoints
  alone let even a free-form classifier fit the training identities.
* **RGCN's pose branch trained alone**: :class:`~keypointops.models.rgcn.RecurrentGraphConv` + DAM
  (``--hidden`` n, the ``rgcn`` cpu preset's 64) on the paper's inputs (the 14 joints' coordinates
  divided by the frame size), trained exactly as the MLP (same steps, batches, optimiser, no triplet
  loss, no weight decay): whether the branch's architecture can fit what the keypoints carry.
* **the same branch on body-normalised inputs** (not the paper's): the MLP's body-normalised
  coordinates of the 14 joints through a ``BatchNorm1d`` over joints x coordinates first (ST-GCN's
  and MS-G3D's ``data_bn``), trained the same way: whether a pose input freed of the crop's framing
  lets the architecture learn the cue.
* **trained pose branches** (``--checkpoint``, RGCN/LGCN runs on the same dataset): the model's
  pose feature ``f^p`` alone (``embedding="pose"``), extracted with the run's own test settings.

Run: ``PYTHONPATH=. python bench/pose_cue.py [--data synthetic-hard] [--steps 2000] [--seed 0]
[--draws 200] [--checkpoint RUN/model.pt ...]``; ``--root DIR`` for a folder written by, e.g.,
``keypointops synth --hard --body-spread 2 --out DIR`` (people twice as different in body and gait).
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from PIL import Image

from keypointops.data import build_dataset, load_keypoints
from keypointops.data.sampling import sample_frames
from keypointops.data.synthetic import gait_twins
from keypointops.evaluation import evaluate
from keypointops.models.rgcn import DualAttention, RecurrentGraphConv, pose14_from_coco17

FRAMES = 4
# COCO-17 limbs: (name, (joint a, joint b) pairs over which the length is averaged)
LIMBS = (("thigh", ((11, 13), (12, 14))), ("shin", ((13, 15), (14, 16))), ("torso", ((5, 11), (6, 12))),
         ("upper arm", ((5, 7), (6, 8))), ("forearm", ((7, 9), (8, 10))), ("shoulders", ((5, 6),)),
         ("hips", ((11, 12),)))


def body_normalised(clip: np.ndarray) -> np.ndarray:
    """``[T, 17, 3]`` keypoints -> ``[T, 17, 2]``: each frame's visible joints centred on their box
    and divided by its height; missing joints (confidence 0) exactly 0."""
    out = np.zeros(clip.shape[:2] + (2,), np.float32)
    for t, frame in enumerate(clip):
        seen = frame[:, 2] > 0
        if seen.sum() < 2:
            continue
        xy = frame[seen, :2]
        lo, hi = xy.min(0), xy.max(0)
        out[t, seen] = (xy - (lo + hi) / 2) / max(hi[1] - lo[1], 1e-3)
    return out


def limb_ratios(clip: np.ndarray) -> np.ndarray:
    """The hand-made feature of a clip: median over frames of each limb's length / body height."""
    rows = []
    for frame in clip:
        seen = frame[:, 2] > 0
        height = np.ptp(frame[seen, 1]) if seen.sum() >= 2 else 0.0
        row = []
        for _, pairs in LIMBS:
            lengths = [np.linalg.norm(frame[a, :2] - frame[b, :2]) for a, b in pairs if seen[a] and seen[b]]
            row.append(np.mean(lengths) / height if lengths and height > 1 else np.nan)
        rows.append(row)
    feature = np.nanmedian(np.array(rows, np.float64), axis=0)
    return np.nan_to_num(feature, nan=0.0)


def evaluation_frames(length: int) -> np.ndarray:
    """The frames of a tracklet of ``length`` frames that make its test clip: ``FRAMES`` sampled ``evenly``."""
    return sample_frames(length, FRAMES, "evenly")


def frame_size(path: str) -> tuple[int, int]:
    """``(H, W)`` of a frame image (the keypoints are in its pixels)."""
    with Image.open(path) as image:
        return image.height, image.width


class Split:
    def __init__(self, tracklets):
        self.keypoints = [load_keypoints(t) for t in tracklets]
        self.pids = np.array([t.pid for t in tracklets])
        self.cams = np.array([t.camid for t in tracklets])
        self.sizes = [frame_size(t.frames[0]) for t in tracklets]

    def clips(self) -> list[np.ndarray]:
        return [kp[evaluation_frames(len(kp))] for kp in self.keypoints]


def retrieval(features: np.ndarray, query: Split, gallery: Split, twins: list[tuple[int, int]]) -> tuple:
    """(mAP on all queries, mean AP of the twins' queries against their pair's tracklets only)."""
    qf, gf = torch.as_tensor(features[:len(query.pids)]), torch.as_tensor(features[len(query.pids):])
    whole = 100 * evaluate(qf, gf, query.pids, gallery.pids, query.cams, gallery.cams)["mAP"]
    pair_of = {pid: set(pair) for pair in twins for pid in pair}
    aps = []
    for i in np.flatnonzero(np.isin(query.pids, list(pair_of))):
        keep = np.isin(gallery.pids, list(pair_of[query.pids[i]]))
        try:
            aps.append(evaluate(qf[i:i + 1], gf[keep], query.pids[i:i + 1], gallery.pids[keep], query.cams[i:i + 1],
                                gallery.cams[keep])["mAP"])
        except ValueError:  # no cross-camera match of this query in its pair's tracklets
            pass
    return whole, 100 * float(np.mean(aps)) if aps else float("nan")


def mlp_net() -> torch.nn.Module:
    """The free-form classifier's trunk: body-normalised ``[B, T, 17, 2]`` -> ``[B, 128]``."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(FRAMES * 17 * 2, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 128), torch.nn.ReLU())


def pose_branch_net(hidden: int) -> torch.nn.Module:
    """RGCN's pose branch as the model builds it: the recurrent graph conv and DAM,
    ``[B, T, 14, 2]`` image-normalised coordinates -> ``f^p [B, 2 * hidden]``."""
    return torch.nn.Sequential(RecurrentGraphConv(hidden), DualAttention(hidden))


class JointBatchNorm(torch.nn.Module):
    """``BatchNorm1d`` over the joints x coordinates of ``[B, T, K, C]`` (statistics over clips and
    frames), as skeleton models normalise their input (``data_bn``)."""

    def __init__(self, joints: int, channels: int):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(joints * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.flatten(2).flatten(0, 1)).view(x.shape)


def body_pose_branch_net(hidden: int) -> torch.nn.Module:
    """RGCN's pose branch behind :class:`JointBatchNorm`: body-normalised ``[B, T, 14, 2]`` -> ``f^p``."""
    return torch.nn.Sequential(JointBatchNorm(14, 2), RecurrentGraphConv(hidden), DualAttention(hidden))


def mlp_inputs(split: Split, index: int, frames: np.ndarray) -> np.ndarray:
    return body_normalised(split.keypoints[index][frames])


def pose_branch_inputs(split: Split, index: int, frames: np.ndarray) -> np.ndarray:
    """The pose branch's node features, as :class:`keypointops.models.RGCN` computes them."""
    clip = torch.from_numpy(split.keypoints[index][frames])
    return pose14_from_coco17(clip, size=split.sizes[index]).float().numpy()


def body_pose_branch_inputs(split: Split, index: int, frames: np.ndarray) -> np.ndarray:
    """The 14 joints of :func:`body_normalised` coordinates (missing joints 0)."""
    clip = split.keypoints[index][frames]
    body = np.concatenate([body_normalised(clip), clip[..., 2:3]], axis=-1)
    return pose14_from_coco17(torch.from_numpy(body)).float().numpy()


def train_classifier(train: Split, net: torch.nn.Module, inputs, width: int, steps: int,
                     seed: int) -> tuple[torch.nn.Module, float, float]:
    """``net`` + a linear classifier trained with cross-entropy on the training identities (Adam
    1e-3, no weight decay, 16 clips per step of ``restricted_random`` frames: the test frames'
    distribution); returns the trunk and the training CE at the start (``ln(ids)``) and at the end
    (mean of the last 100 steps)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    ids = np.unique(train.pids)
    labels = np.searchsorted(ids, train.pids)
    classifier = torch.nn.Linear(width, len(ids))
    optimizer = torch.optim.Adam([*net.parameters(), *classifier.parameters()], lr=1e-3)
    losses = []
    for _ in range(steps):
        batch = rng.choice(len(train.keypoints), 16)
        x = torch.from_numpy(np.stack([inputs(train, i, sample_frames(len(train.keypoints[i]), FRAMES,
                                                                      "restricted_random", rng))
                                       for i in batch]))
        loss = torch.nn.functional.cross_entropy(classifier(net(x)), torch.from_numpy(labels[batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return net.eval(), math.log(len(ids)), float(np.mean(losses[-100:]))


def test_features(net: torch.nn.Module, inputs, splits: tuple[Split, ...]) -> np.ndarray:
    """The trained trunk's embedding of every test clip (``evenly`` frames)."""
    clips = [inputs(split, i, evaluation_frames(len(kp)))
             for split in splits for i, kp in enumerate(split.keypoints)]
    with torch.no_grad():
        return net(torch.from_numpy(np.stack(clips))).numpy()


def pose_features(checkpoint: str, dataset) -> np.ndarray:
    """The query + gallery ``f^p`` embeddings of a trained RGCN/LGCN run."""
    from keypointops.checkpoints import load_checkpoint, model_from_checkpoint
    from keypointops.engine import evaluate_models

    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state, embedding="pose")
    result = evaluate_models({"pose": model}, dataset, state["config"], torch.device("cpu"))["pose"]
    return torch.cat([result["qf"], result["gf"]]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="synthetic-hard")
    parser.add_argument("--root", default=None)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=64, help="n of the pose branch (the rgcn cpu preset's 64)")
    parser.add_argument("--checkpoint", nargs="*", default=[], help="RGCN/LGCN runs whose f^p to evaluate")
    parser.add_argument("--draws", type=int, default=200, help="random features drawn for the chance level")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small models: a second thread gains little, and one leaves a core to another run
    start = time.perf_counter()
    dataset = build_dataset(args.data, args.root)
    twins = gait_twins(dataset.root) if (dataset.root / "synthetic.json").exists() else []
    train, query, gallery = Split(dataset.train), Split(dataset.query), Split(dataset.gallery)
    clips = query.clips() + gallery.clips()
    rows = []
    rng = np.random.default_rng(args.seed)
    draws = np.array([retrieval(rng.normal(size=(len(clips), 7)), query, gallery, twins) for _ in range(args.draws)])
    chance_pairs = draws[:, 1]
    rows.append((f"random (chance, {args.draws} draws)", *draws.mean(axis=0),
                 f"twin-pair AP 95th percentile {np.percentile(chance_pairs, 95):.1f}"))

    def beats(pair_ap: float) -> str:
        return f"twin-pair AP above {100 * np.mean(chance_pairs < pair_ap):.1f} % of the random draws"

    limbs = retrieval(np.stack([limb_ratios(c) for c in clips]), query, gallery, twins)
    rows.append(("limb ratios (hand-made)", *limbs, beats(limbs[1])))
    for name, make_net, inputs, width in (
            ("learned MLP, body-normalised keypoints", mlp_net, mlp_inputs, 128),
            (f"RGCN's pose branch (n = {args.hidden}), trained alone", lambda: pose_branch_net(args.hidden),
             pose_branch_inputs, 2 * args.hidden),
            ("the same on body-normalised inputs with a joint BatchNorm (not the paper's)",
             lambda: body_pose_branch_net(args.hidden), body_pose_branch_inputs, 2 * args.hidden)):
        torch.manual_seed(args.seed)  # each trunk's initial weights from --seed (torch's own start seed varies)
        net, ce_start, ce_end = train_classifier(train, make_net(), inputs, width, args.steps, args.seed)
        learned = retrieval(test_features(net, inputs, (query, gallery)), query, gallery, twins)
        rows.append((f"{name} ({args.steps} steps)", *learned,
                     f"training CE {ce_start:.2f} -> {ce_end:.2f}; {beats(learned[1])}"))
    for path in args.checkpoint:
        pose = retrieval(pose_features(path, dataset), query, gallery, twins)
        rows.append((f"f^p of {path}", *pose, beats(pose[1])))
    print(f"{args.data}: {len(query.pids)} queries, {len(gallery.pids)} gallery tracklets, {len(twins)} gait-twin "
          f"pairs in the test split; {len(np.unique(train.pids))} training ids, {len(train.pids)} tracklets; "
          f"{time.perf_counter() - start:.0f} s")
    print("| feature | mAP, all queries | twin-pair AP | note |\n|---|---:|---:|---|")
    for name, whole, pair, note in rows:
        print(f"| {name} | {whole:.1f} | {pair:.1f} | {note} |")


if __name__ == "__main__":
    main()

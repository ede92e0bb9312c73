"""No-training checks of the hard synthetic variant against the default dataset.

For each dataset (generated fresh, timed): the within-identity spread of the hip's height
(:func:`keypointops.data.synthetic.hip_spread`, pixels at 128 x 64), and the mAP / rank-1 of three
no-learning colour histograms (:mod:`keypointops.models.color_histogram`) on its query / gallery
split: the whole-crop histogram, the 4-stripe histogram (a fixed layout prior, as PCB's stripes)
and the keypoint-aligned part histogram.  On the hard variant the stripes no longer land on the
same body part and family members differ only in where their colours are, so the part histogram
must reach at least twice the 4-stripe histogram's mAP.  With gait twins, the histograms are also
evaluated on the twins' queries alone, against the whole gallery (their twin has the same
colours: only shape and gait tell them apart).  For the part histogram it also prints the standard
error of the mAP over the queries (the standard deviation of the queries' AP / sqrt(queries)): how
much of a difference in mAP the test split's size can resolve.

Test sampling as the ``cpu`` presets: 4 evenly spaced frames per tracklet at 128 x 64.

Run: ``PYTHONPATH=. python bench/synthetic_hard.py [--workers 2] [--keep DIR]``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from keypointops.data import MARS
from keypointops.data.synthetic import DEFAULTS, HARD, gait_twins, generate, hip_spread
from keypointops.engine import evaluate_models
from keypointops.evaluation import evaluate
from keypointops.models.color_histogram import ColorHistogram, PartColorHistogram

EVAL_CONFIG = {"train": dict(frames=4, test_sampling="evenly", height=128, width=64, batch_size=16),
               "workers": 0, "seed": 0}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the generator's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def histograms() -> dict[str, torch.nn.Module]:
    return {"whole-crop histogram": ColorHistogram(stripes=1), "4-stripe histogram": ColorHistogram(stripes=4),
            "part histogram": PartColorHistogram()}


def measure(root: Path, size: tuple[int, int]) -> dict:
    """Hip spread and histogram results (``{name: evaluate() dict}``, plus the twins-only results
    under ``"<name> (gait twins)"``) of the dataset in ``root``."""
    dataset = MARS(root)
    results = evaluate_models(histograms(), dataset, EVAL_CONFIG, torch.device("cpu"))
    twins = {pid for pair in gait_twins(root) for pid in pair}
    q_pids, q_cams = (np.array([getattr(t, k) for t in dataset.query]) for k in ("pid", "camid"))
    g_pids, g_cams = (np.array([getattr(t, k) for t in dataset.gallery]) for k in ("pid", "camid"))
    if twins:
        keep = np.isin(q_pids, list(twins))
        for name in list(results):
            r = results[name]
            results[f"{name} (gait twins)"] = evaluate(r["qf"][keep], r["gf"], q_pids[keep], g_pids, q_cams[keep],
                                                       g_cams)
    part = results["part histogram"]
    aps = [evaluate(part["qf"][i:i + 1], part["gf"], q_pids[i:i + 1], g_pids, q_cams[i:i + 1], g_cams)["mAP"]
           for i in range(len(q_pids))]
    return dict(spread=hip_spread(dataset.train + dataset.query + dataset.gallery, size[0]),
                queries=len(dataset.query), gallery=len(dataset.gallery), results=results,
                twin_queries=int(sum(t.pid in twins for t in dataset.query)),
                part_se=100 * float(np.std(aps, ddof=1) / np.sqrt(len(aps))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="generator processes")
    parser.add_argument("--keep", default=None, help="write the datasets here and keep them")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="synthetic-hard-bench-"))
    rows = {}
    try:
        for name, params in (("default", DEFAULTS), ("hard", HARD)):
            root = base / name
            if root.exists():
                shutil.rmtree(root)
            wall, cpu = time.perf_counter(), cpu_seconds()
            generate(root, workers=args.workers, progress=False, **params)
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            frames = sum(1 for _ in root.glob("bbox_*/*/*.jpg"))
            print(f"{name}: generated {frames} frames in {wall:.1f} s wall, {cpu:.1f} CPU-s ({args.workers} workers)",
                  flush=True)
            rows[name] = measure(root, tuple(params["size"])) | dict(seconds=wall, cpu=cpu, frames=frames)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print()
    print("| dataset | generation (s wall / CPU-s) | frames | queries | gallery | hip spread (px at 128x64) | "
          "whole-crop hist mAP | 4-stripe hist mAP | part hist mAP (+- s.e. over queries) | part / 4-stripe |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        r = row["results"]
        maps = [100 * r[k]["mAP"] for k in ("whole-crop histogram", "4-stripe histogram", "part histogram")]
        print(f"| {name} | {row['seconds']:.1f} / {row['cpu']:.1f} | {row['frames']} | {row['queries']} | {row['gallery']} | "
              f"{row['spread']:.1f} | {maps[0]:.1f} | {maps[1]:.1f} | {maps[2]:.1f} +- {row['part_se']:.1f} | {maps[2] / maps[1]:.2f} |")
    print()
    print("| dataset | histogram | rank-1 | mAP |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        for key, r in row["results"].items():
            label = key if "twins" not in key else f"{key}, {row['twin_queries']} queries"
            print(f"| {name} | {label} | {100 * float(r['cmc'][0]):.1f} | {100 * r['mAP']:.1f} |")


if __name__ == "__main__":
    main()

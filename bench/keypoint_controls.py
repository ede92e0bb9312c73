"""Keypoint-corruption controls of trained models: does each model's test embedding need its keypoints?

Trains each model at the ``cpu`` preset for each seed (or reuses a finished run in ``--out``),
evaluates it with its test keypoints as read and under every corruption setting, and prints a
markdown table: mAP as-is (mean +- sample sd over seeds) and the mAP change of each setting.

    python bench/keypoint_controls.py --models resnet50,alignnet,ctl,rgcn --seeds 3 \\
        --data synthetic-hard --out runs/controls
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from keypointops import engine
from keypointops.data.corruption import KEYPOINT_CORRUPTIONS


def _mean_sd(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.1f}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.1f} ± {sd:.1f}"


def run_model(model: str, seed: int, data: str, out: Path) -> dict:
    """The summary of every keypoint setting for one trained (model, seed); cached in ``result.json``."""
    folder = out / model / f"seed{seed}"
    result_path = folder / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    config = engine.make_config(model, "cpu", data, seed=seed, workers=0)
    tick = time.perf_counter()
    run = engine.train(config, folder, resume=(folder / "model.pt").exists(), evaluate_at_end=False,
                       log=lambda line: print(f"{model}/seed{seed}: {line}", flush=True))
    seconds = time.perf_counter() - tick
    settings = engine.evaluate_keypoint_settings(run["model"].eval(), run["dataset"], config, torch.device("cpu"),
                                                 KEYPOINT_CORRUPTIONS)
    result = {"model": model, "seed": seed, "train_seconds": seconds,
              "keypoints": {k: engine.summary(v) for k, v in settings.items()}}
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def table(results: dict[str, list[dict]]) -> str:
    settings = [s for s in KEYPOINT_CORRUPTIONS if s != "as-is"]
    lines = ["| model | seeds | mAP as-is | rank-1 as-is | " + " | ".join(f"{s} (mAP change)" for s in settings) + " |",
             "|---|---|---|---|" + "---|" * len(settings)]
    for model, runs in results.items():
        maps = [r["keypoints"]["as-is"]["mAP"] for r in runs]
        cells = [model, str(len(runs)), _mean_sd(maps), _mean_sd([r["keypoints"]["as-is"]["rank1"] for r in runs])]
        cells += [_mean_sd([r["keypoints"][s]["mAP"] - m for r, m in zip(runs, maps)]) for s in settings]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50,alignnet,ctl,rgcn")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--data", default="synthetic-hard")
    parser.add_argument("--out", default="runs/controls")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = {m: [run_model(m, s, args.data, out) for s in range(args.seeds)] for m in args.models.split(",")}
    print(table(results))


if __name__ == "__main__":
    main()

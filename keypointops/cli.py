"""The ``keypointops`` command (also ``python -m keypointops``): train, evaluate, export, embed, keypoints, synth.

``keypointops train`` with no argument trains KMPNet's ``cpu`` preset on the synthetic dataset
(generated on first use into a cache folder), evaluates it, and prints rank-1/5/10/20, mAP and mINP
beside two colour-histogram baselines evaluated on the same split. ``torchrun --nproc_per_node=N -m
keypointops train ...`` trains with DDP. Bad input (a missing dataset folder, an unknown model, a
checkpoint of another model, a corrupt checkpoint) ends with a one-line error and exit code 2.
``train`` refuses a run folder that holds another run unless ``--resume`` (continue it) or
``--overwrite`` (delete its files first); ``synth`` refuses a non-empty folder unless ``--replace``.
The op and model benchmarks are a pytest suite in the source checkout: ``pytest bench/``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

__all__ = ["main"]

def _key_values(items: list[str] | None, flag: str) -> dict:
    """``["a=1", "b=[2, 3]", "c=resnet50"]`` -> ``{"a": 1, "b": [2, 3], "c": "resnet50"}`` (JSON values,
    else strings)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


_EXAMPLES = """examples:
  keypointops train                                     # KMPNet on the synthetic dataset, CPU-sized
  keypointops train --model ctl --data mars --root DIR --preset paper --pretrained resnet50.pth
  keypointops evaluate --checkpoint runs/kmpnet-synthetic-cpu/model.pt --out eval/
  keypointops export --checkpoint runs/kmpnet-synthetic-cpu/model.pt --format onnx
  keypointops embed --checkpoint runs/kmpnet-synthetic-cpu/model.pt --out feats.npz
  keypointops synth --out data/synthetic
  keypointops keypoints --data mars --root DIR --weights body_pose_model.pth --device cuda
  torchrun --nproc_per_node=2 -m keypointops train      # DDP
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' layout and shows each option's default where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text and action.option_strings:
            default = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else "%(default)s"
            text += f" (default: {default})"
        return text


class _Parser(argparse.ArgumentParser):
    """The command's parser and its subcommands' (argparse builds those of the parser's class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options that size and pace a training run (shared by ``train`` and ``ablate``)."""
    p.add_argument("--workers", type=int, default=1, help="data loader worker processes per rank")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads per rank (default: this rank's share of the cores minus --workers)")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--max-steps", type=int, help="at most this many steps per epoch")
    for name, kind in (("frames", int), ("batch-size", int), ("instances", int), ("height", int),
                       ("width", int), ("lr", float), ("warmup-epochs", int), ("grad-clip", float)):
        p.add_argument(f"--{name}", type=kind, help=f"override the preset's {name.replace('-', '_')}")
    p.add_argument("--model-option", action="append", metavar="KEY=VALUE",
                   help="override a build_model option of the preset (JSON value), e.g. width=0.25")
    p.add_argument("--data-option", action="append", metavar="KEY=VALUE",
                   help="dataset option, e.g. num_train_ids=20 for a smaller synthetic dataset")


def _train_overrides(args) -> dict:
    return {k: getattr(args, k) for k in ("epochs", "frames", "batch_size", "instances", "height", "width", "lr",
                                          "warmup_epochs", "grad_clip") if getattr(args, k) is not None}


def _keypoint_settings(text: str) -> list[str]:
    """``"as-is,shuffled"`` -> the checked list of keypoint settings."""
    from keypointops.data.corruption import check_corruption

    return [check_corruption(name.strip()) for name in text.split(",") if name.strip()]


def _parser() -> argparse.ArgumentParser:
    from keypointops import __version__
    from keypointops.data import DATASET_NAMES
    from keypointops.data.synthetic import DEFAULTS as SYNTHETIC_DEFAULTS
    from keypointops.data.synthetic import HARD as SYNTHETIC_HARD
    from keypointops.ablation import ABLATIONS
    from keypointops.data.corruption import KEYPOINT_CORRUPTIONS
    from keypointops.engine import AMP_MODES
    from keypointops.models import MODELS, PRESET_NAMES

    parser = _Parser(prog="keypointops", description=__doc__.split("\n\n")[0].replace("``", ""), epilog=_EXAMPLES)
    parser.add_argument("--version", action="version", version=f"keypointops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model, evaluate it beside the colour-histogram baselines")
    p.add_argument("--model", default="kmpnet", choices=sorted(MODELS), help="the model to train")
    p.add_argument("--data", default="synthetic", choices=DATASET_NAMES,
                   help="dataset (synthetic: a folder of keypointops synth, or generated on first use)")
    p.add_argument("--root", default=None, help="dataset folder (synthetic: default a cache folder)")
    p.add_argument("--preset", default="cpu", choices=PRESET_NAMES,
                   help="cpu: a small variant that trains on a CPU; paper: the paper's settings")
    p.add_argument("--pretrained", default=None, metavar="PATH", help="local torchvision ResNet weights")
    p.add_argument("--out", default=None, help="run folder (default runs/<model>-<data>-<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its files are deleted)")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from another run's weights (e.g. a trained pcb for kmpnet: its paper's stage B)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the data order and augmentation")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N epochs")
    _add_run_options(p)
    p.add_argument("--amp", choices=AMP_MODES, default=None,
                   help="mixed precision (default: bf16 on CUDA, off on CPU; fp16 with a gradient scaler)")
    p.add_argument("--channels-last", action="store_true", help="channels_last (NHWC) weights and images")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model (backend: default inductor)")
    p.add_argument("--no-baselines", action="store_true", help="skip the colour-histogram baselines")

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on its dataset's test split")
    p.add_argument("--checkpoint", required=True, help="a model.pt of keypointops train")
    p.add_argument("--root", default=None, help="dataset folder (default: the one it was trained on)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write the table (results.json) and the CMC and ranking pictures there")
    p.add_argument("--workers", type=int, default=1, help="data loader worker processes")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: the free cores)")
    p.add_argument("--model", choices=sorted(MODELS), help="fail unless the checkpoint holds this model")
    p.add_argument("--keypoints", default="as-is", metavar="SETTINGS",
                   help="comma-separated test-keypoint settings, one table row each: "
                        f"{', '.join(KEYPOINT_CORRUPTIONS)} (a keypoint model that works loses mAP when "
                        "they are shuffled)")
    p.add_argument("--model-option", action="append", metavar="KEY=VALUE",
                   help="evaluate the same weights with a changed model option (JSON value), e.g. another test "
                        "embedding: embedding=x_g (KMPNet's graph branch), embedding=global (CTL's V_f^g), "
                        "embedding=pose (RGCN's f^p)")

    p = sub.add_parser("ablate", help="run a paper's ablation rows over seeds, with keypoint-corruption controls")
    p.add_argument("--paper", required=True, choices=list(ABLATIONS), help="whose ablation table to reproduce")
    p.add_argument("--rows", default=None, metavar="NAMES", help="comma-separated rows (default: all of the paper's)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per row")
    p.add_argument("--data", default="synthetic-hard", choices=DATASET_NAMES, help="dataset")
    p.add_argument("--root", default=None, help="dataset folder (synthetic: default a cache folder)")
    p.add_argument("--out", default="runs/ablation", help="folder of the runs and tables (resumes what is there)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, each with its share of the cores")
    p.add_argument("--keypoints", default=",".join(KEYPOINT_CORRUPTIONS), metavar="SETTINGS",
                   help="comma-separated test-keypoint settings evaluated for every run")
    p.add_argument("--table-only", action="store_true",
                   help="write the table of the runs already finished under --out (any seeds per row); train nothing")
    _add_run_options(p)

    p = sub.add_parser("export", help="export the inference model, check it against PyTorch")
    p.add_argument("--checkpoint", required=True, help="a model.pt of keypointops train")
    p.add_argument("--format", choices=("onnx", "exported"), default="onnx",
                   help="onnx: an ONNX model for ONNX Runtime; exported: a torch.export program (.pt2)")
    p.add_argument("--out", default=None, help="output file (default beside the checkpoint)")
    p.add_argument("--model", choices=sorted(MODELS), help="fail unless the checkpoint holds this model")

    p = sub.add_parser("embed", help="write one embedding per query and gallery tracklet to a .npz file")
    p.add_argument("--checkpoint", required=True, help="a model.pt of keypointops train")
    p.add_argument("--data", default=None, choices=DATASET_NAMES, help="dataset (default: the one it was trained on)")
    p.add_argument("--root", default=None, help="dataset folder (default: the one it was trained on)")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--workers", type=int, default=1, help="data loader worker processes")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--model", choices=sorted(MODELS), help="fail unless the checkpoint holds this model")

    p = sub.add_parser("keypoints", help="estimate COCO-17 keypoints of every frame with the OpenPose body network")
    p.add_argument("--data", required=True, choices=DATASET_NAMES, help="dataset")
    p.add_argument("--root", required=True, help="dataset folder")
    p.add_argument("--weights", required=True, metavar="PATH",
                   help="local OpenPose COCO body weights (body_pose_model.pth of the PyTorch ports)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--batch-size", type=int, default=16, help="frames per network batch")
    p.add_argument("--size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=(256, 128),
                   help="network input size (multiples of 8); frames are resized to it")
    p.add_argument("--threshold", type=float, default=0.1, help="heatmap peak under which a joint is missing")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")

    p = sub.add_parser("synth", help="write the synthetic dataset (MARS layout)")
    p.add_argument("--out", required=True, help="folder to write the dataset to")
    p.add_argument("--hard", action="store_true",
                   help="the hard variant (synthetic-hard): its parameters, then the flags below")
    p.add_argument("--ids", type=int, help=f"identities of each split (train and test; default "
                   f"{SYNTHETIC_DEFAULTS['num_train_ids']}, --hard: {SYNTHETIC_HARD['num_train_ids']} and "
                   f"{SYNTHETIC_HARD['num_test_ids']})")
    p.add_argument("--cameras", type=int, help=f"cameras (default {SYNTHETIC_DEFAULTS['num_cameras']})")
    p.add_argument("--frames", type=int, help=f"mean tracklet length (default {SYNTHETIC_DEFAULTS['frames']}, "
                   f"--hard: {SYNTHETIC_HARD['frames']})")
    p.add_argument("--size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                   help=f"frame size in pixels (default {SYNTHETIC_DEFAULTS['size']})")
    p.add_argument("--seed", type=int, help=f"the generator's seed (default {SYNTHETIC_DEFAULTS['seed']})")
    p.add_argument("--body-spread", type=float,
                   help="how far apart people's proportions and gaits are: their ranges widened about their "
                   "centres by this factor, in (0, 2] (default 1; 2: twice as wide, a stronger pose cue)")
    p.add_argument("--replace", action="store_true", help="replace what --out holds (default: refuse a non-empty folder)")
    return parser


# ----------------------------------------------------------------------------------------- tables

def _table(rows: dict[str, dict]) -> str:
    """Markdown table of ``{name: summary()}`` rows."""
    keys = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")
    width = max(len(name) for name in rows)
    lines = [f"| {'method':<{width}} | rank-1 | rank-5 | rank-10 | rank-20 |   mAP |  mINP |",
             f"|{'-' * (width + 2)}|-------:|-------:|--------:|--------:|------:|------:|"]
    for name, s in rows.items():
        lines.append(f"| {name:<{width}} | " + " | ".join(f"{s[k]:{len(h)}.1f}" for k, h in zip(
            keys, ("rank-1", "rank-5", "rank-10", "rank-20", "  mAP", " mINP"))) + " |")
    return "\n".join(lines)


def _report(rows: dict[str, dict], baseline_results: dict, dataset, data: str, out: Path | None) -> None:
    """Prints the table of the model's evaluations (``{label: result}``, the first the main one) and
    the baselines; with ``out``, writes the table as ``results.json`` and the CMC and ranking PNGs of
    the first there."""
    from keypointops.engine import summary
    from keypointops.evaluation import compute_distance
    from keypointops.plots import plot_cmc, plot_ranking

    table = {**{k: summary(v) for k, v in rows.items()}, **{k: summary(v) for k, v in baseline_results.items()}}
    print(_table(table))
    label, result = next(iter(rows.items()))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"data": data, "split": dataset.evaluation_split,
                                                      "results": table}, indent=1) + "\n")
        plot_cmc({label: result["cmc"], **{k: v["cmc"] for k, v in baseline_results.items()}}, out / "cmc.png",
                 title=f"{label} on {data}: mAP {table[label]['mAP']:.1f}%")
        plot_ranking(compute_distance(result["qf"], result["gf"]).numpy(), dataset.query, dataset.gallery,
                     out / "ranking.png")


class _RunLog:
    """Standard output copied to a run folder's ``log.txt`` (appended: a resumed run adds to it).
    What is printed before the folder exists is kept and written once it does, so the log does
    not create the folder."""

    def __init__(self, console, path: Path):
        self.console, self.path, self.pending, self.file = console, path, [], None

    def write(self, text: str) -> int:
        self.console.write(text)
        if self.file is None and self.path.parent.is_dir():
            self.file = open(self.path, "a", encoding="utf-8")
            self.file.write("".join(self.pending))
        if self.file is None:
            self.pending.append(text)
        else:
            self.file.write(text)
            self.file.flush()
        return len(text)

    def flush(self) -> None:
        self.console.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ----------------------------------------------------------------------------------------- commands

def _set_threads(args) -> None:
    """Intra-op threads: ``--threads``, else the rank's share of the cores less one per loader worker
    (on a 2-core machine: 1 thread and 1 worker; more threads than free cores make OpenMP spin)."""
    import torch

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if getattr(args, "workers", 0) < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    share = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(args.threads or max(1, share - getattr(args, "workers", 0)))


def _train(args) -> None:
    from keypointops import engine
    from keypointops.plots import plot_curves

    _set_threads(args)
    config = engine.make_config(args.model, args.preset, args.data, args.root, seed=args.seed, workers=args.workers,
                                pretrained=args.pretrained, init_from=args.init_from, eval_every=args.eval_every,
                                max_steps=args.max_steps, train_overrides=_train_overrides(args),
                                model_overrides=_key_values(args.model_option, "--model-option"),
                                data_options=_key_values(args.data_option, "--data-option"), amp=args.amp,
                                channels_last=args.channels_last, compile=args.compile)
    out = _run_folder(args)
    run = engine.train(config, out, resume=args.resume, overwrite=args.overwrite, with_baselines=not args.no_baselines)
    if run["eval"] is None:  # a DDP rank other than 0
        return
    plot_curves(out / "metrics.jsonl", out / "curves.png")
    print(f"\n{args.model} ({args.preset} preset) on {args.data} ({run['dataset'].evaluation_split} split), "
          f"{_epochs(config['train']['epochs'])}, {run['seconds']:.0f} s; run folder {out}")
    _report({args.model: run["eval"]}, run["baselines"], run["dataset"], args.data, out)


def _run_folder(args) -> Path:
    return Path(args.out or f"runs/{args.model}-{args.data}-{args.preset}")


def _epochs(count: int) -> str:
    return f"{count} epoch" if count == 1 else f"{count} epochs"


def _checkpoint_and_dataset(args) -> tuple[dict, dict, object]:
    """``(checkpoint, its run config, the dataset)`` for a command that reads a checkpoint: the
    config's dataset unless ``--data`` / ``--root`` name another; sets the threads."""
    from keypointops.checkpoints import load_checkpoint
    from keypointops.engine import dataset_of

    _set_threads(args)
    state = load_checkpoint(args.checkpoint, args.model)
    config = dict(state["config"], workers=args.workers)
    if getattr(args, "data", None) is not None:
        config["data"] = args.data
    if getattr(args, "root", None) is not None:
        config["root"] = str(Path(args.root).resolve())
    return state, config, dataset_of(config)


def _evaluate(args) -> None:
    from keypointops import engine
    from keypointops.checkpoints import model_from_checkpoint
    from keypointops.distributed import device_for_rank

    settings = _keypoint_settings(args.keypoints)
    state, config, dataset = _checkpoint_and_dataset(args)
    options = _key_values(args.model_option, "--model-option")
    with engine.model_options_checked(config):
        model = model_from_checkpoint(state, **options)
    device = device_for_rank()
    results = engine.evaluate_models({"model": model.to(device), **engine.baselines()}, dataset, config, device,
                                     keypoints=settings[0])
    name = config["model"] + "".join(f", {key}={value}" for key, value in options.items())
    label = name if settings == ["as-is"] else f"{name}, keypoints {settings[0]}"
    rows = {label: results.pop("model")}
    rows.update({f"{name}, keypoints {s}": r
                 for s, r in engine.evaluate_keypoint_settings(model, dataset, config, device, settings[1:]).items()})
    print(f"{config['model']} after {_epochs(state['epoch'])} on {config['data']}")
    _report(rows, results, dataset, config["data"], None if args.out is None else Path(args.out))


def _export(args) -> None:
    from keypointops.checkpoints import load_checkpoint, model_from_checkpoint
    from keypointops.export import export_model
    from keypointops.models.presets import TrainSettings

    state = load_checkpoint(args.checkpoint, args.model)
    # KMPNet in eval mode runs no graph branch; the reference backend leaves only standard ops.
    model = model_from_checkpoint(state, ops_backend="reference")
    t = TrainSettings.from_dict(state["config"]["train"])
    out = Path(args.out or Path(args.checkpoint).with_suffix(".onnx" if args.format == "onnx" else ".pt2"))
    report = export_model(model, {args.format: out}, frames=t.frames, height=t.height, width=t.width)
    shapes = {"images": f"[{{}}, {{}}, 3, {t.height}, {t.width}]", "keypoints": "[{}, {}, 17, 3]"}
    described = [f"{name} " + shapes[name].format("batch", "frames" if "frames" in axes.values() else t.frames)
                 for name, axes in report["dynamic"].items()]
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): {state['config']['model']} inference model; "
          f"inputs {', '.join(described)}; output embedding [batch, D]")
    errors = ", ".join(f"{name} {error:.3g}" for name, error in report["errors"][args.format].items())
    print(f"max abs error vs PyTorch ({report['runtime'][args.format]}, clips other than the traced one): {errors}")


def _embed(args) -> None:
    import numpy as np

    from keypointops.checkpoints import model_from_checkpoint
    from keypointops.distributed import device_for_rank
    from keypointops.export import embed_dataset

    state, config, dataset = _checkpoint_and_dataset(args)
    arrays = embed_dataset(model_from_checkpoint(state).to(device_for_rank()), dataset, config, device_for_rank())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    print(f"wrote {out}: {len(dataset.query)} query and {len(dataset.gallery)} gallery embeddings of "
          f"dimension {arrays['query_features'].shape[1]} (arrays {', '.join(arrays)})")


def _keypoints(args) -> None:
    import torch

    from keypointops.data import build_dataset
    from keypointops.keypoint_estimation import estimate_dataset
    from keypointops.models.pose_maps import OpenPoseBody, load_openpose_weights

    _set_threads(args)
    net = load_openpose_weights(OpenPoseBody(), args.weights)
    dataset = build_dataset(args.data, args.root)
    stats = estimate_dataset(dataset, net, device=torch.device(args.device), batch_size=args.batch_size,
                             height=args.size[0], width=args.size[1], threshold=args.threshold)
    print(f"keypoints of {stats['frames']} frames written; {stats['skipped']} of {stats['tracklets']} tracklets "
          f"already had theirs")


def _ablate(args) -> None:
    from keypointops.ablation import run_ablation, table_from_runs

    rows = None if args.rows is None else [r.strip() for r in args.rows.split(",") if r.strip()]
    if args.table_only:
        table = table_from_runs(args.paper, args.out, rows=rows, data=args.data)
    else:
        table = run_ablation(args.paper, args.out, seeds=args.seeds, data=args.data, root=args.root, rows=rows,
                             jobs=args.jobs, keypoints=tuple(_keypoint_settings(args.keypoints)),
                             workers=args.workers, threads=args.threads, max_steps=args.max_steps,
                             train_overrides=_train_overrides(args),
                             model_overrides=_key_values(args.model_option, "--model-option"),
                             data_options=_key_values(args.data_option, "--data-option"))
    print(table)
    print(f"\nwrote {Path(args.out) / args.paper / 'ablation.md'}")


def _synth(args) -> None:
    """Generates into a temporary sibling folder renamed into place at the end, so an interrupted run
    leaves no partial dataset at ``--out``; a non-empty ``--out`` is replaced only with ``--replace``."""
    import tempfile

    from keypointops.data.synthetic import DEFAULTS, HARD, generate

    flags = dict(num_train_ids=args.ids, num_test_ids=args.ids, num_cameras=args.cameras, frames=args.frames,
                 size=None if args.size is None else tuple(args.size), seed=args.seed, body_spread=args.body_spread)
    params = {**(HARD if args.hard else DEFAULTS), **{k: v for k, v in flags.items() if v is not None}}
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.replace:
        raise FileExistsError(f"--out {out} is not empty; pass --replace to replace what it holds")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        description = generate(tmp, **params)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(description["counts"], indent=1))
    print(f"wrote the synthetic dataset to {out}")


def _one_line(err: BaseException) -> str:
    """The message of ``err`` on one line. An error raised in a data loader worker arrives with the
    worker's traceback in its message (``Original Traceback ...``); its last line is the message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if "Original Traceback (most recent call last):" in lines:
        last = lines[-1]
        return last.partition(": ")[2] if re.match(r"^[\w.]+(Error|Exception): ", last) else last
    return " ".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``keypointops`` console script; returns the exit code.  A training run's
    standard output is copied to its folder's ``log.txt``."""
    args = _parser().parse_args(argv)
    console = sys.stdout
    if args.command == "train" and os.environ.get("RANK", "0") == "0":
        sys.stdout = _RunLog(console, _run_folder(args) / "log.txt")
    try:
        return _run(args)
    finally:
        if sys.stdout is not console:
            sys.stdout.close()
            sys.stdout = console


def _run(args) -> int:
    """Runs the parsed command; returns the exit code."""
    from keypointops.data import DatasetNotFoundError
    from keypointops.checkpoints import CheckpointError

    start = time.perf_counter()
    command = {"train": _train, "evaluate": _evaluate, "export": _export, "embed": _embed, "keypoints": _keypoints,
               "synth": _synth, "ablate": _ablate}
    try:
        command[args.command](args)
    except (CheckpointError, DatasetNotFoundError, FileNotFoundError, FileExistsError, ValueError,
            FloatingPointError) as err:
        print(f"keypointops {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"keypointops {args.command}: interrupted", file=sys.stderr)
        return 130
    if args.command in ("train", "evaluate") and os.environ.get("RANK", "0") == "0":
        print(f"total {time.perf_counter() - start:.0f} s")
    return 0

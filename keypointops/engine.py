"""Training and evaluation of the re-ID models: the loop behind ``keypointops train``.

A run is described by a plain config dict (:func:`make_config`): the model and its preset, the
dataset, and the preset's ``"train"`` settings with any overrides. :func:`train` trains it (one
process, or DDP under ``torchrun``), writes ``metrics.jsonl`` (one JSON object per epoch) and an
atomic checkpoint ``model.pt`` at the end of every epoch, and evaluates the model.

Exact resume: an epoch's batches and clip augmentations are a pure function of ``(seed, epoch)``
(the data layer's samplers and datasets), the model's own randomness is seeded from ``(seed,
epoch, rank)`` at the start of every epoch (:func:`epoch_seed`), and the checkpoint written at the
end of an epoch holds the model, optimizer and scheduler state, the epoch count and the config
(with the seed): all the state there is. A resumed run restores them and continues with the next
epoch, so it ends with the same weights as an uninterrupted run (CPU; the loader's worker count
does not change the data). A run killed mid-epoch restarts that epoch.

Speed settings of a config (:func:`make_config`): ``amp`` -- mixed precision, ``"bf16"`` (the
default on CUDA), ``"fp16"`` (with a gradient scaler) or ``"off"`` (the default on CPU), under
``torch.autocast`` with the ops' own autocast policy (see :mod:`keypointops._opdefs.autocast`);
``channels_last`` -- the model's weights and the input images in channels_last (NHWC) memory
format; ``compile`` -- a ``torch.compile`` backend for the model's forward (e.g. ``"inductor"``),
or None.
"""
from __future__ import annotations

import inspect
import itertools
import json
import os
import re
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from keypointops._checks import check_choice
from keypointops.checkpoints import (CHECKPOINT_FORMAT, CheckpointError, init_from_checkpoint, load_checkpoint,
                                     save_checkpoint)
from keypointops.distributed import all_reduce_mean, device_for_rank, dist_info, init_distributed, wrap_ddp
from keypointops.evaluation import evaluate
from keypointops.models.presets import TrainSettings

AMP_MODES = ("off", "bf16", "fp16")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = ["AMP_MODES", "make_config", "build_run", "train", "extract_features", "evaluate_models",
           "evaluate_keypoint_settings", "baselines", "forward_backward"]


def make_config(model: str = "kmpnet", preset: str = "cpu", data: str = "synthetic", root: str | None = None, *,
                seed: int = 0, workers: int = 1, pretrained: str | None = None, init_from: str | None = None,
                eval_every: int = 0, max_steps: int | None = None, train_overrides: dict | None = None,
                model_overrides: dict | None = None, data_options: dict | None = None, amp: str | None = None,
                channels_last: bool = False, compile: str | None = None) -> dict:
    """The config of a run: the model preset's ``"model"`` options and ``"train"`` settings
    (:func:`keypointops.models.get_preset`) updated with ``model_overrides`` / ``train_overrides``.

    ``eval_every``: evaluate every N epochs (0: only after the last one, unless the preset's train
    settings hold ``eval_every``). ``max_steps``: stop each epoch after that many steps (quick runs).
    ``init_from``: a checkpoint whose weights initialise the model
    (:func:`keypointops.checkpoints.init_from_checkpoint`), e.g. a trained PCB for KMPNet's stage B.
    ``amp``: one of :data:`AMP_MODES`, or None for the device's default (bf16 on CUDA, off on CPU);
    ``channels_last``, ``compile``: see the module docstring.
    ``root`` is stored as an absolute path, so the run can be evaluated from any folder.
    """
    check_choice("make_config", "amp", amp, (*AMP_MODES, None))
    from keypointops.models import preset_of

    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps (--max-steps) must be >= 1 steps per epoch, got {max_steps}")
    settings = preset_of(model, preset)
    train_cfg = settings.train.replace(**(train_overrides or {}))
    train_cfg = train_cfg.replace(eval_every=eval_every or train_cfg.eval_every)
    model_cfg = settings.model_options(train_cfg)
    return {"model": model, "preset": preset, "model_options": {**model_cfg, **(model_overrides or {})},
            "train": train_cfg.to_dict(), "data": data, "root": None if root is None else str(Path(root).resolve()),
            "data_options": dict(data_options or {}), "seed": seed, "workers": workers, "pretrained": pretrained,
            "init_from": None if init_from is None else str(Path(init_from).resolve()), "max_steps": max_steps,
            "amp": amp, "channels_last": channels_last, "compile": compile}


# ----------------------------------------------------------------------------------------- data + model

def dataset_of(config: dict):
    """The dataset a run config names (``data``, ``root``, ``data_options``); an option the dataset
    does not take is a one-line error naming ``--data-option``."""
    from keypointops.data import build_dataset

    with _options_of("--data-option", config["data"], _dataset_options(config["data"])):
        return build_dataset(config["data"], config["root"], **config["data_options"])


def build_run(config: dict, *, rank: int = 0, world_size: int = 1, initial_weights: bool = True):
    """Builds ``(dataset, train_loader, model)`` of a config (the model on CPU, training mode).
    ``initial_weights=False`` skips the config's ``pretrained`` / ``init_from`` loads: a resumed run's
    checkpoint replaces them, so their files need not exist any more."""
    from keypointops.data import build_loader
    from keypointops.models import build_model
    from keypointops.models.backbones import load_pretrained

    dataset = dataset_of(config)
    t = TrainSettings.from_dict(config["train"])
    loader = build_loader(dataset.train, train=True, frames=t.frames, sampling=t.train_sampling,
                          height=t.height, width=t.width, batch_size=t.batch_size,
                          instances=t.instances, flip=t.flip, random_erase=t.random_erase,
                          workers=config["workers"], seed=config["seed"], rank=rank, world_size=world_size)
    torch.manual_seed(config["seed"])  # the initial weights
    with model_options_checked(config):
        model = build_model(config["model"], dataset.num_train_pids, **config["model_options"])
    if initial_weights and config["pretrained"]:
        load_pretrained(model, config["pretrained"])
    if initial_weights and config.get("init_from"):
        init_from_checkpoint(model, config["model"], config["init_from"])
    return dataset, loader, model


def _keyword_names(function) -> set[str]:
    return {p.name for p in inspect.signature(function).parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _model_options(config: dict) -> list[str]:
    """The build options of the config's model: its constructor's keywords and its preset's options
    (which include the options a model forwards to its parts, e.g. KMPNet's visual model)."""
    from keypointops.models import model_class, preset_of

    names = _keyword_names(model_class(config["model"]).__init__) | set(
        preset_of(config["model"], config["preset"]).model_options(TrainSettings.from_dict(config["train"])))
    return sorted(names - {"self", "num_classes"})


def model_options_checked(config: dict):
    """Context in which building the config's model with an unknown ``--model-option`` raises a
    one-line ``ValueError`` that lists the model's options."""
    return _options_of("--model-option", config["model"], _model_options(config))


def _dataset_options(name: str) -> list[str]:
    """The options of dataset ``name`` (the synthetic generator's parameters, or the reader's)."""
    from keypointops.data import DATASETS, SYNTHETIC_DATASETS
    from keypointops.data.synthetic import generate

    if name in SYNTHETIC_DATASETS:
        own = _keyword_names(generate) - {"root", "workers"} | {"progress", "drop_distractors"}
    else:
        own = _keyword_names(DATASETS[name].__init__) - {"self", "root"}
    return sorted(own | {"validation_ids"})  # build_dataset's own option, for every dataset


@contextmanager
def _options_of(flag: str, owner: str, valid: list[str]):
    """Turns the ``TypeError`` of an unknown keyword option into a one-line ``ValueError`` that
    lists the valid options."""
    try:
        yield
    except TypeError as err:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unknown is None:
            raise
        raise ValueError(f"{flag} {unknown.group(1)!r} is not an option of {owner}; "
                         f"its options are {', '.join(valid)}") from None


def _optimizer(model: nn.Module, t: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    raise ValueError(f"unknown optimizer {t.optimizer!r} (adam or sgd)")


def lr_factor(epoch: int, t: TrainSettings) -> float:
    """The learning-rate multiplier of ``epoch`` (0-based): a linear warmup from 0.1 over
    ``warmup_epochs``, then ``lr_gamma`` at every milestone passed."""
    warmup = t.warmup_epochs
    factor = 0.1 + 0.9 * epoch / warmup if epoch < warmup else 1.0
    return factor * t.lr_gamma ** sum(epoch >= m for m in t.lr_milestones)


# ----------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def extract_features(models: dict[str, nn.Module], loader, num_tracklets: int, device: torch.device,
                     desc: str = "features") -> dict[str, torch.Tensor]:
    """Tracklet embeddings ``{name: [num_tracklets, D]}`` of each model in one pass over ``loader``:
    the eval-mode clip embeddings averaged per tracklet (the batch's ``index``)."""
    for model in models.values():
        model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(num_tracklets)
    for batch in tqdm(loader, desc=desc, leave=False, mininterval=2):
        images, keypoints = batch["images"].to(device), batch["keypoints"].to(device)
        for name, model in models.items():
            emb = model(images, keypoints).float().cpu()
            if name not in sums:
                sums[name] = torch.zeros(num_tracklets, emb.shape[1])
            sums[name].index_add_(0, batch["index"], emb)
        counts.index_add_(0, batch["index"], torch.ones(len(batch["index"])))
    if bool((counts == 0).any()):
        raise RuntimeError("feature extraction: some tracklets got no clip from the loader")
    return {name: total / counts[:, None] for name, total in sums.items()}


def _ids(tracklets) -> tuple[np.ndarray, np.ndarray]:
    return np.array([t.pid for t in tracklets]), np.array([t.camid for t in tracklets])


def evaluate_models(models: dict[str, nn.Module], dataset, config: dict, device: torch.device, *,
                    keypoints: str = "as-is") -> dict[str, dict]:
    """Rank-k, mAP and mINP of each model on the dataset's query / gallery split (eval mode, the
    config's test sampling and input size, one pass over the frames for all models), with the test
    keypoints as read or corrupted (``keypoints``: a setting of
    :data:`keypointops.data.corruption.KEYPOINT_CORRUPTIONS`).

    Returns ``{name: evaluate() dict + "qf", "gf" (the tracklet embeddings)}``."""
    from keypointops.data import build_loader

    t = TrainSettings.from_dict(config["train"])
    feats = {}
    for split, tracklets in (("query", dataset.query), ("gallery", dataset.gallery)):
        loader = build_loader(tracklets, train=False, frames=t.frames, sampling=t.test_sampling,
                              height=t.height, width=t.width, batch_size=t.batch_size,
                              flip=False, random_erase=False, workers=config["workers"], seed=config["seed"],
                              keypoints=keypoints)
        feats[split] = extract_features(models, loader, len(tracklets), device, desc=f"{split} features")
    (q_pids, q_cams), (g_pids, g_cams) = _ids(dataset.query), _ids(dataset.gallery)
    results = {}
    for name in models:
        qf, gf = feats["query"][name], feats["gallery"][name]
        results[name] = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams) | {"qf": qf, "gf": gf}
    return results


def evaluate_keypoint_settings(model: nn.Module, dataset, config: dict, device: torch.device,
                               settings=("as-is",)) -> dict[str, dict]:
    """``{setting: evaluate_models result}`` of ``model`` with its test keypoints under each setting of
    :data:`keypointops.data.corruption.KEYPOINT_CORRUPTIONS` (the keypoint-corruption controls: a
    model whose keypoint branch works loses accuracy with ``"shuffled"``; an inert one does not)."""
    from keypointops.data.corruption import check_corruption

    settings = [check_corruption(s) for s in settings]
    return {s: evaluate_models({"model": model}, dataset, config, device, keypoints=s)["model"] for s in settings}


def baselines() -> dict[str, nn.Module]:
    """The no-learning baselines printed beside a trained model."""
    from keypointops.models.color_histogram import ColorHistogram

    return {"global colour histogram": ColorHistogram(stripes=1), "4-stripe colour histogram": ColorHistogram(stripes=4)}


def summary(result: dict) -> dict:
    """The JSON-friendly numbers of an evaluation: rank-1/5/10/20 (as far as the gallery allows),
    mAP and mINP, in percent."""
    cmc = result["cmc"]
    out = {f"rank{k}": 100.0 * float(cmc[min(k, len(cmc)) - 1]) for k in (1, 5, 10, 20)}
    out.update(mAP=100.0 * result["mAP"], mINP=100.0 * result["mINP"])
    return out


# ----------------------------------------------------------------------------------------- training

def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of an epoch on a rank (the model's own randomness, e.g. dropout)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def amp_mode(config: dict, device: torch.device) -> str:
    """The mixed precision of a run on ``device``: the config's ``amp``, or bf16 on CUDA and off
    elsewhere."""
    return config.get("amp") or ("bf16" if device.type == "cuda" else "off")


def channels_last_images(images: torch.Tensor) -> torch.Tensor:
    """``[B, T, 3, H, W]`` clips whose ``[B*T, 3, H, W]`` frames are channels_last (the same values;
    the models' ``flatten(0, 1)`` of them is a channels_last view)."""
    frames = images.flatten(0, 1).contiguous(memory_format=torch.channels_last)
    return frames.view(images.shape)


def forward_backward(model: nn.Module, core: nn.Module, batch: dict, device: torch.device, amp: str = "off",
                     scaler: torch.amp.GradScaler | None = None, channels_last: bool = False):
    """Forward of one training batch through ``model`` (the model, its compiled form or its DDP
    wrapper), the model's loss (``core.loss``) and its backward; returns ``(loss, parts)``.

    ``amp``: ``"bf16"`` / ``"fp16"`` run forward and loss under ``torch.autocast`` in that dtype
    (``"off"``: float32).  ``scaler``: for fp16, the gradient scaler that scales the loss before
    backward (the caller unscales and steps).  ``channels_last``: the images go in channels_last."""
    images, keypoints = batch["images"].to(device), batch["keypoints"].to(device)
    if channels_last:
        images = channels_last_images(images)
    autocast = (torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp != "off" else nullcontext())
    with autocast:  # the loss too: autocast computes losses in float32
        loss, parts = core.loss(model(images, keypoints), batch["pids"].to(device))
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the training loss is {float(loss.detach())}")
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss, parts


def _train_epoch(model, core, loader, optimizer, scaler, config: dict, device, epoch: int, rank: int) -> dict:
    """One epoch; returns the mean of the loss and of each named loss part, and the clip count.

    The torch RNG is seeded from ``(seed, epoch, rank)`` once the epoch's batch iterator exists
    (creating an iterator may draw from it), so the epoch does not depend on what ran before it."""
    t, max_steps = TrainSettings.from_dict(config["train"]), config["max_steps"]
    model.train()
    loader.batch_sampler.set_epoch(epoch)
    batches = iter(loader)
    torch.manual_seed(epoch_seed(config["seed"], epoch, rank))
    totals: dict[str, float] = {}
    steps = clips = 0
    total = len(loader) if max_steps is None else min(len(loader), max_steps)
    for batch in tqdm(itertools.islice(batches, total), desc=f"epoch {epoch + 1}", total=total,
                      disable=rank != 0, leave=False, mininterval=2):
        optimizer.zero_grad(set_to_none=True)
        try:
            loss, parts = forward_backward(model, core, batch, device, amp_mode(config, device), scaler,
                                           config.get("channels_last", False))
        except FloatingPointError as err:
            raise FloatingPointError(f"training diverged at epoch {epoch + 1}, step {steps + 1} ({err}); "
                                     f"try a lower learning rate than lr={t.lr:g}") from None
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip (and step) the true gradients
        if t.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)  # skipped when a gradient is not finite
            scaler.update()
        else:
            optimizer.step()
        for name, value in {"loss": loss, **parts}.items():
            totals[name] = totals.get(name, 0.0) + float(value.detach())
        steps += 1
        clips += len(batch["pids"])
    if steps == 0:
        raise RuntimeError("the training loader yielded no batch (too few identities or tracklets for "
                           "batch_size / instances?)")
    return {name: value / steps for name, value in totals.items()} | {"steps": steps, "clips": clips}


def _write_metrics(path: Path, epoch_done: int, record: dict | None) -> None:
    """Keeps the records of the first ``epoch_done`` epochs of ``path``, then appends ``record``."""
    lines = path.read_text().splitlines() if path.exists() else []
    try:
        lines = [line for line in lines if json.loads(line)["epoch"] <= epoch_done]
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{path}: corrupt metrics file, not one JSON record with an 'epoch' per line "
                         f"({type(err).__name__}: {err})") from None
    if record is not None:
        lines.append(json.dumps(record))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def train(config: dict, out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
          with_baselines: bool = False, evaluate_at_end: bool = True, log=print) -> dict:
    """Trains (and evaluates) the run of ``config`` into the folder ``out``.

    Writes ``config.json``, ``metrics.jsonl`` and ``model.pt`` (every epoch) there; with ``resume``
    continues from ``out/model.pt`` (the settings of ``config`` that change the result must equal
    the checkpoint's, ``epochs`` may grow). A folder that holds another run's files (see
    :data:`RUN_FILES`) is refused with ``FileExistsError`` unless ``resume`` or ``overwrite`` (which
    deletes them first) is given. The checkpoint of an epoch is written before the epoch's
    evaluation, so a failing evaluation never loses the training. Under ``torchrun`` (``WORLD_SIZE > 1``) runs DDP: each
    rank takes its share of every epoch's batches, gradients are averaged, epoch metrics are reduced,
    rank 0 writes and evaluates.

    ``with_baselines``: the final evaluation also evaluates :func:`baselines` on the same frames;
    ``evaluate_at_end=False`` leaves the final evaluation to the caller ("eval" is then None unless
    ``eval_every`` evaluated the last epoch).  A model that defines ``diagnostics() -> {name:
    float}`` (statistics it gathered over the epoch's training steps, reset by the call) has them
    added to each epoch's record.
    Returns ``{"metrics": last epoch record, "eval": the model's evaluation, "baselines": {name:
    evaluation}, "dataset", "model", "seconds"}`` (evaluations on rank 0 only, None / {} elsewhere).
    """
    start_time = time.perf_counter()
    rank, world_size = dist_info()
    device = device_for_rank()
    init_distributed(world_size, device)
    out = Path(out)
    ckpt_path, metrics_path = out / "model.pt", out / "metrics.jsonl"
    if rank == 0:
        _prepare_run_folder(out, resume, overwrite)
    state = None
    if resume:
        state = load_checkpoint(ckpt_path, config["model"])
        _check_resumable(state["config"], config)
    dataset, loader, core = build_run(config, rank=rank, world_size=world_size, initial_weights=state is None)
    if state is not None and state["num_classes"] != dataset.num_train_pids:
        raise CheckpointError(f"cannot resume {ckpt_path}: it was trained on {state['num_classes']} training "
                              f"identities, the dataset in {config['root']} now has {dataset.num_train_pids}")
    if rank == 0:
        log(dataset.statistics())
    core.to(device)
    if config.get("channels_last"):
        core.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device.type) if amp_mode(config, device) == "fp16" else None
    t = TrainSettings.from_dict(config["train"])
    optimizer = _optimizer(core, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, t))
    start_epoch = 0
    if state is not None:
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"]
        log(f"resuming {ckpt_path} after epoch {start_epoch}")
    model = wrap_ddp(core, device) if world_size > 1 else core
    if config.get("compile"):
        model = torch.compile(model, backend=config["compile"])
    if rank == 0:
        (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        _write_metrics(metrics_path, start_epoch, None)
    record, result, baseline_results = None, None, {}
    epochs = t.epochs
    for epoch in range(start_epoch, epochs):
        tick = time.perf_counter()
        stats = _train_epoch(model, core, loader, optimizer, scaler, config, device, epoch, rank)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        counts = {"steps": stats.pop("steps"), "clips": stats.pop("clips") * world_size}
        stats = all_reduce_mean(stats, world_size)
        seconds = time.perf_counter() - tick
        record = {"epoch": epoch + 1, "lr": lr, **stats, **counts, "seconds": seconds,
                  "clips_per_s": counts["clips"] / seconds}
        if hasattr(core, "diagnostics"):
            record.update(all_reduce_mean({k: float(v) for k, v in core.diagnostics().items()}, world_size))
        last = epoch + 1 == epochs
        if rank == 0:  # the checkpoint first: an evaluation that fails loses no training
            _write_metrics(metrics_path, epoch, record)
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "config": config, "num_classes": dataset.num_train_pids,
                "epoch": epoch + 1, "model": core.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()})
            if (last and evaluate_at_end) or (t.eval_every and (epoch + 1) % t.eval_every == 0):
                result, baseline_results = _evaluate_run(core, dataset, config, device, last and with_baselines)
                record.update(summary(result))
                _write_metrics(metrics_path, epoch, record)
            log(_epoch_line(record, epochs))
        if world_size > 1:
            dist.barrier()
    if result is None and rank == 0 and evaluate_at_end:  # resumed a finished run: evaluate its weights
        result, baseline_results = _evaluate_run(core, dataset, config, device, with_baselines)
    if rank == 0:
        write_part_masks(core, dataset, config, out / "part_masks.png")
    if world_size > 1:
        dist.destroy_process_group()
    return {"metrics": record, "eval": result, "baselines": baseline_results, "dataset": dataset, "model": core,
            "seconds": time.perf_counter() - start_time}


@torch.no_grad()
def write_part_masks(model: nn.Module, dataset, config: dict, path: str | os.PathLike, *, clips: int = 4) -> bool:
    """The part masks of a model that has them (a ``part_masks(images, keypoints)`` method that does
    not return None) over the first test frame of ``clips`` query tracklets spread over the split
    (:func:`keypointops.plots.plot_part_masks`); returns whether a picture was written."""
    if not hasattr(model, "part_masks"):
        return False
    from keypointops.data import build_loader
    from keypointops.data.transforms import denormalize
    from keypointops.plots import plot_part_masks

    t = TrainSettings.from_dict(config["train"])
    step = max(1, len(dataset.query) // clips)
    loader = build_loader(dataset.query[::step][:clips], train=False, frames=t.frames, sampling=t.test_sampling,
                          height=t.height, width=t.width, batch_size=clips, flip=False, random_erase=False,
                          workers=0, seed=config["seed"])
    batch = next(iter(loader))
    device = next(model.parameters()).device
    model.eval()
    masks = model.part_masks(batch["images"].to(device), batch["keypoints"].to(device))
    if masks is None:
        return False
    frames = denormalize(batch["images"][:, 0]).clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1)
    plot_part_masks(frames.numpy(), masks[:, 0].float().cpu().numpy(), path)
    return True


#: The files a training run writes into its folder (``keypointops train`` and ``export`` add the plots
#: and the exported models).
RUN_FILES = ("model.pt", "metrics.jsonl", "config.json", "model.onnx", "model.pt2", "cmc.png", "curves.png",
             "ranking.png", "part_masks.png")


def _prepare_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Creates the run folder; refuses one that holds another run's files unless ``resume`` or
    ``overwrite`` (which deletes them); removes the temporary files of an interrupted checkpoint or
    metrics write."""
    out.mkdir(parents=True, exist_ok=True)
    for orphan in [*out.glob(".model.pt.*.tmp"), out / "metrics.tmp"]:
        orphan.unlink(missing_ok=True)
    if resume:
        return
    existing = [name for name in RUN_FILES if (out / name).exists()]
    # A run killed before its first checkpoint leaves only its config and an empty metrics file:
    # nothing trained, so they are replaced without asking.
    trained = [name for name in existing if name not in ("config.json", "metrics.jsonl")
               or (name == "metrics.jsonl" and (out / name).stat().st_size > 0)]
    if trained and not overwrite:
        raise FileExistsError(f"{out} already holds a run ({', '.join(trained)}); pass --resume to continue it "
                              "or --overwrite to replace it")
    for name in existing:
        (out / name).unlink()


def _evaluate_run(core, dataset, config, device, with_baselines: bool) -> tuple[dict, dict]:
    """The model's evaluation and, when asked, the baselines' (one pass over the test frames)."""
    results = evaluate_models({"model": core, **(baselines() if with_baselines else {})}, dataset, config, device)
    return results.pop("model"), results


def _epoch_line(record: dict, epochs: int) -> str:
    line = (f"epoch {record['epoch']}/{epochs}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"{record['clips_per_s']:.1f} clips/s  {record['seconds']:.0f} s")
    if "mAP" in record:
        line += f"  rank-1 {record['rank1']:.1f}%  mAP {record['mAP']:.1f}%"
    return line


_RESULT_KEYS = ("model", "preset", "model_options", "data", "root", "data_options", "seed", "pretrained", "init_from",
                "amp")


def _check_resumable(saved: dict, config: dict) -> None:
    """A resumed run must train the same thing: only ``epochs``, ``eval_every``, ``workers`` and
    ``max_steps`` may differ from the checkpoint's config."""
    changed = [k for k in _RESULT_KEYS if saved.get(k) != config.get(k)]
    changed += [f"train.{k}" for k in config["train"]
                if k not in ("epochs", "eval_every") and saved["train"].get(k) != config["train"][k]]
    if changed:
        raise CheckpointError(f"cannot resume: the checkpoint was trained with other settings ({', '.join(changed)})")


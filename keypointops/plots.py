"""Pictures of a run (matplotlib, Agg backend, PNG): CMC curves, training curves, ranked retrieval,
part masks over frames."""
from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

__all__ = ["plot_cmc", "plot_curves", "plot_ranking", "plot_part_masks"]


def plot_cmc(curves: dict[str, np.ndarray], path: str | os.PathLike, *, max_rank: int = 20) -> None:
    """CMC curves ``{label: cmc array (fractions)}`` up to ``max_rank``, to ``path``."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, cmc in curves.items():
        ranks = np.arange(1, min(max_rank, len(cmc)) + 1)
        ax.plot(ranks, 100 * np.asarray(cmc)[:len(ranks)], marker=".", label=label)
    ax.set(xlabel="rank", ylabel="matching rate (%)", title="CMC", ylim=(0, 100.5))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(metrics_path: str | os.PathLike, path: str | os.PathLike) -> None:
    """Training curves from a ``metrics.jsonl``: the loss and its parts per epoch, the learning rate,
    and rank-1 / mAP at the epochs that were evaluated."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{metrics_path} holds no epoch")
    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    skip = {"epoch", "lr", "steps", "clips", "seconds", "clips_per_s", "rank1", "rank5", "rank10", "rank20",
            "mAP", "mINP"}
    for key in records[0]:
        if key not in skip:
            axes[0].plot(epochs, [r.get(key, np.nan) for r in records], label=key, lw=2 if key == "loss" else 1)
    axes[0].set(xlabel="epoch", title="training loss")
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].plot(epochs, [r["lr"] for r in records])
    axes[1].set(xlabel="epoch", title="learning rate", yscale="log")
    evaluated = [r for r in records if "mAP" in r]
    for key in ("rank1", "mAP"):
        axes[2].plot([r["epoch"] for r in evaluated], [r[key] for r in evaluated], marker="o", label=key)
    axes[2].set(xlabel="epoch", title="test split (%)", ylim=(0, 100.5))
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _frame(tracklet, size: tuple[int, int], border: str | None) -> np.ndarray:
    """The middle frame of a tracklet, resized to ``size`` (h, w), with a 4-pixel coloured border."""
    image = Image.open(tracklet.frames[len(tracklet.frames) // 2]).convert("RGB").resize(size[::-1])
    if border is not None:
        image = ImageOps.expand(image.crop((4, 4, size[1] - 4, size[0] - 4)), border=4, fill=border)
    return np.asarray(image)


def plot_ranking(distmat: np.ndarray, query, gallery, path: str | os.PathLike, *, num_queries: int = 6,
                 top: int = 10, size: tuple[int, int] = (128, 64), seed: int = 0) -> None:
    """Ranked retrieval: for ``num_queries`` random queries, the query's middle frame and those of its
    ``top`` nearest gallery tracklets (same pid and camera excluded, junk excluded, as in
    evaluation), green border for a true match, red otherwise."""
    rng = np.random.default_rng(seed)
    rows = sorted(rng.choice(len(query), size=min(num_queries, len(query)), replace=False))
    g_pids = np.array([t.pid for t in gallery])
    g_cams = np.array([t.camid for t in gallery])
    fig, axes = plt.subplots(len(rows), top + 1, figsize=(1.1 * (top + 1), 2.1 * len(rows)), squeeze=False)
    for ax_row, q in zip(axes, rows):
        keep = ~(((g_pids == query[q].pid) & (g_cams == query[q].camid)) | (g_pids == -1))
        candidates = np.flatnonzero(keep)
        order = candidates[np.argsort(distmat[q, candidates], kind="stable")[:top]]
        ax_row[0].imshow(_frame(query[q], size, None))
        ax_row[0].set_title(f"query {query[q].pid}", fontsize=7)
        for k, ax in enumerate(ax_row[1:]):
            if k < len(order):
                g = order[k]
                ax.imshow(_frame(gallery[g], size, "#1a9c1a" if g_pids[g] == query[q].pid else "#d62020"))
                ax.set_title(f"{k + 1}: {g_pids[g]}", fontsize=7)
        for ax in ax_row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_part_masks(frames: np.ndarray, masks: np.ndarray, path: str | os.PathLike, *,
                    labels: tuple[str, ...] = ("head", "torso + arms", "legs")) -> None:
    """Part masks over their frames: one row per frame, the frame and then each mask (its cells
    upsampled to the frame, nearest) drawn over the frame in a heat colour map.

    Args:
        frames: ``uint8 [N, H, W, 3]`` frames.
        masks: ``[N, P, h, w]`` masks (each sums to 1 over its ``h * w`` cells), ``P = len(labels)``.
        labels: the parts' names (column titles).
    """
    frames, masks = np.asarray(frames), np.asarray(masks, dtype=np.float64)
    if frames.ndim != 4 or frames.shape[-1] != 3 or masks.ndim != 4 or masks.shape[:2] != (len(frames), len(labels)):
        raise ValueError(f"plot_part_masks: frames must be [N, H, W, 3] and masks [N, {len(labels)}, h, w], got "
                         f"{list(frames.shape)} and {list(masks.shape)}")
    height, width = frames.shape[1:3]
    fig, axes = plt.subplots(len(frames), 1 + len(labels), figsize=(1.3 * (1 + len(labels)), 2.3 * len(frames)),
                             squeeze=False)
    for row, frame, frame_masks in zip(axes, frames, masks):
        row[0].imshow(frame)
        for ax, mask, label in zip(row[1:], frame_masks, labels):
            ax.imshow(frame)
            ax.imshow(mask, cmap="inferno", alpha=0.6, extent=(0, width, height, 0), interpolation="nearest",
                      vmin=0, vmax=mask.max())
            ax.set_title(f"{label}\nmax {mask.max():.2f}", fontsize=7)
    axes[0, 0].set_title("frame", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

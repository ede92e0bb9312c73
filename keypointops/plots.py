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
from matplotlib.lines import Line2D  # noqa: E402
from PIL import Image  # noqa: E402

__all__ = ["plot_cmc", "plot_curves", "plot_ranking", "plot_part_masks"]


# A colour-blind-safe pair (Okabe & Ito, 2008): blue for a true match, vermillion for a false one;
# a tick in the rank's title and the border's line style (solid / dashed) tell them apart without colour too.
MATCH_COLOUR, MISMATCH_COLOUR = "#0072B2", "#D55E00"


def plot_cmc(curves: dict[str, np.ndarray], path: str | os.PathLike, *, max_rank: int = 20,
             title: str = "CMC") -> None:
    """CMC curves ``{label: cmc array (fractions)}`` up to ``max_rank``, to ``path``; ``title``
    names what was evaluated (model, dataset, mAP)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for label, cmc in curves.items():
        ranks = np.arange(1, min(max_rank, len(cmc)) + 1)
        ax.plot(ranks, 100 * np.asarray(cmc)[:len(ranks)], marker=".", label=label)
    ax.set(xlabel="rank", ylabel="matching rate (%)", ylim=(0, 100.5))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(metrics_path: str | os.PathLike, path: str | os.PathLike) -> None:
    """Training curves from a ``metrics.jsonl``, one x-axis in epochs shared by every panel: the
    loss and its parts, the learning rate (a step per epoch: it is constant within one), and
    rank-1 / mAP at the epochs that were evaluated.  Every point has a marker, so a run of one
    epoch shows; legends sit beside the panels, off the lines."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{metrics_path} holds no epoch")
    epochs = np.array([r["epoch"] for r in records])
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), sharex=True)
    skip = {"epoch", "lr", "steps", "clips", "seconds", "clips_per_s", "rank1", "rank5", "rank10", "rank20",
            "mAP", "mINP"}
    for key in records[0]:
        if key not in skip and isinstance(records[0][key], (int, float)):
            axes[0].plot(epochs, [r.get(key, np.nan) for r in records], marker="o", ms=3, label=key,
                         lw=2 if key == "loss" else 1)
    axes[0].set_title("training loss")
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    # the rate of epoch e holds over [e - 1, e]: a step from the epoch's start to its end
    lrs = [r["lr"] for r in records]
    (steps,) = axes[1].step(np.append(epochs - 1, epochs[-1]), lrs + lrs[-1:], where="post")
    axes[1].plot(epochs, lrs, "o", ms=3, color=steps.get_color())
    axes[1].set(title="learning rate", yscale="log")
    evaluated = [r for r in records if "mAP" in r]
    for key in ("rank1", "mAP"):
        axes[2].plot([r["epoch"] for r in evaluated], [r[key] for r in evaluated], marker="o", label=key)
    axes[2].set(title="test split (%)", ylim=(0, 100.5))
    axes[2].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xlabel("epoch")
        ax.set_xlim(0, max(1, epochs[-1]) + 0.25)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _frame(tracklet, size: tuple[int, int]) -> np.ndarray:
    """The middle frame of a tracklet, resized to ``size`` (h, w)."""
    return np.asarray(Image.open(tracklet.frames[len(tracklet.frames) // 2]).convert("RGB").resize(size[::-1]))


def _border(ax, match: bool) -> None:
    """A thick frame around an image: solid blue for a true match, dashed vermillion otherwise."""
    for spine in ax.spines.values():
        spine.set(visible=True, linewidth=4, color=MATCH_COLOUR if match else MISMATCH_COLOUR,
                  linestyle="-" if match else (0, (2, 1)))


def plot_ranking(distmat: np.ndarray, query, gallery, path: str | os.PathLike, *, num_queries: int = 6,
                 top: int = 10, size: tuple[int, int] = (128, 64), seed: int = 0) -> None:
    """Ranked retrieval: for ``num_queries`` random queries, the query's middle frame and those of its
    ``top`` nearest gallery tracklets (same pid and camera excluded, junk excluded, as in
    evaluation), each with its person id, camera and distance under it; a tick by the rank and
    the border say whether it is a true match (legend at the top)."""
    rng = np.random.default_rng(seed)
    rows = sorted(rng.choice(len(query), size=min(num_queries, len(query)), replace=False))
    g_pids = np.array([t.pid for t in gallery])
    g_cams = np.array([t.camid for t in gallery])
    fig, axes = plt.subplots(len(rows), top + 1, figsize=(1.25 * (top + 1), 2.5 * len(rows) + 0.6), squeeze=False)
    for ax_row, q in zip(axes, rows):
        keep = ~(((g_pids == query[q].pid) & (g_cams == query[q].camid)) | (g_pids == -1))
        candidates = np.flatnonzero(keep)
        order = candidates[np.argsort(distmat[q, candidates], kind="stable")[:top]]
        ax_row[0].imshow(_frame(query[q], size))
        ax_row[0].set_title("query", fontsize=10, fontweight="bold")
        ax_row[0].set_xlabel(f"id {query[q].pid}, cam {query[q].camid}", fontsize=9)
        for k, ax in enumerate(ax_row[1:]):
            if k < len(order):
                g = order[k]
                ax.imshow(_frame(gallery[g], size))
                _border(ax, g_pids[g] == query[q].pid)
                match = g_pids[g] == query[q].pid
                ax.set_title(f"{k + 1} \u2713" if match else f"{k + 1}", fontsize=10,
                             color=MATCH_COLOUR if match else "black", fontweight="bold" if match else "normal")
                ax.set_xlabel(f"id {g_pids[g]}, cam {g_cams[g]}\nd {distmat[q, g]:.3g}", fontsize=9)
            else:
                ax.axis("off")
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
        for spine in ax_row[0].spines.values():
            spine.set_visible(False)
    handles = [Line2D([], [], color=MATCH_COLOUR, lw=4, label="true match (\u2713, solid)"),
               Line2D([], [], color=MISMATCH_COLOUR, lw=4, linestyle=(0, (2, 1)), label="other person (dashed)")]
    fig.legend(handles=handles, loc="upper center", ncol=2, fontsize=10, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
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

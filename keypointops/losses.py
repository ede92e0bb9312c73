"""Re-ID losses shared by every model: label-smoothed cross-entropy, batch-hard triplet, diversity.

One implementation of each; the models in :mod:`keypointops.models` call these and nothing else.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cross_entropy_label_smooth", "batch_hard_triplet", "diversity_loss"]


def _check_targets(targets: Tensor, batch: int, fn: str) -> None:
    if not isinstance(targets, Tensor) or targets.dim() != 1 or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{fn}: targets must be an int64 tensor [B], got "
                         f"{getattr(targets, 'dtype', type(targets).__name__)} {list(getattr(targets, 'shape', []))}")
    if targets.numel() != batch:
        raise ValueError(f"{fn}: targets has {targets.numel()} entries but the batch has {batch}")


def cross_entropy_label_smooth(logits: Tensor, targets: Tensor, epsilon: float = 0.1) -> Tensor:
    r"""Cross-entropy with label smoothing (Szegedy et al. 2016), exactly as torchreid's ``CrossEntropyLoss``.

    The target distribution is ``(1 - epsilon) * onehot(y) + epsilon / num_classes`` and the loss
    is its negative log-likelihood under ``softmax(logits)``, averaged over the batch.

    Args:
        logits: ``[B, num_classes]``.
        targets: ``[B]`` int64 class indices in ``[0, num_classes)``.
        epsilon: smoothing in ``[0, 1]``; 0 gives plain cross-entropy.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(f"cross_entropy_label_smooth: logits must be [B, num_classes], got "
                         f"{list(getattr(logits, 'shape', []))}")
    _check_targets(targets, logits.size(0), "cross_entropy_label_smooth")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"cross_entropy_label_smooth: epsilon must be in [0, 1], got {epsilon}")
    num_classes = logits.size(1)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(f"cross_entropy_label_smooth: targets must lie in [0, {num_classes}), got "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    log_probs = F.log_softmax(logits, dim=1)
    smooth = torch.full_like(log_probs, epsilon / num_classes)
    smooth.scatter_add_(1, targets.long()[:, None],
                        torch.full_like(log_probs[:, :1], 1.0 - epsilon))
    return -(smooth * log_probs).sum(1).mean()


def batch_hard_triplet(features: Tensor, targets: Tensor, margin: float = 0.3) -> Tensor:
    r"""Batch-hard triplet loss (Hermans et al. 2017) on Euclidean distances, as torchreid's ``TripletLoss``.

    For every anchor: the hardest positive (largest distance to a sample of the same identity,
    the anchor itself included, as torchreid) and the hardest negative (smallest distance to
    another identity); the loss is ``mean(relu(d_ap - d_an + margin))``.  Distances are
    ``sqrt(clamp(||a||^2 + ||b||^2 - 2 a.b, 1e-12))``.  Anchors without any negative (a batch of
    one identity) are left out; with none left the loss is 0 (still connected to the graph).

    Args:
        features: ``[B, D]`` embeddings.
        targets: ``[B]`` int64 identities.
        margin: the margin, >= 0.
    """
    if not isinstance(features, Tensor) or features.dim() != 2:
        raise ValueError(f"batch_hard_triplet: features must be [B, D], got {list(getattr(features, 'shape', []))}")
    _check_targets(targets, features.size(0), "batch_hard_triplet")
    if margin < 0:
        raise ValueError(f"batch_hard_triplet: margin must be >= 0, got {margin}")
    # The distances in float32 (float64 stays), with autocast off (it would run the Gram matmul in
    # bfloat16 / float16 again): in float16 the clamp's floor 1e-12 rounds to 0, so the zero distance
    # of every anchor to itself gives sqrt's backward 0 / 0 = NaN; and ||a||^2 + ||b||^2 - 2 a.b
    # cancels, so a Gram matrix rounded to 8 mantissa bits (bfloat16) leaves an error of about
    # ||a||^2 / 256 in every squared distance, enough to change the hardest positive and negative.
    features = features.to(torch.promote_types(features.dtype, torch.float32))
    with torch.autocast(features.device.type, enabled=False):
        sq = features.pow(2).sum(1)
        dist = (sq[:, None] + sq[None, :] - 2.0 * features @ features.t()).clamp(min=1e-12).sqrt()
    same = targets[:, None] == targets[None, :]
    d_ap = dist.masked_fill(~same, float("-inf")).amax(1)
    d_an = dist.masked_fill(same, float("inf")).amin(1)
    has_negative = (~same).any(1)
    if not bool(has_negative.any()):
        return features.sum() * 0.0
    return F.relu(d_ap - d_an + margin)[has_negative].mean()


def diversity_loss(parts: Tensor) -> Tensor:
    r"""CTL's diversity loss (Eq. 8): ``|| P P^T - I ||_F^2`` with ``P`` the L2-normalised parts of a clip.

    ``parts`` ``[B, P, D]`` are the part features of each clip (the caller does CTL's temporal
    average pooling first); each of the ``P`` rows is L2-normalised, so the loss of a clip is the
    sum of the squared cosines between its distinct parts.  Averaged over the ``B`` clips.
    """
    if not isinstance(parts, Tensor) or parts.dim() != 3:
        raise ValueError(f"diversity_loss: parts must be [B, P, D], got {list(getattr(parts, 'shape', []))}")
    unit = F.normalize(parts, dim=2)
    gram = unit @ unit.transpose(1, 2)
    eye = torch.eye(parts.size(1), dtype=parts.dtype, device=parts.device)
    return (gram - eye).pow(2).sum((1, 2)).mean()

"""Label-smoothed cross-entropy, batch-hard triplet and diversity losses (keypointops.losses)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from keypointops.losses import batch_hard_triplet, cross_entropy_label_smooth, diversity_loss


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.5])
def test_label_smoothed_ce_matches_torch(epsilon):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 5, (7,), generator=g)
    expected = F.cross_entropy(logits, targets, label_smoothing=epsilon)
    torch.testing.assert_close(cross_entropy_label_smooth(logits, targets, epsilon), expected)


def test_label_smoothed_ce_by_hand():
    logits = torch.tensor([[0.0, 0.0]], dtype=torch.float64)      # p = (0.5, 0.5)
    # -[(0.9 + 0.05) log .5 + 0.05 log .5] = log 2
    assert cross_entropy_label_smooth(logits, torch.tensor([1])).item() == pytest.approx(0.6931471805599453)
    logits = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)
    logp = F.log_softmax(logits, 1)[0]
    expected = -(0.9 + 0.1 / 3) * logp[0] - 0.1 / 3 * (logp[1] + logp[2])
    assert cross_entropy_label_smooth(logits, torch.tensor([0])).item() == pytest.approx(expected.item())


def test_label_smoothed_ce_bad_input():
    with pytest.raises(ValueError, match="targets must lie in"):
        cross_entropy_label_smooth(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="logits must be"):
        cross_entropy_label_smooth(torch.zeros(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="targets has 1 entries"):
        cross_entropy_label_smooth(torch.zeros(2, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="epsilon"):
        cross_entropy_label_smooth(torch.zeros(1, 3), torch.tensor([0]), epsilon=1.5)


def _triplet_loops(x, y, margin):
    losses = []
    for a in range(len(y)):
        dist = [torch.dist(x[a], x[b]).item() for b in range(len(y))]
        pos = [dist[b] for b in range(len(y)) if y[b] == y[a]]
        neg = [dist[b] for b in range(len(y)) if y[b] != y[a]]
        losses.append(max(0.0, max(pos) - min(neg) + margin))
    return sum(losses) / len(losses)


def test_batch_hard_triplet_matches_loops():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    for margin in (0.0, 0.3, 5.0):
        assert batch_hard_triplet(x, y, margin).item() == pytest.approx(_triplet_loops(x, y, margin), abs=1e-6)


def test_batch_hard_triplet_by_hand_and_gradient():
    # 1-D points: ids 0 at 0 and 1, id 1 at 3.  Anchor 0: ap 1, an 3 -> 0; anchor 1: ap 1, an 2 -> 0;
    # anchor 2 (alone): ap 0, an 2 -> 0 with margin 0.3; margin 2.5: 2.5, 2.5-1+... computed below
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1])
    assert batch_hard_triplet(x, y, 0.3).item() == pytest.approx(0.0, abs=1e-5)
    loss = batch_hard_triplet(x, y, 2.5)
    assert loss.item() == pytest.approx(((1 - 3 + 2.5) + (1 - 2 + 2.5) + (0 - 2 + 2.5)) / 3, abs=1e-5)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batch_hard_triplet_reduced_precision_gradient_is_finite(dtype):
    """float16 features (as under float16 autocast): the distances are taken in float32, where the
    clamp of the zero self-distances to 1e-12 holds (in float16 it rounds to 0, and sqrt's backward
    gives 0 / 0 = NaN for every feature); the loss and gradients match the float32 ones."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 8, generator=g).to(dtype).requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = batch_hard_triplet(x, y, 0.3)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    exact = x.detach().float().requires_grad_()
    want = batch_hard_triplet(exact, y, 0.3)
    torch.testing.assert_close(loss.float(), want, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(grad.float(), torch.autograd.grad(want, exact)[0], rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batch_hard_triplet_under_autocast_takes_float32_distances(dtype):
    """Under CPU autocast the Gram matmul of the distances stays in float32: features of norm ~15
    (as a re-ID embedding) whose squared distances (~4) are far below their squared norms (~225),
    where a bfloat16 Gram matrix (error ~225 / 256 per entry) picks other hardest samples."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(8, 64, generator=g) * 3.7 + 0.2 * torch.randn(8, 64, generator=g)).requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    with torch.autocast("cpu", dtype=dtype):
        loss = batch_hard_triplet(x, y, 0.3)
    want = batch_hard_triplet(x.detach(), y, 0.3)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)


def test_batch_hard_triplet_one_identity_is_zero():
    x = torch.randn(4, 3, requires_grad=True)
    loss = batch_hard_triplet(x, torch.zeros(4, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_batch_hard_triplet_bad_input():
    with pytest.raises(ValueError, match="features must be"):
        batch_hard_triplet(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be an int64"):
        batch_hard_triplet(torch.zeros(4, 2), torch.zeros(4))


def test_diversity_loss():
    eye = torch.eye(5, 8, dtype=torch.float64)[None].repeat(3, 1, 1) * 7.0   # orthogonal parts, any norm
    assert diversity_loss(eye).item() == pytest.approx(0.0)
    same = torch.ones(2, 4, 6, dtype=torch.float64)                          # all cosines 1
    assert diversity_loss(same).item() == pytest.approx(4 * 3)
    g = torch.Generator().manual_seed(2)
    parts = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    unit = F.normalize(parts, dim=2)
    expected = sum(float(unit[b, m] @ unit[b, n]) ** 2 for b in range(3)
                   for m, n in itertools.permutations(range(5), 2)) / 3
    assert diversity_loss(parts).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="parts must be"):
        diversity_loss(parts[0])

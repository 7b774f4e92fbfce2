"""Effective-number class weights and the hybrid (class-balanced focal) loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from napari_wbc.errors import DataError
from napari_wbc.losses import HybridLoss, effective_number_weights


def test_weights_follow_formula_and_favour_rare_classes():
    beta = 0.99
    counts = [100, 10, 1]
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    expected = [3 * r / sum(raw) for r in raw]

    w = effective_number_weights(counts, beta=beta)

    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(w.sum()) == pytest.approx(3.0, rel=1e-6)
    assert w[2] > w[1] > w[0]


def test_beta_zero_gives_equal_weights():
    w = effective_number_weights([1000, 3, 1], beta=0.0)
    assert torch.equal(w, torch.ones(3))


def test_empty_class_gets_zero_weight_and_others_still_sum_to_c():
    w = effective_number_weights([50, 0, 5], beta=0.9)
    assert w[1] == 0
    assert float(w.sum()) == pytest.approx(3.0, rel=1e-6)
    assert w[2] > w[0] > 0


@pytest.mark.parametrize(
    ("counts", "beta"), [([], 0.9), ([-1, 2], 0.9), ([0, 0], 0.9), ([1, 2], 1.0), ([1, 2], -0.1)]
)
def test_invalid_weight_arguments_raise(counts, beta):
    with pytest.raises(DataError):
        effective_number_weights(counts, beta=beta)


def test_hybrid_loss_matches_hand_computation():
    beta, gamma = 0.9, 2.0
    counts = [10, 2, 1]
    logits = [[2.0, 0.5, -1.0], [0.1, 0.2, 1.5]]
    targets = [1, 2]

    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    w = [3 * r / sum(raw) for r in raw]
    per_sample = []
    for row, t in zip(logits, targets, strict=True):
        p_t = math.exp(row[t]) / sum(math.exp(z) for z in row)
        per_sample.append(-w[t] * (1 - p_t) ** gamma * math.log(p_t))

    loss = HybridLoss(counts, beta=beta, gamma=gamma, reduction="none")
    got = loss(torch.tensor(logits), torch.tensor(targets))
    assert got.tolist() == pytest.approx(per_sample, rel=1e-5)

    mean = HybridLoss(counts, beta=beta, gamma=gamma)(torch.tensor(logits), torch.tensor(targets))
    assert float(mean) == pytest.approx(sum(per_sample) / 2, rel=1e-5)
    total = HybridLoss(counts, beta=beta, gamma=gamma, reduction="sum")
    assert float(total(torch.tensor(logits), torch.tensor(targets))) == pytest.approx(
        sum(per_sample), rel=1e-5
    )


def test_hybrid_loss_reduces_to_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, generator=gen) * 3
    targets = torch.randint(0, 5, (16,), generator=gen)
    loss = HybridLoss([500, 50, 20, 5, 1], beta=0.0, gamma=0.0)
    assert torch.equal(loss(logits, targets), F.cross_entropy(logits, targets))


def test_focal_term_downweights_easy_samples():
    # One confident correct sample and one wrong one: focal modulation shrinks
    # the easy sample's loss far more than the hard one's.
    logits = torch.tensor([[6.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 0])
    ce = HybridLoss([1, 1], beta=0.0, gamma=0.0, reduction="none")(logits, targets)
    focal = HybridLoss([1, 1], beta=0.0, gamma=2.0, reduction="none")(logits, targets)
    assert focal[0] / ce[0] < 1e-4
    assert focal[1] / ce[1] > 0.5


def test_gradient_flows_and_is_finite():
    logits = torch.tensor([[20.0, -20.0, 0.0], [0.0, 1.0, 2.0]], requires_grad=True)
    loss = HybridLoss([30, 3, 1], beta=0.999, gamma=2.0)(logits, torch.tensor([0, 1]))
    loss.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[1].abs().sum() > 0


def test_attributes_and_wrong_shape():
    loss = HybridLoss([4, 2], beta=0.5, gamma=1.5)
    assert loss.beta == 0.5
    assert loss.gamma == 1.5
    assert loss.weights.shape == (2,)
    assert "weights" in dict(loss.named_buffers())
    with pytest.raises(DataError, match="shape"):
        loss(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(DataError):
        HybridLoss([4, 2], reduction="median")
    with pytest.raises(DataError):
        HybridLoss([4, 2], gamma=-1)

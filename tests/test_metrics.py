"""Metric accumulation: token-exact means over micro-batches, and ROC AUC from score histograms summed over batches
and processes, within the bound of pairs that share a bin."""

import math

import pytest
import torch

from pretrain.metrics import ROC_PREFIX, MetricTracker, auc_from_histogram, roc_histogram


def exact_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """P(positive's score > negative's) + ½ P(equal), over every pair."""
    pos, neg = scores[positive], scores[~positive]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def same_bin_fraction(hist: torch.Tensor) -> float:
    neg, pos = hist.double()
    return float((neg * pos).sum() / (neg.sum() * pos.sum()))


@pytest.mark.parametrize("shift,spread", [(0.0, 1.0), (0.7, 1.0), (2.0, 0.05), (-1.0, 30.0)])
def test_auc_from_histogram_is_within_the_shared_bin_bound(shift, spread):
    """Scores from two shifted Gaussians (narrow ones: many pairs share a bin; wide ones: clamped at ±16)."""
    g = torch.Generator().manual_seed(0)
    positive = torch.rand(3000, generator=g) < 0.15
    scores = (torch.randn(3000, generator=g) + shift * positive.float()) * spread
    valid = torch.ones(3000, dtype=torch.bool)
    hist = roc_histogram(scores, positive, valid)
    assert hist.sum() == 3000 and hist[1].sum() == positive.sum()
    clamped = scores.clamp(-16, 16)  # the histogram ranks clamped scores: equal beyond the range
    bound = 0.5 * same_bin_fraction(hist)
    assert abs(auc_from_histogram(hist) - exact_auc(clamped, positive)) <= bound + 1e-12
    if spread == 1.0:  # a real check: scores in range and wider than a bin leave few pairs in one bin
        assert bound < 0.005


def test_invalid_positions_are_not_counted_and_a_single_class_has_no_auc():
    scores, positive = torch.tensor([0.5, 2.0, -1.0, 3.0]), torch.tensor([True, False, False, True])
    hist = roc_histogram(scores, positive, torch.tensor([True, True, False, False]))
    assert hist.sum() == 2 and auc_from_histogram(hist) == 0.0  # the only pair: positive 0.5 below negative 2.0
    assert math.isnan(auc_from_histogram(roc_histogram(scores, positive, ~positive)))


def test_tracker_sums_histograms_over_batches_and_processes():
    g = torch.Generator().manual_seed(1)
    scores, positive = torch.randn(4, 50, generator=g), torch.rand(4, 50, generator=g) < 0.3
    valid = torch.ones(4, 50, dtype=torch.bool)

    def out(rows):
        return {"acc": torch.tensor(0.5), "n_tok": torch.tensor(50.0 * len(rows)),
                ROC_PREFIX + "auc": roc_histogram(scores[rows], positive[rows], valid[rows])}

    whole = MetricTracker({"acc": "n_tok"})
    whole.add(out([0, 1, 2, 3]))
    process = [MetricTracker({"acc": "n_tok"}) for _ in range(2)]
    for rank, tracker in enumerate(process):
        tracker.add(out([2 * rank]))
        tracker.add(out([2 * rank + 1]))
    flat_other = []  # the second process's sums, added in by the "all-reduce"
    process[1].compute(reduce=lambda flat: flat_other.append(flat) or flat)
    merged = process[0].compute(reduce=lambda flat: flat + flat_other[0])
    assert merged == pytest.approx(whole.compute()) and set(merged) == {"acc", "n_tok", "auc"}
    assert merged["auc"] == pytest.approx(auc_from_histogram(roc_histogram(scores, positive, valid)))

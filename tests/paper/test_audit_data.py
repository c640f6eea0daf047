"""netsim_paper.audit.data: seeded label flips, always to another class, spread over the others."""

from __future__ import annotations

import pytest
import torch

from netsim_paper.audit.data import flip_labels


def test_flip_labels_is_seeded_exact_and_always_wrong():
    labels = torch.arange(1000) % 10
    noisy, flipped = flip_labels(labels, 0.05, seed=3)
    again, flipped_again = flip_labels(labels, 0.05, seed=3)
    assert torch.equal(noisy, again) and torch.equal(flipped, flipped_again)
    assert int(flipped.sum()) == 50
    assert torch.equal(flipped, noisy != labels)                  # every flip changes the class, nothing else changes
    assert noisy.min() >= 0 and noisy.max() <= 9 and noisy.dtype == torch.int64
    other, _ = flip_labels(labels, 0.05, seed=4)
    assert not torch.equal(noisy, other)
    assert not flip_labels(labels, 0.0, seed=0)[1].any()
    assert flip_labels(labels, 1.0, seed=0)[1].all()


def test_flipped_classes_are_spread_over_the_other_classes():
    labels = torch.zeros(9000, dtype=torch.long)
    noisy, _ = flip_labels(labels, 1.0, seed=0)
    counts = torch.bincount(noisy, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 850               # ~1000 each of classes 1..9


@pytest.mark.parametrize("labels, fraction", [
    (torch.tensor([0.0, 1.0]), 0.5), (torch.tensor([0, 10]), 0.5), (torch.tensor([0, 1]), 1.5),
    (torch.tensor([[0, 1]]), 0.5),
])
def test_flip_labels_refuses_bad_input(labels, fraction):
    with pytest.raises(ValueError):
        flip_labels(labels, fraction, seed=0)

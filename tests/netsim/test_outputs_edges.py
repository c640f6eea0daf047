"""netsim.outputs at the edges: one class, label counts, label dtypes."""

import pytest
import torch

from netsim import outputs


def test_a_single_class_has_no_rest_and_is_refused():
    with pytest.raises(ValueError, match="C >= 2"):
        outputs.class_vs_rest(torch.randn(3, 1), torch.zeros(3, dtype=torch.long))


def test_labels_must_be_one_integer_per_row():
    with pytest.raises(ValueError, match="2 labels for 3"):
        outputs.class_vs_rest(torch.randn(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        outputs.class_vs_rest(torch.randn(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        outputs.class_vs_adversary(torch.randn(3, 4), torch.zeros(3, 3, dtype=torch.long))


def test_binarised_outputs_of_extreme_logits_stay_finite():
    logits = torch.tensor([[80.0, -80.0, 0.0], [-1e4, 1e4, 0.0]])
    labels = torch.tensor([0, 0])
    assert torch.isfinite(outputs.class_vs_rest(logits, labels)).all()
    assert torch.isfinite(outputs.neg_log_softmax(logits)).all()

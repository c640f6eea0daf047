"""netsim.enforce at the edges: frozen parameters, weight tying, BatchNorm in training mode
(the criteria run during training), non-finite gradients, option strings."""

import pytest
import torch
from torch import nn

from conftest import SmallCNN, assert_model_unchanged, mlp, model_state
from netsim import NonFiniteError, enforce, outputs


def test_frozen_parameters_are_left_out_of_the_batch_mean_gradient():
    model = mlp(seed=71)
    model[0].requires_grad_(False)
    mu = enforce.batch_mean_gradient(model, torch.randn(4, 3))
    assert mu.shape == (sum(p.numel() for p in model.parameters() if p.requires_grad),)


def test_batchnorm_in_training_mode_uses_the_batch_and_a_failure_restores_it():
    cnn = SmallCNN(d_out=3).train()
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    before = model_state(cnn)
    with pytest.raises(ValueError, match="single inputs"):
        enforce.pair_loss(cnn, images[:2], images[2:3])
    bad = images.clone()
    bad[3] = float("nan")
    with pytest.raises(NonFiniteError):
        enforce.group_loss(cnn, images[:2], bad[2:], output_fn=outputs.class_vs_rest, targets1=labels[:2],
                           targets2=labels[2:])
    assert_model_unchanged(cnn, before)
    loss = enforce.group_loss(cnn, images[:2], images[2:], output_fn=outputs.class_vs_rest, targets1=labels[:2],
                              targets2=labels[2:])
    assert torch.isfinite(loss)


def test_option_strings_and_batch_checks():
    with pytest.raises(ValueError, match="criterion"):
        enforce.group_loss(mlp(), torch.randn(2, 3), torch.randn(2, 3), criterion="cos")
    with pytest.raises(ValueError, match="criterion"):
        enforce.group_criterion(torch.ones(3), torch.ones(3), 1, "Paper")
    with pytest.raises(ValueError, match="targets has 3 rows for 2"):
        enforce.batch_mean_gradient(mlp(d_out=2), torch.randn(2, 3), outputs.class_vs_rest,
                                    torch.zeros(3, dtype=torch.long))


def test_weight_tying_double_backprop_runs():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    model[2].weight = model[0].weight
    loss = enforce.group_loss(model, torch.randn(3, 3), torch.randn(3, 3), criterion="neg_cos")
    loss.backward()
    assert torch.isfinite(model[0].weight.grad).all()

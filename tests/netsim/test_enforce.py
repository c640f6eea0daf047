"""Similarity-enforcing criteria: formulas, section 5 identities, double-backprop gradients."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import netsim
from conftest import jacobian_grads, mlp
from netsim import enforce, outputs


def test_pair_loss_is_minus_kc():
    model = mlp(d_out=1, seed=1)
    x = torch.randn(2, 3)
    expected = -netsim.similarity(model, x[:1], x[1:])[0, 0]
    torch.testing.assert_close(enforce.pair_loss(model, x[:1], x[1:]), expected, rtol=1e-5, atol=1e-6)


def test_group_criteria_formulas():
    mu1, mu2 = torch.tensor([3.0, 4.0]), torch.tensor([4.0, 3.0])
    cos = 24.0 / 25.0
    assert enforce.group_criterion(mu1, mu2, 4, "paper").item() == pytest.approx(4 * 2 / 25)
    assert enforce.group_criterion(mu1, mu2, 4, "neg_cos").item() == pytest.approx(-cos)
    assert enforce.group_criterion(mu1, mu2, 4, "pos_cos").item() == pytest.approx(cos)
    with pytest.raises(ValueError, match="criterion"):
        enforce.group_criterion(mu1, mu2, 4, "cos")


def test_group_loss_uses_batch_mean_gradients_of_the_binarised_output():
    model = mlp(d_out=10, hidden=12, seed=2)
    b1, b2 = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.full((4,), 7)
    J1 = jacobian_grads(model, b1, outputs.class_vs_rest, targets=labels)[:, 0]
    J2 = jacobian_grads(model, b2, outputs.class_vs_rest, targets=labels)[:, 0]
    mu1, mu2 = J1.mean(0), J2.mean(0)
    expected = 4 * (mu1 - mu2).pow(2).sum() / (mu1.norm() * mu2.norm())
    got = enforce.group_loss(model, b1, b2, output_fn=outputs.class_vs_rest, targets1=labels, targets2=labels)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 10**6), n=st.integers(2, 9))
def test_section5_identities_on_normalised_gradients(seed, n):
    """mean_{i != j} k^C = n/(n-1) ||mu||^2 - 1/(n-1) and var = 1 - ||mu||^2, mu the mean of the
    normalised gradients."""
    model = mlp(d_out=1, seed=seed % 101)
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    g = jacobian_grads(model, x)[:, 0].double()
    u = g / g.norm(dim=1, keepdim=True)
    mu = u.mean(0)
    kc = netsim.similarity(model, x).double()
    off_diagonal_mean = (kc.sum() - kc.diagonal().sum()) / (n * (n - 1))
    torch.testing.assert_close(off_diagonal_mean, n / (n - 1) * mu.dot(mu) - 1 / (n - 1), atol=1e-5, rtol=0)
    variance = (u - mu).pow(2).sum(1).mean()
    torch.testing.assert_close(variance, 1 - mu.dot(mu), atol=1e-10, rtol=0)


@pytest.mark.parametrize("criterion", enforce.CRITERIA)
def test_double_backprop_gradient_matches_finite_differences(criterion):
    torch.manual_seed(3)
    model = mlp(d_out=1, hidden=5, seed=3, dtype=torch.float64)
    b1, b2 = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    loss = enforce.group_loss(model, b1, b2, criterion=criterion)
    params = list(model.parameters())
    analytic = torch.autograd.grad(loss, params, allow_unused=True)  # the output bias: grad f = 1, unused
    eps = 1e-6
    for p, g in zip(params[:2], analytic[:2]):          # first layer: the deepest dependence
        for idx in [(0, 0), (1, 2)] if p.ndim == 2 else [(0,), (3,)]:
            values = []
            for shift in (eps, -2 * eps, eps):
                with torch.no_grad():
                    p[idx] += shift
                values.append(enforce.group_loss(model, b1, b2, criterion=criterion).item())
            up, down = values[0], values[1]
            assert g[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)


def test_bad_inputs_are_clear_errors():
    model = mlp(d_out=2)
    with pytest.raises(ValueError, match="d = 1"):
        enforce.group_loss(model, torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="same size"):
        enforce.group_loss(mlp(), torch.randn(2, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="single inputs"):
        enforce.pair_loss(mlp(), torch.randn(2, 3), torch.randn(1, 3))
    frozen_out = torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False), torch.nn.ReLU(),
                                     torch.nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        frozen_out[0].weight.fill_(-1.0)
    with pytest.raises(ValueError, match="zero"):
        enforce.group_loss(frozen_out, torch.ones(2, 3), torch.ones(2, 3))

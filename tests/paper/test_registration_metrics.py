"""Tests of netsim_paper.registration.metrics: vertex and pixel errors, accuracy curves, medians, AUC."""

from __future__ import annotations

import math

import pytest
import torch

from netsim_paper.registration.metrics import accuracy_curve, curve_auc, median_error, pixel_errors, vertex_errors

F64 = torch.float64


def test_vertex_errors_by_hand():
    truth = [torch.tensor([[0.0, 0.0], [10.0, 0.0], [10.0, 10.0]], dtype=F64),
             torch.tensor([[5.0, 5.0], [6.0, 5.0]], dtype=F64)]
    predicted = [torch.tensor([[3.0, 4.0], [10.0, 0.0], [9.0, 11.0]], dtype=F64),
                 torch.tensor([[5.0, 7.0], [6.0, 5.5]], dtype=F64)]
    expected = torch.tensor([5.0, 0.0, math.sqrt(2), 2.0, 0.5], dtype=F64)
    assert torch.allclose(vertex_errors(predicted, truth), expected)


def test_vertex_errors_reject_different_structures():
    square = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="differ in size"):
        vertex_errors([square], [square, square])
    with pytest.raises(ValueError, match="polygon 1"):
        vertex_errors([square, square], [square, torch.zeros(3, 2, dtype=F64)])
    with pytest.raises(ValueError, match="empty"):
        vertex_errors([], [])


def test_pixel_errors_by_hand_with_and_without_mask():
    predicted = torch.zeros(2, 2, 2, dtype=F64)
    true = torch.zeros(2, 2, 2, dtype=F64)
    true[:, 0, 0] = torch.tensor([3.0, 4.0])  # error 5 at row 0, column 0
    true[:, 1, 1] = torch.tensor([0.0, -1.0])  # error 1 at row 1, column 1
    assert torch.allclose(pixel_errors(predicted, true), torch.tensor([5.0, 0.0, 0.0, 1.0], dtype=F64))
    mask = torch.tensor([[True, False], [False, True]])
    assert torch.allclose(pixel_errors(predicted, true, mask), torch.tensor([5.0, 1.0], dtype=F64))
    # Batched fields with one shared mask.
    batched = pixel_errors(torch.stack([predicted, true]), torch.stack([true, true]), mask)
    assert torch.allclose(batched, torch.tensor([5.0, 1.0, 0.0, 0.0], dtype=F64))


def test_pixel_errors_check_their_inputs():
    field = torch.zeros(2, 3, 3)
    with pytest.raises(ValueError, match="shapes differ"):
        pixel_errors(field, torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="boolean"):
        pixel_errors(field, field, torch.ones(3, 3))
    with pytest.raises(ValueError, match="does not fit"):
        pixel_errors(field, field, torch.ones(4, 4, dtype=torch.bool))


def test_accuracy_curve_by_hand():
    errors = torch.tensor([0.0, 0.3, 0.5, 1.0, 2.2])
    taus, fraction = accuracy_curve(errors, tau_max=1.0)
    assert taus.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    # F(τ) counts errors <= τ: the error 0.5 counts at τ = 0.5, the error 1.0 at τ = 1.
    assert fraction.tolist() == [0.2, 0.2, 0.6, 0.6, 0.8]


def test_accuracy_curve_default_range_reaches_one_and_off_grid_tau_max_is_kept():
    taus, fraction = accuracy_curve(torch.tensor([0.1, 0.9, 1.6]))
    assert float(taus[-1]) == 1.75 and float(fraction[-1]) == 1.0
    taus, _ = accuracy_curve(torch.tensor([0.1]), tau_max=0.6)
    assert taus.tolist() == [0.0, 0.25, 0.5, 0.6]


def test_accuracy_curve_is_monotone_and_bounded():
    errors = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=F64) * 20
    taus, fraction = accuracy_curve(errors, tau_max=25.0, step=0.5)
    assert torch.all(fraction[1:] >= fraction[:-1])
    assert float(fraction[0]) >= 0 and float(fraction[-1]) == 1.0
    # Against the obvious definition, one threshold at a time.
    assert torch.equal(fraction, torch.stack([(errors <= tau).to(F64).mean() for tau in taus]))


def test_median_of_known_lists():
    assert median_error(torch.tensor([4.0, 1.0, 3.0])) == 3.0
    assert median_error(torch.tensor([4.0, 1.0, 3.0, 2.0])) == 2.5  # the two middle values averaged
    assert median_error(torch.tensor([[18.0]])) == 18.0


def test_auc_of_all_zero_errors_is_one_and_of_large_errors_zero():
    assert curve_auc(*accuracy_curve(torch.zeros(10), tau_max=5.0)) == 1.0
    assert curve_auc(*accuracy_curve(torch.full((10,), 9.0), tau_max=5.0)) == 0.0


def test_auc_by_hand_and_its_fine_grid_limit():
    taus = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    fraction = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    assert curve_auc(taus, fraction) == pytest.approx(0.5)  # trapezoids: (0.25 + 0.75) / 2
    errors = torch.tensor([0.0, 1.0, 2.0, 10.0], dtype=F64)
    tau_max = 4.0
    exact = float((1 - errors.clamp(max=tau_max) / tau_max).mean())  # (1 + 0.75 + 0.5 + 0) / 4
    assert curve_auc(*accuracy_curve(errors, tau_max=tau_max, step=1e-3)) == pytest.approx(exact, abs=1e-3)


def test_empty_nan_and_negative_inputs_are_refused():
    for bad, message in [(torch.tensor([]), "empty"), (torch.tensor([1.0, math.nan]), "NaN"),
                         (torch.tensor([-1.0]), ">= 0")]:
        with pytest.raises(ValueError, match=message):
            accuracy_curve(bad, tau_max=1.0)
        with pytest.raises(ValueError, match=message):
            median_error(bad)
    with pytest.raises(ValueError, match="two thresholds"):
        curve_auc(torch.tensor([0.0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="NaN"):
        curve_auc(torch.tensor([0.0, 1.0]), torch.tensor([0.5, math.nan]))
    with pytest.raises(ValueError, match="increasing"):
        curve_auc(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 1.0]))

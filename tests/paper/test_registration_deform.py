"""Tests of netsim_paper.registration.deform: random fields, sampling, warping, conventions, augmentations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.path import Path

from netsim_paper.registration import deform
from netsim_paper.registration.deform import (
    align_polygons,
    compose,
    control_grid_field,
    field_at,
    flip,
    flip_polygons,
    inverse_approx,
    move_polygons,
    pixel_centres,
    random_field,
    rotate90,
    rotate90_polygons,
    scale_field,
    warp_image,
)

F64 = torch.float64


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def affine_field(height: int, width: int, matrix, offset) -> torch.Tensor:
    """(2, H, W) field φ(p) = A p + b at the pixel centres."""
    centres = pixel_centres(height, width, dtype=F64)
    return torch.einsum("ij,jhw->ihw", torch.tensor(matrix, dtype=F64), centres) + torch.tensor(
        offset, dtype=F64).view(2, 1, 1)


def smooth_image(height: int, width: int, period: float = 32.0) -> torch.Tensor:
    """(1, H, W) low-frequency test image, so that bilinear interpolation error stays small."""
    x, y = pixel_centres(height, width, dtype=F64)
    w = 2 * math.pi / period
    return (torch.sin(w * x + 0.3) * torch.cos(0.7 * w * y) + 0.5 * torch.sin(0.5 * w * (x + y)))[None]


def rasterise(polygons, height: int, width: int, supersample: int = 4) -> torch.Tensor:
    """(H, W) fraction of each pixel covered by the polygons (even-odd fill, supersampled)."""
    offsets = (np.arange(supersample) + 0.5) / supersample
    xs = (np.arange(width)[:, None] + offsets).ravel()
    ys = (np.arange(height)[:, None] + offsets).ravel()
    points = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    inside = np.zeros(len(points), dtype=bool)
    for polygon in polygons:
        inside ^= Path(polygon.numpy()).contains_points(points)
    fine = inside.reshape(height * supersample, width * supersample).astype(np.float64)
    return torch.from_numpy(fine.reshape(height, supersample, width, supersample).mean((1, 3)))


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


# --------------------------------------------------------------------------- random fields


@pytest.mark.parametrize("make", [random_field, control_grid_field])
def test_amplitude_is_max_abs_component_and_both_ends_are_reached(make):
    field = make(48, 40, amplitude=7.5, generator=generator(3), dtype=F64)
    assert field.shape == (2, 48, 40)
    for component in field:
        assert abs(float(component.max()) - 7.5) < 1e-6
        assert abs(float(component.min()) + 7.5) < 1e-6


@pytest.mark.parametrize("make", [random_field, control_grid_field])
def test_fields_are_deterministic_given_the_generator(make):
    first = make(32, 32, amplitude=2.0, generator=generator(11))
    second = make(32, 32, amplitude=2.0, generator=generator(11))
    other = make(32, 32, amplitude=2.0, generator=generator(12))
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


def test_random_field_gradient_is_within_the_bound_derived_from_its_bumps():
    """|∇φ| in pixels is bounded by (2A / range) Σ_k |w_k| e^{-1/2} / sqrt(λ_min(Σ_k)) / min(H, W).

    A bump w exp(-dᵀΣ⁻¹d / 2) has gradient w e^{-q/2} Σ⁻¹d, whose norm is at most
    w sqrt(q) e^{-q/2} / sqrt(λ_min) <= w e^{-1/2} / sqrt(λ_min) (normalised coordinates; one
    pixel is 1/W of them). The stretch multiplies slopes by 2A / (max - min) of the raw sum,
    and a finite difference over one pixel is at most the Lipschitz constant.
    """
    size, amplitude, cov_scale = 96, 3.0, 0.002
    for seed in range(4):
        field = random_field(size, size, amplitude=amplitude, generator=generator(seed), dtype=F64)
        # Same generator state -> same bump parameters (the draw order is fixed).
        bumps = deform._random_bumps(30, cov_scale, generator(seed))
        raw = deform._evaluate_bumps(bumps, size, size).flatten(1)
        smallest_eigenvalue = torch.linalg.eigvalsh(bumps.covariances)[..., 0]
        raw_lipschitz = (bumps.weights.abs() * math.exp(-0.5) / smallest_eigenvalue.sqrt()).sum(1) / size
        bound = 2 * amplitude / (raw.max(1).values - raw.min(1).values) * raw_lipschitz  # (2,)
        step_x = (field[:, :, 1:] - field[:, :, :-1]).abs().flatten(1).max(1).values
        step_y = (field[:, 1:, :] - field[:, :-1, :]).abs().flatten(1).max(1).values
        assert torch.all(step_x <= bound * (1 + 1e-9)) and torch.all(step_y <= bound * (1 + 1e-9))
        # Typical size: a lone bump stretched onto [-A, A] has max slope 2 e^{-1/2} A / σ ≈ 1.2 A / σ,
        # σ = sqrt(cov_scale) W the narrowest bump width; sums of 30 bumps stay of that order.
        narrowest_std = math.sqrt(cov_scale) * size
        assert max(step_x.max(), step_y.max()) < 2.0 * amplitude / narrowest_std


def test_control_grid_field_varies_on_the_grid_scale():
    field = control_grid_field(64, 64, amplitude=4.0, grid=3, generator=generator(0), dtype=F64)
    slope = max((field[:, :, 1:] - field[:, :, :-1]).abs().max(), (field[:, 1:] - field[:, :-1]).abs().max())
    # Control points 31.5 px apart; a cubic through them swings at most a few times 2A per spacing.
    assert slope < 4 * (2 * 4.0) / 31.5


def test_random_field_rejects_bad_arguments():
    with pytest.raises(ValueError, match="amplitude"):
        random_field(8, 8, amplitude=-1.0, generator=generator())
    with pytest.raises(TypeError, match="Generator"):
        random_field(8, 8, amplitude=1.0, generator=0)
    with pytest.raises(ValueError, match="n_bumps"):
        random_field(8, 8, amplitude=1.0, generator=generator(), n_bumps=0)
    with pytest.raises(ValueError, match="grid"):
        control_grid_field(8, 8, amplitude=1.0, generator=generator(), grid=1)


# --------------------------------------------------------------------------- sampling


def test_field_at_is_exact_on_affine_fields():
    height, width = 20, 30
    field = affine_field(height, width, [[0.03, -0.02], [0.01, 0.05]], [1.5, -2.0])
    points = torch.rand(200, 2, generator=generator(1), dtype=F64)
    # Between the outermost pixel centres bilinear interpolation reproduces an affine function.
    points = 0.5 + points * torch.tensor([width - 1.0, height - 1.0], dtype=F64)
    points = torch.cat([points, torch.tensor([[0.5, 0.5], [width - 0.5, height - 0.5], [3.5, 7.5]], dtype=F64)])
    expected = points @ torch.tensor([[0.03, -0.02], [0.01, 0.05]], dtype=F64).T + torch.tensor([1.5, -2.0], dtype=F64)
    assert torch.allclose(field_at(field, points), expected, atol=1e-12)


def test_field_at_reads_pixel_centres_exactly_and_clamps_outside():
    field = torch.arange(2 * 4 * 5, dtype=F64).view(2, 4, 5)
    # Pixel (row 2, column 3) has its centre at (x, y) = (3.5, 2.5).
    assert torch.equal(field_at(field, torch.tensor([[3.5, 2.5]], dtype=F64))[0], field[:, 2, 3])
    # Beyond the tile the border value is repeated.
    assert torch.equal(field_at(field, torch.tensor([[-7.0, 100.0]], dtype=F64))[0], field[:, 3, 0])


def test_field_at_batched_matches_unbatched():
    fields = torch.stack([random_field(16, 16, amplitude=2.0, generator=generator(s), dtype=F64) for s in range(3)])
    points = torch.rand(3, 10, 2, generator=generator(5), dtype=F64) * 16
    batched = field_at(fields, points)
    assert batched.shape == (3, 10, 2)
    for b in range(3):
        assert torch.allclose(batched[b], field_at(fields[b], points[b]))
    with pytest.raises(ValueError, match="points must have shape"):
        field_at(fields, points[0])


# --------------------------------------------------------------------------- warping


def test_integer_translation_is_a_roll_away_from_borders():
    image = torch.randn(3, 24, 28, generator=generator(0), dtype=F64)
    field = torch.zeros(2, 24, 28, dtype=F64)
    field[0], field[1] = 3.0, -2.0
    warped = warp_image(image, field)  # warped(p) = image(p + (3, -2))
    rolled = torch.roll(image, shifts=(2, -3), dims=(-2, -1))
    assert torch.allclose(warped[:, 2:, :-3], rolled[:, 2:, :-3], atol=1e-12)


def test_subpixel_translation_of_a_linear_ramp_is_exact():
    height, width = 16, 20
    x, y = pixel_centres(height, width, dtype=F64)
    ramp = (0.7 * x - 1.3 * y + 2.0)[None]
    field = torch.zeros(2, height, width, dtype=F64)
    field[0], field[1] = 0.3, -0.45
    warped = warp_image(ramp, field)
    expected = 0.7 * (x + 0.3) - 1.3 * (y - 0.45) + 2.0
    interior = (slice(1, None), slice(None, -1))  # where p + φ(p) stays between pixel centres
    assert torch.allclose(warped[0][interior], expected[interior], atol=1e-12)


def test_warp_accepts_batches_and_shares_unbatched_inputs():
    images = torch.randn(2, 3, 12, 12, generator=generator(0), dtype=F64)
    field = random_field(12, 12, amplitude=1.5, generator=generator(1), dtype=F64)
    batched = warp_image(images, field)
    assert batched.shape == (2, 3, 12, 12)
    assert torch.allclose(batched[1], warp_image(images[1], field))
    fields = torch.stack([field, -field])
    assert torch.allclose(warp_image(images[0], fields)[1], warp_image(images[0], -field))
    with pytest.raises(TypeError, match="floating"):
        warp_image(torch.zeros(1, 12, 12, dtype=torch.uint8), field)
    with pytest.raises(ValueError, match="spatial sizes"):
        warp_image(images, field[:, :10])


def test_compose_matches_two_successive_warps():
    size, margin, period = 64, 8, 64.0
    image = smooth_image(size, size, period)
    phi = control_grid_field(size, size, amplitude=2.0, grid=4, generator=generator(0), dtype=F64)
    psi = control_grid_field(size, size, amplitude=2.0, grid=4, generator=generator(1), dtype=F64)
    twice = warp_image(warp_image(image, psi), phi)
    inner = (..., slice(margin, -margin), slice(margin, -margin))
    error_composed = (warp_image(image, compose(phi, psi)) - twice)[inner].abs().max()
    error_summed = (warp_image(image, phi + psi) - twice)[inner].abs().max()
    # What is left is bilinear interpolation of the image, at most (|I_xx| + |I_yy|) / 8 per
    # sampling (h = 1 px), with |I_xx| + |I_yy| <= 1.74 w^2 for smooth_image; three samplings.
    w = 2 * math.pi / period
    assert error_composed < 3 * 1.74 * w**2 / 8
    # The naive sum misses psi∘(id + phi) - psi, of order |∇psi| |phi|.
    assert error_composed < 0.25 * error_summed


def test_compose_matches_the_analytic_composite_field():
    height, width = 48, 64
    x, y = pixel_centres(height, width, dtype=F64)

    def psi_at(px, py):  # a smooth analytic field, so psi(p + phi(p)) is known exactly
        return torch.stack((1.5 * torch.sin(px / 9.0) * torch.cos(py / 11.0), 1.2 * torch.cos((px + py) / 13.0)))

    phi = torch.stack((0.8 * torch.cos(y / 10.0) + 0.5, 1.1 * torch.sin(x / 12.0)))
    expected = phi + psi_at(x + phi[0], y + phi[1])
    error = (compose(phi, psi_at(x, y)) - expected)[:, 4:-4, 4:-4].abs().max()
    # Only the bilinear reading of psi between pixel centres: <= (|psi_xx| + |psi_yy|) / 8.
    assert error < (1.5 * (1 / 81 + 1 / 121) + 1.2 * 2 / 169) / 8


def test_inverse_approx_is_second_order():
    size, margin = 96, 10
    inner = (..., slice(margin, -margin), slice(margin, -margin))
    for amplitude in (0.5, 1.0):
        phi = random_field(size, size, amplitude=amplitude, generator=generator(2), cov_scale=0.01, dtype=F64)
        gradient = max((phi[:, :, 1:] - phi[:, :, :-1]).abs().max(), (phi[:, 1:] - phi[:, :-1]).abs().max())
        residual = compose(phi, inverse_approx(phi))[inner].abs().max()
        naive = compose(phi, -phi)[inner].abs().max()
        # Leading term |∇φ|² |φ| (plus |∇²φ||∇φ||φ|², of the same order for Gaussian bumps).
        assert residual < 3 * float(gradient) ** 2 * amplitude
        assert residual < 0.25 * naive


def test_scale_field_resamples_the_grid_and_scales_the_vectors():
    field = affine_field(32, 48, [[0.02, 0.01], [-0.03, 0.04]], [2.0, -1.0])
    half = scale_field(field, 0.5)
    assert half.shape == (2, 16, 24)
    # In coarse pixels φ'(p') = f φ(p' / f) = A p' + f b: still affine, exact away from borders.
    expected = affine_field(16, 24, [[0.02, 0.01], [-0.03, 0.04]], [1.0, -0.5])
    assert torch.allclose(half[:, 2:-2, 2:-2], expected[:, 2:-2, 2:-2], atol=1e-10)
    double = scale_field(half, 2.0)
    assert double.shape == field.shape
    assert torch.allclose(double[:, 4:-4, 4:-4], field[:, 4:-4, 4:-4], atol=1e-10)
    assert scale_field(field[None], 0.5).shape == (1, 2, 16, 24)
    with pytest.raises(ValueError, match="not a positive integer"):
        scale_field(field, 0.3)


def test_moving_at_a_coarse_scale_matches_moving_at_full_scale():
    field = random_field(64, 64, amplitude=3.0, generator=generator(4), cov_scale=0.02, dtype=F64)
    polygon = torch.tensor([[10.0, 12.0], [50.0, 14.0], [48.0, 52.0], [16.0, 40.0]], dtype=F64)
    full = move_polygons(polygon, field) * 0.5
    coarse = move_polygons(polygon * 0.5, scale_field(field, 0.5))
    assert (full - coarse).abs().max() < 0.05  # resampling error of a smooth field only


# --------------------------------------------------------------------------- polygons vs rasters


def test_move_then_align_is_the_identity_to_first_order():
    field = random_field(64, 64, amplitude=2.0, generator=generator(5), cov_scale=0.02, dtype=F64)
    polygons = [torch.rand(7, 2, generator=generator(s), dtype=F64) * 56 + 4 for s in range(3)]
    amplitude = 2.0
    gradient = float(max((field[:, :, 1:] - field[:, :, :-1]).abs().max(), (field[:, 1:] - field[:, :-1]).abs().max()))
    restored = align_polygons(move_polygons(polygons, field), field)
    assert isinstance(restored, list) and [p.shape for p in restored] == [p.shape for p in polygons]
    error = max(float((r - p).norm(dim=1).max()) for r, p in zip(restored, polygons))
    # align(move(v)) - v = φ(v - φ(v)) - φ(v): per component at most |∇φ_c| |φ(v)| with
    # |∇φ_c| <= sqrt 2 x (max partial) and |φ(v)| <= sqrt 2 x amplitude; sqrt 2 more for the norm.
    assert error <= math.sqrt(2) ** 3 * gradient * amplitude
    assert error > 1e-3  # the one-step move is not an exact inverse...
    exact = align_polygons(move_polygons(polygons, field, iterations=30), field)
    assert max(float((r - p).abs().max()) for r, p in zip(exact, polygons)) < 1e-9  # ...the converged one is


def test_moved_polygons_match_the_warped_raster():
    size = 64
    field = control_grid_field(size, size, amplitude=3.0, grid=4, generator=generator(6), dtype=F64)
    # Densely sampled outlines, so that straight edges between vertices follow the smooth warp.
    t = torch.linspace(0, 1, 41, dtype=F64)[:-1, None]
    corners = torch.tensor([[14.0, 12.0], [44.0, 16.0], [48.0, 50.0], [18.0, 46.0], [14.0, 12.0]], dtype=F64)
    outline = torch.cat([a + t * (b - a) for a, b in zip(corners[:-1], corners[1:])])
    warped_coverage = warp_image(rasterise([outline], size, size)[None], field)[0]
    coverages = {name: rasterise(polygons, size, size) for name, polygons in [
        ("unmoved", [outline]),
        ("one step", move_polygons([outline], field)),
        ("converged", move_polygons([outline], field, iterations=10))]}
    overlap = {name: iou(coverage > 0.5, warped_coverage > 0.5) for name, coverage in coverages.items()}
    mismatch = {name: float((coverage - warped_coverage).abs().sum()) for name, coverage in coverages.items()}
    # |∇φ| ≈ 0.37 here, so the first-order move is off by up to ~1 px along the outline;
    # solving v' + φ(v') = v leaves only the rasterisation/interpolation error of the edges.
    assert overlap["one step"] > 0.95 and overlap["converged"] > 0.98
    assert overlap["unmoved"] < overlap["one step"] - 0.1
    assert mismatch["one step"] < 0.25 * mismatch["unmoved"]
    assert mismatch["converged"] < mismatch["one step"]


def test_polygon_structure_is_kept_and_checked():
    field = torch.zeros(2, 8, 8, dtype=F64)
    assert move_polygons([], field) == []
    single = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    assert torch.equal(move_polygons(single, field), single)
    with pytest.raises(ValueError, match="polygon 1"):
        move_polygons([single, torch.zeros(3)], field)
    with pytest.raises(ValueError, match=r"\(2, H, W\)"):
        move_polygons(single, field[None])


# --------------------------------------------------------------------------- augmentations


def constant_field(dx: float, dy: float, height: int = 6, width: int = 9) -> torch.Tensor:
    field = torch.empty(2, height, width, dtype=F64)
    field[0], field[1] = dx, dy
    return field


@pytest.mark.parametrize("k, expected", [(1, (0.0, -1.0)), (2, (-1.0, 0.0)), (3, (0.0, 1.0)), (4, (1.0, 0.0))])
def test_rotating_a_constant_field_rotates_its_vectors_counter_clockwise_on_screen(k, expected):
    _, _, rotated = rotate90(None, None, constant_field(1.0, 0.0), k)
    assert rotated.shape == ((2, 9, 6) if k % 2 else (2, 6, 9))
    assert torch.equal(rotated[:, 0, 0], torch.tensor(expected, dtype=F64))


@pytest.mark.parametrize("axis, expected", [("x", (-1.0, 2.0)), ("y", (1.0, -2.0))])
def test_flipping_a_constant_field_negates_one_component(axis, expected):
    _, _, flipped = flip(None, None, constant_field(1.0, 2.0), axis)
    assert torch.equal(flipped[:, 3, 4], torch.tensor(expected, dtype=F64))
    with pytest.raises(ValueError, match="axis"):
        flip(None, None, constant_field(1.0, 2.0), "z")


def augmentations():
    """(augment the tensors, augment the polygons) pairs: every rotation and both flips."""
    for k in range(4):
        yield pytest.param(lambda im, ra, fi, k=k: rotate90(im, ra, fi, k),
                           lambda p, h, w, k=k: rotate90_polygons(p, k, h, w), id=f"rot{k}")
    for axis in ("x", "y"):
        yield pytest.param(lambda im, ra, fi, a=axis: flip(im, ra, fi, a),
                           lambda p, h, w, a=axis: flip_polygons(p, a, h, w), id=f"flip_{axis}")


@pytest.mark.parametrize("augment, augment_points", list(augmentations()))
def test_pixel_positions_follow_the_polygon_transform(augment, augment_points):
    height, width = 7, 11
    image = torch.zeros(1, height, width, dtype=F64)
    image[0, 2, 8] = 1.0  # the pixel centred at (x, y) = (8.5, 2.5)
    augmented, _, _ = augment(image, None, None)
    row, column = augmented[0].nonzero()[0].tolist()
    centre = augment_points(torch.tensor([[8.5, 2.5]], dtype=F64), height, width)[0]
    assert centre.tolist() == [column + 0.5, row + 0.5]


@pytest.mark.parametrize("augment, augment_points", list(augmentations()))
def test_moving_then_augmenting_equals_augmenting_then_moving(augment, augment_points):
    height, width = 40, 56
    field = random_field(height, width, amplitude=3.0, generator=generator(7), cov_scale=0.01, dtype=F64)
    polygons = [torch.tensor([[5.2, 7.9], [30.0, 4.1], [44.6, 33.3]], dtype=F64),
                torch.tensor([[12.0, 20.0], [20.5, 21.5], [16.0, 35.0], [9.0, 30.0]], dtype=F64)]
    _, _, augmented_field = augment(None, None, field)
    moved_then_augmented = augment_points(move_polygons(polygons, field), height, width)
    augmented_then_moved = move_polygons(augment_points(polygons, height, width), augmented_field)
    for a, b in zip(moved_then_augmented, augmented_then_moved):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("augment, augment_points", list(augmentations()))
def test_warping_then_augmenting_equals_augmenting_then_warping(augment, augment_points):
    height, width = 24, 32
    image = torch.randn(2, 3, height, width, generator=generator(8), dtype=F64)
    raster = (torch.rand(2, 1, height, width, generator=generator(9)) > 0.5).to(F64)
    field = random_field(height, width, amplitude=2.5, generator=generator(10), dtype=F64)
    augmented_image, augmented_raster, augmented_field = augment(image, raster, field)
    warped_image, warped_raster, _ = augment(warp_image(image, field), warp_image(raster, field), None)
    assert torch.allclose(warp_image(augmented_image, augmented_field), warped_image, atol=1e-10)
    assert torch.allclose(warp_image(augmented_raster, augmented_field), warped_raster, atol=1e-10)

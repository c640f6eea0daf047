"""Tests of netsim_paper.registration.train: noise, training pairs, training, the multi-round loop."""

from __future__ import annotations

import math
import types

import pytest
import torch

from netsim_paper.registration import train
from netsim_paper.registration.deform import move_polygons
from netsim_paper.registration.geometry import rasterize
from netsim_paper.registration.model import RegistrationNet, registration_loss
from netsim_paper.registration.train import (
    TrainedChain,
    TrainedRound,
    label_noise_fields,
    move_cadasters,
    new_chain,
    perturbation_field,
    run_rounds,
    sample_batch,
    train_chain,
    train_stage,
)

SQUARE = torch.tensor([[20.0, 20.0], [44.0, 20.0], [44.0, 40.0], [20.0, 40.0]], dtype=torch.float64)


def _max_gradient(fields: torch.Tensor) -> float:
    """max |∂φ_c/∂x|, |∂φ_c/∂y| of ``(..., 2, H, W)`` fields (finite differences)."""
    return max(float(g.abs().max()) for g in torch.gradient(fields, dim=(-2, -1)))


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads are ~20x slower on the 2-core machines
    yield
    torch.set_num_threads(previous)


def test_label_noise_is_zero_mean_across_tiles_and_does_not_fold():
    fields = label_noise_fields(6, 256, 12.0, seed=0)  # the configs' noise_px and cov_scale
    assert fields.shape == (6, 2, 256, 256)
    assert float(fields.mean(0).abs().max()) < 1e-5
    assert _max_gradient(fields) < 0.5
    shift = label_noise_fields(3, 32, 5.0, seed=1, kind="shift")
    assert torch.allclose(shift, shift[:1, :, :1, :1].expand_as(shift))
    assert float(shift[0, :, 0, 0].norm()) == pytest.approx(5.0, rel=1e-5)
    with pytest.raises(ValueError, match="kind"):
        label_noise_fields(2, 32, 1.0, seed=0, kind="other")


def test_perturbations_reach_their_amplitude_without_folding():
    generator = torch.Generator().manual_seed(0)
    # The configs' largest perturbation is 16 full-resolution px on 256-px tiles (4 px of the
    # 64-px coarse stage): |∇ψ| < 9 amplitude / size ≈ 0.56, well below the folding limit of 1.
    for height, amplitude in ((64, 4.0), (128, 4.0), (256, 4.0), (256, 16.0)):
        field = perturbation_field(height, height, amplitude, generator)
        assert field.shape == (2, height, height)
        assert float(field.abs().max()) == pytest.approx(amplitude, rel=0.02)
        assert _max_gradient(field) < 9 * amplitude / height
    # "bumps": the label noise's own recipe, same amplitude rule, drawn small and upsampled.
    bumps = perturbation_field(256, 256, 12.0, generator, kind="bumps", cov_scale=0.03)
    assert float(bumps.abs().max()) == pytest.approx(12.0, rel=0.02)
    assert _max_gradient(bumps) < 0.5
    constant = perturbation_field(8, 8, 3.0, generator, kind="constant")
    assert torch.equal(constant, constant[:, :1, :1].expand_as(constant)) and constant.abs().max() <= 3.0


def test_misaligned_raster_is_the_raster_of_the_moved_labels():
    # No crop, no augmentation: the warped, thresholded raster must match rasterising the
    # labels moved by ψ (deform's convention v' + ψ(v') = v) up to boundary pixels.
    raster = rasterize([SQUARE], 64, 64)[None]
    image = torch.rand(1, 3, 64, 64)
    generator = torch.Generator().manual_seed(3)
    _, misaligned, psi, weights = sample_batch(image, raster, batch_size=1, amplitude=4.0, generator=generator,
                                               augment=False)
    moved = move_polygons([SQUARE], psi[0].double(), iterations=10)
    expected = rasterize(moved, 64, 64)
    fill_mismatch = (misaligned[0, 0] != expected[0]).float().mean()
    assert float(fill_mismatch) < 0.01  # a few boundary pixels at most
    assert float(psi.abs().max()) > 1.0  # the perturbation really moved it
    assert weights.shape == (1, 64, 64) and float(weights.max()) == 10.0


def test_sample_batch_is_deterministic_and_augmentation_turns_vectors():
    images, rasters = torch.rand(2, 3, 32, 32), (torch.rand(2, 3, 32, 32) > 0.5).float()
    a = sample_batch(images, rasters, batch_size=3, amplitude=2.0, generator=torch.Generator().manual_seed(0), crop=16)
    b = sample_batch(images, rasters, batch_size=3, amplitude=2.0, generator=torch.Generator().manual_seed(0), crop=16)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (3, 3, 16, 16) and a[2].shape == (3, 2, 16, 16)
    # A constant perturbation keeps its norm under rotations and flips, whatever they were.
    _, _, psi, _ = sample_batch(images, rasters, batch_size=4, amplitude=2.0, kind="constant",
                                generator=torch.Generator().manual_seed(1))
    norms = psi.norm(dim=1)
    assert torch.allclose(norms, norms[:, :1, :1].expand_as(norms))


def _tiny_batch():
    generator = torch.Generator().manual_seed(0)
    raster = rasterize([SQUARE / 2, SQUARE / 2 + 16], 32, 32)[None].expand(2, 3, 32, 32)
    image = raster.clone() * 0.8 + 0.1  # the buildings are visible in the image
    return sample_batch(image, raster.contiguous(), batch_size=4, amplitude=2.0, generator=generator, crop=32,
                        kind="constant")


def test_training_steps_reduce_the_loss_on_a_fixed_batch():
    image, raster, target, weights = _tiny_batch()
    torch.manual_seed(0)
    net = RegistrationNet(cap=3.0, channels=(4, 8))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = registration_loss(net(image, raster), target, weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_one_stage_learns_a_constant_translation():
    # Buildings drawn in the image and the raster; the raster is shifted by a constant vector
    # (|component| <= 2 px) which the net must read off the image-raster offset.
    raster = rasterize([SQUARE / 2, SQUARE / 2 + torch.tensor([14.0, 8.0], dtype=torch.float64)], 32, 32)[None]
    image = raster.expand(1, 3, 32, 32) * 0.8 + 0.1
    torch.manual_seed(0)
    net = RegistrationNet(cap=3.0, channels=(8, 16))
    losses = train_stage(net, image.contiguous(), raster.contiguous(), steps=150, batch_size=8, amplitude=2.0,
                         generator=torch.Generator().manual_seed(0), lr=3e-3, crop=None, kind="constant")
    evaluation = sample_batch(image.contiguous(), raster.contiguous(), batch_size=16, amplitude=2.0,
                              generator=torch.Generator().manual_seed(99), kind="constant")
    with torch.no_grad():
        error = registration_loss(net(evaluation[0], evaluation[1]), evaluation[2], evaluation[3])
        baseline = registration_loss(torch.zeros_like(evaluation[2]), evaluation[2], evaluation[3])
    # Predicting 0 costs E|ψ|² = 2 * 2²/3 ≈ 2.7 px²; the trained stage must do far better.
    assert float(error) < 0.25 * float(baseline), (float(error), float(baseline), losses[-5:])


# --------------------------------------------------------------------------- the round loop

TINY = {"tile_size": 128, "train_tiles": 2, "tile_seed": 0, "seed": 0, "noise_px": 6.0, "noise_cov_scale": 0.015,
        "scales": [4], "caps": [4.0], "channels": [4, 8], "perturbation_px": [8.0], "steps": [3], "batch_size": 2,
        "crop": 32, "lr": 1e-3, "rounds": 2, "control_rounds": 1, "extra_noise_factor": 1.5}


class ShiftChain:
    """A stub chain: aligning adds a constant shift, whatever the input."""

    def __init__(self, shift: float):
        self.shift = shift

    def align(self, image, polygons):
        return [p + self.shift for p in polygons]


def test_rounds_realign_the_original_noisy_labels():
    calls = []

    def stub_train(images, labels, cfg, *, seed):
        calls.append([[p.clone() for p in cadaster] for cadaster in labels])
        return TrainedChain(ShiftChain(1.0), [], 0.0)

    result = run_rounds(types.SimpleNamespace(**TINY), rounds=3, clean=False, controls=(), train_fn=stub_train)
    noisy = result.noisy
    assert len(calls) == 3
    for r, round_result in enumerate(result.rounds):
        # Every round's labels are the ORIGINAL noisy labels + one shift, never + (r + 1) shifts.
        for aligned, original in zip(round_result.labels, noisy):
            for p, q in zip(aligned, original):
                torch.testing.assert_close(p, q + 1.0)
        # Round r trained on labels_r: the noisy labels first, then the previous round's output.
        expected_labels = noisy if r == 0 else result.rounds[r - 1].labels
        for trained_on, expected in zip(calls[r], expected_labels):
            for p, q in zip(trained_on, expected):
                torch.testing.assert_close(p, q)
    assert result.noise.median > 0


def test_clean_model_and_controls_use_their_labels():
    seen = []

    def stub_train(images, labels, cfg, *, seed):
        seen.append((seed, labels))
        return TrainedChain(ShiftChain(0.0), [], 0.0)

    result = run_rounds(types.SimpleNamespace(**TINY), rounds=1, train_fn=stub_train)
    assert len(seen) == 4  # main round, clean, two controls
    clean_labels = seen[1][1]
    for p, q in zip(clean_labels[0], result.truth[0]):
        assert torch.equal(p, q)
    biased = result.controls["biased"]
    offsets = torch.cat([(p - q) for c, t in zip(biased.noisy, result.truth) for p, q in zip(c, t)])
    assert torch.allclose(offsets, offsets[:1].expand_as(offsets), atol=1e-6)  # one shared shift
    assert not torch.equal(result.controls["extra_noise"].noisy[0][0], result.noisy[0][0])


def test_rounds_are_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(train.config, "cache_dir", lambda experiment, profile, cfg: tmp_path)
    cfg = types.SimpleNamespace(**TINY)
    first = run_rounds(cfg, rounds=1, clean=False, controls=())
    second = run_rounds(cfg, rounds=1, clean=False, controls=())
    assert first.rounds[0].losses == second.rounds[0].losses
    assert torch.equal(first.rounds[0].training.errors, second.rounds[0].training.errors)
    state = first.rounds[0].chain.state_dict()
    assert all(torch.equal(v, second.rounds[0].chain.state_dict()[k]) for k, v in state.items())

    def must_not_train(*args, **kwargs):
        raise AssertionError("a cached round was retrained")

    run_rounds(cfg, profile="smoke", rounds=1, clean=False, controls=(), train_fn=train_chain)
    assert (tmp_path / "round0.pt").exists()
    cached = run_rounds(cfg, profile="smoke", rounds=1, clean=False, controls=(), train_fn=must_not_train)
    assert torch.equal(cached.rounds[0].training.errors, first.rounds[0].training.errors)


def test_move_cadasters_checks_lengths():
    with pytest.raises(ValueError, match="cadasters"):
        move_cadasters([[SQUARE]], torch.zeros(2, 2, 8, 8))


def test_warmup_schedule_rises_then_decays_to_zero(monkeypatch):
    seen = []

    class Spy(torch.optim.Adam):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", Spy)
    image = torch.rand(2, 3, 8, 8)
    stage = RegistrationNet(cap=1.0, channels=(2,))
    train_stage(stage, image, torch.zeros_like(image), steps=10, batch_size=1, amplitude=1.0,
                generator=torch.Generator().manual_seed(0), lr=1.0, crop=None, warmup=4)
    assert seen[:4] == pytest.approx([0.25 * (k + 1) * 0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(4)])
    assert seen[3] == max(seen) and seen[-1] < 0.05


def test_heldout_tiles_and_the_noise_sweep():
    cfg = types.SimpleNamespace(**{**TINY, "heldout_tiles": 1, "sweep_noise_factors": [0.5, 2.0]})
    result = run_rounds(cfg, rounds=1, clean=False, controls=("biased", "sweep"),
                        train_fn=lambda images, labels, cfg, *, seed: TrainedChain(ShiftChain(0.0), [], 0.0))
    assert len(result.heldout.truth) == 1 and result.heldout.noise.median > 0
    assert result.rounds[0].heldout.median == pytest.approx(result.heldout.noise.median)
    sweep = [result.controls[f"noise{f:g}"] for f in (0.5, 2.0)]
    assert [c.noise_factor for c in sweep] == [0.5, 2.0]
    assert sweep[0].noise.median < result.noise.median < sweep[1].noise.median
    # the biased control's held-out labels carry the same shift as its training labels
    biased = result.controls["biased"]
    shift = biased.noisy[0][0][0] - result.truth[0][0][0]
    held = [p - q for c, t in zip(biased.rounds[0].heldout_labels, result.heldout.truth) for p, q in zip(c, t)]
    torch.testing.assert_close(torch.cat(held), shift.expand(sum(len(p) for p in held), 2), atol=1e-4, rtol=0)


def test_worker_processes_give_the_same_chains(tmp_path, monkeypatch):
    monkeypatch.setattr(train.config, "cache_dir", lambda experiment, profile, cfg: tmp_path / "one")
    cfg = types.SimpleNamespace(**{**TINY, "heldout_tiles": 1})
    one = run_rounds(cfg, profile="smoke", rounds=1, controls=("biased",))
    monkeypatch.setattr(train.config, "cache_dir", lambda experiment, profile, cfg: tmp_path / "two")
    two = run_rounds(cfg, profile="smoke", rounds=1, controls=("biased",), workers=2)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["biased_round0.pt", "clean_round0.pt", "round0.pt"]
    for a, b in ((one.rounds[0], two.rounds[0]), (one.clean, two.clean),
                 (one.controls["biased"].rounds[0], two.controls["biased"].rounds[0])):
        assert a.losses == b.losses
        assert torch.equal(a.training.errors, b.training.errors)
    with pytest.raises(ValueError, match="profile"):
        run_rounds(cfg, rounds=1, workers=2)


def test_training_leaves_the_global_rng_alone():
    image = torch.rand(1, 3, 32, 32)
    state = torch.random.get_rng_state()
    train_chain(image, [[SQUARE / 2]], types.SimpleNamespace(**{**TINY, "steps": [1]}), seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_inflated_cadasters_have_the_requested_median_error_and_keep_their_centres():
    from netsim_paper.registration.metrics import median_error, vertex_errors
    from netsim_paper.registration.train import inflate_cadasters
    truth = [[SQUARE, SQUARE + 50.0], [SQUARE * 2.0]]
    inflated = inflate_cadasters(truth, 3.0)
    errors = torch.cat([vertex_errors(p, t) for p, t in zip(inflated, truth)])
    assert median_error(errors) == pytest.approx(3.0)
    for cadaster, original in zip(inflated, truth):
        for p, q in zip(cadaster, original):
            torch.testing.assert_close(p.mean(0), q.mean(0))
            assert (p - p.mean(0)).norm(dim=1).min() > (q - q.mean(0)).norm(dim=1).min()  # outward
    with pytest.raises(ValueError, match="no polygon"):
        inflate_cadasters([[]], 1.0)


def test_sweep_without_noise_factors_is_an_error():
    cfg = types.SimpleNamespace(**{**TINY, "sweep_noise_factors": []})
    with pytest.raises(ValueError, match="sweep_noise_factors"):
        run_rounds(cfg, rounds=1, clean=False, controls=("sweep",),
                   train_fn=lambda images, labels, cfg, *, seed: TrainedChain(ShiftChain(0.0), [], 0.0))
    with pytest.raises(ValueError, match="sweep_noise_factors"):
        run_rounds(types.SimpleNamespace(**TINY), rounds=1, clean=False, controls=("sweep",))  # no key at all


def test_cached_rounds_are_plain_data_and_rebuild_the_same_chain(tmp_path):
    cfg = types.SimpleNamespace(**TINY)
    image = torch.rand(1, 3, 32, 32)
    trained = train_chain(image, [[SQUARE / 2]], types.SimpleNamespace(**{**TINY, "steps": [2]}), seed=3)
    labels = [[SQUARE.clone()]]
    round_ = TrainedRound(trained.chain, trained.losses, trained.seconds, labels, [])
    torch.save(round_.to_payload(), tmp_path / "round.pt")
    payload = torch.load(tmp_path / "round.pt", weights_only=True)  # no pickled module or class
    state = torch.random.get_rng_state()
    again = TrainedRound.from_payload(payload, cfg)
    assert torch.equal(torch.random.get_rng_state(), state)  # rebuilding draws nothing
    assert type(again.chain) is type(trained.chain) and not again.chain.stages[0].training
    original = trained.chain.state_dict()
    assert original.keys() == again.chain.state_dict().keys()
    assert all(torch.equal(v, again.chain.state_dict()[k]) for k, v in original.items())
    assert again.losses == trained.losses and again.seconds == trained.seconds
    assert torch.equal(again.labels[0][0], SQUARE)
    with torch.no_grad():
        aligned, expected = again.chain.align(image[0], [SQUARE / 2]), trained.chain.align(image[0], [SQUARE / 2])
    torch.testing.assert_close(aligned, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="missing"):
        TrainedRound.from_payload({"chain": payload["chain"]}, cfg)
    with pytest.raises(ValueError, match="architecture"):
        TrainedRound.from_payload(payload, types.SimpleNamespace(**{**TINY, "channels": [4, 4]}))
    assert isinstance(new_chain(cfg), type(trained.chain))

"""netsim_paper.sinusoid.data: the Section 4.3 toy problem, its network and its ensembles."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from netsim_paper import cache
from netsim_paper.sinusoid.data import (
    SinusoidRun,
    make_sinusoid,
    run_seeds,
    runs_from_plain,
    runs_to_plain,
    sinusoid_mlp,
    target_curvature,
    train_sinusoid_ensemble,
)
from netsim_paper.sinusoid.stacked import is_relu_mlp, train_stacked


def test_default_network_is_the_authors_21057_parameter_mlp():
    model = sinusoid_mlp(seed=0)
    assert sum(p.numel() for p in model.parameters()) == 21_057
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2, 64)] + [(64, 64)] * 5 + [(64, 1)]
    assert sum(isinstance(m, nn.ReLU) for m in model) == 6
    assert is_relu_mlp(model)


def test_network_init_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    a, b, c = sinusoid_mlp(seed=1), sinusoid_mlp(seed=1), sinusoid_mlp(seed=2)
    assert torch.equal(torch.rand(3), expected_next)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, c[0].weight)
    # PyTorch default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the biases.
    assert a[2].bias.abs().max() <= 1 / math.sqrt(64)


def test_make_sinusoid_follows_the_protocol():
    data = make_sinusoid(frequency=4, seed=3)
    assert data.alpha.shape == (2048,) and data.alpha.dtype == torch.float64
    assert data.inputs.shape == (2048, 2) and data.inputs.dtype == torch.float32
    assert data.targets.shape == (2048, 1) and data.targets.dtype == torch.float32
    assert data.frequency == 4.0 and data.seed == 3
    assert 0 <= data.alpha.min() and data.alpha.max() < 1
    torch.testing.assert_close(data.inputs.norm(dim=1), torch.ones(2048))
    angle = torch.atan2(data.inputs[:, 1].double(), data.inputs[:, 0].double()) % (2 * math.pi)
    torch.testing.assert_close(angle / (2 * math.pi), data.alpha, atol=1e-6, rtol=0)
    torch.testing.assert_close(data.targets[:, 0].double(),
                               torch.sin(2 * math.pi * 4 * data.alpha), atol=1e-6, rtol=0)


def test_same_seed_same_positions_for_every_frequency():
    a, b = make_sinusoid(100, frequency=1, seed=5), make_sinusoid(100, frequency=8, seed=5)
    assert torch.equal(a.alpha, b.alpha) and torch.equal(a.inputs, b.inputs)
    assert not torch.equal(a.alpha, make_sinusoid(100, frequency=1, seed=6).alpha)
    with pytest.raises(ValueError, match="n >= 1"):
        make_sinusoid(0, frequency=1)


@pytest.mark.parametrize("frequency", [1, 2, 4, 16])
def test_curvature_matches_finite_differences(frequency):
    alpha = torch.linspace(0.013, 0.987, 201, dtype=torch.float64)
    h = 1e-5 / frequency
    y = lambda a: torch.sin(2 * math.pi * frequency * a)  # noqa: E731
    slope = (y(alpha + h) - y(alpha - h)) / (2 * h)
    second = (y(alpha + h) - 2 * y(alpha) + y(alpha - h)) / h ** 2
    numeric = second.abs() / (1 + slope ** 2) ** 1.5
    scale = (2 * math.pi * frequency) ** 2
    torch.testing.assert_close(target_curvature(alpha, frequency), numeric,
                               atol=1e-4 * scale, rtol=1e-4)


def test_curvature_peaks_at_extrema_and_vanishes_at_zero_crossings():
    f = 3
    peaks = torch.tensor([0.25, 0.75], dtype=torch.float64) / f
    torch.testing.assert_close(target_curvature(peaks, f),
                               torch.full((2,), (2 * math.pi * f) ** 2, dtype=torch.float64))
    zeros = torch.tensor([0.0, 0.5], dtype=torch.float64) / f
    assert target_curvature(zeros, f).abs().max() < 1e-9
    assert target_curvature(torch.tensor([0.1], dtype=torch.float32), f).dtype == torch.float32


def test_run_seeds_are_deterministic_and_distinct():
    assert run_seeds(4) == run_seeds(4)
    seeds = run_seeds(4)
    assert seeds.data == 4 and len({seeds.data, seeds.init, seeds.shuffle}) == 3
    assert run_seeds(5).init != seeds.init


def test_ensemble_records_are_paired_deterministic_and_stack_independent():
    kwargs = dict(n=64, epochs=2, batch_size=16, progress=False)
    runs = train_sinusoid_ensemble([1, 2], [0, 1], **kwargs)
    assert [(r.frequency, r.seed) for r in runs] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    # Paired across frequencies: same positions and same initial network for a seed.
    assert torch.equal(runs[0].data.alpha, runs[2].data.alpha)
    assert not torch.equal(runs[0].data.alpha, runs[1].data.alpha)
    assert torch.equal(runs[0].data.alpha, make_sinusoid(64, frequency=1, seed=0).alpha)
    for run in runs:
        assert run.epoch_loss.shape == (2,)
        with torch.no_grad():
            l1 = (run.model(run.data.inputs) - run.data.targets).abs().mean().item()
        assert run.final_train_l1 == pytest.approx(l1)

    again = train_sinusoid_ensemble([1, 2], [0, 1], **kwargs)
    for a, b in zip(runs, again):
        assert all(torch.equal(pa, pb) for pa, pb in zip(a.model.parameters(), b.model.parameters()))

    alone = train_sinusoid_ensemble([2], [1], **kwargs)[0]
    for pa, pb in zip(alone.model.parameters(), runs[3].model.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


def test_ensemble_run_equals_training_that_network_alone():
    run = train_sinusoid_ensemble([4], [2], n=64, epochs=2, batch_size=16, progress=False)[0]
    seeds = run_seeds(2)
    model = sinusoid_mlp(seed=seeds.init)
    data = make_sinusoid(64, frequency=4, seed=seeds.data)
    (expected,), _ = train_stacked([model], data.inputs, data.targets, lr=1e-4, batch_size=16,
                                   epochs=2, shuffle_seeds=[seeds.shuffle], method="vmap",
                                   progress=False)
    for pa, pb in zip(run.model.parameters(), expected.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


def test_runs_round_trip_through_a_weights_only_file_bit_for_bit(tmp_path):
    runs = train_sinusoid_ensemble([1, 2], [0], n=32, epochs=2, batch_size=8, hidden=8, depth=2, progress=False)
    cache.save_atomic(runs_to_plain(runs), tmp_path / "runs.pt")          # refuses anything but plain data
    state = torch.get_rng_state()
    loaded = runs_from_plain(cache.load(tmp_path / "runs.pt"))
    assert torch.equal(torch.get_rng_state(), state), "rebuilding the networks must not draw from the global RNG"
    for run, back in zip(runs, loaded):
        assert (back.frequency, back.seed, back.final_train_l1) == (run.frequency, run.seed, run.final_train_l1)
        assert back.data.frequency == run.data.frequency and back.data.seed == run.data.seed
        for name in ("alpha", "inputs", "targets"):
            assert torch.equal(getattr(back.data, name), getattr(run.data, name))
        assert torch.equal(back.epoch_loss, run.epoch_loss)
        assert str(back.model) == str(run.model)
        for (name, a), (name_back, b) in zip(run.model.state_dict().items(), back.model.state_dict().items()):
            assert name == name_back and torch.equal(a, b)
        with torch.no_grad():
            assert torch.equal(back.model(run.data.inputs), run.model(run.data.inputs))


def test_a_state_dict_of_another_network_is_refused():
    plain = train_sinusoid_ensemble([1], [0], n=16, epochs=1, batch_size=8, hidden=4, depth=0,
                                    progress=False)[0].to_plain()
    with pytest.raises(ValueError, match="not a sinusoid_mlp"):
        SinusoidRun.from_plain({**plain, "state_dict": {"0.weight": torch.zeros(4, 2), "0.bias": torch.zeros(4)}})
    with pytest.raises(RuntimeError, match="state_dict"):
        SinusoidRun.from_plain({**plain, "state_dict": {**plain["state_dict"], "extra.weight": torch.zeros(1)}})

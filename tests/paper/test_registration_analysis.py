"""The shared set-up of notebooks 04-05 (netsim_paper.registration.analysis)."""

from __future__ import annotations

import pytest
import torch

from netsim_paper.registration.analysis import pick_queries, round_labels, round_patches
from netsim_paper.registration.model import RegistrationChain
from netsim_paper.registration.patches import patch_inputs, select_patches
from netsim_paper.registration.train import RoundResult, RoundsResult, evaluate, make_tiles


def _result(n_rounds: int = 2) -> RoundsResult:
    """Two 128-px tiles; round r's labels are the truth shifted by r + 1 px (distinct per round)."""
    images, truth = make_tiles(range(2), 128)
    noisy = [[p + 3.0 for p in cadaster] for cadaster in truth]
    rounds = []
    for r in range(n_rounds):
        chain = RegistrationChain((4, 2), caps=(2.0, 2.0), channels=(4, 8)).train()
        labels = [[p + (r + 1.0) for p in cadaster] for cadaster in truth]
        rounds.append(RoundResult(chain, [], 0.0, labels, [], training=evaluate(labels, truth), heldout=None))
    return RoundsResult(images, truth, noisy, torch.zeros(2, 2, 128, 128), evaluate(noisy, truth), None, rounds,
                        None, {})


def test_round_labels_are_what_each_round_trained_on():
    result = _result(3)
    assert round_labels(result, 0) is result.noisy
    assert round_labels(result, 1) is result.rounds[0].labels
    assert round_labels(result, 2) is result.rounds[1].labels
    with pytest.raises(IndexError, match="round 3"):
        round_labels(result, 3)


def test_pick_queries_one_per_tile_from_distinct_tiles():
    positions = torch.tensor([[0, 0, 0], [0, 0, 64], [1, 0, 0], [1, 64, 0], [1, 64, 64], [2, 0, 0]])
    queries = pick_queries(positions, 2, seed=0)
    tiles = positions[queries, 0]
    assert len(queries) == 2 and len(set(tiles.tolist())) == 2
    assert torch.equal(queries, pick_queries(positions, 2, seed=0))  # seeded
    every = pick_queries(positions, 10, seed=1)  # more than the tiles: one per tile
    assert sorted(positions[every, 0].tolist()) == [0, 1, 2]
    draws = {tuple(pick_queries(positions, 3, seed=s).tolist()) for s in range(20)}
    assert len(draws) > 1  # the seed matters
    with pytest.raises(ValueError, match="count"):
        pick_queries(positions, 0, seed=0)


def test_round_patches_match_patch_inputs_round_by_round():
    result = _result(2)
    setup = round_patches(result, patch=32, per_tile=3, stage=0, seed=5)
    assert setup.scale == 4 and setup.stage == 0 and setup.patch == 32
    assert torch.equal(setup.positions, select_patches(result.truth, 128, per_tile=3, patch=32, seed=5))
    images, _ = patch_inputs(result.images, result.truth, setup.positions, 32, scale=4)
    assert torch.equal(setup.image_patches, images) and images.shape[-1] == 8
    for r in range(2):
        _, rasters = patch_inputs(result.images, round_labels(result, r), setup.positions, 32, scale=4)
        assert torch.equal(setup.raster_patches[r], rasters)
    assert not torch.equal(setup.raster_patches[0], setup.raster_patches[1])
    for net, entry in zip(setup.nets, result.rounds, strict=True):
        assert net is entry.chain.stages[0] and not net.training
    assert round_patches(result, patch=32, per_tile=3, stage=1, seed=5).scale == 2
    with pytest.raises(ValueError, match="stage 2"):
        round_patches(result, patch=32, per_tile=3, stage=2, seed=5)

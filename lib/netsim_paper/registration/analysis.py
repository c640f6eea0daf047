"""The patches, inputs and networks that notebooks 04 and 05 (Figs. 6-7) analyse, set up once.

Both notebooks look at the training tiles of `run_rounds` through each round's chain: for round
r, one stage of that round's chain (``stage``, the coarse one in the configs), fed every patch as
that stage sees it (image average-pooled by the stage's scale, raster drawn at that scale) with
the raster of **the labels round r was trained on** (`round_labels`). `round_patches` builds
those inputs; `pick_queries` draws the query patches both notebooks share.

Example::

    >>> from netsim_paper import config
    >>> from netsim_paper.registration import analysis
    >>> from netsim_paper.registration.train import run_rounds
    >>> result = run_rounds(config.load("registration", "smoke"), profile="smoke",
    ...                     clean=False, controls=())  # doctest: +SKIP
    >>> setup = analysis.round_patches(result, patch=64, per_tile=8, stage=0, seed=0)  # doctest: +SKIP
    >>> queries = analysis.pick_queries(setup.positions, 4, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from netsim_paper.registration.patches import patch_inputs, select_patches
from netsim_paper.registration.train import Cadaster, RoundsResult

__all__ = ["RoundPatches", "pick_queries", "round_labels", "round_patches"]


def round_labels(result: RoundsResult, r: int) -> list[Cadaster]:
    """The labels round ``r`` (0-based) was trained on: the noisy labels for round 0, the labels
    realigned by round ``r - 1`` after.

    Raises:
        IndexError: ``r`` is not a round of ``result``.
    """
    if not 0 <= r < len(result.rounds):
        raise IndexError(f"round {r} of a run with {len(result.rounds)} rounds")
    return result.noisy if r == 0 else result.rounds[r - 1].labels


def pick_queries(positions: Tensor, count: int, seed: int) -> Tensor:
    """Query patches: one per tile, from ``count`` distinct tiles drawn by the seed.

    Args:
        positions: ``(P, 3)`` rows ``(tile, y0, x0)`` from `select_patches`.
        count: queries wanted; fewer when fewer tiles have patches.
        seed: seeds the draw (``numpy.random.default_rng``: the tiles, then a patch per tile).

    Returns:
        ``(min(count, tiles),)`` long indices into ``positions``, in draw order.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    rng = np.random.default_rng(seed)
    tiles = positions[:, 0].numpy()
    chosen = rng.choice(np.unique(tiles), size=min(count, len(np.unique(tiles))), replace=False)
    return torch.tensor([int(rng.choice(np.flatnonzero(tiles == t))) for t in chosen])


@dataclass(frozen=True)
class RoundPatches:
    """The patches of the training tiles as one stage of every round's chain sees them.

    Attributes:
        positions: ``(P, 3)`` long rows ``(tile, y0, x0)``, full-resolution px.
        patch: patch side p, full-resolution px.
        stage: the chain stage analysed.
        scale: that stage's downsampling s: its outputs are in px of that scale.
        image_patches: ``(P, 3, p/s, p/s)`` image crops at the stage's scale (the same every round).
        raster_patches: per round, ``(P, 3, p/s, p/s)`` rasters of that round's training labels.
        nets: per round, the stage's network, in eval mode.
    """

    positions: Tensor
    patch: int
    stage: int
    scale: int
    image_patches: Tensor
    raster_patches: list[Tensor]
    nets: list[nn.Module]


def round_patches(result: RoundsResult, *, patch: int, per_tile: int, stage: int, seed: int) -> RoundPatches:
    """Selects the patches (`select_patches` on the TRUE cadasters) and builds every round's inputs.

    Args:
        result: `run_rounds`'s result with its chains.
        patch: patch side, full-resolution px.
        per_tile: patches per tile at most.
        stage: the chain stage whose networks are analysed (0 = coarsest).
        seed: seeds the patch selection.
    """
    if not result.rounds:
        raise ValueError("the result has no round to analyse")
    scales = result.rounds[0].chain.scales
    if not 0 <= stage < len(scales):
        raise ValueError(f"stage {stage} of a chain with scales {tuple(scales)}")
    scale = int(scales[stage])
    size = tuple(result.images.shape[-2:])
    positions = select_patches(result.truth, size, per_tile=per_tile, patch=patch, seed=seed)
    image_patches, _ = patch_inputs(result.images, result.truth, positions, patch, scale=scale)
    raster_patches = [patch_inputs(result.images, round_labels(result, r), positions, patch, scale=scale)[1]
                      for r in range(len(result.rounds))]
    nets = [entry.chain.stages[stage].eval() for entry in result.rounds]
    return RoundPatches(positions, patch, stage, scale, image_patches, raster_patches, nets)

"""The smoke and paper settings of the registration experiments: self-denoising (Figs. 1-2,
notebook 01), neighbouring patches (Figs. 6-7, notebook 04) and the similarity histograms
(Fig. 7 and the talk's denoising factor, notebook 05). Registered in `netsim_paper.config`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class RegistrationConfig:
    """Section 1 / Fig. 2: a multiscale registration chain on synthetic 256-px tiles.

    noise_px 12 (bump fields, cov_scale 0.015, |grad| < 0.5) gives a median per-vertex label
    noise of ~7 px, about a fifth of the median building width (~35 px). Perturbation
    amplitudes are full-resolution pixels per stage; caps are pixels of each stage's scale.
    GroupNorm, lr 3e-3 with warm-up + cosine decay, and finer stages started from the coarser
    one: without them the finer stages did not leave their initial plateau in 600 steps.
    Perturbations are "bumps", the noise's own recipe and scale (a network that can tell them
    apart by smoothness learns to leave the noise alone); the coarse stage gets most steps:
    round-1 gain 0.16 -> 0.25 (bumps) and 0.16 -> 0.45 (1600 coarse steps), measured.

    The fields are those `registration.train.run_rounds` and `train_chain` document.
    """

    #: Bump whenever a code constant that shapes a cached result changes: in
    #: `registration/train.py`, the seed offsets of the held-out tiles and their noise, of the
    #: clean run, of the controls and of each round's training.
    RECIPE: ClassVar[int] = 1
    SMOKE: ClassVar[RegistrationConfig]
    PAPER: ClassVar[RegistrationConfig]

    tile_size: int
    train_tiles: int
    heldout_tiles: int
    tile_seed: int
    seed: int
    noise_px: float
    noise_cov_scale: float
    scales: tuple[int, ...]
    caps: tuple[float, ...]
    channels: tuple[int, ...]
    norm: str
    perturbation_px: tuple[float, ...]
    perturbation_kind: str
    steps: tuple[int, ...]
    warmup: int
    init_from_coarser: bool
    batch_size: int
    crop: int
    lr: float
    rounds: int
    control_rounds: int
    extra_noise_factor: float
    sweep_noise_factors: tuple[float, ...]


RegistrationConfig.SMOKE = RegistrationConfig(
    tile_size=256, train_tiles=8, heldout_tiles=4, tile_seed=0, seed=0, noise_px=12.0, noise_cov_scale=0.015,
    scales=(4, 2, 1), caps=(8.0, 6.0, 6.0), channels=(8, 16, 32), norm="group", perturbation_px=(24.0, 8.0, 4.0),
    perturbation_kind="bumps", steps=(150, 60, 60), warmup=20, init_from_coarser=True, batch_size=4, crop=64,
    lr=3e-3, rounds=2, control_rounds=1, extra_noise_factor=1.5, sweep_noise_factors=(0.5,))
RegistrationConfig.PAPER = RegistrationConfig(
    tile_size=256, train_tiles=48, heldout_tiles=16, tile_seed=0, seed=0, noise_px=12.0, noise_cov_scale=0.015,
    scales=(4, 2, 1), caps=(8.0, 6.0, 6.0), channels=(16, 32, 64), norm="group", perturbation_px=(24.0, 8.0, 4.0),
    perturbation_kind="bumps", steps=(1600, 400, 400), warmup=50, init_from_coarser=True, batch_size=8, crop=64,
    lr=3e-3, rounds=3, control_rounds=2, extra_noise_factor=1.5, sweep_noise_factors=(0.5,))


@dataclass(frozen=True)
class NeighborPatchesConfig:
    """Figs. 6-7 (section 6): patches of the registration training tiles seen through each
    round's coarse stage (stage 0, downsampling 4).

    The authors: ~3600 patches, 10 per tile, ~10 queries, 10 neighbours each. Every patch is
    also a query of the quantitative comparison (the P x P kernels, notebook 04).

    Attributes:
        patch: patch side in full-resolution pixels.
        per_tile: patches per tile (at most).
        queries: query patches shown.
        neighbours: neighbours shown per query.
        perceptual_level: the feature level of the perceptual baseline.
        stage: the chain's stage analysed (0 = coarsest).
    """

    #: Bump whenever a code constant that shapes a cached result of this experiment changes.
    RECIPE: ClassVar[int] = 1
    SMOKE: ClassVar[NeighborPatchesConfig]
    PAPER: ClassVar[NeighborPatchesConfig]

    patch: int
    per_tile: int
    queries: int
    neighbours: int
    perceptual_level: int
    stage: int


NeighborPatchesConfig.SMOKE = NeighborPatchesConfig(patch=64, per_tile=8, queries=4, neighbours=10,
                                                    perceptual_level=1, stage=0)
NeighborPatchesConfig.PAPER = NeighborPatchesConfig(patch=64, per_tile=10, queries=10, neighbours=10,
                                                    perceptual_level=1, stage=0)


@dataclass(frozen=True)
class SimilarityHistogramsConfig:
    """Fig. 7 and the talk's self-denoising estimate (notebook 05; its patches and query are
    notebook 04's).

    Attributes:
        bins: histogram bins.
        denoising_round: the round whose network the denoising factor is measured on.
        denoising_queries: query patches of the denoising factor.
        factor_variants: (output, parameters) pairs; "no_head" = last 1x1 conv excluded.
    """

    #: Bump whenever a code constant that shapes a cached result of this experiment changes.
    RECIPE: ClassVar[int] = 1
    SMOKE: ClassVar[SimilarityHistogramsConfig]
    PAPER: ClassVar[SimilarityHistogramsConfig]

    bins: int
    denoising_round: int
    denoising_queries: int
    factor_variants: tuple[tuple[str, str], ...]


_FACTOR_VARIANTS = (("mean", "all"), ("mean", "no_head"), ("vertices", "all"), ("vertices", "no_head"))
SimilarityHistogramsConfig.SMOKE = SimilarityHistogramsConfig(bins=100, denoising_round=1, denoising_queries=40,
                                                              factor_variants=_FACTOR_VARIANTS)
SimilarityHistogramsConfig.PAPER = SimilarityHistogramsConfig(bins=100, denoising_round=1, denoising_queries=100,
                                                              factor_variants=_FACTOR_VARIANTS)

"""Training the registration chain on noisy cadasters, and the multi-round self-denoising loop.

The paper's section 1 (after Girard et al.): a multiscale chain of networks is trained to
align misaligned building cadasters to aerial images. The training labels are themselves
noisy (OpenStreetMap is misaligned); the training pairs are made by perturbing those noisy
labels further by a random smooth field ψ and asking the network to predict ψ. Because the
label noise is unpredictable from the input and zero-mean, the network learns to align to
the *image*, and applying it to the original noisy labels denoises them. Retraining on the
denoised labels ("rounds") reduces the error further.

Pipeline (each step a function below):

1. `make_tiles`: fixed synthetic scenes (images + exact cadasters), drawn once by seed:
   training tiles and, far from their seeds, held-out tiles that are never trained on.
2. `label_noise_fields` / `move_cadasters`: noisy labels = true polygons moved by a smooth
   field per tile (zero-mean across tiles), or by a shared constant shift (biased control);
   `inflate_cadasters`: every building drawn too large (the other biased control).
3. `sample_batch`: a fresh random perturbation ψ per sample at the stage's scale
   (`perturbation_field`: "smooth", the noise's own "bumps", or "constant"); input = the
   labels' raster warped by ψ (thresholded back to 0/1, i.e. the raster of the labels moved
   by ψ), target = ψ; random crops, 90° rotations and flips (vectors turned too).
4. `train_stage` / `train_chain`: Adam on `registration_loss` (optionally with linear
   warm-up + cosine decay), coarse stage first, each stage at its own scale with its own
   perturbation amplitude; with ``cfg.init_from_coarser`` a finer stage starts from the
   coarser stage's trained weights.
5. `run_rounds`: rounds of train -> align the ORIGINAL noisy labels -> retrain, plus a
   clean-label chain, controls and a noise sweep, evaluated on the training and the
   held-out tiles; trained chains (with their realigned labels) cached by config hash as plain
   data (`TrainedRound.to_payload`), independent runs optionally trained in worker processes.
   The results are small frozen dataclasses: `RoundsResult` holds `LabelErrors`,
   `RoundResult` per round, `HeldOutTiles` and `Control` runs.

Example (the smoke profile)::

    >>> from netsim_paper import config
    >>> from netsim_paper.registration.train import run_rounds
    >>> result = run_rounds(config.load("registration", "smoke"), profile="smoke")  # doctest: +SKIP
    >>> result.noise.median, [r.training.median for r in result.rounds]  # doctest: +SKIP
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import multiprocessing
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from netsim_paper import cache, config, runtime
from netsim_paper.registration.deform import (
    control_grid_field,
    flip,
    move_polygons,
    pixel_centres,
    random_field,
    rotate90,
    scale_field,
)
from netsim_paper.registration.geometry import loss_weights, rasterize
from netsim_paper.registration.metrics import accuracy_curve, curve_auc, median_error, vertex_errors
from netsim_paper.registration.model import RegistrationChain, downsample_image, registration_loss
from netsim_paper.registration.scenes import make_scene

__all__ = [
    "Control",
    "HeldOutTiles",
    "LabelErrors",
    "RoundResult",
    "RoundsResult",
    "TrainedChain",
    "TrainedRound",
    "evaluate",
    "inflate_cadasters",
    "label_noise_fields",
    "make_tiles",
    "move_cadasters",
    "new_chain",
    "perturbation_field",
    "run_rounds",
    "sample_batch",
    "train_chain",
    "train_stage",
]

Cadaster = list[Tensor]

# The seed offsets below shape every cached result (the cache key covers the config and
# `RegistrationConfig.RECIPE`, not this code): bump RECIPE in registration/config.py whenever
# one of them changes.
#: Held-out scenes are drawn from tile seeds this far above the training tiles' seeds.
HELDOUT_TILE_SEED_OFFSET = 100_000
#: The held-out tiles' label noise is drawn from the training noise seed + this.
HELDOUT_NOISE_SEED_OFFSET = 50_000
#: Round r of a run trains from the run's seed + this * (r + 1).
ROUND_SEED_STRIDE = 1000
#: Training seed of the clean-label chain: the config's seed + this.
CLEAN_SEED_OFFSET = -1
#: Noise seeds of the controls (the config's seed + these) and their training seed offset.
EXTRA_NOISE_SEED_OFFSET = 1
BIASED_SEED_OFFSET = 2
SWEEP_SEED_OFFSET = 3
CONTROL_TRAIN_SEED_OFFSET = 7


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    value = getattr(cfg, name, default) if not isinstance(cfg, dict) else cfg.get(name, default)
    return value


# =========================================================================================
# Data: tiles, label noise
# =========================================================================================


def make_tiles(seeds: Sequence[int], size: int = 256) -> tuple[Tensor, list[Cadaster]]:
    """Synthetic aerial tiles with their exact cadasters.

    Args:
        seeds: one scene seed per tile.
        size: tile side in pixels.

    Returns:
        images ``(N, 3, size, size)`` float32 and N true cadasters (lists of ``(n, 2)`` float64).
    """
    scenes = [make_scene(int(seed), size=size) for seed in seeds]
    if not scenes:
        return torch.empty(0, 3, size, size), []
    return torch.stack([scene.image for scene in scenes]), [scene.polygons for scene in scenes]


def label_noise_fields(n_tiles: int, size: int, amplitude: float, *, seed: int, kind: str = "smooth",
                       cov_scale: float = 0.015) -> Tensor:
    """The label-noise fields of a training set, one per tile.

    * ``kind="smooth"``: the authors' random Gaussian-bump field per tile (`random_field`,
      each component stretched to [-amplitude, amplitude]), minus the mean field over the
      tiles, so the noise is exactly zero-mean across tiles at every pixel (the premise of
      self-denoising: the network cannot learn a systematic offset from the labels).
    * ``kind="shift"``: the same constant vector for every tile, of norm ``amplitude`` in a
      random direction: a *biased* noise that no amount of averaging removes (control).

    Args:
        n_tiles: N.
        size: tile side H = W.
        amplitude: pixels (see `kind`).
        seed: seeds the fields.
        kind: "smooth" or "shift".
        cov_scale: bump covariance scale of the smooth fields; 0.015 makes bumps ~31 px wide
            on 256-px tiles, so |∇φ| stays < 0.5 up to amplitude ~12 px (no folding).

    Returns:
        ``(N, 2, size, size)`` float32 fields in pixels (deform's convention: labels are the
        true polygons moved by them, ``v - φ(v)``).
    """
    generator = torch.Generator().manual_seed(int(seed))
    if kind == "smooth":
        fields = torch.stack([random_field(size, size, amplitude=amplitude, generator=generator,
                                           cov_scale=cov_scale) for _ in range(n_tiles)])
        if n_tiles > 1:
            fields = fields - fields.mean(0, keepdim=True)
        return fields
    if kind == "shift":
        angle = float(torch.rand((), generator=generator, dtype=torch.float64)) * 2 * math.pi
        vector = torch.tensor([math.cos(angle), math.sin(angle)]) * amplitude
        return vector.view(1, 2, 1, 1).expand(n_tiles, 2, size, size).float().clone()
    raise ValueError(f"kind must be 'smooth' or 'shift', got {kind!r}")


def move_cadasters(cadasters: Sequence[Cadaster], fields: Tensor, iterations: int = 10) -> list[Cadaster]:
    """Moves each tile's polygons by its field (``v' + φ(v') = v``, `move_polygons`).

    Args:
        cadasters: N cadasters.
        fields: ``(N, 2, H, W)``.
        iterations: fixed-point steps (10: consistent with the warped raster to ~1e-3 px).

    Returns:
        N moved cadasters.
    """
    if len(cadasters) != len(fields):
        raise ValueError(f"{len(cadasters)} cadasters for {len(fields)} fields")
    return [list(move_polygons(list(c), f.double(), iterations=iterations)) if len(c) else []
            for c, f in zip(cadasters, fields, strict=True)]


def inflate_cadasters(cadasters: Sequence[Cadaster], median_px: float) -> list[Cadaster]:
    """Every building drawn too large: each polygon scaled about its vertex mean by one factor.

    A systematic label error that, unlike a constant shift, looks the same after any quarter
    turn or flip of a crop (scaling about a building's own centre commutes with them), so the
    training augmentation cannot turn it into zero-mean noise: the biased control that
    self-denoising should not remove.

    Args:
        cadasters: N cadasters.
        median_px: the median vertex displacement to produce (the factor is
            ``median_px / median |v - centre|`` over all vertices).

    Returns:
        N inflated cadasters.
    """
    polygons = [p for cadaster in cadasters for p in cadaster]
    if not polygons:
        raise ValueError("no polygon to inflate")
    radii = torch.cat([(p - p.mean(0)).norm(dim=1) for p in polygons])
    factor = float(median_px) / float(radii.median())
    return [[p.mean(0) + (1.0 + factor) * (p - p.mean(0)) for p in cadaster] for cadaster in cadasters]


# =========================================================================================
# Training pairs
# =========================================================================================


def perturbation_field(height: int, width: int, amplitude: float, generator: torch.Generator, *,
                       kind: str = "smooth", grid: int = 4, cov_scale: float = 0.015) -> Tensor:
    """A random training perturbation ψ at a stage's resolution.

    ``kind="smooth"``: `control_grid_field` (``grid`` x ``grid`` bicubic control vectors, each
    component stretched to exactly ±amplitude), drawn on a grid of at most 64 x 64 and
    upsampled by `scale_field`: the field is smooth on the scale of the tile / (grid - 1),
    so the upsampling is exact to well below a pixel and costs ~7 ms instead of ~200 ms.
    With grid 4 its gradient stays below ~``9 * amplitude / h`` (~0.5 for 16 px on 256 px).
    ``kind="bumps"``: the authors' Gaussian-bump field (`random_field` with ``cov_scale``, each
    component stretched to exactly ±amplitude), drawn the same way (at most 64 x 64, then
    upsampled): with the label noise's ``cov_scale`` the perturbations and the noise have the
    same spatial statistics, so a network cannot tell them apart by smoothness -- the premise
    of self-denoising (with the stiffer control-grid fields it learned to leave the rougher
    noise alone: round-1 gain 0.16 where the linear-Gaussian bound was 0.88, measured).
    ``kind="constant"``: one translation, each component uniform in [-amplitude, amplitude].

    Args:
        height: h of the stage's tile.
        width: w of the stage's tile.
        amplitude: pixels of the stage's scale.
        generator: source of randomness.
        kind: "smooth", "bumps" or "constant".
        grid: control points per axis of the smooth field.
        cov_scale: bump covariance scale of the "bumps" field (normalised coordinates).

    Returns:
        ``(2, h, w)`` float32.
    """
    if kind == "constant":
        vector = (torch.rand(2, generator=generator) * 2 - 1) * amplitude
        return vector.view(2, 1, 1).expand(2, height, width).clone()
    if kind not in ("smooth", "bumps"):
        raise ValueError(f"kind must be 'smooth', 'bumps' or 'constant', got {kind!r}")
    factor = 1
    while height // (2 * factor) >= 64 and width // (2 * factor) >= 64 and height % (2 * factor) == 0 \
            and width % (2 * factor) == 0:
        factor *= 2
    if kind == "bumps":
        small = random_field(height // factor, width // factor, amplitude=amplitude / factor, generator=generator,
                             cov_scale=cov_scale)
    else:
        small = control_grid_field(height // factor, width // factor, amplitude=amplitude / factor,
                                   generator=generator, grid=grid)
    return small if factor == 1 else scale_field(small, float(factor))


def _crop_start(size: int, crop: int, generator: torch.Generator) -> int:
    return int(torch.randint(0, size - crop + 1, (), generator=generator)) if size > crop else 0


def _warp_crop(raster: Tensor, field: Tensor, y0: int, x0: int) -> Tensor:
    """`warp_image(raster, φ)` evaluated on a crop only (same result, 1/16 of the samples).

    Args:
        raster: ``(C, H, W)`` whole tile.
        field: ``(2, h, w)`` φ on the crop whose top-left pixel is ``(y0, x0)``.

    Returns:
        ``(C, h, w)``: ``raster(p + φ(p))`` for the crop's pixel centres p (border clamped).
    """
    height, width = raster.shape[-2:]
    h, w = field.shape[-2:]
    positions = pixel_centres(h, w, dtype=raster.dtype) + field.to(raster.dtype)
    positions = positions + positions.new_tensor([x0, y0]).view(2, 1, 1)
    # grid_sample with align_corners=False: -1 and +1 are the outer edges x = 0 and x = W.
    grid = positions.permute(1, 2, 0) * positions.new_tensor([2.0 / width, 2.0 / height]) - 1.0
    return F.grid_sample(raster[None], grid[None], mode="bilinear", padding_mode="border",
                         align_corners=False)[0]


def sample_batch(images: Tensor, rasters: Tensor, *, batch_size: int, amplitude: float,
                 generator: torch.Generator, crop: int | None = None, augment: bool = True,
                 kind: str = "smooth", cov_scale: float = 0.015) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draws a batch of training pairs ((image, misaligned raster), ψ) at one scale.

    For each sample: a random tile, a fresh perturbation ψ (`perturbation_field`), the
    labels' raster warped by ψ and thresholded at 0.5 (pixel p is set iff ``p + ψ(p)`` is
    inside the labels' polygons: the raster of the labels moved by ψ, deform's convention,
    at a fraction of the cost of re-rasterising), a random crop, then a random quarter turn
    and a random left-right flip applied to image, raster and ψ together (vectors turned).

    Args:
        images: ``(N, 3, h, w)`` tiles at the stage's scale.
        rasters: ``(N, 3, h, w)`` rasters of the round's labels at the stage's scale.
        batch_size: B.
        amplitude: ψ amplitude in pixels of the stage's scale.
        generator: all randomness (tile, ψ, crop, augmentation) comes from it.
        crop: side of the random square crop (None: the whole tile; must be square then if
            augmenting with odd quarter turns).
        augment: random rotations and flips.
        kind: "smooth", "bumps" or "constant" perturbations (`perturbation_field`).
        cov_scale: bump scale of "bumps" perturbations.

    Returns:
        images ``(B, 3, c, c)``, misaligned rasters ``(B, 3, c, c)``, targets ψ ``(B, 2, c, c)``
        and loss weights ``(B, c, c)`` (`loss_weights` of the misaligned raster).
    """
    n, _, height, width = images.shape
    if rasters.shape != images.shape:
        raise ValueError(f"images and rasters differ in shape: {tuple(images.shape)} vs {tuple(rasters.shape)}")
    crop_h, crop_w = (height, width) if crop is None else (min(crop, height), min(crop, width))
    if augment and crop_h != crop_w:
        raise ValueError(f"quarter-turn augmentation needs square crops, got {(crop_h, crop_w)}")
    out_images, out_rasters, out_fields = [], [], []
    for _ in range(batch_size):
        tile = int(torch.randint(0, n, (), generator=generator))
        psi = perturbation_field(height, width, amplitude, generator, kind=kind, cov_scale=cov_scale)
        y0, x0 = _crop_start(height, crop_h, generator), _crop_start(width, crop_w, generator)
        rows, cols = slice(y0, y0 + crop_h), slice(x0, x0 + crop_w)
        psi = psi[:, rows, cols]
        raster = (_warp_crop(rasters[tile], psi, y0, x0) > 0.5).float()
        image = images[tile][:, rows, cols]
        if augment:
            k = int(torch.randint(0, 4, (), generator=generator))
            image, raster, psi = rotate90(image, raster, psi, k)
            if int(torch.randint(0, 2, (), generator=generator)):
                image, raster, psi = flip(image, raster, psi, "x")
        out_images.append(image)
        out_rasters.append(raster)
        out_fields.append(psi)
    batch_rasters = torch.stack(out_rasters)
    return torch.stack(out_images), batch_rasters, torch.stack(out_fields), loss_weights(batch_rasters)


# =========================================================================================
# Training
# =========================================================================================


def train_stage(net: torch.nn.Module, images: Tensor, rasters: Tensor, *, steps: int, batch_size: int,
                amplitude: float, generator: torch.Generator, lr: float = 1e-3, crop: int | None = 64,
                kind: str = "smooth", augment: bool = True, warmup: int = 0, cov_scale: float = 0.015) -> list[float]:
    """Trains one stage with Adam on fresh perturbations of fixed labels.

    The learning rate rises linearly over ``warmup`` steps, then follows a cosine decay to 0
    at ``steps`` (with ``warmup=0``: constant ``lr``, the original recipe). With GroupNorm
    stages, lr 3e-3 and the schedule reached in 800 steps the loss that constant 1e-3 without
    normalisation needed ~2500 for (coarse stage, measured).

    Args:
        net: the stage, ``(image, raster) -> field`` at this scale.
        images: ``(N, 3, h, w)`` tiles at the stage's scale.
        rasters: ``(N, 3, h, w)`` label rasters at the stage's scale.
        steps: Adam steps.
        batch_size: samples per step.
        amplitude: perturbation amplitude in pixels of this scale.
        generator: source of the batches.
        lr: Adam learning rate.
        crop: random crop side (the net is fully convolutional; crops keep CPU steps cheap).
        kind: "smooth", "bumps" or "constant" perturbations (`perturbation_field`).
        augment: random quarter turns and flips.
        cov_scale: bump scale of "bumps" perturbations.
        warmup: linear warm-up steps; > 0 switches on the warm-up + cosine schedule.

    Returns:
        The loss of every step.
    """
    if steps < 0 or batch_size < 1 or warmup < 0:
        raise ValueError(f"steps and warmup must be >= 0 and batch_size >= 1, got {steps}, {warmup}, {batch_size}")
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)

    def factor(step: int) -> float:
        if not warmup:
            return 1.0
        return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    net.train()
    losses = []
    for _ in range(steps):
        image, raster, target, weights = sample_batch(images, rasters, batch_size=batch_size, amplitude=amplitude,
                                                      generator=generator, crop=crop, augment=augment, kind=kind,
                                                      cov_scale=cov_scale)
        loss = registration_loss(net(image, raster), target, weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    net.eval()
    return losses


def _stage_inputs(images: Tensor, labels: Sequence[Cadaster], scale: int) -> tuple[Tensor, Tensor]:
    """Images and label rasters of all tiles at one scale: two ``(N, 3, H/scale, W/scale)``."""
    height, width = images.shape[-2:]
    rasters = torch.stack([rasterize(cadaster, height, width, scale=1.0 / scale) for cadaster in labels])
    return downsample_image(images, scale), rasters


@dataclasses.dataclass(frozen=True)
class TrainedChain:
    """What a training function returns (`train_chain`, or a stub in tests).

    Attributes:
        chain: the trained `RegistrationChain` (anything with ``align(image, polygons)`` for a stub).
        losses: per stage, the loss of every step.
        seconds: wall time of the training.
    """

    chain: Any
    losses: list[list[float]]
    seconds: float


def new_chain(cfg: Any) -> RegistrationChain:
    """An untrained chain of the config's architecture (``scales``, ``caps``, ``channels``, ``norm``)."""
    return RegistrationChain([int(s) for s in _get(cfg, "scales")], caps=_get(cfg, "caps"),
                             channels=_get(cfg, "channels", (16, 32, 64)), norm=_get(cfg, "norm", "none"))


def train_chain(images: Tensor, labels: Sequence[Cadaster], cfg: Any, *, seed: int) -> TrainedChain:
    """Builds and trains a chain on (images, labels), stage by stage (coarse first) at each scale.

    Stage s is trained on perturbations of amplitude ``cfg.perturbation_px[s]`` full-resolution
    pixels (i.e. ``/ scales[s]`` pixels of its scale), for ``cfg.steps[s]`` steps. The stages
    are trained one after the other on the round's labels (not on the output of the coarser
    stage); with ``cfg.init_from_coarser`` each finer stage starts from the coarser stage's
    trained weights instead of a fresh initialisation.

    Args:
        images: ``(N, 3, H, W)`` tiles.
        labels: N cadasters (the round's labels).
        cfg: the "registration" config (scales, caps, channels, norm (default "none"),
            perturbation_px, perturbation_kind (default "smooth"), noise_cov_scale (the
            "bumps" scale, default 0.015), steps, batch_size, lr (default 1e-3), warmup
            (default 0: constant lr), init_from_coarser (default False), crop (default 64)).
        seed: seeds the initial weights and the batches.

    Returns:
        The chain (every stage in eval mode), the per-stage step losses and the wall time.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images for {len(labels)} label cadasters")
    scales = [int(s) for s in _get(cfg, "scales")]
    for name in ("caps", "perturbation_px", "steps"):
        if len(_get(cfg, name)) != len(scales):
            raise ValueError(f"cfg.{name} needs one value per scale {scales}, got {_get(cfg, name)}")
    start = time.perf_counter()
    # Initial weights from the seed alone, leaving the global RNG as it was (cached or not).
    chain = runtime.build_seeded(lambda: new_chain(cfg), seed)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for index, scale in enumerate(scales):
        if index and _get(cfg, "init_from_coarser", False):
            # The stages share one architecture and the matching they learn is nearly
            # scale-free: starting from the coarser stage skips the long initial plateau.
            chain.stages[index].load_state_dict(chain.stages[index - 1].state_dict())
        stage_images, rasters = _stage_inputs(images, labels, scale)
        losses.append(train_stage(
            chain.stages[index], stage_images, rasters, steps=int(_get(cfg, "steps")[index]),
            batch_size=int(_get(cfg, "batch_size")), amplitude=float(_get(cfg, "perturbation_px")[index]) / scale,
            generator=generator, lr=float(_get(cfg, "lr", 1e-3)), crop=_get(cfg, "crop", 64),
            warmup=int(_get(cfg, "warmup", 0)), kind=_get(cfg, "perturbation_kind", "smooth"),
            cov_scale=float(_get(cfg, "noise_cov_scale", 0.015))))
    return TrainedChain(chain.eval(), losses, time.perf_counter() - start)


# =========================================================================================
# Evaluation and the multi-round loop
# =========================================================================================


@dataclasses.dataclass(frozen=True)
class LabelErrors:
    """Per-vertex errors of a set of labels against the truth (`evaluate`).

    Attributes:
        errors: ``(V,)`` float64 distances in pixels, every vertex of every tile.
        median: their median, pixels.
        taus: ``(T,)`` thresholds of the accuracy curve, pixels.
        fraction: ``(T,)`` fraction of vertices with error <= tau.
        auc: area under the accuracy curve, normalised to [0, 1].
    """

    errors: Tensor
    median: float
    taus: Tensor
    fraction: Tensor
    auc: float


def evaluate(predicted: Sequence[Cadaster], truth: Sequence[Cadaster], *, tau_max: float = 20.0) -> LabelErrors:
    """Per-vertex errors against the truth, their median, accuracy curve and its AUC.

    Args:
        predicted: N cadasters.
        truth: N true cadasters (same structure).
        tau_max: last threshold of the accuracy curve, pixels.
    """
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted cadasters for {len(truth)} true ones")
    errors = torch.cat([vertex_errors(p, t) for p, t in zip(predicted, truth, strict=True) if len(t)])
    taus, fraction = accuracy_curve(errors, tau_max=tau_max)
    return LabelErrors(errors, median_error(errors), taus, fraction, curve_auc(taus, fraction))


@dataclasses.dataclass(frozen=True)
class TrainedRound:
    """One round of a run, as cached: its trained chain and the labels it realigned.

    Attributes:
        chain: the round's chain.
        losses: per stage, the loss of every training step.
        seconds: training wall time.
        labels: the run's ORIGINAL noisy training labels realigned by the chain (N cadasters).
        heldout_labels: the held-out tiles' noisy labels realigned by the chain.
    """

    chain: Any
    losses: list[list[float]]
    seconds: float
    labels: list[Cadaster]
    heldout_labels: list[Cadaster]

    def to_payload(self) -> dict[str, Any]:
        """Plain data for the cache (tensors, lists, numbers): the chain as its state dict."""
        return {"chain": dict(self.chain.state_dict()), "losses": [list(map(float, stage)) for stage in self.losses],
                "seconds": float(self.seconds), "labels": self.labels, "heldout_labels": self.heldout_labels}

    @classmethod
    def from_payload(cls, payload: dict[str, Any], cfg: Any) -> TrainedRound:
        """The round back from `to_payload`'s data: the chain rebuilt by `new_chain(cfg)`.

        Rebuilding draws no random number from the global RNG (`runtime.build_seeded`), and
        every stage is left in eval mode, as `train_chain` leaves it.

        Raises:
            ValueError: the payload lacks a key, or its state dict does not fit the config's chain.
        """
        missing = {"chain", "losses", "seconds", "labels", "heldout_labels"} - set(payload)
        if missing:
            raise ValueError(f"not a cached registration round: missing {sorted(missing)}")
        chain = runtime.build_seeded(lambda: new_chain(cfg), 0)
        try:
            chain.load_state_dict(payload["chain"])
        except RuntimeError as error:
            raise ValueError(f"the cached chain does not fit the config's architecture: {error}") from error
        return cls(chain.eval(), payload["losses"], payload["seconds"], payload["labels"], payload["heldout_labels"])


@dataclasses.dataclass(frozen=True)
class RoundResult(TrainedRound):
    """A `TrainedRound` with the errors of its realigned labels.

    Attributes:
        training: errors of ``labels`` on the training tiles (the set being denoised).
        heldout: errors of ``heldout_labels`` on the held-out tiles (None without them).
    """

    training: LabelErrors
    heldout: LabelErrors | None


@dataclasses.dataclass(frozen=True)
class HeldOutTiles:
    """The held-out tiles: never trained on, their own noisy labels realigned by every chain.

    Attributes:
        images: ``(M, 3, H, W)``.
        truth: M true cadasters.
        noisy: M noisy cadasters.
        noise: errors of ``noisy`` (None when M = 0).
    """

    images: Tensor
    truth: list[Cadaster]
    noisy: list[Cadaster]
    noise: LabelErrors | None


@dataclasses.dataclass(frozen=True)
class Control:
    """A control run: its own label errors, trained and realigned like the main run.

    Attributes:
        noise_factor: its smooth noise over the main noise (None for the biased controls).
        noisy: its noisy training labels.
        noise: errors of ``noisy`` on the training tiles.
        heldout_noise: errors of its held-out labels (None without held-out tiles).
        rounds: one `RoundResult` per round.
    """

    noise_factor: float | None
    noisy: list[Cadaster]
    noise: LabelErrors
    heldout_noise: LabelErrors | None
    rounds: list[RoundResult]


@dataclasses.dataclass(frozen=True)
class RoundsResult:
    """Everything `run_rounds` measured.

    Attributes:
        images: ``(N, 3, H, W)`` training tiles.
        truth: N true cadasters.
        noisy: N noisy cadasters (labels_0).
        noise_fields: ``(N, 2, H, W)`` the label-noise fields.
        noise: errors of ``noisy``.
        heldout: the held-out tiles.
        rounds: the main run, one `RoundResult` per round.
        clean: the chain trained on the true labels (None if not run).
        controls: name -> `Control`.
    """

    images: Tensor
    truth: list[Cadaster]
    noisy: list[Cadaster]
    noise_fields: Tensor
    noise: LabelErrors
    heldout: HeldOutTiles
    rounds: list[RoundResult]
    clean: RoundResult | None
    controls: dict[str, Control]


TrainFn = Callable[..., TrainedChain]
#: ``artefact(name, compute, cfg)``: a `TrainedRound`, from the cache or from ``compute()``.
Artefacts = Callable[[str, Callable[[], TrainedRound], Any], TrainedRound]


@dataclasses.dataclass
class _Run:
    """One chain of rounds: train on ``train_labels`` first, then on the previous round's output.

    Every round's chain realigns the ORIGINAL ``noisy`` labels (and ``heldout_noisy`` on the
    held-out tiles); round r + 1 trains on round r's realigned training labels.
    """

    tag: str
    train_labels: list[Cadaster]
    noisy: list[Cadaster]
    heldout_noisy: list[Cadaster]
    rounds: int
    seed: int


def _train_rounds(run: _Run, images: Tensor, heldout_images: Tensor, cfg: Any, train_fn: TrainFn,
                  artefact: Artefacts) -> list[TrainedRound]:
    """The rounds of one `_Run`, each a `TrainedRound` artefact ``<tag>round<r>``."""

    def train_and_align(labels: list[Cadaster], r: int) -> TrainedRound:
        trained = train_fn(images, labels, cfg, seed=run.seed + ROUND_SEED_STRIDE * (r + 1))
        chain = trained.chain
        # Always the ORIGINAL noisy labels: the chain of round r is a denoiser of them,
        # not a further step on top of the previous round's output.
        return TrainedRound(chain, trained.losses, trained.seconds,
                            [chain.align(i, c) for i, c in zip(images, run.noisy, strict=True)],
                            [chain.align(i, c) for i, c in zip(heldout_images, run.heldout_noisy, strict=True)])

    trained, labels = [], run.train_labels
    for r in range(run.rounds):
        trained.append(artefact(f"{run.tag}round{r}", lambda labels=labels, r=r: train_and_align(labels, r), cfg))
        labels = trained[-1].labels
    return trained


def _artefacts(directory: Path | None, refresh: bool) -> Artefacts:
    """``artefact(name, compute, cfg)``: cached as plain data in ``directory / "<name>.pt"``, or
    computed when ``directory`` is None."""
    if directory is None:
        return lambda name, compute, cfg: compute()

    def artefact(name: str, compute: Callable[[], TrainedRound], cfg: Any) -> TrainedRound:
        payload = cache.cached(directory / f"{name}.pt", lambda: compute().to_payload(), refresh=refresh)
        return TrainedRound.from_payload(payload, cfg)

    return artefact


def _run_in_worker(run: _Run, images: Tensor, heldout_images: Tensor, cfg: Any, train_fn: TrainFn,
                   directory: str, refresh: bool) -> str:
    """Process-pool entry point: train one `_Run` into the cache (`configure_threads`'s count)."""
    runtime.configure_threads()
    _train_rounds(run, images, heldout_images, cfg, train_fn, _artefacts(Path(directory), refresh))
    return run.tag


def _train_all(runs: list[_Run], images: Tensor, heldout_images: Tensor, cfg: Any, train_fn: TrainFn,
               directory: Any, refresh: bool, workers: int, log: Callable[[str], None]) -> bool:
    """Trains the runs with missing artefacts in ``workers`` processes; True if it did any."""
    todo = [run for run in runs
            if refresh or any(not (directory / f"{run.tag}round{r}.pt").exists() for r in range(run.rounds))]
    if workers < 2 or len(todo) < 2:
        return False
    # Longest runs first (more rounds = more trainings): a greedy schedule of the pool.
    todo.sort(key=lambda run: -run.rounds)
    context = multiprocessing.get_context("spawn")  # fork + torch threads can deadlock
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), mp_context=context) as pool:
        futures = [pool.submit(_run_in_worker, run, images, heldout_images, cfg, train_fn, str(directory), refresh)
                   for run in todo]
        try:
            for future in concurrent.futures.as_completed(futures):
                log(f"trained {future.result() or 'main_'}rounds")
        except BaseException:
            pool.shutdown(cancel_futures=True)  # report a failed run now, not after the others
            raise
    return True


def run_rounds(cfg: Any, *, profile: str | None = None, rounds: int | None = None, clean: bool = True,
               controls: Sequence[str] = ("extra_noise", "biased"), train_fn: TrainFn = train_chain,
               refresh: bool = False, verbose: bool = False, workers: int = 1) -> RoundsResult:
    """The registration experiment: noisy labels, rounds of self-denoising, clean model, controls.

    Round r trains a chain on (images, labels_r) with fresh perturbations (labels_0 = the
    noisy labels); labels_{r+1} = that chain applied to the ORIGINAL noisy labels. Errors
    are per-vertex distances to the true polygons, on the training tiles (the set being
    denoised, as in the paper) and on held-out tiles (their own noisy labels, realigned by
    the same chains, never trained on).

    Args:
        cfg: the "registration" config: ``tile_size``, ``train_tiles``, ``heldout_tiles``,
            ``tile_seed`` (first scene seed), ``seed`` (noise and training), ``noise_px``,
            ``noise_cov_scale``, ``rounds``, ``extra_noise_factor``, ``control_rounds``,
            ``sweep_noise_factors``, plus `train_chain`'s keys.
        profile: with a profile, trained chains (and their realigned labels) are cached under
            ``config.cache_dir("registration", profile, cfg) / "<tag>round<r>.pt"`` (tag ""
            for the main rounds, "clean_", "extra_noise_", "biased_", "noise<f>_" for the
            sweep); None disables caching.
        rounds: overrides ``cfg.rounds``.
        clean: also train a chain on the true polygons and apply it to the noisy labels.
        controls: any of "extra_noise" (smooth noise ``extra_noise_factor`` times larger) and
            "biased" (every tile shifted by the same constant vector of norm = the measured
            median noise) and "inflated" (every building scaled about its centre, median
            vertex error = the measured median noise: `inflate_cadasters`), each run for
            ``cfg.control_rounds`` rounds; "sweep": one round on
            noise ``f`` times the main noise for each f in ``cfg.sweep_noise_factors`` (the
            gain against the perturbation-to-noise ratio; at least one factor needed).
        train_fn: ``(images, labels, cfg, seed=) -> TrainedChain``; a stub in tests (cached
            rounds must hold a `new_chain(cfg)`: the cache keeps its state dict).
        refresh: retrain even when cached.
        verbose: print one line per trained chain.
        workers: train independent runs (main rounds, clean, each control) in this many
            processes of `runtime.configure_threads`'s thread count each (1 unless
            ``$NETSIM_THREADS``); needs a ``profile`` (the processes hand their
            chains over through the cache) and a picklable ``train_fn``.

    Returns:
        A `RoundsResult`.

    Raises:
        ValueError: an unknown control, "sweep" without ``cfg.sweep_noise_factors``, or
            ``workers > 1`` without a profile.
    """
    unknown = set(controls) - {"extra_noise", "biased", "inflated", "sweep"}
    if unknown:
        raise ValueError(f"unknown controls {sorted(unknown)}; valid: 'extra_noise', 'biased', 'inflated', 'sweep'")
    if "sweep" in controls and not _get(cfg, "sweep_noise_factors", ()):
        raise ValueError("controls=('sweep',) needs cfg.sweep_noise_factors (the noise factors to sweep); "
                         "it has none, so the sweep would run nothing")
    if workers > 1 and profile is None:
        raise ValueError("workers > 1 hands chains over through the cache: give a profile")
    # One thread unless $NETSIM_THREADS says otherwise: on the 2-core machines two threads
    # made a training step of this net 20x slower (2.3 s vs 0.11 s, batch 8 of 64^2).
    runtime.configure_threads()
    n_rounds = int(_get(cfg, "rounds") if rounds is None else rounds)
    size, seed = int(_get(cfg, "tile_size")), int(_get(cfg, "seed", 0))
    tile_seed = int(_get(cfg, "tile_seed", 0))
    directory = config.cache_dir("registration", profile, cfg) if profile is not None else None
    log = print if verbose else (lambda message: None)

    n_train, n_heldout = int(_get(cfg, "train_tiles")), int(_get(cfg, "heldout_tiles", 0))
    images, truth = make_tiles(range(tile_seed, tile_seed + n_train), size)
    # Held-out scenes far from the training seeds, with their own noise draw.
    heldout_seed = tile_seed + HELDOUT_TILE_SEED_OFFSET
    heldout_images, heldout_truth = make_tiles(range(heldout_seed, heldout_seed + n_heldout), size)
    noise_px, cov_scale = float(_get(cfg, "noise_px")), float(_get(cfg, "noise_cov_scale", 0.015))

    def noisy_labels(amplitude: float, noise_seed: int, kind: str = "smooth") -> tuple[Tensor, list, list]:
        fields = label_noise_fields(n_train, size, amplitude, seed=noise_seed, kind=kind, cov_scale=cov_scale)
        heldout_fields = label_noise_fields(n_heldout, size, amplitude, seed=noise_seed + HELDOUT_NOISE_SEED_OFFSET,
                                            kind=kind, cov_scale=cov_scale) if n_heldout else fields[:0]
        if kind == "shift" and n_heldout:
            heldout_fields = fields[:1].expand(n_heldout, -1, -1, -1)  # the same bias everywhere
        return fields, move_cadasters(truth, fields), move_cadasters(heldout_truth, heldout_fields)

    fields, noisy, heldout_noisy = noisy_labels(noise_px, seed)
    noise = evaluate(noisy, truth)
    log(f"label noise: median {noise.median:.2f} px")
    runs = [_Run("", noisy, noisy, heldout_noisy, n_rounds, seed)]
    if clean:
        runs.append(_Run("clean_", truth, noisy, heldout_noisy, 1, seed + CLEAN_SEED_OFFSET))
    # name -> (noise factor or None, training labels, held-out labels, rounds)
    control_sets: dict[str, tuple[float | None, list, list, int]] = {}
    n_control = int(_get(cfg, "control_rounds", 1))
    for name in controls:
        if name == "extra_noise":
            factor = float(_get(cfg, "extra_noise_factor", 1.5))
            control_sets[name] = (factor, *noisy_labels(noise_px * factor, seed + EXTRA_NOISE_SEED_OFFSET)[1:],
                                  n_control)
        elif name == "biased":
            control_sets[name] = (None, *noisy_labels(noise.median, seed + BIASED_SEED_OFFSET, kind="shift")[1:],
                                  n_control)
        elif name == "inflated":
            control_sets[name] = (None, inflate_cadasters(truth, noise.median),
                                  inflate_cadasters(heldout_truth, noise.median) if n_heldout else [], n_control)
        else:
            for factor in _get(cfg, "sweep_noise_factors"):
                control_sets[f"noise{float(factor):g}"] = (
                    float(factor), *noisy_labels(noise_px * float(factor), seed + SWEEP_SEED_OFFSET)[1:], 1)
    for name, (_, control_noisy, control_heldout, control_rounds) in control_sets.items():
        runs.append(_Run(f"{name}_", control_noisy, control_noisy, control_heldout, control_rounds,
                         seed + CONTROL_TRAIN_SEED_OFFSET))

    if directory is not None and _train_all(runs, images, heldout_images, cfg, train_fn, directory, refresh,
                                            workers, log):
        refresh = False  # the workers just wrote fresh artefacts
    artefact = _artefacts(directory, refresh)

    heldout = HeldOutTiles(heldout_images, heldout_truth, heldout_noisy,
                           evaluate(heldout_noisy, heldout_truth) if n_heldout else None)

    def results(run: _Run) -> list[RoundResult]:
        out = []
        for r, trained in enumerate(_train_rounds(run, images, heldout_images, cfg, train_fn, artefact)):
            out.append(RoundResult(**{f.name: getattr(trained, f.name) for f in dataclasses.fields(trained)},
                                   training=evaluate(trained.labels, truth),
                                   heldout=evaluate(trained.heldout_labels, heldout_truth) if n_heldout else None))
            log(f"{run.tag or 'main '}round {r}: median {out[-1].training.median:.2f} px "
                f"(trained in {trained.seconds:.1f} s)")
        return out

    main_rounds = results(runs[0])
    clean_round = results(runs[1])[0] if clean else None
    control_results = {}
    for run, (name, (factor, control_noisy, control_heldout, _)) in zip(runs[1 + clean:], control_sets.items(),
                                                                         strict=True):
        control_results[name] = Control(factor, control_noisy, evaluate(control_noisy, truth),
                                        evaluate(control_heldout, heldout_truth) if n_heldout else None,
                                        results(run))
    return RoundsResult(images, truth, noisy, fields, noise, heldout, main_rounds, clean_round, control_results)

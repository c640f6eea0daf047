"""Patch data sets of the registration tiles, and what the registration network finds similar.

Paper section 6 (Figs. 6-7) and the talk's part IV compare training patches through the
registration network of each self-denoising round. This module builds those patches and
one chain stage's view of them, at that stage's scale (`patch_inputs(..., scale=)`);
notebooks 04-05 use each round's coarse stage (stage 0, downsampling 4: the config's
``neighbor_patches.stage``). The kernels themselves are the library's streaming functions
(`netsim.similarity`, `netsim.soft_density`, `netsim.diagnostics.kernel_sums`) applied to a
`PatchModel`.

Choices (the authors' where their code says, ours where it does not):

* Patches (`select_patches`): as the authors' ``sample_patches``, a regular grid of
  non-overlapping ``patch x patch`` cells per tile, shuffled by the seed, keeping the first
  ``per_tile`` cells that contain a building of the TRUE cadaster (the same patch set for
  every round). The authors' "contain" is ``require="whole"``: a polygon with every vertex in
  the closed square. Their patches were 124 px of 4x-downsampled Inria tiles (~500 px at full
  resolution); ours are 64 full-resolution px (16 px at the coarse stage's scale 4), where
  16-50 px buildings rarely fit whole in a grid cell (measured on 20 synthetic 256-px tiles:
  2.7 such cells per tile of 16, so 10 per tile is impossible). The default is therefore
  ``require="vertex"``: at least one true building corner inside the cell (a whole or partial
  building; 10 per tile there), which also makes the true correction below defined in practice.
  ``require="partial"`` accepts any cell where some pixel centre lies inside a true polygon.
* Network inputs (`patch_inputs`): the image crop and the crop of the raster of the ROUND's
  labels (round r is trained on ``noisy`` for r = 0 and ``rounds[r-1].labels`` after), each
  tile average-pooled / rasterised once at the stage's scale and then cropped (identical to
  rasterising the patch: the raster is pixel-local). Positions and patch sides stay in
  full-resolution pixels.
* Output (d = 2), `PatchModel`: "mean" over the output patch of each displacement channel
  (default); the authors took the "sum", which is ``patch**2`` times the mean: the same
  normalised kernels k^C (K scales by a constant, removed by the normalisation), but the
  mean stays in pixels. "centre": the displacement at the patch centre (bilinear: the mean
  of the 2 x 2 central pixels for an even side). "vertices": the mean displacement over the
  raster's vertex pixels, i.e. at the label corners -- the same support as the true
  correction y below, so predictions and targets are comparable in the denoising analysis.
  Every output is in pixels of the stage's scale: multiply by the scale to compare it with
  y (full-resolution pixels), or divide y by it.
* True correction (`patch_corrections`): y_i = mean over the label vertices inside the patch
  (half-open square ``[x0, x0 + p) x [y0, y0 + p)``) of (truth - label), in full-resolution
  pixels: the displacement that would align those labels. Label polygons correspond vertex
  by vertex to the true ones. Patches without a label vertex inside (the labels moved away
  from the true building) use the label vertex nearest to the patch by default (``empty="nearest"``, and
  flagged), or NaN (``"nan"``: excluded from the neighbour scores), or raise.
* Self-denoising terms (`netsim.diagnostics.self_denoising`): a patch input is (image, raster
  of the round's labels), unperturbed. Training pairs are those labels moved by ψ with target
  ψ, so for this input the training target is ỹ_i = 0 (training takes the labels as aligned)
  while the true target is y_i (the correction above): the label noise, as a displacement, is
  ε_i = ỹ_i - y_i = -y_i, and ŷ_i is the `PatchModel` output. Use the same output for ŷ and
  for the kernels ("vertices" shares y's support; "mean" also averages the field over the
  background, where the loss weights are 0). The network is trained on perturbed crops, not
  on these patches, so the convergence term E_k[ŷ] - E_k[ỹ] need not vanish: report it.
* Other similarities (`perceptual_neg_distances`, `pixel_neg_distances`): pretrained VGG
  weights cannot be downloaded here, so the "perceptual" similarity is the L2 distance
  between activations of a fixed intermediate level of the registration network's OWN image
  encoder (a network trained on these very images, unlike ImageNet's VGG); and plain pixel
  L2. Both are returned as negated distances so that higher = more similar, like k^C.

Cost (measured at scale 1, before the notebooks moved to the coarse stage: default
``RegistrationNet`` widths (16, 32, 64) without normalisation, 64-px inputs, one thread,
layer-wise engine; the coarse stage's 16-px inputs cost less): ~50-60 ms per patch
Jacobian, so one pass over 3600 patches (a query's k^C row, a block of up to ~200 queries'
rows, or the soft density's) takes minutes, while the all-pairs `kernel_sums` (row blocks
of ~200 patches in the default 512 MB) needs about N / 400 such passes: evaluate the
denoising factor at a subset of queries (``query_index``, one pass for up to ~200 of them),
each query still averaging over all N patches.

Example:
    >>> import torch
    >>> from netsim_paper.registration.model import RegistrationNet
    >>> square = torch.tensor([[10.0, 10.0], [30.0, 10.0], [30.0, 30.0], [10.0, 30.0]], dtype=torch.float64)
    >>> positions = select_patches([[square]], 64, per_tile=2, patch=32, seed=0)
    >>> positions.tolist()                       # (tile, y0, x0): the only cell holding the square
    [[0, 0, 0]]
    >>> images, rasters = patch_inputs(torch.rand(1, 3, 64, 64), [[square]], positions, 32)
    >>> model = PatchModel(RegistrationNet(channels=(4, 8), zero_init=False), output="mean")
    >>> model(pack(images, rasters)).shape
    torch.Size([1, 2])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from netsim import without_inplace
from netsim.diagnostics import predictions
from netsim.neighbours import neg_l2_distances
from netsim_paper.registration.geometry import as_polygon, rasterize
from netsim_paper.registration.model import downsample_image

__all__ = [
    "OUTPUTS",
    "PatchCorrections",
    "PatchModel",
    "encoder_features",
    "fill_fraction",
    "pack",
    "patch_corrections",
    "patch_inputs",
    "patch_outputs",
    "perceptual_neg_distances",
    "pixel_neg_distances",
    "select_patches",
]

#: The d = 2 outputs a `PatchModel` can give (see the module docstring).
OUTPUTS = ("mean", "sum", "centre", "vertices")
REQUIRE = ("whole", "vertex", "partial")
EMPTY = ("nearest", "nan", "raise")

Cadaster = Sequence[Tensor]


def _tile_size(size) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"tile size must be positive, got {(height, width)}")
    return height, width


def _check_positions(positions: Tensor, n_tiles: int, patch: int, height: int, width: int) -> Tensor:
    positions = torch.as_tensor(positions, dtype=torch.long).cpu()
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must be (P, 3) rows (tile, y0, x0), got {tuple(positions.shape)}")
    if positions.shape[0] == 0:
        raise ValueError("positions is empty: no patch selected")
    tile, y0, x0 = positions.unbind(1)
    bad = (tile < 0) | (tile >= n_tiles) | (y0 < 0) | (x0 < 0) | (y0 + patch > height) | (x0 + patch > width)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten().tolist()
        raise ValueError(f"patches {rows[:20]} do not fit: tile index in [0, {n_tiles}) and the {patch}-px square "
                         f"inside the {height} x {width} tile are required")
    return positions


def select_patches(cadasters: Sequence[Cadaster], size, *, per_tile: int = 10, patch: int = 64,
                   stride: int | None = None, seed: int = 0, require: str = "vertex") -> Tensor:
    """Patch positions holding at least one building, ``per_tile`` per tile (the authors' sampling).

    Each tile's grid of cells (top-left corners ``0, stride, 2 stride, ...``; default stride =
    patch: non-overlapping, as the authors) is shuffled by a generator seeded with
    ``(seed, tile)`` -- so a tile's patches do not depend on the other tiles -- and the first
    ``per_tile`` cells that hold a building are kept (fewer when the tile has fewer).

    Args:
        cadasters: N TRUE cadasters (lists of ``(n, 2)`` (x, y) polygons in pixels).
        size: tile size, an int or ``(H, W)``.
        per_tile: patches per tile at most.
        patch: side of the square patches in pixels.
        stride: grid spacing (default ``patch``).
        seed: seeds the shuffles.
        require: what "holds a building" means (see the module docstring): "vertex" (default:
            a polygon vertex in the half-open square ``[x0, x0 + p) x [y0, y0 + p)``),
            "whole" (the authors' rule: a polygon with every vertex in the closed square) or
            "partial" (some pixel centre of the cell inside a polygon).

    Returns:
        ``(P, 3)`` long rows ``(tile, y0, x0)``, tile by tile, in sampling order.

    Raises:
        ValueError: a patch larger than the tile, bad arguments, or no building in any cell.
    """
    height, width = _tile_size(size)
    if require not in REQUIRE:
        raise ValueError(f"require must be one of {REQUIRE}, got {require!r}")
    if patch < 1 or per_tile < 1:
        raise ValueError(f"patch and per_tile must be >= 1, got patch={patch}, per_tile={per_tile}")
    if patch > height or patch > width:
        raise ValueError(f"patch {patch} px is larger than the {height} x {width} tile")
    stride = patch if stride is None else int(stride)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if len(cadasters) == 0:
        raise ValueError("no tile: cadasters is empty")
    cells = np.array([(y0, x0) for y0 in range(0, height - patch + 1, stride)
                      for x0 in range(0, width - patch + 1, stride)])
    rows = []
    for tile, cadaster in enumerate(cadasters):
        polygons = [as_polygon(p, name=f"tile {tile} polygon {i}") for i, p in enumerate(cadaster)]
        if not polygons:
            continue
        order = np.random.default_rng([int(seed), tile]).permutation(len(cells))
        if require == "whole":
            lo = torch.stack([p.min(0).values for p in polygons]).numpy()     # (B, 2) (x, y)
            hi = torch.stack([p.max(0).values for p in polygons]).numpy()
        elif require == "vertex":
            corners = torch.cat(polygons).numpy()                             # (V, 2) (x, y)
        else:
            fill = rasterize(polygons, height, width)[0] > 0.5
        kept = 0
        for index in order:
            y0, x0 = (int(v) for v in cells[index])
            if require == "whole":
                holds = bool(np.any((lo[:, 0] >= x0) & (lo[:, 1] >= y0) & (hi[:, 0] <= x0 + patch)
                                    & (hi[:, 1] <= y0 + patch)))
            elif require == "vertex":
                holds = bool(np.any((corners[:, 0] >= x0) & (corners[:, 0] < x0 + patch)
                                    & (corners[:, 1] >= y0) & (corners[:, 1] < y0 + patch)))
            else:
                holds = bool(fill[y0:y0 + patch, x0:x0 + patch].any())
            if holds:
                rows.append((tile, y0, x0))
                kept += 1
                if kept == per_tile:
                    break
    if not rows:
        rule = {"whole": "wholly inside", "vertex": "with a corner inside", "partial": "partly inside"}[require]
        raise ValueError(f"no {patch}-px cell (stride {stride}) of any of the {len(cadasters)} tiles has a building "
                         f"{rule}: use smaller patches, require='partial', or tiles with buildings")
    return torch.tensor(rows, dtype=torch.long)


def patch_inputs(images: Tensor, labels: Sequence[Cadaster], positions: Tensor, patch: int, *,
                 scale: int = 1) -> tuple[Tensor, Tensor]:
    """The network inputs of each patch: image crop and the crop of the labels' raster.

    Each tile that has a patch is rasterised once (`rasterize`, fill / edge / vertex channels,
    at the given scale) and cropped; the result equals rasterising each patch on its own.

    Args:
        images: ``(N, 3, H, W)`` tiles in [0, 1].
        labels: N cadasters whose raster the network sees (the round's training labels).
        positions: ``(P, 3)`` rows ``(tile, y0, x0)`` from `select_patches`, full-resolution px.
        patch: side p, full-resolution px.
        scale: the downsampling factor of the stage that will see the patches (a chain stage
            at scale s sees images average-pooled by s and rasters drawn at 1/s): ``y0``, ``x0``
            and ``p`` must be multiples of it.

    Returns:
        image patches ``(P, 3, p/s, p/s)`` and raster patches ``(P, 3, p/s, p/s)``, float32.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    if len(labels) != images.shape[0]:
        raise ValueError(f"{len(labels)} label cadasters for {images.shape[0]} images")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    height, width = images.shape[-2:]
    positions = _check_positions(positions, images.shape[0], patch, height, width)
    if patch % scale or bool((positions[:, 1:] % scale).any()):
        raise ValueError(f"patch {patch} and every patch corner must be multiples of scale {scale}")
    side = patch // scale
    image_patches = torch.empty(len(positions), 3, side, side, dtype=torch.float32)
    raster_patches = torch.empty_like(image_patches)
    for tile in torch.unique(positions[:, 0]).tolist():
        where = torch.nonzero(positions[:, 0] == tile).flatten()
        raster = rasterize(labels[tile], height, width, scale=1.0 / scale)
        image = downsample_image(images[tile], scale)
        for i in where.tolist():
            _, y0, x0 = (v // scale for v in positions[i].tolist())
            image_patches[i] = image[:, y0:y0 + side, x0:x0 + side]
            raster_patches[i] = raster[:, y0:y0 + side, x0:x0 + side]
    return image_patches, raster_patches


def pack(image_patches: Tensor, raster_patches: Tensor) -> Tensor:
    """``(P, 6, p, p)``: image and raster channels in one tensor, the input of a `PatchModel`."""
    if image_patches.ndim != 4 or image_patches.shape[1] != 3 or raster_patches.shape != image_patches.shape:
        raise ValueError(f"image and raster patches must both be (P, 3, p, p), got {tuple(image_patches.shape)} "
                         f"and {tuple(raster_patches.shape)}")
    return torch.cat([image_patches, raster_patches], 1)


class PatchModel(nn.Module):
    """A registration network seen as a one-input model with a d = 2 output, for the kernels.

    ``netsim.similarity``, ``soft_density``, ``diagnostics.kernel_sums`` and both kernel
    engines take a model of ONE input tensor; a registration net takes (image, raster). This
    wrapper takes the packed ``(B, 6, p, p)`` tensor (`pack`), calls ``net(image, raster)`` and
    reduces the ``(B, 2, p, p)`` field to ``(B, 2)`` (`OUTPUTS`). The parameters are the net's
    net's own values in a copy whose activations compute out of place (`netsim.without_inplace`:
    the layer-wise engine reads each layer's output after the forward pass, which an in-place
    ReLU would overwrite); freeze parameters before wrapping. Kernels of the wrapper are kernels
    of the net.

    Args:
        net: ``(image (B, 3, p, p), raster (B, 3, p, p)) -> (B, 2, p, p)``, e.g.
            ``result.rounds[r].chain.stages[s]`` in eval mode, fed patches made by
            `patch_inputs` at that stage's scale ``scales[s]`` (notebooks 04-05: s = 0, the
            coarse stage).
        output: "mean" (default), "sum" (the authors'), "centre" or "vertices".

    With "vertices", a patch whose raster has no vertex pixel has output 0 and a zero
    gradient: the normalised kernels then raise `netsim.ZeroGradientError` naming it. Keep
    the patches with ``patch_corrections(...).count > 0`` (a label vertex inside implies
    vertex pixels inside); on the smoke registration run 2 of 79 patches had none.
    """

    def __init__(self, net: nn.Module, output: str = "mean"):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.net = without_inplace(net)
        self.output = output

    def field(self, packed: Tensor) -> Tensor:
        """``(B, 2, p, p)`` the net's displacement field (pixels) on packed patches."""
        if packed.ndim != 4 or packed.shape[1] != 6:
            raise ValueError(f"PatchModel takes packed (B, 6, p, p) patches (image then raster channels, "
                             f"see pack), got {tuple(packed.shape)}")
        return self.net(packed[:, :3], packed[:, 3:])

    def forward(self, packed: Tensor) -> Tensor:
        """``(B, 6, p, p) -> (B, 2)`` the reduced output (see `OUTPUTS`)."""
        field = self.field(packed)
        if self.output == "mean":
            return field.mean((2, 3))
        if self.output == "sum":
            return field.sum((2, 3))
        if self.output == "centre":
            h, w = field.shape[-2:]
            rows = slice(h // 2 - 1, h // 2 + 1) if h % 2 == 0 else slice(h // 2, h // 2 + 1)
            cols = slice(w // 2 - 1, w // 2 + 1) if w % 2 == 0 else slice(w // 2, w // 2 + 1)
            return field[:, :, rows, cols].mean((2, 3))
        weights = packed[:, 5]                                     # the raster's vertex channel
        total = weights.sum((1, 2))
        return (field * weights[:, None]).sum((2, 3)) / total.clamp_min(1e-12)[:, None]


def patch_outputs(net: nn.Module, image_patches: Tensor, raster_patches: Tensor, *, output: str = "mean",
                  batch_size: int = 64) -> Tensor:
    """``(P, 2)`` the network's reduced output ŷ on each patch (no gradients), in pixels.

    Raises:
        ValueError: with ``output="vertices"``, patches whose raster has no vertex pixel.
    """
    packed = pack(image_patches, raster_patches)
    if output == "vertices":
        empty = torch.nonzero(raster_patches[:, 2].sum((1, 2)) == 0).flatten()
        if empty.numel():
            raise ValueError(f"patches {empty.tolist()[:20]} have no vertex pixel: "
                             "output='vertices' is undefined there")
    device = next(net.parameters()).device
    return predictions(PatchModel(net, output), packed.to(device), batch_size=batch_size).cpu()


@dataclass
class PatchCorrections:
    """The true correction of each patch's labels.

    Attributes:
        y: ``(P, 2)`` float64 mean of (truth - label) over the label vertices inside the patch,
            pixels (dx, dy); NaN rows for empty patches with ``empty="nan"``.
        count: ``(P,)`` number of label vertices inside the patch.
        fallback: ``(P,)`` bool, patches whose y comes from the nearest vertex outside.
    """

    y: Tensor
    count: Tensor
    fallback: Tensor


def patch_corrections(truth: Sequence[Cadaster], labels: Sequence[Cadaster], positions: Tensor, patch: int, *,
                      empty: str = "nearest") -> PatchCorrections:
    """The true correction y_i of each patch: mean over its label vertices of (truth - label).

    A vertex ``(x, y)`` is inside the patch ``(tile, y0, x0)`` when ``x0 <= x < x0 + p`` and
    ``y0 <= y < y0 + p``.

    Args:
        truth: N true cadasters.
        labels: N label cadasters, polygon by polygon and vertex by vertex the true ones moved.
        positions: ``(P, 3)`` rows ``(tile, y0, x0)``.
        patch: side p.
        empty: patches with no label vertex inside: "nearest" (the correction of the label
            vertex nearest to the square; flagged in ``fallback``), "nan", or "raise".

    Returns:
        `PatchCorrections`.

    Raises:
        ValueError: cadasters that do not correspond, or empty patches with ``empty="raise"``.
    """
    if empty not in EMPTY:
        raise ValueError(f"empty must be one of {EMPTY}, got {empty!r}")
    if len(truth) != len(labels):
        raise ValueError(f"{len(truth)} true cadasters for {len(labels)} label cadasters")
    positions = torch.as_tensor(positions, dtype=torch.long).cpu()
    if positions.ndim != 2 or positions.shape[1] != 3 or positions.shape[0] == 0:
        raise ValueError(f"positions must be a non-empty (P, 3) array of (tile, y0, x0), got {tuple(positions.shape)}")
    if bool(((positions[:, 0] < 0) | (positions[:, 0] >= len(truth))).any()):
        raise ValueError(f"tile indices must lie in [0, {len(truth)})")
    y = torch.full((len(positions), 2), float("nan"), dtype=torch.float64)
    count = torch.zeros(len(positions), dtype=torch.long)
    fallback = torch.zeros(len(positions), dtype=torch.bool)
    for tile in torch.unique(positions[:, 0]).tolist():
        true_tile, label_tile = truth[tile], labels[tile]
        if len(true_tile) != len(label_tile):
            raise ValueError(f"tile {tile}: {len(true_tile)} true polygons for {len(label_tile)} labels")
        shapes = [(torch.as_tensor(t).shape, torch.as_tensor(lab).shape)
                  for t, lab in zip(true_tile, label_tile, strict=True)]
        mismatched = [i for i, (a, b) in enumerate(shapes) if a != b]
        if mismatched:
            raise ValueError(f"tile {tile}: polygons {mismatched[:10]} differ in vertex count between truth and labels")
        if not label_tile:
            vertices = torch.zeros(0, 2, dtype=torch.float64)
            corrections = vertices
        else:
            vertices = torch.cat([torch.as_tensor(p, dtype=torch.float64) for p in label_tile])
            corrections = torch.cat([torch.as_tensor(p, dtype=torch.float64) for p in true_tile]) - vertices
        for i in torch.nonzero(positions[:, 0] == tile).flatten().tolist():
            _, y0, x0 = positions[i].tolist()
            inside = ((vertices[:, 0] >= x0) & (vertices[:, 0] < x0 + patch)
                      & (vertices[:, 1] >= y0) & (vertices[:, 1] < y0 + patch))
            count[i] = int(inside.sum())
            if count[i] > 0:
                y[i] = corrections[inside].mean(0)
            elif empty == "raise":
                raise ValueError(f"patch {i} (tile {tile}, y0 {y0}, x0 {x0}) holds no label vertex; "
                                 "pass empty='nearest' or 'nan'")
            elif empty == "nearest":
                if len(vertices) == 0:
                    raise ValueError(f"patch {i}: tile {tile} has no label polygon to fall back on")
                lo = vertices.new_tensor([x0, y0])
                gap = (vertices - vertices.clamp(lo, lo + patch)).norm(dim=1)   # distance to the square
                y[i] = corrections[int(torch.argmin(gap))]
                fallback[i] = True
    return PatchCorrections(y=y, count=count, fallback=fallback)


def fill_fraction(raster_patches: Tensor) -> Tensor:
    """``(P,)`` building density: the fraction of the patch's pixels in the raster's fill channel."""
    if raster_patches.ndim != 4 or raster_patches.shape[1] != 3:
        raise ValueError(f"raster patches must be (P, 3, p, p), got {tuple(raster_patches.shape)}")
    return raster_patches[:, 0].double().mean((1, 2))


def _encoder_level(net: nn.Module, level: int | None) -> int:
    for name in ("image_encoder", "raster_encoder", "channels"):
        if not hasattr(net, name):
            raise TypeError(f"{type(net).__name__} has no {name!r}: the perceptual similarity reads the encoders "
                            "of a netsim_paper.registration.model.RegistrationNet")
    levels = len(net.channels)
    level = levels // 2 if level is None else int(level)
    if not 0 <= level < levels:
        raise ValueError(f"level must lie in [0, {levels}) for channels {net.channels}, got {level}")
    return level


def encoder_features(net: nn.Module, image_patches: Tensor, raster_patches: Tensor | None = None, *,
                     level: int | None = None, branches: Sequence[str] = ("image",)) -> Tensor:
    """``(B, F)`` flattened activations of one level of the registration net's own encoders.

    The image branch sees ``image - 0.5`` exactly as in ``RegistrationNet.forward``.

    Args:
        net: a `RegistrationNet`.
        image_patches: ``(B, 3, p, p)``.
        raster_patches: ``(B, 3, p, p)``, needed when "raster" is in ``branches``.
        level: encoder level (0 = finest, after the first conv block); default the middle one,
            ``len(channels) // 2`` (level 1 of 3: like VGG's intermediate layers, both local
            texture and some context).
        branches: "image" (default: a perceptual loss looks at the image only) and/or "raster".
    """
    level = _encoder_level(net, level)
    unknown = set(branches) - {"image", "raster"}
    if unknown or not branches:
        raise ValueError(f"branches must be a non-empty subset of ('image', 'raster'), got {tuple(branches)}")
    device = next(net.parameters()).device
    parts = []
    net = without_inplace(net)   # each level's features, not what a later in-place ReLU made of them
    with torch.no_grad():
        if "image" in branches:
            parts.append(net.image_encoder(image_patches.to(device) - 0.5)[level].flatten(1))
        if "raster" in branches:
            if raster_patches is None:
                raise ValueError("branches include 'raster' but no raster_patches were given")
            parts.append(net.raster_encoder(raster_patches.to(device))[level].flatten(1))
    return torch.cat(parts, 1).cpu()


def perceptual_neg_distances(net: nn.Module, image_patches: Tensor, raster_patches: Tensor | None = None, *,
                             query_index: Tensor | None = None, level: int | None = None,
                             branches: Sequence[str] = ("image",), batch_size: int = 64) -> Tensor:
    """``(Q, P)`` minus the L2 distance between encoder activations ("perceptual loss" similarity).

    Streams the P patches in batches: only the queries' features are held.

    Args:
        net, level, branches: see `encoder_features`.
        image_patches, raster_patches: ``(P, 3, p, p)``.
        query_index: ``(Q,)`` query rows (default: all P, then ``(P, P)``).
        batch_size: patches per forward pass.
    """
    n = image_patches.shape[0]
    if n == 0:
        raise ValueError("no patch")
    rows = torch.arange(n) if query_index is None else torch.as_tensor(query_index, dtype=torch.long).flatten()

    def features(index):
        return encoder_features(net, image_patches[index], None if raster_patches is None else raster_patches[index],
                                level=level, branches=branches).double()

    queries = torch.cat([features(rows[s:s + batch_size]) for s in range(0, len(rows), batch_size)])
    blocks = [torch.cdist(queries, features(torch.arange(s, min(n, s + batch_size))))
              for s in range(0, n, batch_size)]
    return -torch.cat(blocks, 1)


def pixel_neg_distances(image_patches: Tensor, *, query_index: Tensor | None = None) -> Tensor:
    """``(Q, P)`` minus the L2 distance between the patches' pixels (RGB, flattened)."""
    if image_patches.ndim != 4:
        raise ValueError(f"image patches must be (P, 3, p, p), got {tuple(image_patches.shape)}")
    return neg_l2_distances(image_patches, query_index)

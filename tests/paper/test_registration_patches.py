"""Registration patches: selection, inputs, the PatchModel wrapper under both kernel engines,
true corrections, and the alternative (perceptual, pixel) similarities."""

import pytest
import torch

import netsim
from conftest import reference_jacobians
from netsim import diagnostics
from netsim_paper.registration import patches
from netsim_paper.registration.geometry import rasterize
from netsim_paper.registration.model import RegistrationNet
from netsim_paper.registration.train import label_noise_fields, make_tiles, move_cadasters


def square(x0, y0, side):
    return torch.tensor([[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]], dtype=torch.float64)


@pytest.fixture(scope="module")
def tiles():
    """Three small synthetic tiles, their truth and labels shifted by one constant vector."""
    images, truth = make_tiles(range(3), size=128)
    fields = label_noise_fields(3, 128, 3.0, seed=0, kind="shift")
    return images, truth, move_cadasters(truth, fields), fields[0, :, 0, 0].double()


def small_net(seed=0):
    torch.manual_seed(seed)
    return RegistrationNet(channels=(4, 8), zero_init=False).eval()


def packed_patches(n=6, p=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, p, p, generator=g)
    rasters = (torch.rand(n, 3, p, p, generator=g) > 0.6).float()
    return patches.pack(images, rasters)


# ----------------------------------------------------------------------------------------- selection

def inside(p, x0, y0, side, closed):
    upper = (p[:, 0] <= x0 + side) & (p[:, 1] <= y0 + side) if closed else \
        (p[:, 0] < x0 + side) & (p[:, 1] < y0 + side)
    return (p[:, 0] >= x0) & (p[:, 1] >= y0) & upper


def test_select_patches_holds_a_true_corner_and_is_deterministic(tiles):
    _, truth, _, _ = tiles
    pos = patches.select_patches(truth, 128, per_tile=3, patch=32, seed=5)
    assert pos.dtype == torch.long and pos.shape[1] == 3
    assert torch.equal(pos, patches.select_patches(truth, 128, per_tile=3, patch=32, seed=5))
    assert not torch.equal(pos, patches.select_patches(truth, 128, per_tile=3, patch=32, seed=6))
    assert torch.bincount(pos[:, 0], minlength=3).tolist() == [3, 3, 3]
    assert (pos[:, 1] % 32 == 0).all() and (pos[:, 2] % 32 == 0).all()     # the authors' grid
    assert len({tuple(r) for r in pos.tolist()}) == len(pos)
    for tile, y0, x0 in pos.tolist():
        assert any(bool(inside(p, x0, y0, 32, closed=False).any()) for p in truth[tile])
    # a tile's patches do not depend on the other tiles (the shuffle is seeded by (seed, tile))
    fewer = patches.select_patches([truth[0], truth[1], []], 128, per_tile=3, patch=32, seed=5)
    assert torch.equal(fewer, pos[pos[:, 0] < 2])


def test_select_patches_whole_rule_is_the_authors(tiles):
    _, truth, _, _ = tiles
    pos = patches.select_patches(truth, 128, per_tile=4, patch=64, stride=32, seed=0, require="whole")
    assert len(pos) > 0
    for tile, y0, x0 in pos.tolist():
        assert any(bool(inside(p, x0, y0, 64, closed=True).all()) for p in truth[tile])


def test_select_patches_rules_whole_versus_partial():
    # a triangle across all four 32-px cells, with corners in three of them
    big = torch.tensor([[10.0, 10.0], [60.0, 10.0], [10.0, 60.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="no 32-px cell .* wholly inside"):
        patches.select_patches([[big]], 64, patch=32, require="whole")
    pos = patches.select_patches([[big]], 64, patch=32, require="partial", per_tile=10)
    assert sorted(map(tuple, pos[:, 1:].tolist())) == [(0, 0), (0, 32), (32, 0), (32, 32)]
    pos = patches.select_patches([[big]], 64, patch=32, require="vertex", per_tile=10)
    assert sorted(map(tuple, pos[:, 1:].tolist())) == [(0, 0), (0, 32), (32, 0)]
    small = square(40.0, 8.0, 10.0)
    for rule in patches.REQUIRE:
        assert patches.select_patches([[small]], 64, patch=32, require=rule).tolist() == [[0, 0, 32]]


def test_select_patches_errors():
    with pytest.raises(ValueError, match="larger than"):
        patches.select_patches([[square(1.0, 1.0, 3.0)]], 32, patch=64)
    with pytest.raises(ValueError, match="no 16-px cell"):
        patches.select_patches([[], []], 32, patch=16)
    with pytest.raises(ValueError, match="require"):
        patches.select_patches([[square(1.0, 1.0, 3.0)]], 32, patch=16, require="any")
    with pytest.raises(ValueError, match="empty"):
        patches.select_patches([], 32, patch=16)


# ----------------------------------------------------------------------------------------- inputs

def test_patch_inputs_equal_per_patch_rasterisation(tiles):
    images, truth, labels, _ = tiles
    pos = patches.select_patches(truth, 128, per_tile=2, patch=32, seed=1)
    image_patches, raster_patches = patches.patch_inputs(images, labels, pos, 32)
    assert image_patches.shape == raster_patches.shape == (len(pos), 3, 32, 32)
    for i, (tile, y0, x0) in enumerate(pos.tolist()):
        torch.testing.assert_close(image_patches[i], images[tile, :, y0:y0 + 32, x0:x0 + 32])
        shifted = [p - p.new_tensor([x0, y0]) for p in labels[tile]]
        torch.testing.assert_close(raster_patches[i], rasterize(shifted, 32, 32))


def test_patch_inputs_at_a_stage_scale_are_what_the_stage_sees(tiles):
    # A chain stage at scale s sees the tile average-pooled by s and the raster drawn at 1/s
    # (RegistrationChain.stage_field): the patch must be the same crop of those.
    images, truth, labels, _ = tiles
    pos = patches.select_patches(truth, 128, per_tile=2, patch=32, seed=1)
    image_patches, raster_patches = patches.patch_inputs(images, labels, pos, 32, scale=4)
    assert image_patches.shape == raster_patches.shape == (len(pos), 3, 8, 8)
    for i, (tile, y0, x0) in enumerate(pos.tolist()):
        small = torch.nn.functional.avg_pool2d(images[tile], 4)
        torch.testing.assert_close(image_patches[i], small[:, y0 // 4:y0 // 4 + 8, x0 // 4:x0 // 4 + 8])
        raster = rasterize(labels[tile], 128, 128, scale=0.25)
        torch.testing.assert_close(raster_patches[i], raster[:, y0 // 4:y0 // 4 + 8, x0 // 4:x0 // 4 + 8])
    with pytest.raises(ValueError, match="multiples of scale 3"):
        patches.patch_inputs(images, labels, pos, 32, scale=3)


def test_patch_inputs_errors(tiles):
    images, truth, labels, _ = tiles
    with pytest.raises(ValueError, match="empty"):
        patches.patch_inputs(images, labels, torch.zeros(0, 3, dtype=torch.long), 32)
    with pytest.raises(ValueError, match=r"patches \[0\] do not fit"):
        patches.patch_inputs(images, labels, torch.tensor([[0, 100, 0]]), 32)
    with pytest.raises(ValueError, match="label cadasters"):
        patches.patch_inputs(images, labels[:2], torch.tensor([[0, 0, 0]]), 32)
    with pytest.raises(ValueError, match=r"\(P, 3\)"):
        patches.patch_inputs(images, labels, torch.tensor([0, 0, 0]), 32)


# ----------------------------------------------------------------------------------------- PatchModel

@pytest.mark.parametrize("output", ["mean", "centre", "vertices"])
def test_patch_model_outputs(output):
    net = small_net()
    x = packed_patches(n=4, p=8)
    field = net(x[:, :3], x[:, 3:])
    got = patches.PatchModel(net, output)(x)
    if output == "mean":
        expected = field.mean((2, 3))
    elif output == "centre":
        expected = field[:, :, 3:5, 3:5].mean((2, 3))
    else:
        w = x[:, 5]
        expected = (field * w[:, None]).sum((2, 3)) / w.sum((1, 2))[:, None]
    torch.testing.assert_close(got, expected)
    assert all(m.inplace for m in net.modules() if hasattr(m, "inplace"))   # flags restored


def test_patch_model_rejects_bad_input():
    with pytest.raises(ValueError, match="output must be"):
        patches.PatchModel(small_net(), "max")
    with pytest.raises(ValueError, match=r"\(B, 6, p, p\)"):
        patches.PatchModel(small_net())(torch.rand(2, 3, 8, 8))


@pytest.mark.parametrize("output", ["mean", "centre"])
def test_both_engines_match_per_sample_autograd(output):
    """k^C and the unnormalised 2 x 2 kernels from both engines = a plain autograd loop."""
    model = patches.PatchModel(small_net(3), output)
    x = packed_patches(n=5, p=8, seed=3)
    J = reference_jacobians(model, x).double()                      # (N, 2, p)
    K_ref = torch.einsum("iap,jbp->ijab", J, J)
    kc_ref = netsim.similarity_from_jacobians(J)
    for method in ("layerwise", "jacobian"):
        K = netsim.similarity(model, x, kind="inner", reduce="none", method=method, chunk_size=2)
        torch.testing.assert_close(K.double(), K_ref, rtol=2e-4, atol=1e-6 * K_ref.abs().max())
        kc = netsim.similarity(model, x, method=method, chunk_size=2)
        torch.testing.assert_close(kc.double(), kc_ref, rtol=1e-4, atol=1e-5)
    # the layer-wise rules accept every layer (UnsupportedModel otherwise); `auto` measures
    assert netsim.engine.engine_for(model, x, method="layerwise").name == "layerwise"


def test_sum_and_mean_outputs_give_the_same_correlation_kernel():
    """The authors' sum is p^2 times the mean: K scales by p^4, k^C does not move."""
    net, x, p = small_net(4), packed_patches(n=5, p=8, seed=4), 8
    mean, total = patches.PatchModel(net, "mean"), patches.PatchModel(net, "sum")
    torch.testing.assert_close(netsim.similarity(mean, x), netsim.similarity(total, x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(netsim.similarity(mean, x, reduce="rot"), netsim.similarity(total, x, reduce="rot"),
                               rtol=1e-4, atol=1e-5)
    k_mean = netsim.similarity(mean, x, kind="inner", reduce="none").double()
    k_sum = netsim.similarity(total, x, kind="inner", reduce="none").double()
    torch.testing.assert_close(k_sum, p ** 4 * k_mean, rtol=1e-4, atol=1e-6 * k_sum.abs().max())


def test_soft_density_and_kernel_sums_of_patch_model():
    model = patches.PatchModel(small_net(5), "mean")
    x = packed_patches(n=6, p=8, seed=5)
    kc = netsim.similarity(model, x, method="layerwise")
    # the identities notebook 04 used to assert, on the patch model itself
    torch.testing.assert_close(kc, kc.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(kc.diagonal(), torch.ones(6), rtol=0, atol=1e-4)
    assert float(kc.abs().max()) <= 1 + 1e-4
    # (soft_density's two engines are compared in test_density; its forward-mode pass is slow to warm up)
    torch.testing.assert_close(netsim.soft_density(model, x), kc.sum(1), rtol=1e-4, atol=1e-4)
    J = reference_jacobians(model, x).double()
    K = torch.einsum("iap,jbp->ijab", J, J)
    a = torch.randn(6, 2, dtype=torch.float64)
    for method in ("layerwise", "jacobian"):
        sums = diagnostics.kernel_sums(model, x, {"a": a}, method=method, chunk_size=4)
        torch.testing.assert_close(sums.total, K.sum(1), rtol=1e-4, atol=1e-6 * K.abs().max())
        torch.testing.assert_close(sums.second_moment, torch.einsum("ijab,ijcb->iac", K, K), rtol=1e-4,
                                   atol=1e-6 * K.abs().max() ** 2)
        expected = torch.linalg.solve(K.sum(1), torch.einsum("ijab,jb->ia", K, a))
        torch.testing.assert_close(sums.averages()["a"], expected, rtol=1e-3, atol=1e-6)


def test_vertices_output_without_vertex_pixels_is_a_named_zero_gradient():
    x = packed_patches(n=3, p=8, seed=6)
    x[1, 5] = 0.0                                                   # patch 1: no vertex pixel
    model = patches.PatchModel(small_net(6), "vertices")
    with pytest.raises(netsim.ZeroGradientError, match=r"indices 1\b"):
        netsim.similarity(model, x)
    with pytest.raises(ValueError, match=r"patches \[1\] have no vertex pixel"):
        patches.patch_outputs(model.net, x[:, :3], x[:, 3:], output="vertices")


def test_patch_outputs_match_the_model():
    net = small_net(7)
    x = packed_patches(n=5, p=8, seed=7)
    got = patches.patch_outputs(net, x[:, :3], x[:, 3:], output="centre", batch_size=2)
    torch.testing.assert_close(got, patches.PatchModel(net, "centre")(x).detach())


# ----------------------------------------------------------------------------------------- corrections

def test_patch_corrections_recover_a_constant_shift(tiles):
    _, truth, labels, shift = tiles
    pos = patches.select_patches(truth, 128, per_tile=3, patch=32, seed=2)
    corr = patches.patch_corrections(truth, labels, pos, 32)
    assert corr.y.shape == (len(pos), 2) and corr.y.dtype == torch.float64
    # labels are the truth moved by v - phi: truth - label = phi, the same vector everywhere
    torch.testing.assert_close(corr.y, shift.expand_as(corr.y), rtol=0, atol=1e-6)
    assert (corr.count[~corr.fallback] > 0).all()


def test_patch_corrections_average_inside_vertices_and_handle_empty_patches():
    truth = [[square(2.0, 2.0, 4.0), square(20.0, 20.0, 4.0)]]
    moved = [[truth[0][0] + torch.tensor([1.0, 0.0], dtype=torch.float64),     # correction (-1, 0)
              truth[0][1] + torch.tensor([0.0, 2.0], dtype=torch.float64)]]     # correction (0, -2)
    pos = torch.tensor([[0, 0, 0], [0, 16, 16], [0, 0, 16]])
    corr = patches.patch_corrections(truth, moved, pos, 16)
    torch.testing.assert_close(corr.y[0], torch.tensor([-1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(corr.y[1], torch.tensor([0.0, -2.0], dtype=torch.float64))
    assert corr.count.tolist() == [4, 4, 0] and corr.fallback.tolist() == [False, False, True]
    # nearest label vertex to the empty square [16, 32) x [0, 16) is (21, 22) of the second building
    torch.testing.assert_close(corr.y[2], torch.tensor([0.0, -2.0], dtype=torch.float64))
    assert torch.isnan(patches.patch_corrections(truth, moved, pos, 16, empty="nan").y[2]).all()
    with pytest.raises(ValueError, match="patch 2 .* holds no label vertex"):
        patches.patch_corrections(truth, moved, pos, 16, empty="raise")


def test_patch_corrections_errors():
    truth = [[square(2.0, 2.0, 4.0)]]
    with pytest.raises(ValueError, match="vertex count"):
        patches.patch_corrections(truth, [[square(2.0, 2.0, 4.0)[:3]]], torch.tensor([[0, 0, 0]]), 16)
    with pytest.raises(ValueError, match="label cadasters"):
        patches.patch_corrections(truth, [], torch.tensor([[0, 0, 0]]), 16)
    with pytest.raises(ValueError, match="non-empty"):
        patches.patch_corrections(truth, truth, torch.zeros(0, 3), 16)


def test_fill_fraction():
    rasters = torch.zeros(2, 3, 4, 4)
    rasters[1, 0, :2] = 1.0
    assert patches.fill_fraction(rasters).tolist() == [0.0, 0.5]


# ----------------------------------------------------------------------------------------- other similarities

def test_pixel_and_perceptual_distances():
    net = small_net(8)
    x = packed_patches(n=7, p=8, seed=8)
    images, rasters = x[:, :3], x[:, 3:]
    images[4] = images[2]                                            # a duplicate image
    pixel = patches.pixel_neg_distances(images)
    torch.testing.assert_close(pixel, -torch.cdist(images.flatten(1).double(), images.flatten(1).double()))
    perceptual = patches.perceptual_neg_distances(net, images, batch_size=3)
    assert perceptual.shape == (7, 7) and perceptual[2, 4] == 0 and (perceptual <= 0).all()
    feats = patches.encoder_features(net, images).double()
    torch.testing.assert_close(perceptual, -torch.cdist(feats, feats))
    assert feats.shape == (7, 8 * 4 * 4)                             # level 1 of (4, 8): 8 channels at p / 2
    queries = torch.tensor([5, 0])
    torch.testing.assert_close(patches.perceptual_neg_distances(net, images, query_index=queries), perceptual[queries])
    both = patches.perceptual_neg_distances(net, images, rasters, branches=("image", "raster"), level=0)
    assert both.shape == (7, 7) and both[2, 4] < 0                  # the rasters differ
    with pytest.raises(ValueError, match="level"):
        patches.encoder_features(net, images, level=2)
    with pytest.raises(ValueError, match="raster_patches"):
        patches.encoder_features(net, images, branches=("raster",))
    with pytest.raises(TypeError, match="RegistrationNet"):
        patches.encoder_features(torch.nn.Linear(2, 2), images)

"""Tests of netsim_paper.registration.model: the per-scale net, the loss, the chain."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from netsim_paper.registration.geometry import loss_weights, rasterize
from netsim_paper.registration.model import RegistrationChain, RegistrationNet, downsample_image, registration_loss

SQUARE = torch.tensor([[20.0, 20.0], [40.0, 20.0], [40.0, 40.0], [20.0, 40.0]], dtype=torch.float64)


class ConstantStage(nn.Module):
    """A stub stage: outputs a constant field (in pixels of its scale) and records input sizes."""

    def __init__(self, dx: float, dy: float):
        super().__init__()
        self.vector = torch.tensor([dx, dy])
        self.seen: list[tuple[int, ...]] = []

    def forward(self, image, raster):
        self.seen.append(tuple(image.shape))
        assert raster.shape == image.shape
        b, _, h, w = image.shape
        return self.vector.view(1, 2, 1, 1).expand(b, 2, h, w).clone()


def test_net_output_shape_and_zero_init():
    net = RegistrationNet(cap=3.0, channels=(4, 8, 16))
    out = net(torch.rand(2, 3, 16, 24), torch.rand(2, 3, 16, 24))
    assert out.shape == (2, 2, 16, 24)
    assert torch.equal(out, torch.zeros_like(out))  # zero head: identity alignment at the start


def test_net_output_is_bounded_by_cap():
    torch.manual_seed(0)
    net = RegistrationNet(cap=2.5, channels=(4, 8), zero_init=False)
    with torch.no_grad():
        net.head.weight.mul_(1e4)  # saturate the tanh
    out = net(torch.rand(3, 3, 8, 8) * 10, torch.rand(3, 3, 8, 8))
    assert out.abs().max() <= 2.5
    assert out.abs().max() > 2.4  # and the bound is actually reached


def test_net_rejects_bad_shapes_and_cap():
    net = RegistrationNet(channels=(4, 8, 16))
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.rand(1, 3, 10, 12), torch.rand(1, 3, 10, 12))
    with pytest.raises(ValueError, match="shape"):
        net(torch.rand(1, 3, 8, 8), torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="cap"):
        RegistrationNet(cap=0.0)


def test_parameter_count_of_default_net():
    assert sum(p.numel() for p in RegistrationNet().parameters()) == 312_610


def test_loss_matches_hand_computation():
    predicted = torch.zeros(1, 2, 1, 2)
    target = torch.zeros(1, 2, 1, 2)
    predicted[0, :, 0, 0] = torch.tensor([1.0, 2.0])   # squared error 5
    predicted[0, :, 0, 1] = torch.tensor([0.0, -3.0])  # squared error 9
    weights = torch.tensor([[[10.0, 0.1]]])
    expected = (10.0 * 5 + 0.1 * 9) / 10.1
    assert float(registration_loss(predicted, target, weights)) == pytest.approx(expected, rel=1e-6)
    assert float(registration_loss(target, target, weights)) == 0.0
    assert float(registration_loss(predicted, target, torch.zeros(1, 1, 2))) == 0.0  # no building: 0, not NaN


def test_loss_on_a_raster_ignores_background_and_is_zero_for_exact_target():
    raster = rasterize([SQUARE], 64, 64)
    weights = loss_weights(raster)[None]
    target = torch.randn(1, 2, 64, 64)
    assert float(registration_loss(target.clone(), target, weights)) == 0.0
    off_building = target.clone()
    off_building[..., weights[0] == 0] += 100.0  # errors on the background cost nothing
    assert float(registration_loss(off_building, target, weights)) == 0.0
    with pytest.raises(ValueError, match="weights"):
        registration_loss(target, target, weights[:, :10])


def test_downsample_image_averages_blocks():
    image = torch.arange(16.0).view(1, 4, 4).expand(3, 4, 4)
    small = downsample_image(image, 2)
    assert small.shape == (3, 2, 2)
    assert float(small[0, 0, 0]) == pytest.approx((0 + 1 + 4 + 5) / 4)
    with pytest.raises(ValueError, match="divisible"):
        downsample_image(torch.rand(3, 6, 6), 4)


def test_chain_stages_see_their_scales():
    stages = [ConstantStage(0.0, 0.0) for _ in range(3)]
    chain = RegistrationChain((4, 2, 1), stages=stages)
    chain.align(torch.rand(3, 64, 64), [SQUARE])
    assert [s.seen for s in stages] == [[(1, 3, 16, 16)], [(1, 3, 32, 32)], [(1, 3, 64, 64)]]
    default = RegistrationChain((4, 2, 1), caps=(6.0, 5.0, 4.0), channels=(4, 8, 16))
    assert len(default.stages) == 3 and [s.cap for s in default.stages] == [6.0, 5.0, 4.0]
    with pytest.raises(ValueError, match="one cap per scale"):
        RegistrationChain((4, 2), caps=(1.0,))


def test_zero_output_chain_leaves_polygons_unchanged():
    chain = RegistrationChain((4, 2, 1), channels=(4, 8, 16))  # zero-initialised heads
    aligned, fields = chain.align(torch.rand(3, 64, 64), [SQUARE, SQUARE + 5], return_fields=True)
    assert torch.equal(aligned[0], SQUARE) and torch.equal(aligned[1], SQUARE + 5)
    assert len(fields) == 3 and all(f.shape == (2, 64, 64) and not f.any() for f in fields)


def test_chain_composes_stage_corrections_in_full_resolution_pixels():
    # A constant (1, -0.5) px field at scale 4 is (4, -2) full-resolution pixels, etc.
    chain = RegistrationChain((4, 2, 1), stages=[ConstantStage(1.0, -0.5), ConstantStage(0.5, 0.0),
                                                 ConstantStage(0.25, 0.25)])
    aligned = chain.align(torch.rand(3, 64, 64), [SQUARE])
    shift = torch.tensor([4.0 + 1.0 + 0.25, -2.0 + 0.0 + 0.25], dtype=torch.float64)
    torch.testing.assert_close(aligned[0], SQUARE + shift)
    many = chain.align_many(torch.rand(2, 3, 64, 64), [[SQUARE], []])
    torch.testing.assert_close(many[0][0], SQUARE + shift)
    assert many[1] == []


def test_group_norm_option_makes_each_output_independent_of_the_batch():
    torch.manual_seed(0)
    net = RegistrationNet(cap=3.0, channels=(4, 8), zero_init=False, norm="group")
    # 2 per conv block: 2 encoders x 2 levels, fuse, decoder
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in net.modules()) == 2 * 6
    image, raster = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    net.train()
    together = net(image, raster)
    alone = torch.cat([net(image[i:i + 1], raster[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone)  # per-sample statistics: unlike BatchNorm
    with pytest.raises(ValueError, match="norm"):
        RegistrationNet(norm="batch")

"""Neighbour-count estimators: fast soft estimate vs dense, the paper's identities, input checks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import netsim
from conftest import SmallCNN, jacobian_grads, mlp
from netsim import density, outputs
from netsim.engine import engine_for
from netsim.grads import output_jvp

METHODS = ("jacobian", "layerwise")
#: soft_density's two second passes: the kept normalised Jacobians (default) or forward-mode jvps.
CACHES = (None, 0)


def _dense_rows(model, xs, **kw):
    """The reference: row sums of k^C computed from materialised Jacobians."""
    return netsim.similarity_from_jacobians(jacobian_grads(model, xs, **kw)).sum(1)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("d", [1, 2])
def test_fast_soft_estimate_equals_dense_row_sums(d, method, cache):
    model = mlp(d_out=d, seed=d)
    xs = torch.randn(40, 3)
    torch.testing.assert_close(netsim.soft_density(model, xs, chunk_size=7, method=method, memory_budget=cache),
                               _dense_rows(model, xs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("method", METHODS)
def test_fast_soft_estimate_with_rank_deficient_classifier_and_cnn(method, cache):
    model = mlp(d_out=5, hidden=12, seed=4)
    xs = torch.randn(30, 3)
    dense = _dense_rows(model, xs, output_fn=outputs.neg_log_softmax)
    fast = netsim.soft_density(model, xs, output_fn=outputs.neg_log_softmax, chunk_size=8, method=method,
                               memory_budget=cache)
    torch.testing.assert_close(fast, dense, rtol=1e-4, atol=1e-4)
    cnn = SmallCNN(d_out=2).eval()
    images = torch.randn(20, 1, 8, 8)
    torch.testing.assert_close(netsim.soft_density(cnn, images, method=method, memory_budget=cache),
                               _dense_rows(cnn, images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_kept_jacobians_skip_the_second_pass_until_they_overflow_the_budget(method, monkeypatch):
    """Within memory_budget the second pass evaluates nothing; one byte short of the whole first
    pass, the kept chunks are dropped and the second pass runs its jvps: the same counts."""
    jvps = []
    monkeypatch.setattr(density, "output_jvp", lambda *a, **k: jvps.append(1) or output_jvp(*a, **k))
    model, xs = mlp(d_out=2, seed=5).double(), torch.randn(23, 3, dtype=torch.float64)
    expected = _dense_rows(model, xs)
    engine = engine_for(model, xs[:5], chunk_size=5, method=method)
    whole = sum(engine.nbytes(rep) for _, rep in engine.chunks(xs))   # 4 chunks of 5, then 3
    for budget, chunks_with_jvps in ((whole, 0), (whole - 1, 5), (0, 5)):
        jvps.clear()
        counts = netsim.soft_density(model, xs, chunk_size=5, method=method, memory_budget=budget)
        torch.testing.assert_close(counts, expected, rtol=1e-10, atol=1e-10)
        assert len(jvps) == 2 * chunks_with_jvps, budget      # d = 2 jvps per chunk


def test_soft_estimate_against_a_separate_reference_set():
    model = mlp(d_out=2, seed=2)
    xs, ref = torch.randn(6, 3), torch.randn(25, 3)
    torch.testing.assert_close(netsim.soft_density(model, xs, reference=ref),
                               netsim.similarity(model, xs, ref).sum(1), rtol=1e-4, atol=1e-4)


def _loop_counts(kc, tau, alpha):
    """Plain loops over pairs: the reference for the vectorised estimators (ties within the
    documented tolerance count as reaching tau)."""
    n = kc.shape[0]
    hard, pos = torch.zeros(n), torch.zeros(n)
    for i in range(n):
        for j in range(n):
            if i != j and kc[i, j] >= tau - density.tie_tolerance(kc.dtype):
                hard[i] += 1
            if i != j and kc[i, j] > 0:
                pos[i] += kc[i, j] ** alpha
    return hard, pos


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 10**6), tau=st.floats(0, 1), alpha=st.floats(0.1, 4))
def test_vectorised_estimators_equal_pair_loops(seed, tau, alpha):
    g = torch.Generator().manual_seed(seed)
    kc = torch.rand(9, 9, generator=g) * 2 - 1
    kc = (kc + kc.T) / 2
    kc.fill_diagonal_(1.0)
    hard, pos = _loop_counts(kc, tau, alpha)
    torch.testing.assert_close(density.hard_count(kc, tau), hard)
    torch.testing.assert_close(density.positive_count(kc, alpha), pos)
    torch.testing.assert_close(density.soft_count(kc), kc.sum(1))


def test_integral_of_hard_counts_over_tau_is_the_positive_count():
    """int_0^1 N_tau dtau = N_1^+ (section 4.1), on a fine midpoint grid."""
    model = mlp(d_out=1, seed=11)
    kc = netsim.similarity(model, torch.randn(60, 3))
    steps = 20_000
    taus = (torch.arange(steps) + 0.5) / steps
    integral = sum(density.hard_count(kc, float(t)) for t in taus) / steps
    torch.testing.assert_close(integral, density.positive_count(kc, 1.0), atol=60 / steps, rtol=0)


def test_soft_count_is_positive_count_plus_self_when_no_cosine_is_negative():
    """A net whose every gradient entry is positive (positive inputs and output weights, softplus)
    has no negative k^C: then N_S = N_1^+ + 1 exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Softplus(), nn.Linear(8, 1))
    with torch.no_grad():
        model[2].weight.abs_()
    xs = torch.rand(50, 2) + 0.1
    kc = netsim.similarity(model, xs)
    assert kc.min() > 0
    torch.testing.assert_close(density.soft_count(kc), density.positive_count(kc, 1.0) + 1)
    torch.testing.assert_close(netsim.soft_density(model, xs), density.positive_count(kc, 1.0) + 1,
                               rtol=1e-4, atol=1e-4)


def test_neighbour_counts_dispatch():
    model = mlp(d_out=1, seed=12)
    xs = torch.randn(30, 3)
    kc = netsim.similarity(model, xs)
    torch.testing.assert_close(netsim.neighbour_counts(model, xs, estimator="hard", tau=0.5),
                               density.hard_count(kc, 0.5))
    torch.testing.assert_close(netsim.neighbour_counts(model, xs, estimator="positive", alpha=3),
                               density.positive_count(kc, 3), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(netsim.neighbour_counts(model, xs, estimator="soft"), kc.sum(1),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tau", [-0.1, 1.01, float("nan")])
def test_tau_outside_unit_interval_is_an_error(tau):
    with pytest.raises(ValueError, match="tau"):
        density.hard_count(torch.eye(3), tau)
    with pytest.raises(ValueError, match="tau"):
        netsim.neighbour_counts(mlp(), torch.randn(3, 3), estimator="hard", tau=tau)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_non_positive_alpha_is_an_error(alpha):
    with pytest.raises(ValueError, match="alpha"):
        density.positive_count(torch.eye(3), alpha)


def test_unknown_estimator_is_an_error():
    with pytest.raises(ValueError, match="estimator"):
        netsim.neighbour_counts(mlp(), torch.randn(3, 3), estimator="knn")


def test_all_counts_names_and_values():
    kc = netsim.similarity(mlp(d_out=1, seed=13), torch.randn(20, 3))
    counts = density.all_counts(kc, taus=(0.5, 0.9), alphas=(2,))
    assert list(counts) == ["N_S", "N_tau=0.5", "N_tau=0.9", "N_alpha=2^+"]
    torch.testing.assert_close(counts["N_tau=0.9"], density.hard_count(kc, 0.9))
    torch.testing.assert_close(counts["N_alpha=2^+"], density.positive_count(kc, 2))


def test_soft_neighbour_counts_honour_the_engine_options():
    """Options such as on_zero and method reach the soft estimate too (they used to be dropped)."""
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0]]))
        model[0].bias.zero_()
    xs = torch.tensor([[1.0, 2.0], [-1.0, -1.0], [0.5, 0.1]])   # sample 1: every unit off
    counts = netsim.neighbour_counts(model, xs, estimator="soft", on_zero="zero", method="jacobian")
    assert counts[1] == 0 and torch.isfinite(counts).all()
    torch.testing.assert_close(counts, netsim.similarity(model, xs, on_zero="zero").sum(1), rtol=1e-5, atol=1e-5)


def test_auto_sums_token_maps_layerwise_whatever_the_kernel_timing(monkeypatch):
    """A kernel's timing does not tell soft density's cost: with token maps the layer-wise engine sums their
    per-token factors (the Jacobian engine forms each sample's gradient), so auto takes it there even when
    the timing picks the Jacobian engine; without token maps the timing decides."""
    from conftest import TinyTransformer, token_batch
    from netsim import engine as engine_module
    from netsim.engine import JacobianEngine

    def refused(self, inputs, targets=None):
        raise AssertionError("the Jacobian engine ran")
        yield

    monkeypatch.setattr(engine_module, "_AUTO_CHOICES", type(engine_module._AUTO_CHOICES)())
    monkeypatch.setattr(engine_module, "_faster", lambda engines, *args: "jacobian")
    monkeypatch.setattr(JacobianEngine, "chunks", refused)
    model, xs = TinyTransformer().eval(), token_batch(12)
    expected = netsim.soft_density(model, xs, method="layerwise")
    torch.testing.assert_close(netsim.soft_density(model, xs), expected, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="the Jacobian engine ran"):
        netsim.soft_density(mlp(), torch.randn(8, 3))

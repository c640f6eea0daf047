"""Diagnostics: two-pass fast paths against dense per-sample formulas."""

import pytest
import torch

import netsim
from conftest import mlp
from netsim import diagnostics


@pytest.mark.parametrize("method", ["jacobian", "layerwise"])
@pytest.mark.parametrize("d", [1, 2])
def test_uncertainty_factor_matches_dense_formula(d, method):
    model = mlp(d_out=d, seed=20 + d)
    with torch.no_grad():  # a shared positive component keeps sum_x' k^I > 0, as with an output bias
        model[-1].bias.fill_(0.0)
    xs = torch.randn(25, 3)
    K = netsim.similarity(model, xs, kind="inner", reduce="none").double()     # (N, N, d, d)
    own = torch.diagonal(K[torch.arange(25), torch.arange(25)], dim1=-2, dim2=-1).sum(-1)
    total = torch.diagonal(K.sum(1), dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(diagnostics.uncertainty_factor(model, xs, chunk_size=6, method=method).double(),
                               own / total, rtol=1e-4, atol=1e-6)


def test_uncertainty_factor_rejects_non_positive_totals():
    """A bias-free tanh net is odd in x, so grad f(-x) = -grad f(x): against the reference {-x}
    the total similarity is -||grad f(x)||^2 < 0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8, bias=False), torch.nn.Tanh(),
                                torch.nn.Linear(8, 1, bias=False))
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"<= 0 for samples \[0, 1\]"):
        diagnostics.uncertainty_factor(model, x, reference=-x)


@pytest.mark.parametrize("method", ["jacobian", "layerwise"])
@pytest.mark.parametrize("d", [1, 2])
def test_kernel_average_matches_dense_per_sample_solve(d, method):
    model = mlp(d_out=d, seed=30 + d)
    xs, queries = torch.randn(20, 3), torch.randn(6, 3)
    values = torch.randn(20, d)
    K = netsim.similarity(model, queries, xs, kind="inner", reduce="none").double()  # (Q, N, d, d)
    expected = torch.linalg.solve(K.sum(1), torch.einsum("qnab,nb->qa", K, values.double()))
    got = diagnostics.kernel_average(model, xs, values, queries=queries, chunk_size=7, method=method)
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-4)


def test_kernel_average_of_a_constant_is_that_constant():
    model = mlp(d_out=2, seed=40)
    xs = torch.randn(15, 3)
    const = torch.tensor([[0.3, -1.2]]).expand(15, 2)
    torch.testing.assert_close(diagnostics.kernel_average(model, xs, const), const, rtol=1e-4, atol=1e-4)


def test_kernel_average_checks_shapes():
    model = mlp(d_out=2)
    with pytest.raises(ValueError, match="rows"):
        diagnostics.kernel_average(model, torch.randn(5, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="d = 2"):
        diagnostics.kernel_average(model, torch.randn(5, 3), torch.randn(5, 3))


def test_fit_diagnostic_separates_isolated_and_crowded_points():
    n = 40
    targets = torch.linspace(-1, 1, n)
    isolated = diagnostics.fit_diagnostic(torch.eye(n), targets)
    assert isolated.overfit.all() and not isolated.underfit.any()
    torch.testing.assert_close(isolated.local_std, torch.zeros(n))
    crowded = diagnostics.fit_diagnostic(torch.ones(n, n), targets)
    assert crowded.underfit.all() and not crowded.overfit.any()
    torch.testing.assert_close(crowded.relative_std, torch.ones(n))
    # dense but homogeneous neighbourhoods (two clusters with one label each): not under-fit
    block = torch.block_diag(torch.ones(20, 20), torch.ones(20, 20))
    clustered = diagnostics.fit_diagnostic(block, (torch.arange(n) >= 20).float())
    assert not clustered.underfit.any() and not clustered.overfit.any()


def test_fit_diagnostic_input_errors():
    with pytest.raises(ValueError, match="same N"):
        diagnostics.fit_diagnostic(torch.eye(3), torch.zeros(4))
    with pytest.raises(ValueError, match="all targets are equal"):
        diagnostics.fit_diagnostic(torch.eye(3), torch.zeros(3))


# ----------------------------------------------------------------------------------------- self-denoising

import math  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import reference_jacobians  # noqa: E402


def dense_sums(model, xs, values, rows=None):
    """float64 reference from explicit per-sample Jacobians: S_i, sum_j K_ij a_j, sum_j K_ij K_ij^T."""
    J = reference_jacobians(model, xs).double()
    K = torch.einsum("iap,jbp->ijab", J, J)
    K = K if rows is None else K[rows]
    return K.sum(1), {k: torch.einsum("ijab,jb->ia", K, v.double()) for k, v in values.items()}, \
        torch.einsum("ijab,ijcb->iac", K, K), K


@pytest.mark.parametrize("method", ["jacobian", "layerwise"])
@pytest.mark.parametrize("query_index", [None, [7, 0, 3, 12]])
def test_kernel_sums_match_dense_reference(method, query_index):
    """Several row blocks and column chunks (tiny budget), symmetric and query-subset paths."""
    model = mlp(d_out=2, seed=50, dtype=torch.float64)
    xs = torch.randn(13, 3, dtype=torch.float64)
    values = {"a": torch.randn(13, 2), "b": torch.randn(13, 2)}
    sums = diagnostics.kernel_sums(model, xs, values, query_index=query_index, method=method, chunk_size=3,
                                   memory_budget=1)
    total, weighted, moment, K = dense_sums(model, xs, values, query_index)
    torch.testing.assert_close(sums.total, total, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sums.second_moment, moment, rtol=1e-10, atol=1e-10)
    for k in values:
        torch.testing.assert_close(sums.weighted[k], weighted[k], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(sums.averages()[k], torch.linalg.solve(total, weighted[k]), rtol=1e-8, atol=1e-8)
    # the factor from explicit A_ij = S_i^-1 K_ij
    A = torch.linalg.solve(total[:, None], K)                              # (Q, N, 2, 2)
    expected = torch.sqrt(torch.einsum("ijab,ijab->i", A, A) / 2)          # Tr sum_j A A^T / 2
    torch.testing.assert_close(sums.denoising_factor(), expected, rtol=1e-8, atol=1e-10)
    assert sums.n == 13 and sums.total.shape[0] == (13 if query_index is None else 4)


def test_kernel_sums_agree_with_kernel_average_and_inner_kernel():
    model = mlp(d_out=2, seed=51)
    xs = torch.randn(17, 3)
    values = torch.randn(2, 17, 2)
    two_pass = diagnostics.kernel_average(model, xs, values, chunk_size=5)
    assert two_pass.shape == (2, 17, 2)
    torch.testing.assert_close(two_pass[1], diagnostics.kernel_average(model, xs, values[1]))
    sums = diagnostics.kernel_sums(model, xs, {"0": values[0], "1": values[1]}, second_moment=False)
    avg = sums.averages()
    torch.testing.assert_close(avg["1"].float(), two_pass[1], rtol=1e-3, atol=1e-4)
    K = netsim.similarity(model, xs, kind="inner", reduce="none").double()  # the library's K_ij = J_i J_j^T
    torch.testing.assert_close(sums.total, K.sum(1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="second_moment=True"):
        sums.denoising_factor()


def test_singular_kernel_sums_name_the_rows():
    """f = W relu(x): a sample with x <= 0 has a zero gradient, so sum_j K_ij = 0 on its row."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(3, 2, bias=False))
    xs = torch.rand(6, 3)
    xs[[1, 4]] = -xs[[1, 4]]
    with pytest.raises(diagnostics.SingularKernelSumError, match=r"2 row\(s\) i = 1, 4") as info:
        diagnostics.kernel_average(model, xs, torch.randn(6, 2))
    assert info.value.indices == [1, 4]
    with pytest.raises(diagnostics.SingularKernelSumError, match="i = 1, 4"):
        diagnostics.kernel_sums(model, xs).denoising_factor()
    with pytest.raises(diagnostics.SingularKernelSumError, match="i = 1, 4"):
        diagnostics.self_denoising(model, xs, true=torch.zeros(6, 2), noisy=torch.ones(6, 2))


def test_kernel_sums_input_errors():
    model = mlp(d_out=2)
    xs = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"values\['a'\] must be \(N, d\) = \(5, 2\)"):
        diagnostics.kernel_sums(model, xs, {"a": torch.randn(4, 2)})
    with pytest.raises(ValueError, match="non-finite"):
        diagnostics.kernel_sums(model, xs, {"a": torch.full((5, 2), float("nan"))})
    with pytest.raises(ValueError, match=r"query_index must lie in \[0, 5\)"):
        diagnostics.kernel_sums(model, xs, query_index=[5])
    with pytest.raises(ValueError, match="query_index is empty"):
        diagnostics.kernel_sums(model, xs, query_index=[])
    with pytest.raises(ValueError, match="xs must be a non-empty"):
        diagnostics.kernel_sums(model, xs[:0])
    with pytest.raises(ValueError, match=r"\(V, N, d\)"):
        diagnostics.kernel_average(model, xs, torch.randn(1, 1, 5, 2))


def constant_jacobian_model(d: int, seed: int) -> torch.nn.Module:
    return mlp(d_in=3, hidden=6, d_out=d, seed=seed, dtype=torch.float64)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 12), d=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_identical_kernels_give_factor_one_over_sqrt_n(n, d, seed):
    """All inputs equal: K_ij = G for all i, j, so A_ij = I / N and sum_j A A^T = I / N:
    factor = sqrt(Tr(I / N) / d) = 1 / sqrt(N), the smallest value the factor can take."""
    model = constant_jacobian_model(d, seed)
    xs = torch.randn(1, 3, dtype=torch.float64).expand(n, 3).clone()
    factor = diagnostics.denoising_factor(model, xs)
    torch.testing.assert_close(factor, torch.full((n,), 1 / math.sqrt(n), dtype=torch.float64), rtol=1e-9, atol=0)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(3, 12), seed=st.integers(0, 10_000), scale=st.floats(1e-2, 1e2))
def test_factor_is_scale_invariant_and_at_least_one_over_sqrt_n(n, seed, scale):
    """Scaling the outputs by c scales every K_ij by c^2 and leaves A_ij, hence the factor and
    every kernel average, unchanged; sum_j A_ij = I gives factor >= 1/sqrt(N) (Cauchy-Schwarz)."""
    model = mlp(d_out=2, seed=seed, dtype=torch.float64)
    xs = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    values = {"a": torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))}
    plain = diagnostics.kernel_sums(model, xs, values)
    scaled = diagnostics.kernel_sums(model, xs, values, output_fn=lambda out: scale * out)
    torch.testing.assert_close(scaled.denoising_factor(), plain.denoising_factor(), rtol=1e-7, atol=0)
    torch.testing.assert_close(scaled.averages()["a"], plain.averages()["a"], rtol=1e-6, atol=1e-9)
    assert bool((plain.denoising_factor() >= 1 / math.sqrt(n) * (1 - 1e-9)).all())


def test_self_denoising_decomposition_holds_and_gap_vanishes_at_a_stationary_point():
    """A net whose trainable part is its linear head, fitted by least squares to noisy labels:
    the gradient of sum_j ||y^_j - y~_j||^2 is exactly 0, so E_k[y^] = E_k[y~] and
    y^ - E_k[y] = E_k[eps] + shift; and the decomposition is an identity to rounding."""
    torch.manual_seed(3)
    n = 40
    model = mlp(d_in=3, hidden=10, d_out=2, depth=1, seed=3, dtype=torch.float64)
    for p in model[0].parameters():
        p.requires_grad_(False)
    xs = torch.randn(n, 3, dtype=torch.float64)
    true = torch.stack([torch.sin(xs[:, 0]), xs[:, 1] * xs[:, 2]], 1)
    noisy = true + 0.3 * torch.randn(n, 2, dtype=torch.float64)
    with torch.no_grad():                        # least squares on the features (plus the bias)
        features = torch.cat([model[1](model[0](xs)), torch.ones(n, 1, dtype=torch.float64)], 1)
        solution = torch.linalg.lstsq(features, noisy).solution
        model[2].weight.copy_(solution[:-1].T)
        model[2].bias.copy_(solution[-1])
    result = diagnostics.self_denoising(model, xs, true=true, noisy=noisy, chunk_size=7, memory_budget=1)
    scale = true.abs().max()
    assert result.residual.abs().max() < 1e-10 * scale
    assert result.convergence_gap.abs().max() < 1e-8 * scale
    torch.testing.assert_close(result.error, result.noise_average + result.shift, rtol=0, atol=1e-8)
    torch.testing.assert_close(result.shift_norm, result.shift.norm(dim=1))
    noise = noisy - true
    torch.testing.assert_close(result.measured_factor,
                               result.noise_average.norm(dim=1) / noise.pow(2).sum(1).mean().sqrt())
    # the same pass at a subset of queries gives the same rows
    sub = diagnostics.self_denoising(model, xs, true=true, noisy=noisy, query_index=torch.tensor([5, 9]))
    torch.testing.assert_close(sub.factor, result.factor[[5, 9]])
    torch.testing.assert_close(sub.error, result.error[[5, 9]])
    summary = result.summary()
    assert set(summary) >= {"factor_predicted_rms", "factor_measured_rms", "shift_median", "shift_p90", "residual_max"}
    assert summary["factor_predicted_rms"] >= 1 / math.sqrt(n)


def test_self_denoising_decomposition_holds_away_from_convergence():
    model = mlp(d_out=2, seed=60)
    xs = torch.randn(15, 3)
    true, noisy = torch.randn(15, 2), torch.randn(15, 2)
    result = diagnostics.self_denoising(model, xs, true=true, noisy=noisy)
    lhs = result.error
    rhs = result.noise_average + result.shift + result.convergence_gap
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-9 * float(lhs.abs().max()))
    assert result.convergence_gap.abs().max() > 1e-3          # an untrained net is not stationary
    torch.testing.assert_close(result.predicted_average - result.noisy_average, result.convergence_gap)

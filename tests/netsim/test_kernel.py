"""The kernels against per-pair reference formulas and against the paper's identities."""

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import netsim
from conftest import SmallCNN, jacobian_grads, mlp
from netsim import kernel, outputs
from netsim.engine import engine_for
from netsim.kernel import ZeroGradientError, psd_power
from netsim.memory import budget_bytes

KINDS = ("inner", "influence", "correlation")


# --- a per-pair reference written from the paper's formulas, in float64 numpy -------------

def _pinv_power(k, power, rtol=1e-9):
    w, v = np.linalg.eigh(k)
    keep = w > rtol * w.max()
    return (v[:, keep] * w[keep] ** power) @ v[:, keep].T, int(keep.sum())


def reference_matrix(Jx, Jy, kind):
    """K(x, y) d x d for every pair, by the formulas of sections 2-3, one pair at a time."""
    Jx, Jy = Jx.double().numpy(), Jy.double().numpy()
    out = np.zeros((len(Jx), len(Jy), Jx.shape[1], Jx.shape[1]))
    ranks = np.zeros((len(Jx), len(Jy), 2))
    for i, a in enumerate(Jx):
        for j, b in enumerate(Jy):
            kxy = a @ b.T
            if kind == "inner":
                out[i, j], ranks[i, j] = kxy, (a.shape[0], a.shape[0])
            elif kind == "influence":  # Theorem 3: K(x', x) K(x, x)^-1
                pinv, r = _pinv_power(a @ a.T, -1.0)
                out[i, j], ranks[i, j] = kxy.T @ pinv, (r, r)
            else:  # Eq. (4) with K(x', x')^-1/2 on the right
                ra, r1 = _pinv_power(a @ a.T, -0.5)
                rb, r2 = _pinv_power(b @ b.T, -0.5)
                out[i, j], ranks[i, j] = ra @ kxy @ rb, (r1, r2)
    return out, ranks


def reference_reduce(mats, ranks, kind, reduce):
    if reduce == "none":
        return mats
    norm = np.sqrt(ranks[..., 0] * ranks[..., 1]) if kind == "correlation" else ranks[..., 0]
    if reduce == "trace":
        return np.trace(mats, axis1=-2, axis2=-1) / norm
    # rotation-invariant: the best rotation found by brute force over a fine angle grid
    theta = np.linspace(0, 2 * np.pi, 20001)
    rot = np.stack([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])  # (2, 2, T)
    tr = np.einsum("abt,...ba->...t", rot, mats)
    return tr.max(-1) / norm


METHODS = ("jacobian", "layerwise")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduce", ["trace", "rot", "none"])
def test_streaming_similarity_matches_per_pair_reference(kind, reduce, method):
    model = mlp(d_out=2, seed=3)
    xs, ys = torch.randn(9, 3), torch.randn(5, 3)
    Jx, Jy = jacobian_grads(model, xs), jacobian_grads(model, ys)
    mats, ranks = reference_matrix(Jx, Jy, kind)
    expected = torch.from_numpy(reference_reduce(mats, ranks, kind, reduce)).float()
    got = netsim.similarity(model, xs, ys, kind=kind, reduce=reduce, chunk_size=2, memory_budget=1, method=method)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-4 if reduce == "rot" else 1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduce", ["trace", "none"])
def test_symmetric_blocks_equal_the_dense_path(kind, reduce, method):
    model = SmallCNN(d_out=2).eval()
    xs = torch.randn(13, 1, 8, 8)
    dense = netsim.similarity_from_jacobians(jacobian_grads(model, xs), kind=kind, reduce=reduce)
    for block in (1, 10**9):  # many row blocks (mirrored triangle) and a single block
        got = netsim.similarity(model, xs, kind=kind, reduce=reduce, chunk_size=3, memory_budget=block,
                                method=method)
        torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-5)


def test_one_output_kernels_are_the_papers_scalar_formulas():
    model = mlp(d_out=1)
    xs = torch.randn(6, 3)
    g = jacobian_grads(model, xs)[:, 0].double()
    inner = g @ g.T
    norms = g.norm(dim=1)
    expected = {"inner": inner, "influence": inner / norms[:, None] ** 2,
                "correlation": inner / (norms[:, None] * norms[None, :])}
    for kind, value in expected.items():
        for reduce in ("trace", "none"):
            got = netsim.similarity(model, xs, kind=kind, reduce=reduce).double()
            torch.testing.assert_close(got.reshape(6, 6), value, rtol=1e-4, atol=1e-6)


# --- section 2.3: k^I as importance-weighted products of activities -----------------------

def test_inner_kernel_is_lambda_weighted_activity_products():
    """k^I(x,x') = sum_i lambda_i a_i(x) a_i(x'), lambda_i = sum_{j using a_i} df/db_j(x) df/db_j(x')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 1)).double()
    xs = torch.randn(8, 3, dtype=torch.float64)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    inputs_of = {}
    hooks = [m.register_forward_hook(lambda m, a, o: inputs_of.__setitem__(m, a[0].detach())) for m in linears]
    model(xs)
    for h in hooks:
        h.remove()
    J = jacobian_grads(model, xs)[:, 0]
    # df/db_j for every neuron j: the bias entries of the gradient (parameter order: weight, bias)
    offsets, start = {}, 0
    for m in linears:
        start += m.weight.numel()
        offsets[m] = slice(start, start + m.bias.numel())
        start += m.bias.numel()
    expected = torch.zeros(8, 8, dtype=torch.float64)
    for m in linears:
        delta = J[:, offsets[m]]                               # (N, out): df/db_j
        lam = delta @ delta.T                                  # every input activity feeds all j
        acts = torch.cat([inputs_of[m], torch.ones(8, 1, dtype=torch.float64)], 1)  # a_0 = 1: bias
        expected += lam * (acts @ acts.T)
    torch.testing.assert_close(netsim.similarity(model, xs, kind="inner"), expected)


# --- Theorem 1: the output is a linear function of the last layer's gradient ---------------

@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 10**6), act=st.sampled_from([nn.Tanh, nn.ReLU, nn.Sigmoid]))
def test_theorem1_equal_gradients_give_equal_outputs(seed, act):
    """For a last linear layer f(x) = <grad_{W,b} f(x), (W, b)>, so ||grad f(x) - grad f(x')|| bounds
    |f(x) - f(x')|: equal gradients force equal outputs."""
    model = mlp(d_out=1, act=act, seed=seed % 1000, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(6, 3, generator=g, dtype=torch.float64)
    J = jacobian_grads(model, xs)[:, 0]
    last = model[-1]
    theta_last = torch.cat([last.weight.flatten(), last.bias])
    f = model(xs)[:, 0]
    torch.testing.assert_close(J[:, -theta_last.numel():] @ theta_last, f)
    gap = (J[:, None] - J[None]).norm(dim=-1)
    assert torch.all((f[:, None] - f[None]).abs() <= theta_last.norm() * gap + 1e-9)


# --- section 3: properties of K^C ------------------------------------------------------------

@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 10**6), d=st.integers(1, 4), n=st.integers(2, 6))
def test_normalised_matrix_kernel_properties(seed, d, n):
    model = mlp(d_out=d, hidden=6, seed=seed % 997, act=nn.Tanh)
    xs = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
    K = netsim.similarity(model, xs, reduce="none").double()
    eye = torch.eye(d, dtype=torch.float64).expand(n, d, d)
    torch.testing.assert_close(K[torch.arange(n), torch.arange(n)], eye, atol=2e-4, rtol=0)
    torch.testing.assert_close(K.transpose(0, 1), K.transpose(-1, -2), atol=1e-5, rtol=1e-4)
    tol = 1e-4
    assert K.abs().max() <= 1 + tol
    assert torch.diagonal(K, dim1=-2, dim2=-1).sum(-1).abs().max() <= d + tol
    assert torch.linalg.matrix_norm(K).max() <= math.sqrt(d) + tol
    k = netsim.similarity(model, xs).double()
    torch.testing.assert_close(k, torch.diagonal(K, dim1=-2, dim2=-1).sum(-1) / d, atol=1e-5, rtol=1e-4)


def _rotation(theta, dtype=torch.float32):
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=dtype)


def test_rotation_invariant_kernel_ignores_a_relative_output_rotation():
    """Rotating one side's outputs by R changes K^C into K^C R^T: k^C changes, k^{C,rot} does not."""
    model = mlp(d_out=2, seed=5)
    xs, ys = torch.randn(6, 3), torch.randn(4, 3)
    Jx, Jy = jacobian_grads(model, xs), jacobian_grads(model, ys)
    Jy_rot = torch.einsum("ab,nbp->nap", _rotation(0.9), Jy)
    rot, rot_r = (netsim.similarity_from_jacobians(Jx, J, reduce="rot") for J in (Jy, Jy_rot))
    tr, tr_r = (netsim.similarity_from_jacobians(Jx, J, reduce="trace") for J in (Jy, Jy_rot))
    torch.testing.assert_close(rot, rot_r, atol=1e-5, rtol=1e-4)
    assert (tr - tr_r).abs().max() > 0.05


def test_kernels_are_unchanged_by_rotating_the_last_layer():
    """An orthogonal change of output coordinates (rotate W, b of the last layer) leaves k^C and
    k^{C,rot} unchanged: the normalisation makes the kernel independent of the output basis."""
    model = mlp(d_out=2, seed=6)
    xs = torch.randn(7, 3)
    before = {r: netsim.similarity(model, xs, reduce=r) for r in ("trace", "rot")}
    with torch.no_grad():
        R = _rotation(0.7)
        model[-1].weight.copy_(R @ model[-1].weight)
        model[-1].bias.copy_(R @ model[-1].bias)
    for r, value in before.items():
        torch.testing.assert_close(netsim.similarity(model, xs, reduce=r), value, atol=1e-5, rtol=1e-4)


def test_rot_needs_two_outputs():
    with pytest.raises(ValueError, match="d = 3"):
        netsim.similarity(mlp(d_out=3), torch.randn(3, 3), reduce="rot")


# --- Theorem 3: the influence kernel predicts the effect of a real parameter step ----------

def test_theorem3_parameter_step_moves_other_outputs_by_the_influence_kernel():
    model = mlp(d_out=2, hidden=10, seed=7, dtype=torch.float64)
    x, others = torch.randn(1, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    v = torch.tensor([0.6, -0.8], dtype=torch.float64)
    Jx = jacobian_grads(model, x)[0]                      # (d, p)
    predicted = netsim.similarity(model, x, others, kind="influence", reduce="none")[0] @ v  # (M, d)
    errors = []
    for eps in (1e-3, 5e-4):
        step = eps * Jx.T @ torch.linalg.solve(Jx @ Jx.T, v)       # the minimum-norm step
        moved = _shifted(model, step)
        with torch.no_grad():
            torch.testing.assert_close((moved(x) - model(x))[0] / eps, v, atol=1e-3, rtol=0)
            errors.append(((moved(others) - model(others)) / eps - predicted).abs().max().item())
    assert errors[0] < 1e-3
    assert 1.6 < errors[0] / errors[1] < 2.4  # the remainder is O(eps^2): halving eps halves it


def _shifted(model, flat_step):
    """A copy of the model with the flat parameter step added (named_parameters order)."""
    moved = copy.deepcopy(model)
    offset = 0
    with torch.no_grad():
        for p in moved.parameters():
            p += flat_step[offset:offset + p.numel()].reshape(p.shape)
            offset += p.numel()
    return moved


# --- classification: singular self-kernels ----------------------------------------------

def test_every_method_handles_tied_weights():
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    tied[2].weight = tied[0].weight
    xs = torch.randn(6, 3)
    dense = netsim.similarity_from_jacobians(jacobian_grads(tied, xs))
    for method in ("auto", "layerwise", "jacobian"):
        torch.testing.assert_close(netsim.similarity(tied, xs, method=method), dense, rtol=1e-4, atol=1e-5)


def test_classification_self_kernel_has_rank_d_minus_one_and_unit_self_similarity():
    model = mlp(d_out=10, hidden=16, seed=8)
    xs = torch.randn(12, 3)
    J = jacobian_grads(model, xs, output_fn=outputs.neg_log_softmax)
    _, rank = psd_power(J @ J.transpose(1, 2), -0.5)
    assert rank.tolist() == [9] * 12
    for reduce in ("trace", "none"):
        k = netsim.similarity(model, xs, output_fn=outputs.neg_log_softmax, reduce=reduce)
        assert torch.isfinite(k).all()
    k = netsim.similarity(model, xs, output_fn=outputs.neg_log_softmax)
    torch.testing.assert_close(k.diagonal(), torch.ones(12), atol=1e-5, rtol=0)
    assert k.abs().max() <= 1 + 1e-5


@pytest.mark.parametrize("binarise", ["rest", "adversary"])
def test_binarised_classification_outputs(binarise):
    model = mlp(d_out=10, hidden=16, seed=9)
    xs, labels = torch.randn(8, 3), torch.randint(0, 10, (8,))
    if binarise == "rest":
        fn, targets = outputs.class_vs_rest, labels
        log_p = torch.log_softmax(model(xs), 1)
        mask = torch.nn.functional.one_hot(labels, 10).bool()
        expected = log_p[mask] - log_p[~mask].reshape(8, 9).mean(1)
    else:
        fn, targets = outputs.class_vs_adversary, outputs.sample_adversary(labels, 10, torch.Generator().manual_seed(0))
        assert (targets[:, 0] != targets[:, 1]).all()
        log_p = torch.log_softmax(model(xs), 1)
        expected = log_p.gather(1, targets[:, :1])[:, 0] - log_p.gather(1, targets[:, 1:])[:, 0]
    torch.testing.assert_close(fn(model(xs), targets)[:, 0], expected)
    k = netsim.similarity(model, xs, output_fn=fn, x_targets=targets)
    torch.testing.assert_close(k.diagonal(), torch.ones(8), atol=1e-5, rtol=0)


# --- bad input ----------------------------------------------------------------------------

def _dead_relu_model():
    """ReLU net without output bias: the input (-1, -1) switches every unit off (zero gradient)."""
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0]]))
        model[0].bias.zero_()
        model[2].weight.fill_(1.0)
    return model


def test_zero_gradient_is_a_clear_error_naming_the_samples():
    xs = torch.tensor([[1.0, 2.0], [-1.0, -1.0], [0.5, 0.1], [-2.0, -3.0]])
    with pytest.raises(ZeroGradientError, match=r"indices 1, 3") as err:
        netsim.similarity(_dead_relu_model(), xs)
    assert err.value.indices == [1, 3]
    with pytest.raises(ZeroGradientError):
        netsim.soft_density(_dead_relu_model(), xs)


def test_zero_gradient_opt_in_gives_zero_similarity_not_nan():
    xs = torch.tensor([[1.0, 2.0], [-1.0, -1.0], [0.5, 0.1]])
    for kind in ("correlation", "influence"):
        k = netsim.similarity(_dead_relu_model(), xs, kind=kind, on_zero="zero")
        assert torch.isfinite(k).all()
        assert (k[1] == 0).all()
    k = netsim.similarity(_dead_relu_model(), xs, on_zero="zero")
    assert (k[:, 1] == 0).all() and k[0, 0] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("bad", [dict(kind="cosine"), dict(reduce="max"), dict(on_zero="nan")])
def test_unknown_options_are_errors(bad):
    with pytest.raises(ValueError, match="must be one of"):
        netsim.similarity(mlp(d_out=2), torch.randn(3, 3), **bad)


def test_empty_second_set_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        netsim.similarity(mlp(), torch.randn(3, 3), torch.randn(0, 3))


def test_remove_shared_direction_projects_out_the_mean_normalised_gradient():
    from netsim.kernel import remove_shared_direction

    J = jacobian_grads(mlp(d_out=2, seed=10), torch.randn(30, 3)).double()
    P = remove_shared_direction(J)
    shared = (J / J.norm(dim=2, keepdim=True)).mean(0)
    assert (P * shared).sum(2).abs().max() < 1e-10                     # orthogonal to it
    # a component common to every gradient is removed entirely
    common = torch.randn(1, 1, J.shape[2], dtype=J.dtype)
    spread = torch.randn_like(J) * 1e-3
    assert remove_shared_direction(common + spread).norm() < 0.05 * (common + spread).norm()


@pytest.mark.parametrize("theta", [0.0, 0.4, 1.3, 2.5, -2.0])
def test_trace_kernel_of_a_rotated_copy_is_the_cosine_and_rot_is_one(theta):
    """J(x') = R_theta J(x): K^C(x, x') = R_theta^T, so 1/2 Tr K^C = cos(theta) exactly and the
    rotation-invariant reduction (the max over output rotations) is 1 (the tour's figure). Exact to
    float64 rounding: the 1.4e-8 once seen here was the rotation built in float32, then cast."""
    model = mlp(d_out=2, seed=8)
    J = jacobian_grads(model, torch.randn(5, 3)).double()
    J_rot = torch.einsum("ab,nbp->nap", _rotation(theta, torch.float64), J)
    trace = netsim.similarity_from_jacobians(J, J_rot, reduce="trace").diagonal()
    rot = netsim.similarity_from_jacobians(J, J_rot, reduce="rot").diagonal()
    torch.testing.assert_close(trace, torch.full_like(trace, math.cos(theta)), atol=1e-12, rtol=0)
    torch.testing.assert_close(rot, torch.ones_like(rot), atol=1e-12, rtol=0)


def test_rot_reduction_is_never_below_the_trace():
    model = mlp(d_out=2, seed=9)
    xs, ys = torch.randn(8, 3), torch.randn(6, 3)
    tr = netsim.similarity(model, xs, ys, reduce="trace")
    rot = netsim.similarity(model, xs, ys, reduce="rot")
    assert (rot >= tr - 1e-6).all()


def test_the_memory_budget_is_the_argument_else_the_environment_else_the_default(monkeypatch):
    from netsim import memory
    monkeypatch.delenv(memory.MEMORY_BUDGET_VARIABLE, raising=False)
    assert memory.budget_bytes(12345) == 12345 and memory.budget_bytes(0) == 0
    assert memory.budget_bytes() == memory.DEFAULT_MEMORY_BUDGET
    for text, expected in (("1048576", 2**20), ("512MiB", 512 * 2**20), ("2G", 2 * 2**30), ("1.5gb", 3 * 2**29),
                           (" 64 kib ", 64 * 2**10)):
        monkeypatch.setenv(memory.MEMORY_BUDGET_VARIABLE, text)
        assert memory.budget_bytes() == expected, text
        assert memory.budget_bytes(7) == 7                          # the argument wins
    for text in ("lots", "-5", "1.2.3", "5 PB"):
        monkeypatch.setenv(memory.MEMORY_BUDGET_VARIABLE, text)
        with pytest.raises(ValueError, match="NETSIM_MEMORY_BUDGET"):
            memory.budget_bytes()
    for bad in (-1, 1.5, True, "1G"):
        with pytest.raises(ValueError, match="memory_budget must be a non-negative int"):
            memory.budget_bytes(bad)


@pytest.mark.parametrize("method", ["jacobian", "layerwise"])
def test_row_blocks_fill_the_budget_and_each_costs_a_pass_over_the_columns(method):
    """The default budget holds 40 samples in one row block; a budget of one byte, one chunk per block
    (each re-reads the columns). A stream (`similarity_blocks`) also holds no more than the 40 x 40
    matrix it avoids: several blocks even with the default. The kernels agree."""
    model, xs = mlp(d_out=2, seed=9).double(), torch.randn(40, 3, dtype=torch.float64)
    engine = engine_for(model, xs[:4], chunk_size=4, method=method)
    assert kernel.block_rows(engine, 2, 8, budget_bytes()) >= 40
    assert kernel.block_rows(engine, 2, 8, 1) == 4                   # never below one chunk
    many = list(kernel.similarity_blocks(model, xs, chunk_size=4, method=method, memory_budget=1))
    capped = list(kernel.similarity_blocks(model, xs, chunk_size=4, method=method))
    assert len({rows.start for rows, *_ in many}) == 10 and len({rows.start for rows, *_ in capped}) > 1
    full = netsim.similarity(model, xs, chunk_size=4, method=method)
    torch.testing.assert_close(netsim.similarity(model, xs, chunk_size=4, method=method, memory_budget=1), full,
                               rtol=1e-12, atol=1e-12)

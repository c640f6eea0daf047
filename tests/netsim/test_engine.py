"""netsim.engine: both engines against the plain per-sample loop, the auto choice, chunk layouts,
and the in-place recording state kept per engine."""

import pytest
import torch
from torch import nn

import netsim
from conftest import SmallCNN, mlp, reference_jacobians
from netsim import NonFiniteError, layerwise
from netsim.engine import JacobianEngine, LayerwiseEngine, engine_for


def _models():
    inplace_cnn = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
                                nn.Linear(3 * 36, 2))
    return {
        "mlp": (mlp(d_out=2, seed=31, hidden=12), torch.randn(11, 3)),
        "cnn": (SmallCNN(d_out=2, seed=32).eval(), torch.randn(9, 1, 8, 8)),
        "inplace_cnn": (inplace_cnn, torch.randn(7, 1, 6, 6)),
    }


def _dense(rep, engine):
    return rep if isinstance(engine, JacobianEngine) else layerwise.materialise(rep)


@pytest.mark.parametrize("method", ["jacobian", "layerwise"])
@pytest.mark.parametrize("name", list(_models()))
def test_every_engine_operation_equals_the_reference_loop(name, method):
    model, xs = _models()[name]
    J = reference_jacobians(model, xs)
    engine = engine_for(model, xs, method=method, chunk_size=4)
    assert engine.name == method
    reps = list(engine.chunks(xs))
    assert [start for start, _ in reps] == list(range(0, len(xs), 4))        # short last chunk included
    rep = engine.cat([r for _, r in reps])
    assert engine.shape(rep) == tuple(J.shape[:2]) and engine.size(rep) == len(xs)
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_dense(rep, engine), J, **tol)
    torch.testing.assert_close(engine.self_gram(rep), J @ J.transpose(1, 2), **tol)
    gram = torch.einsum("iap,jbp->ijab", J, J[:5])
    torch.testing.assert_close(engine.gram(rep, engine.cat([reps[0][1]]), False), gram[:, :4], **tol)
    torch.testing.assert_close(engine.gram(rep, reps[0][1], True), gram[:, :4].diagonal(dim1=-2, dim2=-1).sum(-1),
                               **tol)
    left = torch.randn(len(xs), 2, 2)
    torch.testing.assert_close(_dense(engine.transform(rep, left), engine), left @ J, **tol)
    sums = engine.summed(rep)
    torch.testing.assert_close(engine.dot_with_sums(rep, sums), J @ J.sum(0).T, **tol)
    assert bool((engine.max_abs(rep) >= J.abs().amax((1, 2)) * (1 - 1e-5)).all())   # an upper bound
    # a sum read back as parameters is the direction whose jvp gives J S^T
    jv = netsim.output_jvp(model, xs, engine.tangent(sums, 0))
    torch.testing.assert_close(jv, J @ J.sum(0)[0], **tol)


def test_auto_picks_layerwise_when_the_rules_apply_and_jacobians_otherwise():
    model, xs = mlp(), torch.randn(4, 3)
    assert isinstance(engine_for(model, xs), LayerwiseEngine)
    tied = mlp(hidden=3, d_in=3)
    tied[2].weight = tied[0].weight                       # one parameter in two modules
    assert isinstance(engine_for(tied, xs), JacobianEngine)
    with pytest.raises(layerwise.UnsupportedModel, match="shared"):
        engine_for(tied, xs, method="layerwise")


def test_default_chunks_follow_the_size_of_a_sample():
    small = engine_for(mlp(), torch.randn(4, 3))
    assert 16 <= small.chunk <= 256
    assert engine_for(mlp(), torch.randn(4, 3), chunk_size=5).chunk == 5
    assert engine_for(mlp(), torch.randn(4, 3), method="jacobian").chunk == netsim.grads.DEFAULT_CHUNK


class _Counting(nn.Module):
    """Counts forward passes of the wrapped model."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_in_place_recording_is_found_once_and_kept_on_the_engine():
    """The probe finds that copies are needed (two forwards on one sample); every chunk then
    runs exactly one forward, and nothing is remembered outside the engine."""
    model, xs = _models()["inplace_cnn"]
    counted = _Counting(model)
    engine = engine_for(counted, xs, chunk_size=3)
    assert engine.copy_records is True and counted.calls == 2
    counted.calls = 0
    list(engine.chunks(xs))
    assert counted.calls == 3                               # 7 samples, chunks of 3
    fresh = engine_for(_Counting(netsim.without_inplace(model)), xs)
    assert fresh.copy_records is False
    torch.testing.assert_close(netsim.similarity(counted, xs, method="layerwise"),
                               netsim.similarity(model, xs, method="jacobian"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["jacobian", "layerwise"])
def test_non_finite_chunks_are_named_by_their_position_in_the_data(method):
    xs = torch.randn(9, 3)
    xs[5, 0] = float("inf")
    engine = engine_for(mlp(), xs, method=method, chunk_size=2)
    with pytest.raises(NonFiniteError) as err:
        list(engine.chunks(xs))
    assert err.value.where == {"inputs": [5]}


def test_bad_engine_options_are_refused():
    with pytest.raises(ValueError, match="method"):
        engine_for(mlp(), torch.randn(2, 3), method="Jacobian")
    with pytest.raises(ValueError, match="chunk_size"):
        engine_for(mlp(), torch.randn(2, 3), chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        JacobianEngine(mlp(), None, -3)

"""netsim.engine: both engines against the plain per-sample loop, the measured auto choice (fake clocks) and its
cache, chunk layouts,
and the in-place recording state kept per engine."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

import netsim
from conftest import SmallCNN, mlp, reference_jacobians
from netsim import NonFiniteError, layerwise
from netsim import engine as engine_module
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


@pytest.fixture
def fresh_choices(monkeypatch):
    """An empty `auto` cache for the test (the module's cache is restored after)."""
    monkeypatch.setattr(engine_module, "_AUTO_CHOICES", OrderedDict())
    return engine_module._AUTO_CHOICES


def _clock(*ticks):
    """A fake clock returning `ticks` in turn, and failing if read once more."""
    it = iter(ticks)
    return lambda: next(it)


def test_auto_times_both_engines_and_keeps_the_faster(fresh_choices):
    xs = torch.randn(4, 3)
    # layer-wise chunk timed first (0 -> 5), then the Jacobian one (5 -> 6): Jacobians are faster
    assert isinstance(engine_for(mlp(), xs, clock=_clock(0.0, 5.0, 5.0, 6.0)), JacobianEngine)
    # the same structure (another instance, other weights) is not measured again: the clock is not read
    assert isinstance(engine_for(mlp(seed=3), torch.randn(6, 3), clock=_clock()), JacobianEngine)
    # another structure is measured: here the layer-wise engine wins
    assert isinstance(engine_for(mlp(hidden=5), xs, clock=_clock(0.0, 1.0, 1.0, 3.0)), LayerwiseEngine)
    # d, the sample shape and the trainable parameters are part of the structure
    assert isinstance(engine_for(mlp(d_out=2), xs, clock=_clock(0.0, 1.0, 1.0, 3.0)), LayerwiseEngine)
    frozen = mlp()
    frozen[0].weight.requires_grad_(False)
    assert isinstance(engine_for(frozen, xs, clock=_clock(0.0, 1.0, 1.0, 3.0)), LayerwiseEngine)
    assert len(fresh_choices) == 4


def test_auto_compares_time_per_sample_on_a_bounded_chunk(fresh_choices, monkeypatch):
    """Each engine times as many samples (up to 16) as fit in AUTO_PROBE_BYTES; per-sample times are compared."""
    model, xs = mlp(hidden=40), torch.randn(20, 3)
    jacobian_bytes = JacobianEngine(model, None, None).bytes_per_sample(1, 4)
    layer_bytes = engine_for(model, xs, method="layerwise").bytes_per_sample(1, 4)
    assert 8 * layer_bytes < jacobian_bytes                # wide hidden layers: factors are small
    monkeypatch.setattr(engine_module, "AUTO_PROBE_BYTES", 2 * jacobian_bytes)
    seen = {}
    for cls in (JacobianEngine, LayerwiseEngine):
        def chunks(self, inputs, targets=None, original=cls.chunks):
            seen[self.name] = len(inputs)
            return original(self, inputs, targets)
        monkeypatch.setattr(cls, "chunks", chunks)
    # layer-wise: 16 samples in 8 s (0.5 s each); Jacobians: 2 samples in 2 s (1 s each)
    assert isinstance(engine_for(model, xs, clock=_clock(0.0, 8.0, 8.0, 10.0)), LayerwiseEngine)
    assert seen == {"layerwise": 16, "jacobian": 2}


def test_auto_times_each_engine_after_an_untimed_warm_up(fresh_choices, monkeypatch):
    """An engine whose first call is slow (vmap tracing) is judged on its later calls."""
    now = [0.0]
    costs = {"layerwise": [1.0], "jacobian": [100.0, 0.5]}   # seconds per call; the last one repeats
    calls = {"layerwise": 0, "jacobian": 0}
    for cls in (JacobianEngine, LayerwiseEngine):
        def chunks(self, inputs, targets=None, original=cls.chunks):
            cost = costs[self.name]
            now[0] += cost[min(calls[self.name], len(cost) - 1)]
            calls[self.name] += 1
            return original(self, inputs, targets)
        monkeypatch.setattr(cls, "chunks", chunks)
    assert isinstance(engine_for(mlp(), torch.randn(20, 3), clock=lambda: now[0]), JacobianEngine)
    assert calls == {"layerwise": 2, "jacobian": 2}


def test_the_auto_cache_is_bounded(fresh_choices, monkeypatch):
    monkeypatch.setattr(engine_module, "AUTO_CACHE_SIZE", 2)
    xs = torch.randn(3, 3)
    for hidden in (3, 4, 5):
        engine_for(mlp(hidden=hidden), xs, clock=_clock(0.0, 1.0, 1.0, 2.0))
    assert len(fresh_choices) == 2
    engine_for(mlp(hidden=5), xs, clock=_clock())                          # still cached: not measured
    engine_for(mlp(hidden=3), xs, clock=_clock(0.0, 1.0, 1.0, 2.0))        # the oldest was dropped: measured again


def test_auto_falls_back_to_jacobians_when_the_rules_refuse_the_model(fresh_choices):
    xs = torch.randn(4, 3)
    twice = mlp(hidden=3, d_in=3)
    twice[2] = twice[0]                                   # one module run twice
    assert isinstance(engine_for(twice, xs, clock=_clock()), JacobianEngine)   # nothing to measure
    with pytest.raises(layerwise.UnsupportedModel, match="also registered"):
        engine_for(twice, xs, method="layerwise")
    assert not fresh_choices


def test_auto_with_real_timing_equals_both_engines():
    model, xs = _models()["cnn"]
    results = {m: netsim.similarity(model, xs, method=m) for m in ("auto", "layerwise", "jacobian")}
    torch.testing.assert_close(results["auto"], results["layerwise"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["auto"], results["jacobian"], rtol=1e-5, atol=1e-5)


def test_default_chunks_follow_the_size_of_a_sample():
    small = engine_for(mlp(), torch.randn(4, 3), method="layerwise")
    assert 16 <= small.chunk <= 256
    assert engine_for(mlp(), torch.randn(4, 3), chunk_size=5, method="layerwise").chunk == 5
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
    engine = engine_for(counted, xs, chunk_size=3, method="layerwise")
    assert engine.copy_records is True and counted.calls == 2
    counted.calls = 0
    list(engine.chunks(xs))
    assert counted.calls == 3                               # 7 samples, chunks of 3
    fresh = engine_for(_Counting(netsim.without_inplace(model)), xs, method="layerwise")
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


@pytest.mark.parametrize("failing", ["layerwise", "jacobian"])
@pytest.mark.parametrize("when", [1, 2])   # the untimed one-sample run, or the timed chunk
def test_auto_survives_an_engine_failing_anywhere_in_its_timing(fresh_choices, monkeypatch, failing, when):
    """An engine that raises in auto's timing (before: an UnsupportedModel after the one-sample probe
    escaped to the user) is left out with one warning, and the other engine is used."""
    engine_class = LayerwiseEngine if failing == "layerwise" else JacobianEngine
    original, calls = engine_class.chunks, []

    def chunks(self, inputs, targets=None):
        calls.append(1)
        if len(calls) == when:
            raise RuntimeError("boom in the timed run")
        yield from original(self, inputs, targets)

    monkeypatch.setattr(engine_class, "chunks", chunks)
    with pytest.warns(engine_module.EngineFailedWarning, match=f"the {failing} engine failed.*boom"):
        chosen = engine_for(mlp(), torch.randn(8, 3), clock=_clock(0.0, 1.0, 2.0, 3.0))
    assert chosen.name != failing


def test_auto_left_with_no_working_engine_raises_the_jacobian_engines_error(fresh_choices, monkeypatch):
    def broken(self, inputs, targets=None):
        raise RuntimeError("nothing works")
        yield

    monkeypatch.setattr(LayerwiseEngine, "chunks", broken)
    monkeypatch.setattr(JacobianEngine, "chunks", broken)
    with pytest.raises(RuntimeError, match="nothing works"):
        engine_for(mlp(), torch.randn(8, 3), clock=_clock(0.0, 1.0))


def test_a_users_output_error_is_raised_without_blaming_an_engine(recwarn):
    for call in (netsim.per_sample_grads, netsim.similarity, netsim.soft_density):
        with pytest.raises(ValueError, match="d = 0 columns"):
            call(mlp(), torch.randn(4, 3), output_fn=lambda out: out[:, :0])
        with pytest.raises(TypeError, match="not a tensor"):
            call(mlp(), torch.randn(4, 3), output_fn=lambda out: [out])
    assert not [w for w in recwarn if issubclass(w.category, engine_module.EngineFailedWarning)]

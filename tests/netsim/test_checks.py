"""Every public function checks its arguments before the model runs, and a refused call leaves
the model exactly as it was: parameters, buffers (BatchNorm running statistics), modes, hooks."""

import pytest
import torch
from torch import nn

import netsim
from conftest import SmallCNN, assert_model_unchanged, mlp, model_state
from netsim import diagnostics, enforce, engine, grads, layerwise, outputs


def _tangent(model):
    return {k: torch.ones_like(p) for k, p in grads.trainable_parameters(model).items()}


def _calls(x, values):
    """(name, call(model)) for every public function that takes a model."""
    return [
        ("per_sample_grads", lambda m: netsim.per_sample_grads(m, x)),
        ("iter_jacobians", lambda m: list(netsim.iter_jacobians(m, x))),
        ("output_jvp", lambda m: netsim.output_jvp(m, x, _tangent(m))),
        ("output_dim", lambda m: grads.output_dim(m, x)),
        ("similarity", lambda m: netsim.similarity(m, x)),
        ("similarity ys", lambda m: netsim.similarity(m, x, x[:2], kind="influence")),
        ("similarity_blocks", lambda m: list(netsim.kernel.similarity_blocks(m, x))),
        ("soft_density", lambda m: netsim.soft_density(m, x)),
        ("soft_density reference", lambda m: netsim.soft_density(m, x, reference=x[:3])),
        ("neighbour_counts hard", lambda m: netsim.neighbour_counts(m, x)),
        ("neighbour_counts positive", lambda m: netsim.neighbour_counts(m, x, estimator="positive")),
        ("neighbour_counts soft", lambda m: netsim.neighbour_counts(m, x, estimator="soft")),
        ("engine_for", lambda m: engine.engine_for(m, x)),
        ("factorise", lambda m: layerwise.factorise(m, x)),
        ("uncertainty_factor", lambda m: diagnostics.uncertainty_factor(m, x)),
        ("kernel_average", lambda m: diagnostics.kernel_average(m, x, values)),
        ("kernel_sums", lambda m: diagnostics.kernel_sums(m, x, {"a": values})),
        ("denoising_factor", lambda m: diagnostics.denoising_factor(m, x)),
        ("self_denoising", lambda m: diagnostics.self_denoising(m, x, true=values, noisy=values)),
        ("predictions", lambda m: diagnostics.predictions(m, x)),
    ]


_IMAGES = torch.randn(6, 1, 8, 8)
_CALLS = _calls(_IMAGES, torch.randn(6, 2))


@pytest.mark.parametrize("name,call", _CALLS, ids=[c[0] for c in _CALLS])
def test_batchnorm_in_training_mode_is_refused_and_leaves_the_model_untouched(name, call):
    cnn = SmallCNN(d_out=2).train()
    handle = cnn.conv.register_forward_hook(lambda *a: None)   # a user's own hook must survive
    before = model_state(cnn)
    with pytest.raises(ValueError, match="training mode"):
        call(cnn)
    assert_model_unchanged(cnn, before)
    handle.remove()


@pytest.mark.parametrize("name", ["group_loss", "pair_loss"])
def test_enforcing_criteria_that_fail_after_a_training_forward_restore_the_buffers(name):
    cnn = SmallCNN(d_out=2).train()           # d = 2: refused, but only once the output is seen
    before = model_state(cnn)
    with pytest.raises(ValueError, match="one scalar output per sample"):
        if name == "group_loss":
            enforce.group_loss(cnn, _IMAGES[:3], _IMAGES[3:])
        else:
            enforce.pair_loss(cnn, _IMAGES[:1], _IMAGES[1:2])
    assert_model_unchanged(cnn, before)
    # the same call with a valid output trains as usual: BatchNorm uses and updates batch statistics
    enforce.group_loss(cnn, _IMAGES[:3], _IMAGES[3:], output_fn=lambda out: out[:, 0])
    assert not torch.equal(cnn.bn.running_mean, before["tensors"]["bn.running_mean"])


X, T = torch.randn(6, 3), torch.zeros(7, dtype=torch.long)


class _TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x), x.sum(1)


BAD_CALLS = [
    ("7 targets for 6 inputs: similarity", ValueError, "7 rows for 6",
     lambda m: netsim.similarity(m, X, output_fn=outputs.class_vs_rest, x_targets=T)),
    ("7 targets for 6 inputs: neighbour_counts", ValueError, "7 rows for 6",
     lambda m: netsim.neighbour_counts(m, X, output_fn=outputs.class_vs_rest, targets=T)),
    ("7 targets for 6 inputs: soft estimator", ValueError, "7 rows for 6",
     lambda m: netsim.neighbour_counts(m, X, estimator="soft", output_fn=outputs.class_vs_rest, targets=T)),
    ("7 targets for 6 inputs: soft_density", ValueError, "7 rows for 6",
     lambda m: netsim.soft_density(m, X, output_fn=outputs.class_vs_rest, targets=T)),
    ("y_targets without ys", ValueError, "without ys",
     lambda m: netsim.similarity(m, X, y_targets=T[:6])),
    ("chunk_size=-1", ValueError, "chunk_size must be a positive", lambda m: netsim.similarity(m, X, chunk_size=-1)),
    ("chunk_size=0", ValueError, "chunk_size must be a positive int", lambda m: netsim.similarity(m, X, chunk_size=0)),
    ("chunk_size=0 per_sample_grads", ValueError, "chunk_size",
     lambda m: netsim.per_sample_grads(m, X, chunk_size=0)),
    ("chunk_size=-1 soft_density", ValueError, "chunk_size", lambda m: netsim.soft_density(m, X, chunk_size=-1)),
    ("chunk_size=2.5", TypeError, "chunk_size", lambda m: netsim.soft_density(m, X, chunk_size=2.5)),
    ("memory_budget=True", ValueError, "memory_budget", lambda m: netsim.similarity(m, X, memory_budget=True)),
    ("memory_budget=-1", ValueError, "memory_budget", lambda m: netsim.soft_density(m, X, memory_budget=-1)),
    ("memory_budget=1.5", ValueError, "memory_budget",
     lambda m: netsim.neighbour_counts(m, X, estimator="soft", memory_budget=1.5)),
    ("rtol=-1", ValueError, "rtol", lambda m: netsim.similarity(m, X, rtol=-1.0)),
    ("on_zero='ignore' soft_density", ValueError, "on_zero", lambda m: netsim.soft_density(m, X, on_zero="ignore")),
    ("method='fast'", ValueError, "method", lambda m: netsim.soft_density(m, X, method="fast")),
    ("kind=None", ValueError, "kind", lambda m: netsim.similarity(m, X, kind=None)),
    ("estimator typo", ValueError, "estimator", lambda m: netsim.neighbour_counts(m, X, estimator="Hard")),
    ("misspelt kwarg, soft", TypeError, "chunksize",
     lambda m: netsim.neighbour_counts(m, X, estimator="soft", chunksize=3)),
    ("matrix-only kwarg, soft", TypeError, "progress",
     lambda m: netsim.neighbour_counts(m, X, estimator="soft", progress=True)),
    ("misspelt kwarg, hard", TypeError, "on_zeros", lambda m: netsim.neighbour_counts(m, X, on_zeros="zero")),
    ("empty reference", ValueError, "reference must be a non-empty",
     lambda m: netsim.soft_density(m, X, reference=X[:0])),
    ("reference_targets without reference", ValueError, "without reference",
     lambda m: netsim.soft_density(m, X, reference_targets=T[:6])),
    ("non-tensor inputs", TypeError, "batch of xs must be a tensor", lambda m: netsim.similarity(m, X.tolist())),
    ("half inputs", TypeError, "float32", lambda m: netsim.similarity(m, X.half())),
    ("tangent of the wrong shape", ValueError, "tangent",
     lambda m: netsim.output_jvp(m, X, {k: torch.ones(1) for k, _ in m.named_parameters()})),
    ("self_denoising typo", TypeError, "chunksize",
     lambda m: diagnostics.self_denoising(m, X, true=torch.zeros(6, 2), noisy=torch.zeros(6, 2), chunksize=2)),
    ("predictions batch_size=0", ValueError, "batch_size", lambda m: diagnostics.predictions(m, X, batch_size=0)),
    ("NaN values", ValueError, "non-finite|NaN",
     lambda m: diagnostics.kernel_average(m, X, torch.full((6, 2), float("nan")))),
]


@pytest.mark.parametrize("name,error,match,call", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_are_clear_errors_before_the_model_runs(name, error, match, call):
    model = mlp(d_out=2)
    counter = []
    model.register_forward_pre_hook(lambda *a: counter.append(1))
    before = model_state(model)
    with pytest.raises(error, match=match):
        call(model)
    assert_model_unchanged(model, before)
    assert not counter, "the model ran before the arguments were checked"


def test_a_model_returning_a_tuple_asks_for_output_fn():
    with pytest.raises(TypeError, match="returned a tuple.*output_fn"):
        netsim.similarity(_TupleNet(), X)
    k = netsim.similarity(_TupleNet(), X, output_fn=lambda out: out[0])
    assert k.shape == (6, 6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("call", [netsim.similarity, netsim.soft_density, netsim.per_sample_grads])
def test_half_precision_models_are_refused_with_what_to_do(dtype, call):
    model = mlp(d_out=2, dtype=dtype)
    with pytest.raises(TypeError, match=r"float32.*\.float\(\)"):
        call(model, X.to(dtype))


def test_calls_inside_autocast_are_refused():
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="autocast"):
        netsim.similarity(mlp(), X)


def test_non_module_and_frozen_models_are_refused():
    with pytest.raises(TypeError, match="nn.Module"):
        netsim.similarity(lambda x: x, X)
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        netsim.soft_density(frozen, X)

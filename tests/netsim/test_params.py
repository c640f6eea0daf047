"""params= (name patterns or a callable) equals freezing the other parameters, leaves the model's flags
alone, and refuses patterns that match nothing."""

import copy

import pytest
import torch

import netsim
from conftest import TinyTransformer, assert_model_unchanged, mlp, model_state, token_batch
from netsim import diagnostics, enforce

MLP_PATTERNS = ["2.*", "4.weight"]
TRANSFORMER_PATTERNS = ["encoder.layers.1.*", "head.*"]


def frozen_copy(model, keep):
    """A copy of `model` whose parameters outside `keep` (a name predicate) are frozen."""
    other = copy.deepcopy(model)
    for name, p in other.named_parameters():
        p.requires_grad_(keep(name))
    return other


CALLS = {
    "per_sample_grads": lambda m, x, **kw: netsim.per_sample_grads(m, x, chunk_size=4, **kw),
    "similarity": lambda m, x, **kw: netsim.similarity(m, x, chunk_size=4, **kw),
    "soft_density": lambda m, x, **kw: netsim.soft_density(m, x, chunk_size=4, **kw),
    "neighbour_counts": lambda m, x, **kw: netsim.neighbour_counts(m, x, tau=0.3, chunk_size=4, **kw),
    "uncertainty_factor": lambda m, x, **kw: diagnostics.uncertainty_factor(m, x, chunk_size=4, **kw),
}


def _cases():
    x = torch.randn(9, 3, generator=torch.Generator().manual_seed(0))
    tokens = token_batch(8)
    return {
        "mlp": (lambda: mlp(d_out=2).eval(), x, MLP_PATTERNS),
        "transformer": (lambda: TinyTransformer(d_out=2).eval(), tokens, TRANSFORMER_PATTERNS),
    }


@pytest.mark.parametrize("method", ["jacobian", "auto"])
@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("case", ["mlp", "transformer"])
def test_params_equals_freezing_the_others(case, call, method):
    make, x, patterns = _cases()[case]
    model = make()
    keep = lambda name: any(__import__("fnmatch").fnmatchcase(name, p) for p in patterns)  # noqa: E731
    expected = CALLS[call](frozen_copy(model, keep), x, method=method) if call != "per_sample_grads" else \
        CALLS[call](frozen_copy(model, keep), x)
    before = model_state(model)
    for params in (patterns, lambda name, p: keep(name)):
        options = {"params": params} if call == "per_sample_grads" else {"params": params, "method": method}
        torch.testing.assert_close(CALLS[call](model, x, **options), expected, rtol=1e-5, atol=1e-6)
    assert_model_unchanged(model, before)
    assert all(p.requires_grad for p in model.parameters())


def test_a_selection_only_picks_among_trainable_parameters():
    model = mlp(d_out=2).eval()
    model[0].weight.requires_grad_(False)
    x = torch.randn(4, 3)
    assert netsim.per_sample_grads(model, x, params=["0.*"]).shape == (4, 2, 8)   # the bias only
    assert netsim.num_parameters(model, ["0.*", "4.*"]) == 8 + 18


@pytest.mark.parametrize("params, error, match", [
    (["head.*"], ValueError, "matches no trainable parameter.*0.weight"),
    ("2.*", TypeError, "list of name patterns"),
    ([], ValueError, "empty"),
    ([3], TypeError, "patterns"),
    (lambda name, p: False, ValueError, "selects no trainable parameter"),
])
def test_bad_selections_are_clear_errors_before_the_model_runs(params, error, match):
    model = mlp(d_out=2).eval()
    runs = []
    model.register_forward_pre_hook(lambda *a: runs.append(1))
    before = model_state(model)
    for call in (lambda: netsim.similarity(model, torch.randn(4, 3), params=params),
                 lambda: netsim.soft_density(model, torch.randn(4, 3), params=params),
                 lambda: netsim.per_sample_grads(model, torch.randn(4, 3), params=params)):
        with pytest.raises(error, match=match):
            call()
    assert not runs
    assert_model_unchanged(model, before)


def test_enforcing_criteria_take_params_and_keyword_inputs():
    model, x1, x2 = mlp().eval(), torch.randn(3, 3), torch.randn(3, 3)
    keep = lambda name: name.startswith("4.")  # noqa: E731
    expected = enforce.group_loss(frozen_copy(model, keep), x1, x2)
    torch.testing.assert_close(enforce.group_loss(model, x1, x2, params=["4.*"]), expected)
    keyword = enforce.pair_loss(_Keyword(model), {"x": x1[:1]}, {"x": x2[:1]}, params=["net.4.*"])
    torch.testing.assert_close(keyword, enforce.pair_loss(frozen_copy(model, keep), x1[:1], x2[:1]))


class _Keyword(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

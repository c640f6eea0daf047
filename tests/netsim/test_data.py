"""Every public function that takes data gives, for a Dataset, a DataLoader (short last batch), a
generator and dict batches, the numbers it gives for the same samples as one tensor."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import netsim
from conftest import TinyTransformer, mlp, token_batch
from netsim import diagnostics, outputs
from netsim.data import as_source

N, M = 11, 7
XS = torch.randn(N, 3, generator=torch.Generator().manual_seed(1))
YS = torch.randn(M, 3, generator=torch.Generator().manual_seed(2))
LABELS = torch.arange(N) % 3
OPTIONS = dict(chunk_size=4)


class Pairs(Dataset):
    """A map-style Dataset of (x, label) tuples, labels as Python ints."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        return XS[i], int(LABELS[i])


def forms(x, name):
    """The same samples as a DataLoader with a short last batch, a Dataset, a list of batches."""
    return {
        f"{name}-loader": DataLoader(TensorDataset(x), batch_size=3),
        f"{name}-dataset": TensorDataset(x),
        f"{name}-list": [x[:5], x[5:]],
    }


def with_labels():
    """(x, label) data: a DataLoader of tuples, a Dataset of tuples, a list of dict batches."""
    return {
        "pairs-loader": (DataLoader(Pairs(), batch_size=4), {}),
        "pairs-dataset": (Pairs(), {}),
        "dicts": ([{"x": XS[:6], "y": LABELS[:6]}, {"x": XS[6:], "y": LABELS[6:]}], {"targets_key": "y"}),
    }


class KeywordMLP(torch.nn.Module):
    """The MLP, called with keyword inputs: forward(x=...)."""

    def __init__(self):
        super().__init__()
        self.net = mlp(d_out=3)

    def forward(self, x):
        return self.net(x)


CALLS = {
    "per_sample_grads": lambda m, d, **kw: netsim.per_sample_grads(m, d, **OPTIONS, **kw),
    "similarity": lambda m, d, targets=None, **kw: netsim.similarity(m, d, memory_budget=3000, x_targets=targets,
                                                                     **OPTIONS, **kw),
    "soft_density": lambda m, d, **kw: netsim.soft_density(m, d, **OPTIONS, **kw),
    "neighbour_counts": lambda m, d, **kw: netsim.neighbour_counts(m, d, tau=0.3, memory_budget=3000, **OPTIONS,
                                                                   **kw),
    "uncertainty_factor": lambda m, d, **kw: diagnostics.uncertainty_factor(m, d, **OPTIONS, **kw),
    "kernel_average": lambda m, d, **kw: diagnostics.kernel_average(m, d, torch.randn(N, 1, generator=torch.Generator()
                                                                    .manual_seed(3)), **OPTIONS, **kw),
    "kernel_sums": lambda m, d, **kw: diagnostics.kernel_sums(m, d, {"a": torch.arange(N, dtype=torch.float32)},
                                                              memory_budget=3000, **OPTIONS, **kw).total,
    "kernel_sums_queries": lambda m, d, **kw: diagnostics.kernel_sums(
        m, d, {"a": torch.arange(N, dtype=torch.float32)}, query_index=torch.tensor([7, 2, 9]), **OPTIONS, **kw).total,
    "predictions": lambda m, d, **kw: diagnostics.predictions(m, d, batch_size=4, **kw),
    "self_denoising": lambda m, d, **kw: diagnostics.self_denoising(
        m, d, true=torch.linspace(0, 1, N)[:, None],
        noisy=torch.linspace(0, 1, N)[:, None] + 0.1 * (LABELS[:, None] - 1), **OPTIONS, **kw).factor,
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("form", list(forms(XS, "x")))
def test_data_forms_equal_one_tensor(call, form):
    model = mlp().eval()
    expected = CALLS[call](model, XS)
    assert torch.equal(CALLS[call](model, forms(XS, "x")[form]), expected)


@pytest.mark.parametrize("call", ["per_sample_grads", "predictions"])
def test_a_generator_read_once_equals_one_tensor(call):
    model = mlp().eval()
    assert torch.equal(CALLS[call](model, (x for x in XS.split(3))), CALLS[call](model, XS))


def test_generators_where_one_pass_is_enough():
    model = mlp().eval()
    gen = lambda: (x for x in YS.split(2))  # noqa: E731
    expected = netsim.similarity(model, XS, YS, chunk_size=4)
    assert torch.equal(netsim.similarity(model, (x for x in XS.split(3)), DataLoader(YS, batch_size=2), chunk_size=4),
                       expected)
    assert torch.equal(netsim.soft_density(model, gen(), reference=XS, chunk_size=4),
                       netsim.soft_density(model, YS, reference=XS, chunk_size=4))
    assert torch.equal(netsim.soft_density(model, XS, reference=gen(), chunk_size=4),
                       netsim.soft_density(model, XS, reference=YS, chunk_size=4))


@pytest.mark.parametrize("call", ["similarity", "soft_density", "neighbour_counts", "uncertainty_factor",
                                  "kernel_average", "kernel_sums", "self_denoising"])
def test_a_generator_needed_twice_is_a_clear_error_before_the_model_runs(call):
    model = mlp().eval()
    runs = []
    model.register_forward_pre_hook(lambda *a: runs.append(1))
    with pytest.raises(ValueError, match="re-iterable"):
        CALLS[call](model, (x for x in XS.split(3)))
    assert not runs


@pytest.mark.parametrize("call", ["per_sample_grads", "similarity", "soft_density", "neighbour_counts",
                                  "kernel_average", "kernel_sums", "predictions"])
@pytest.mark.parametrize("form", list(with_labels()))
def test_targets_from_tuple_and_dict_batches(call, form):
    model = mlp(d_out=3).eval()
    data, kw = with_labels()[form]
    if form == "dicts":  # dict batches are keyword inputs
        model = KeywordMLP().eval()
    expected = CALLS[call](model if form != "dicts" else model.net, XS, targets=LABELS, output_fn=outputs.class_vs_rest)
    got = CALLS[call](model, data, output_fn=outputs.class_vs_rest, **kw)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_dict_batched_transformer_equals_its_tensor_calls():
    """Several keyword tensors per sample (tokens and padding mask) through dict batches."""
    model = TinyTransformer(d_out=2).eval()
    tokens, mask = token_batch(9, padded=True)

    class Bound(torch.nn.Module):  # the reference: the same model with the mask bound per call
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, both):
            return self.model(both[:, 0], both[:, 1].bool())

    both = torch.stack([tokens, mask.long()], 1)
    expected = netsim.similarity(Bound(), both, method="jacobian", chunk_size=4)
    batches = [{"tokens": tokens[:4], "padding_mask": mask[:4]}, {"tokens": tokens[4:], "padding_mask": mask[4:]}]
    for method in ("auto", "layerwise", "jacobian"):   # keyword inputs reach every engine
        got = netsim.similarity(model, batches, chunk_size=4, method=method)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_batches_of_different_lengths_are_streamed_apart():
    """Dynamic padding: each batch padded to its own length. Chunks end where the shape changes
    (never joined across lengths), and row blocks still fall on their multiples."""
    batches = [{"ids": torch.zeros(3, 5)}, {"ids": torch.zeros(2, 5)}, {"ids": torch.zeros(4, 7)},
               {"ids": torch.zeros(1, 2)}]
    source = as_source(batches)
    got = [(offset, tuple(x["ids"].shape)) for offset, x, _ in source.chunks(4)]
    assert got == [(0, (4, 5)), (4, (1, 5)), (5, (4, 7)), (9, (1, 2))]
    got = [(offset, x["ids"].shape[0]) for offset, x, _ in source.chunks(8, block=3)]
    assert got == [(0, 3), (3, 2), (5, 1), (6, 3), (9, 1)]


def test_the_loader_is_streamed_in_chunks_never_concatenated():
    source = as_source(DataLoader(TensorDataset(XS, LABELS), batch_size=5))
    sizes = [(offset, x.shape[0], y.shape[0]) for offset, x, y in source.chunks(4)]
    assert sizes == [(0, 4, 4), (4, 4, 4), (8, 3, 3)]
    assert source.length == N


@pytest.mark.parametrize("bad, error, match", [
    ("text", TypeError, "Dataset"),
    ([["a"]], TypeError, "tensor"),
    ([{"x": XS, "y": LABELS}], ValueError, "targets_key 'labels'"),
])
def test_bad_data_is_a_clear_error(bad, error, match):
    with pytest.raises(error, match=match):
        netsim.similarity(mlp().eval(), bad, targets_key="labels" if isinstance(bad, list) and
                          isinstance(bad[0], dict) else None)


def test_targets_given_twice_or_of_the_wrong_length_are_errors():
    model = mlp(d_out=3).eval()
    with pytest.raises(ValueError, match="give them once"):
        netsim.per_sample_grads(model, Pairs(), targets=LABELS, output_fn=outputs.class_vs_rest)
    with pytest.raises(ValueError, match="rows"):
        netsim.per_sample_grads(model, TensorDataset(XS), targets=LABELS[:5], output_fn=outputs.class_vs_rest)


def test_a_shuffling_loader_is_refused():
    with pytest.raises(ValueError, match="shuffle=False"):
        netsim.soft_density(mlp().eval(), DataLoader(TensorDataset(XS), batch_size=3, shuffle=True))


def test_tensor_calls_probe_the_engine_as_before():
    """The engine choice of `method="auto"` is measured on the same samples whether or not data is a tensor."""
    source = as_source(DataLoader(TensorDataset(XS), batch_size=3))
    inputs, _ = source.first(netsim.engine.AUTO_PROBE_SAMPLES)
    assert torch.equal(inputs, XS[:netsim.engine.AUTO_PROBE_SAMPLES])
    generator = as_source(x for x in XS.split(3))
    assert torch.equal(generator.first(5)[0], XS[:5])
    assert torch.equal(torch.cat([x for _, x, _ in generator.chunks(4)]), XS)   # what `first` read is replayed

"""netsim.threads: several threads calling netsim on one model get the results of calls made one
after the other (every engine, every public function), a user's own forward in another thread is not
recorded, and the process-wide attention setting is restored once the last call is done."""

import threading

import pytest
import torch

import netsim
from conftest import TinyTransformer, mlp, token_batch
from netsim import layerwise

THREADS, ROUNDS = 4, 3


def _run_together(work, count=THREADS):
    """Runs `work(i)` in `count` threads released at once; returns their results (re-raises a failure)."""
    barrier, results, errors = threading.Barrier(count), [None] * count, []

    def run(i):
        try:
            barrier.wait()
            results[i] = [work(i) for _ in range(ROUNDS)]
        except BaseException as error:   # noqa: BLE001 -- handed to the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _cases():
    model = mlp(d_in=3, hidden=16, d_out=2, seed=3).eval()
    inputs = [torch.randn(40, 3, generator=torch.Generator().manual_seed(i)) for i in range(THREADS)]
    transformer = TinyTransformer().eval()
    tokens = [token_batch(24, seed=i) for i in range(THREADS)]
    return {"mlp": (model, inputs), "transformer": (transformer, tokens)}


FUNCTIONS = {
    "similarity": lambda model, x, method: netsim.similarity(model, x, method=method, chunk_size=8),
    "soft_density": lambda model, x, method: netsim.soft_density(model, x, method=method, chunk_size=8),
    "per_sample_grads": lambda model, x, method: netsim.per_sample_grads(model, x, method=method, chunk_size=8),
}


@pytest.mark.parametrize("function", list(FUNCTIONS))
@pytest.mark.parametrize("method", ["layerwise", "jacobian", "auto"])
@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_threads_on_one_model_get_the_sequential_results(name, method, function):
    model, inputs = _cases()[name]
    call = FUNCTIONS[function]
    alone = [call(model, x, method) for x in inputs]
    together = _run_together(lambda i: call(model, inputs[i], method))
    for i, rounds in enumerate(together):
        for result in rounds:   # auto may time the engines differently under load: equal to rounding
            torch.testing.assert_close(result, alone[i], rtol=1e-5, atol=1e-6)


def test_the_index_built_and_queried_from_threads_matches(tmp_path):
    model, inputs = _cases()["mlp"]
    indexes = [netsim.SimilarityIndex.build(model, x, tmp_path / str(i)) for i, x in enumerate(inputs)]
    alone = [index.query(inputs[0], k=3) for index in indexes]
    together = _run_together(lambda i: indexes[i].query(inputs[0], k=3))
    for i, rounds in enumerate(together):
        for values, neighbours in rounds:
            assert torch.equal(neighbours, alone[i][1])
            torch.testing.assert_close(values, alone[i][0])


def test_a_users_forward_in_another_thread_is_not_recorded():
    """While the layer-wise engine records its forward, the user's own forward passes on the model in
    another thread run unrecorded (they would otherwise count as a second call of each module)."""
    model, inputs = _cases()["transformer"]
    expected = layerwise.factorise(model, inputs[0])
    stop = threading.Event()

    def user():
        with torch.no_grad():
            while not stop.is_set():
                model(inputs[1])

    worker = threading.Thread(target=user)
    worker.start()
    try:
        for _ in range(20):
            got = layerwise.factorise(model, inputs[0])
            torch.testing.assert_close(layerwise.materialise(got), layerwise.materialise(expected))
    finally:
        stop.set()
        worker.join()


def test_the_attention_setting_is_restored_by_the_last_call():
    before = torch.backends.mha.get_fastpath_enabled()
    model, inputs = _cases()["transformer"]
    _run_together(lambda i: netsim.similarity(model, inputs[i], method="jacobian"))
    assert torch.backends.mha.get_fastpath_enabled() == before

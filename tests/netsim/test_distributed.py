"""Data-parallel soft density, similarity and streamed counts over 2 CPU processes (gloo, loopback) equal the
single-process results."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import netsim
from conftest import mlp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, n, results, split_auto=False):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        if split_auto:   # auto's timing picks a different engine on each rank
            netsim.engine._faster = lambda engines, *args: engines[rank % 2].name
        model, xs = mlp(d_out=2, seed=7), torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
        group = dist.group.WORLD
        out = {"soft": netsim.soft_density(model, xs, process_group=group, chunk_size=5),
               "soft_jac": netsim.soft_density(model, xs, process_group=group, method="jacobian"),
               "kc": netsim.similarity(model, xs, process_group=group),
               "kn": netsim.similarity(model, xs, xs[:4], kind="influence", reduce="none", process_group=group),
               "hard": netsim.neighbour_counts(model, xs, tau=0.3, process_group=group, chunk_size=4),
               "positive": netsim.neighbour_counts(model, xs, estimator="positive", process_group=group)}
        results[rank] = {k: v.tolist() for k, v in out.items()}  # plain data: worker memory is freed on exit
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, n, split_auto", [(2, 23, False), (3, 2, False),   # uneven shards; a rank with no rows
                                                  (2, 23, True)])   # ranks whose auto timing disagrees use rank 0's
def test_sharded_results_equal_single_process(world, n, split_auto):
    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(_worker, args=(world, _free_port(), n, results, split_auto), nprocs=world,
                       start_method="spawn")
    model, xs = mlp(d_out=2, seed=7), torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    expected = {"soft": netsim.soft_density(model, xs), "soft_jac": netsim.soft_density(model, xs),
                "kc": netsim.similarity(model, xs),
                "kn": netsim.similarity(model, xs, xs[:4], kind="influence", reduce="none"),
                "hard": netsim.neighbour_counts(model, xs, tau=0.3),
                "positive": netsim.neighbour_counts(model, xs, estimator="positive")}
    for rank in range(world):
        for key, value in expected.items():
            torch.testing.assert_close(torch.tensor(results[rank][key]), value, rtol=1e-4, atol=1e-5)

"""What the similarity executes: the engine's row-block plan, the GEMM flops of its gram calls,
and a meter that times the engines' gram calls (the GEMM-efficiency goal)."""

from __future__ import annotations

import time


def bench_engine(b, method: str):
    """The kernel engine `netsim.similarity` uses for the bench `b` with `method`."""
    from netsim.engine import engine_for
    return engine_for(b.model, b.inputs, b.output_fn, b.targets, None, method)


def similarity_plan(b, method: str) -> dict:
    """What `netsim.similarity(b.model, b.inputs)` will execute: row block size, number of
    Jacobian evaluations (rows + streamed columns), sample pairs in the grams, flops per pair,
    and the gram's executed flops.

    Flops per pair (executed, counting a multiply-add as 2): Jacobian engine 2 d p;
    layer-wise engine, summed over layers, Linear(in, out): 2 (in + d out) (the X X^T and
    Delta Delta^T GEMMs; the elementwise product and the sum over layers are not counted),
    a dense (conv / generic) layer with p_l parameters: 2 d p_l. A diagonal block (a row block
    with itself) multiplies only its upper tiles of dense entries (`layerwise.symmetric_products`).
    """
    from netsim.grads import num_parameters
    from netsim.kernel import block_rows
    from netsim.layerwise import symmetric_products
    from netsim.memory import budget_bytes
    engine = bench_engine(b, method)
    d, itemsize = b.d, 4
    if engine.name == "layerwise":
        from netsim import layerwise
        factors = layerwise.factorise(b.model, b.inputs[:1], b.output_fn, None if b.targets is None else b.targets[:1])
        dense = sum(layer_pair_flops(f) for f in factors if isinstance(f, layerwise.DenseFactors))
        pair_flops = sum(layer_pair_flops(f) for f in factors)
    else:
        pair_flops = dense = 2 * d * num_parameters(b.model)
    rows = block_rows(engine, d, itemsize, budget_bytes())

    def counts(n: int) -> tuple[int, int]:
        evals = pairs = 0
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            evals += (r1 - r0) + (n - r1)
            pairs += (r1 - r0) * (n - r0)
        return evals, pairs

    def flops(n: int) -> float:
        """Executed gram flops at N = n: each pair's, less the dense entries' skipped lower tiles."""
        skipped = sum((r1 - r0) ** 2 - symmetric_products(r1 - r0)
                      for r0, r1 in ((r0, min(n, r0 + rows)) for r0 in range(0, n, rows)))
        return counts(n)[1] * pair_flops - skipped * dense

    return {"rows_per_block": rows, "pair_flops": pair_flops, "counts": counts, "flops": flops}


def layer_pair_flops(f) -> int:
    """Executed GEMM flops per pair of samples of one layer's factors (see `similarity_plan`)."""
    from netsim import layerwise
    if isinstance(f, layerwise.DenseFactors):
        return 2 * f.grads.shape[1] * f.grads.shape[2]
    return 2 * ((f.x.shape[1] if f.weight else 0) + f.delta.shape[1] * f.delta.shape[2])


def gram_flops(fx, fy) -> float:
    """Executed GEMM flops of one `layerwise.gram(fx, fy)` call (see `similarity_plan`)."""
    from netsim import layerwise
    total = 0.0
    for a, b in zip(fx, fy):
        nx = a.grads.shape[0] if isinstance(a, layerwise.DenseFactors) else a.x.shape[0]
        ny = b.grads.shape[0] if isinstance(b, layerwise.DenseFactors) else b.x.shape[0]
        dense_self = fx is fy and isinstance(a, layerwise.DenseFactors)   # only the upper tiles run
        total += (layerwise.symmetric_products(nx) if dense_self else nx * ny) * layer_pair_flops(a)
    return total


class GramMeter:
    """Wraps the engines' `gram` to accumulate its CPU time and executed flops."""

    def __init__(self):
        self.seconds, self.flops, self.calls = 0.0, 0.0, 0
        from netsim.engine import JacobianEngine, LayerwiseEngine
        lw, jac = LayerwiseEngine.gram, JacobianEngine.gram

        def lw_gram(rx, ry, trace):
            self.flops += gram_flops(rx, ry)
            return self._timed(lw, rx, ry, trace)

        def jac_gram(rx, ry, trace):
            from netsim.layerwise import symmetric_products
            pairs = symmetric_products(rx.shape[0]) if rx is ry and trace else rx.shape[0] * ry.shape[0]
            self.flops += 2.0 * pairs * rx.shape[1] * rx.shape[2]
            return self._timed(jac, rx, ry, trace)

        self._originals = (lw, jac)
        LayerwiseEngine.gram = staticmethod(lw_gram)
        JacobianEngine.gram = staticmethod(jac_gram)

    def restore(self):
        from netsim.engine import JacobianEngine, LayerwiseEngine
        LayerwiseEngine.gram, JacobianEngine.gram = (staticmethod(f) for f in self._originals)

    def _timed(self, fn, *args):
        t0 = time.process_time()
        out = fn(*args)
        self.seconds += time.process_time() - t0
        self.calls += 1
        return out

    def reset(self):
        self.seconds, self.flops, self.calls = 0.0, 0.0, 0

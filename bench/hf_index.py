"""SimilarityIndex on a Hugging Face language model (issue #19): build cost, memory and the sketch's
accuracy on a GPT-2-style model trained here on real text.

    .venv/bin/python bench/hf_index.py              # 4,096 windows of 64 tokens (~25 min, 1 thread)
    .venv/bin/python bench/hf_index.py --quick      # 512 windows, a smaller model (~3 min)

The corpus is the standard library's documentation (`netsim_paper.hf.text`: pydoc's topics and
module docstrings), a byte-level BPE tokenizer of 8,192 tokens is trained on it, and the documents
are cut into windows of 64 tokens. A `GPT2LMHeadModel` (4 layers, width 384, 6 heads, tied
embedding: 10.3M parameters) is trained on N = 4,096 windows (AdamW, lr 1e-3, batches of 32, 2 epochs,
2 threads; cached under data/cache/bench/). Then, with 1 thread:

- epoch: forward + backward of the language-model loss over the N windows in batches of 32 (no
  optimizer step), the unit of every ratio, as in `bench/run.py`;
- build: `SimilarityIndex.build` over the N windows, output `causal_lm_log_likelihood` (each
  window's mean log-likelihood, d = 1), sketch 1024, in a forked process whose peak resident memory
  above its start is recorded, beside the memory budget and the dense per-sample gradients of one
  chunk (what the build never forms);
- query: 100 top-10 queries (test windows) against the index;
- accuracy: on a pool of 1,000 training windows where exact k^C is feasible (computed with a 6 GiB
  budget, the reference rather than what is measured), top-10 recall of 100 test windows and the
  k^C error on the query x pool entries, for several sketch sizes, and `calibrate`'s error on
  random pairs; and `SimilarityIndex.refine` at sketch 1024: 100 proposals per query ranked by
  exact k^C recomputed from the pool (its recall and CPU seconds, with the reference's budget).

The peak memory is the resident set: it counts what glibc's allocator keeps after torch frees it,
which grows over a long build as the heap fragments.

Writes `bench/hf_index_results.json` and `bench/hf_index_sketch.png`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import netsim  # noqa: E402
from index import recall_at, seconds  # noqa: E402
from netsim.memory import budget_bytes  # noqa: E402
from netsim.outputs import causal_lm_log_likelihood  # noqa: E402
from netsim_paper.cache import cached  # noqa: E402
from netsim_paper.config import repo_root  # noqa: E402
from netsim_paper.hf import text  # noqa: E402
from netsim_paper.hf.models import gpt2_lm  # noqa: E402
from netsim_paper.hf.train import sequence_losses, train_lm  # noqa: E402
from timing import maxrss_mb, rss_mb  # noqa: E402

SKETCH_SIZES = (256, 512, 1024, 2048, 4096)
FULL = dict(n=4096, pool=1000, vocab=8192, width=384, layers=4, heads=6, length=64, epochs=2)
QUICK = dict(n=512, pool=200, vocab=2048, width=128, layers=2, heads=4, length=64, epochs=1)
BATCH, LR, SEED = 32, 1e-3, 0
REFERENCE_BUDGET = 6 * 2**30   # bytes, for the exact k^C the sketches are measured against, and `refine`'s
REFINE_CANDIDATES = 100


def batches(ids: torch.Tensor, size: int = BATCH) -> list[dict]:
    """The windows as the dict batches a user passes: input ids and their labels (the ids)."""
    return [{"input_ids": ids[s:s + size], "labels": ids[s:s + size]} for s in range(0, len(ids), size)]


def epoch_seconds(model, ids: torch.Tensor) -> float:
    def run():
        for batch in batches(ids):
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
    return seconds(run)[0]


def _build_child(connection, model, ids, path, sketch) -> None:
    start = rss_mb()
    t, index = seconds(lambda: netsim.SimilarityIndex.build(model, batches(ids), path, sketch=sketch,
                                                            output_fn=causal_lm_log_likelihood, targets_key="labels"))
    engine = netsim.engine.engine_for(model, {"input_ids": ids[:1]}, causal_lm_log_likelihood, ids[:1], None,
                                      "layerwise")
    engine.tokens = True   # as the build sizes its chunks: token maps kept as per-token factors
    connection.send({"seconds": t, "peak_extra_mb": maxrss_mb() - start, "chunk": engine.chunk,
                     "engine": index.manifest["engine"], "values_per_sample": index.manifest["values_per_sample"],
                     "bytes": index.nbytes})


def build_measured(model, ids, path, sketch) -> dict:
    """`SimilarityIndex.build` in a forked process: its CPU seconds and peak memory above its start."""
    parent, child = multiprocessing.get_context("fork").Pipe()
    process = multiprocessing.get_context("fork").Process(target=_build_child, args=(child, model, ids, path, sketch))
    process.start()
    child.close()   # the child's end: recv raises EOFError if the child dies
    try:
        return parent.recv()
    finally:
        process.join()


def plain_count_sketches(model, queries: list[dict], pool: list[dict]) -> dict[int, torch.Tensor]:
    """The unstructured baseline of the sketches: every sample's gradient formed (a batch at a time),
    normalised, and count-sketched with a fully random hash per sketch size, `{k: (Q + M, k)}` rows."""
    out = {k: [] for k in SKETCH_SIZES}
    hashes = {}
    for batch in queries + pool:
        g = netsim.per_sample_grads(model, batch, output_fn=causal_lm_log_likelihood, targets_key="labels",
                                    method="layerwise")[:, 0]
        g = g / g.norm(dim=1, keepdim=True)
        for k in SKETCH_SIZES:
            if k not in hashes:
                generator = torch.Generator().manual_seed(k)
                hashes[k] = (torch.randint(0, k, (g.shape[1],), generator=generator),
                             torch.randint(0, 2, (g.shape[1],), generator=generator).float() * 2 - 1)
            bucket, sign = hashes[k]
            out[k].append(g.new_zeros(len(g), k).index_add_(1, bucket, g * sign))
        del g
    return {k: torch.nn.functional.normalize(torch.cat(v), dim=1) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="512 windows, a smaller model")
    parser.add_argument("--out", type=Path, default=HERE / "hf_index_results.json")
    args = parser.parse_args()
    setting = QUICK if args.quick else FULL
    torch.manual_seed(SEED)
    docs = text.python_docs()
    tokenizer = text.train_tokenizer(docs, setting["vocab"])
    windows = text.token_windows(docs, tokenizer, setting["length"])
    train, test = text.split(windows, setting["n"], 100, SEED)

    def fit():
        torch.set_num_threads(2)
        model = gpt2_lm(vocab_size=setting["vocab"], width=setting["width"], layers=setting["layers"],
                        heads=setting["heads"], length=setting["length"], seed=SEED)
        t0 = time.perf_counter()
        losses = train_lm(model, train.ids, epochs=setting["epochs"], batch_size=BATCH, lr=LR, seed=SEED,
                          progress=True)
        return {"state": model.state_dict(), "losses": losses, "seconds": time.perf_counter() - t0}

    key = f"gpt2_{text.corpus_digest(docs)[:12]}_" + "_".join(f"{k}{v}" for k, v in setting.items())
    trained = cached(repo_root() / "data" / "cache" / "bench" / "hf_index" / f"{key}.pt", fit)
    torch.set_num_threads(1)
    model = gpt2_lm(vocab_size=setting["vocab"], width=setting["width"], layers=setting["layers"],
                    heads=setting["heads"], length=setting["length"], seed=SEED)
    model.load_state_dict(trained["state"])
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    out = {"setting": setting, "params": params, "threads": 1, "corpus_sha256": text.corpus_digest(docs),
           "documents": len(docs), "windows": len(windows), "train_losses": trained["losses"],
           "train_wall_s": trained["seconds"], "test_loss": float(sequence_losses(model, test.ids).mean()),
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "netsim": netsim.__version__, "memory_budget_bytes": budget_bytes(),
           "reference_budget_bytes": REFERENCE_BUDGET}
    print(f"{params:,} parameters; {len(train)} training windows; test loss {out['test_loss']:.3f} nats/token",
          flush=True)
    out["epoch_s"] = epoch_seconds(model, train.ids)
    print(f"epoch: {out['epoch_s']:.1f} s CPU", flush=True)
    work = Path(tempfile.mkdtemp(prefix="netsim-hf-index-bench-"))
    try:
        built = build_measured(model, train.ids, work / "index", netsim.index.DEFAULT_SKETCH)
        out["build"] = built
        out["build_x_epoch"] = built["seconds"] / out["epoch_s"]
        # what the build never forms: the dense per-sample gradients of one chunk
        out["dense_chunk_bytes"] = built["chunk"] * params * 4
        print(f"build: {built['seconds']:.1f} s = {out['build_x_epoch']:.2f} x epoch, "
              f"peak +{built['peak_extra_mb']:.0f} MB (budget {out['memory_budget_bytes'] / 2**20:.0f} MB; "
              f"one chunk's dense gradients {out['dense_chunk_bytes'] / 2**20:.0f} MB)", flush=True)
        index = netsim.SimilarityIndex.open(work / "index", model, output_fn=causal_lm_log_likelihood)
        t, _ = seconds(lambda: index.query(batches(test.ids), k=10, targets_key="labels"))
        out["query100_s"], out["query100_x_epoch"] = t, t / out["epoch_s"]
        print(f"100 top-10 queries: {t:.2f} s", flush=True)
        out["sketch_plan"] = index.manifest["sketch_plan"]
        shutil.rmtree(work / "index")
        # accuracy against exact k^C on a pool
        pool = batches(train.ids[:setting["pool"]])
        queries = batches(test.ids)
        # the reference, not what is measured: a larger budget than the default holds the 100 queries'
        # dense gradients (4 GiB) in one block, one pass over the pool instead of five
        t, exact_rows = seconds(lambda: netsim.similarity(model, queries, pool, output_fn=causal_lm_log_likelihood,
                                                          targets_key="labels", method="layerwise",
                                                          memory_budget=REFERENCE_BUDGET))
        out["exact_pool_kc_s"] = t
        print(f"exact k^C, {len(test)} x {setting['pool']}: {t:.0f} s", flush=True)
        exact_top = exact_rows.topk(10, 1).indices
        t, plain = seconds(lambda: plain_count_sketches(model, queries, pool))
        print(f"plain count sketches of the formed gradients: {t:.0f} s", flush=True)
        accuracy = []
        for k in SKETCH_SIZES:
            index = netsim.SimilarityIndex.build(model, pool, work / f"s{k}", output_fn=causal_lm_log_likelihood,
                                                 targets_key="labels", sketch=k)
            rows = index.similarity(queries, targets_key="labels")
            err = (rows - exact_rows).abs().flatten()
            calib = index.calibrate(pool, n_pairs=2000, targets_key="labels")
            if k == netsim.index.DEFAULT_SKETCH:   # the sketch's proposals ranked by exact k^C
                index.memory_budget = REFERENCE_BUDGET
                t, (_, refined) = seconds(lambda index=index: index.refine(queries, pool, k=10, targets_key="labels",
                                                                           candidates=REFINE_CANDIDATES))
                out["refine"] = {"k": k, "candidates": REFINE_CANDIDATES, "queries": len(test), "seconds": t,
                                 "recall_at_10": recall_at(exact_top, refined)}
                print(f"refine ({REFINE_CANDIDATES} proposals): recall@10 {out['refine']['recall_at_10']:.3f}, "
                      f"{t:.0f} s", flush=True)
            plain_rows = plain[k][:len(test)] @ plain[k][len(test):].T
            accuracy.append({"k": k, "values_per_sample": index.manifest["values_per_sample"],
                             "recall_at_10": recall_at(exact_top, rows.topk(10, 1).indices),
                             "median_abs_err": float(err.median()), "p99_abs_err": float(err.quantile(0.99)),
                             "calibration": calib,
                             "plain_count_sketch": {
                                 "recall_at_10": recall_at(exact_top, plain_rows.topk(10, 1).indices),
                                 "median_abs_err": float((plain_rows - exact_rows).abs().median())}})
            print(f"sketch {k}: recall@10 {accuracy[-1]['recall_at_10']:.3f}, median |err| "
                  f"{accuracy[-1]['median_abs_err']:.4f}, p99 {accuracy[-1]['p99_abs_err']:.4f}; plain count sketch: "
                  f"recall@10 {accuracy[-1]['plain_count_sketch']['recall_at_10']:.3f}, median |err| "
                  f"{accuracy[-1]['plain_count_sketch']['median_abs_err']:.4f}", flush=True)
            shutil.rmtree(work / f"s{k}")
        out["accuracy"] = accuracy
        out["exact_kc"] = {"median_row": float(exact_rows.median()), "mean_top10": float(exact_rows.topk(10, 1)
                                                                                         .values.mean())}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    default = next(a for a in out["accuracy"] if a["k"] == netsim.index.DEFAULT_SKETCH)
    out["goals"] = {
        "build_le_3x_epoch": out["build_x_epoch"] <= 3.0,
        "recall_default_ge_0.9": default["recall_at_10"] >= 0.9,
        "peak_memory_le_budget": built["peak_extra_mb"] * 2**20 <= out["memory_budget_bytes"],
        "refine_recall_ge_0.9": out["refine"]["recall_at_10"] >= 0.9,
    }
    args.out.write_text(json.dumps(out, indent=1))
    plot(out, args.out.with_name("hf_index_sketch.png"))
    print(json.dumps(out["goals"], indent=1))


def plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = out["accuracy"]
    ks = [a["k"] for a in acc]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(ks, [a["median_abs_err"] for a in acc], "o-", label="median")
    ax1.plot(ks, [a["p99_abs_err"] for a in acc], "s-", label="99th percentile")
    ax1.set(xscale="log", yscale="log", xlabel="sketch size k (stored values per sample)",
            ylabel="|k^C sketch - k^C exact|", title="k^C error (test windows x pool)")
    ax1.legend()
    ax2.plot(ks, [a["recall_at_10"] for a in acc], "o-")
    ax2.axhline(0.9, color="grey", ls=":", label="goal 0.9")
    ax2.axvline(netsim.index.DEFAULT_SKETCH, color="grey", ls="--", label="default size")
    ax2.set(xscale="log", ylim=(0, 1.02), xlabel="sketch size k (stored values per sample)", ylabel="recall@10",
            title=f"top-10 recall vs exact k^C ({out['setting']['pool']} windows)")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
    fig.suptitle(f"SimilarityIndex sketch on a GPT-2 language model ({out['params'] / 1e6:.1f}M parameters, "
                 "mean log-likelihood, d = 1)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plot"]:
        results = Path(sys.argv[2]) if len(sys.argv) > 2 else HERE / "hf_index_results.json"
        plot(json.loads(results.read_text()), results.with_name("hf_index_sketch.png"))
    else:
        main()

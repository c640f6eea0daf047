"""SimilarityIndex at data-set scale (issue #14): build, query, disk and sketch accuracy on real MNIST.

    .venv/bin/python bench/index.py                  # 50k training images (~15 min, 1 thread)
    .venv/bin/python bench/index.py --quick          # 5k images, for a smoke run (~2 min)
    .venv/bin/python bench/index.py --plot           # redraw bench/index_sketch.png from the results

The authors' MNIST CNN (`mnist_cnn`, 317,069 parameters) is trained for one pass over the
training images (Adam, lr 1e-3, batches of 64, seeded), then, with 1 thread:

- epoch: forward + backward of the cross-entropy over the N images in batches of 128 (no
  optimizer step), the unit of every ratio, as in `bench/run.py`;
- build: `SimilarityIndex.build` over the N images with `class_vs_rest` and the labels (d = 1),
  sketched at the default size, and with d = 10 (`neg_log_softmax`) at the same size per output;
- query: 100 top-10 queries (test images, their predicted labels) against the N-image index;
- disk: the sketched index's bytes; the exact index's bytes from its values per sample
  (one exact shard is built to read them; the whole exact index is not written);
- accuracy: on a pool of `--pool` training images where exact k^C is feasible, top-10 recall
  of 200 test queries and the k^C error on random pairs, for several sketch sizes.

Writes `bench/index_results.json` and the plot `bench/index_sketch.png` (error and recall
against the sketch size).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "lib"))

import netsim  # noqa: E402
from netsim.index import DEFAULT_SKETCH  # noqa: E402
from netsim.outputs import class_vs_rest, neg_log_softmax  # noqa: E402
from netsim_paper.mnist.data import load_mnist, normalise  # noqa: E402
from netsim_paper.mnist.speedup import mnist_cnn  # noqa: E402

SKETCH_SIZES = (256, 512, 1024, 2048, 4096, 8192)


def train(images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> nn.Module:
    model = mnist_cnn(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(images), 64):
        batch = order[start:start + 64]
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def seconds(fn) -> tuple[float, object]:
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def epoch_seconds(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    def run():
        for start in range(0, len(images), 128):
            loss = nn.functional.cross_entropy(model(images[start:start + 128]), labels[start:start + 128])
            model.zero_grad(set_to_none=True)
            loss.backward()
        model.zero_grad(set_to_none=True)
    return seconds(run)[0]


def recall_at(exact_idx: torch.Tensor, approx_idx: torch.Tensor) -> float:
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(exact_idx, approx_idx))
    return hits / exact_idx.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5k images, fewer sketch sizes")
    parser.add_argument("--n", type=int, default=None, help="indexed training images (default 50000)")
    parser.add_argument("--pool", type=int, default=None, help="training images of the exact-recall pool")
    parser.add_argument("--out", type=Path, default=HERE / "index_results.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = args.n or (5000 if args.quick else 50000)
    pool = args.pool or (1000 if args.quick else 5000)
    sizes = (512, DEFAULT_SKETCH, 4096) if args.quick else SKETCH_SIZES

    data = load_mnist()
    images, labels = normalise(data.train_images[:n]), data.train_labels[:n].long()
    test_images, test_labels = normalise(data.test_images[:200]), data.test_labels[:200].long()
    t_train, model = seconds(lambda: train(images, labels))
    with torch.no_grad():
        test_pred = model(test_images).argmax(1)
    out = {"n": n, "pool": pool, "default_sketch": DEFAULT_SKETCH, "threads": 1, "train_s": t_train,
           "test_accuracy_200": float((test_pred == test_labels).double().mean()),
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "netsim": netsim.__version__}
    out["epoch_s"] = epoch_seconds(model, images, labels)
    print(f"epoch over {n}: {out['epoch_s']:.1f} s CPU", flush=True)
    work = Path(tempfile.mkdtemp(prefix="netsim-index-bench-"))
    try:
        # build, d = 1 and d = 10, at the default sketch size
        for name, output_fn, targets in (("d1", class_vs_rest, labels), ("d10", neg_log_softmax, None)):
            t, index = seconds(lambda: netsim.SimilarityIndex.build(  # noqa: B023
                model, images, work / name, output_fn=output_fn, targets=targets, sketch=DEFAULT_SKETCH))  # noqa: B023
            out[f"build_{name}_s"] = t
            out[f"build_{name}_x_epoch"] = t / out["epoch_s"]
            out[f"disk_{name}_bytes"] = index.nbytes
            out[f"engine_{name}"] = index.manifest["engine"]
            print(f"build {name}: {t:.1f} s = {t / out['epoch_s']:.2f} x epoch, {index.nbytes / 2**20:.0f} MiB",
                  flush=True)
            if name == "d1":
                queries = test_images[:100]
                t, _ = seconds(lambda: index.query(queries, k=10, targets=test_pred[:100]))  # noqa: B023
                out["query100_s"], out["query100_x_epoch"] = t, t / out["epoch_s"]
                print(f"100 top-10 queries: {t:.2f} s = {t / out['epoch_s']:.3f} x epoch", flush=True)
                out["sketch_plan"] = index.manifest["sketch_plan"]
                out["values_per_sample_sketch"] = index.manifest["values_per_sample"]
            shutil.rmtree(work / name)
        # the exact index's size, from one exact shard's values per sample
        exact = netsim.SimilarityIndex.build(model, images[:256], work / "exact", output_fn=class_vs_rest,
                                             targets=labels[:256])
        itemsize = 4
        out["values_per_sample_exact"] = exact.manifest["values_per_sample"]
        out["disk_exact_d1_bytes_projected"] = exact.manifest["values_per_sample"] * itemsize * n
        shutil.rmtree(work / "exact")
        # accuracy against exact k^C on a pool
        pool_images, pool_labels = images[:pool], labels[:pool]
        queries, query_targets = test_images, test_pred
        t, exact_rows = seconds(lambda: netsim.similarity(model, queries, pool_images, output_fn=class_vs_rest,
                                                          x_targets=query_targets, y_targets=pool_labels))
        exact_top = exact_rows.topk(10, 1).indices
        accuracy = []
        for k in sizes:
            index = netsim.SimilarityIndex.build(model, pool_images, work / f"s{k}", output_fn=class_vs_rest,
                                                 targets=pool_labels, sketch=k)
            rows = index.similarity(queries, targets=query_targets)
            err = (rows - exact_rows).abs().flatten()
            calib = index.calibrate(pool_images, n_pairs=2000, targets=pool_labels)
            accuracy.append({"k": k, "values_per_sample": index.manifest["values_per_sample"],
                             "recall_at_10": recall_at(exact_top, rows.topk(10, 1).indices),
                             "median_abs_err": float(err.median()), "p99_abs_err": float(err.quantile(0.99)),
                             "calibration": calib})
            print(f"sketch {k}: recall@10 {accuracy[-1]['recall_at_10']:.3f}, median |err| "
                  f"{accuracy[-1]['median_abs_err']:.4f}, p99 {accuracy[-1]['p99_abs_err']:.4f}", flush=True)
            shutil.rmtree(work / f"s{k}")
        out["accuracy"] = accuracy
        out["exact_pool_kc_s"] = t
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["goals"] = {
        "build_d1_le_3x_epoch": out["build_d1_x_epoch"] <= 3.0,
        "build_d10_le_30x_epoch": out["build_d10_x_epoch"] <= 30.0,
        "query100_le_0.1_epoch": out["query100_x_epoch"] <= 0.1,
        "recall_default_ge_0.9": next(a for a in accuracy if a["k"] == DEFAULT_SKETCH)["recall_at_10"] >= 0.9,
        "disk_default_le_1GB": out["disk_d1_bytes"] * (50000 / n) <= 1e9,
    }
    args.out.write_text(json.dumps(out, indent=1))
    plot(out, args.out.with_name("index_sketch.png"))
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
            ylabel="|k^C sketch - k^C exact|", title="k^C error (test queries x pool)")
    ax1.legend()
    ax2.plot(ks, [a["recall_at_10"] for a in acc], "o-")
    ax2.axhline(0.9, color="grey", ls=":", label="goal 0.9")
    ax2.axvline(out["default_sketch"], color="grey", ls="--", label="default size")
    ax2.set(xscale="log", ylim=(0, 1.02), xlabel="sketch size k (stored values per sample)", ylabel="recall@10",
            title=f"top-10 recall vs exact k^C ({out['pool']} images)")
    ax2.legend()
    for ax in (ax1, ax2):   # one labelled tick per measured size, no minor labels
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
    fig.suptitle("SimilarityIndex sketch on MNIST (authors' CNN, class vs rest, d = 1)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plot"]:   # redraw the plot from a results file: bench/index.py --plot [json]
        results = Path(sys.argv[2]) if len(sys.argv) > 2 else HERE / "index_results.json"
        plot(json.loads(results.read_text()), results.with_name("index_sketch.png"))
    else:
        main()

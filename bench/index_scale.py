"""The SimilarityIndex at a million samples (issue #21): exact and approximate top-10 search against N.

    .venv/bin/python bench/index_scale.py              # N = 50k, 200k, 1M (~1 h, 1 thread, run alone)
    .venv/bin/python bench/index_scale.py --quick      # N = 5k, 20k (a smoke run, ~3 min)

Data: the 60,000 real MNIST training images, each translated by up to 2 pixels (zero fill), in the
order translation by translation: sample i is image i mod 60000 shifted by the (i // 60000)-th of
the 25 shifts of {-2..2}^2, the image itself first, then by growing shift (1M samples use 17 of
them). That is the augmentation an MNIST trainer uses, and it gives the neighbour structure such
a data set has: a sample's nearest k^C neighbours are mostly other translations of its image and
other images of its digit. The first N samples are indexed.

Model and output: the authors' MNIST CNN trained for one pass over 50,000 images (as `bench/index.py`),
`class_vs_rest` with the labels (d = 1), sketch 1024. For each N, with 1 thread:

- epoch: forward + backward of the cross-entropy over 50,000 of the samples in batches of 128,
  scaled to N (an epoch is linear in N);
- build: `SimilarityIndex.build` (CPU seconds) and the approximate index (`build_ann`, default
  settings), their sizes on disk;
- queries: 100 test images (their predicted labels) -- the exact streamed search, and the
  approximate one at several `nprobe` and the default one: CPU milliseconds per query (sketching the query included)
  and top-10 recall against the exact search.

Writes `bench/index_scale_results.json` (the README's scale table and its projection to 100M samples).
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
from torch.utils.data import Dataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import netsim  # noqa: E402
from index import epoch_seconds, recall_at, seconds, train  # noqa: E402
from netsim.index import DEFAULT_SKETCH, default_nprobe  # noqa: E402
from netsim.outputs import class_vs_rest  # noqa: E402
from netsim_paper.mnist.data import load_mnist, normalise  # noqa: E402

SHIFTS = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
SHIFTS.sort(key=lambda s: (abs(s[0]) + abs(s[1]), s))   # the image itself first, then the small shifts
FULL_SIZES, QUICK_SIZES = (50_000, 200_000, 1_000_000), (5_000, 20_000)
NPROBES = (8, 16, 32, 64, 128)
SHARD_SIZE = 16384


class Translated(Dataset):
    """The images in every translation of `SHIFTS` (see the module), `(image, label)` items."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, n: int):
        self.images, self.labels, self.n = images, labels, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        base, shift = i % len(self.images), SHIFTS[i // len(self.images)]
        padded = torch.nn.functional.pad(self.images[base], (2, 2, 2, 2))
        dy, dx = shift
        return padded[:, 2 + dy:30 + dy, 2 + dx:30 + dx], self.labels[base]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "index_scale_results.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = load_mnist()
    images, labels = normalise(data.train_images), data.train_labels.long()
    t_train, model = seconds(lambda: train(images[:50_000], labels[:50_000]))
    test_images = normalise(data.test_images[:100])
    with torch.no_grad():
        test_pred = model(test_images).argmax(1)
    epoch_50k = epoch_seconds(model, images[:50_000], labels[:50_000])
    out = {"sizes": [], "sketch": DEFAULT_SKETCH, "shard_size": SHARD_SIZE, "threads": 1, "train_s": t_train,
           "epoch_50k_s": epoch_50k, "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "netsim": netsim.__version__,
           "data": "60,000 MNIST training images, each translated by up to 2 px (zero fill)"}
    print(f"epoch over 50,000: {epoch_50k:.1f} s CPU", flush=True)
    work = Path(tempfile.mkdtemp(prefix="netsim-index-scale-"))
    try:
        for n in (QUICK_SIZES if args.quick else FULL_SIZES):
            data_n = Translated(images, labels, n)
            row = {"n": n, "epoch_s": epoch_50k * n / 50_000}
            row["build_s"], index = seconds(lambda: netsim.SimilarityIndex.build(  # noqa: B023
                model, data_n, work / str(n), output_fn=class_vs_rest,  # noqa: B023
                sketch=DEFAULT_SKETCH, shard_size=SHARD_SIZE))
            row["index_bytes"] = index.nbytes
            wall = time.perf_counter()
            row["ann_build_s"], approximate = seconds(index.build_ann)
            row["ann_build_wall_s"] = time.perf_counter() - wall
            row["ann_bytes"] = sum(f.stat().st_size for f in (index.path / "ann").iterdir()
                                   if f.name == "index.faiss")
            row["nlist"] = approximate.meta["settings"]["nlist"]
            t, exact = seconds(lambda: index.query(test_images, k=10, targets=test_pred))  # noqa: B023
            row["exact_query_ms"] = 1000 * t / len(test_images)
            row["approximate"] = []
            row["default_nprobe"] = default_nprobe(row["nlist"])   # measured too: the goals read it
            for nprobe in sorted({p for p in NPROBES if p <= row["nlist"]} | {row["default_nprobe"]}):
                index.query(test_images[:2], k=10, targets=test_pred[:2], search="approximate", nprobe=nprobe)
                t, found = seconds(lambda: index.query(test_images, k=10, targets=test_pred,  # noqa: B023
                                                       search="approximate", nprobe=nprobe))  # noqa: B023
                row["approximate"].append({"nprobe": nprobe, "query_ms": 1000 * t / len(test_images),
                                           "recall_at_10": recall_at(exact[1], found[1])})
            out["sizes"].append(row)
            print(json.dumps(row), flush=True)
            args.out.write_text(json.dumps(out, indent=1) + "\n")   # kept as it goes: the 1M step is long
            shutil.rmtree(work / str(n))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

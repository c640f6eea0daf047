"""The smoke and paper settings of the data audit on real MNIST (notebook 06). Registered in
`netsim_paper.config`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class DataAuditConfig:
    """Notebook 06: find flipped training labels and misclassified test images with the similarity index.

    The authors' CNN is trained normally (Adam, seeded) on the first `n_train` images of MNIST's
    50k training split, `flip_fraction` of whose labels were replaced by another class at random.
    The paper profile uses the whole 50k split and stays within ~10 minutes on 2 cores.

    Attributes:
        n_train: training images (the first ones of the 50k split; at most 50000).
        n_test: test images (the first ones of the 10k test set).
        flip_fraction: fraction of training labels flipped, each to another class drawn uniformly.
        epochs, batch_size, lr: Adam training of the CNN.
        sketch: stored numbers per sample of the index's random projection (None: exact). Each
            all-pairs neighbour pass costs N^2 / 2 x sketch multiply-adds; 256 (254 stored values,
            51 MB at N = 50000) was measured on the smoke subset (3000 images): k^C audit AUROC
            0.976 at 256, 0.977 at 1024, 0.978 exact (median |k^C error| 0.061, 0.0065, 0). The
            notebook measures the error of the sketch it uses (`calibrate`).
        calibration_pairs: random pairs on which the sketch's k^C error is measured.
        k: neighbours per sample of every k-NN label-disagreement score.
        ablation_n: training samples (the first ones) on which the audit is repeated with the
            output at the given labels, the ablation of the output choice (two more indexes).
        cleanlab_folds: folds of the out-of-sample probabilities of cleanlab's score (when installed).
        n_boot: paired bootstrap resamples of the AUROC intervals.
        shown_queries: test images in the neighbours figure (half of them misclassified where possible).
        shown_neighbours: neighbours shown per query and similarity.
    """

    #: Bump whenever a code constant that shapes a cached result of this experiment changes.
    RECIPE: ClassVar[int] = 1
    SMOKE: ClassVar[DataAuditConfig]
    PAPER: ClassVar[DataAuditConfig]

    n_train: int
    n_test: int
    flip_fraction: float
    epochs: int
    batch_size: int
    lr: float
    sketch: int | None
    calibration_pairs: int
    k: int
    ablation_n: int
    cleanlab_folds: int
    n_boot: int
    shown_queries: int
    shown_neighbours: int


DataAuditConfig.SMOKE = DataAuditConfig(
    n_train=3000, n_test=1000, flip_fraction=0.05, epochs=2, batch_size=64, lr=1e-3, sketch=256,
    calibration_pairs=200, k=10, ablation_n=3000, cleanlab_folds=2, n_boot=200, shown_queries=4, shown_neighbours=5)
DataAuditConfig.PAPER = DataAuditConfig(
    n_train=50000, n_test=10000, flip_fraction=0.05, epochs=1, batch_size=64, lr=1e-3, sketch=256,
    calibration_pairs=2000, k=10, ablation_n=10000, cleanlab_folds=2, n_boot=200, shown_queries=4,
    shown_neighbours=6)

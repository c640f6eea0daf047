"""The smoke and paper settings of notebook 07 (Hugging Face models on real data). Registered in
`netsim_paper.config` as "huggingface"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class HuggingFaceConfig:
    """Notebook 07: netsim on two `transformers` model classes trained here.

    A `ViTForImageClassification` on real MNIST (the first `vit_train` images of the 50k training
    split, the first `vit_test` test images) and a `GPT2LMHeadModel` on the standard library's
    documentation (`netsim_paper.hf.text`: a byte-level BPE tokenizer of `lm_vocab` tokens trained
    here, windows of `lm_length` tokens, `lm_train` / `lm_test` of them drawn at random).

    Attributes:
        vit_train, vit_test: MNIST images (training, test).
        vit_patch, vit_width, vit_layers, vit_heads: the ViT (image 28, 1 channel, 10 classes).
        vit_epochs, vit_batch, vit_lr: AdamW training.
        lm_vocab, lm_length, lm_train, lm_test: tokenizer size, window length, windows.
        lm_width, lm_layers, lm_heads: the GPT-2 (feed-forward 4 x width, tied embedding).
        lm_epochs, lm_batch, lm_lr: AdamW training.
        sketch: stored values per sample of both indexes (`SimilarityIndex(sketch=)`).
        calibration_pairs: random pairs on which each index's k^C error is measured.
        k: neighbours per query of the neighbour statistics.
        module_pairs: query-neighbour (and random) pairs split by module (`similarity_by_module`).
        n_boot: bootstrap resamples of the intervals.
        shown_queries, shown_neighbours: the neighbour figures and printouts.
    """

    #: Bump whenever a code constant that shapes a cached result of this experiment changes.
    RECIPE: ClassVar[int] = 1
    SMOKE: ClassVar[HuggingFaceConfig]
    PAPER: ClassVar[HuggingFaceConfig]

    vit_train: int
    vit_test: int
    vit_patch: int
    vit_width: int
    vit_layers: int
    vit_heads: int
    vit_epochs: int
    vit_batch: int
    vit_lr: float
    lm_vocab: int
    lm_length: int
    lm_train: int
    lm_test: int
    lm_width: int
    lm_layers: int
    lm_heads: int
    lm_epochs: int
    lm_batch: int
    lm_lr: float
    sketch: int
    calibration_pairs: int
    k: int
    module_pairs: int
    n_boot: int
    shown_queries: int
    shown_neighbours: int


HuggingFaceConfig.SMOKE = HuggingFaceConfig(
    vit_train=6000, vit_test=500, vit_patch=7, vit_width=48, vit_layers=1, vit_heads=2, vit_epochs=6, vit_batch=64,
    vit_lr=1e-3, lm_vocab=1024, lm_length=32, lm_train=1000, lm_test=200, lm_width=64, lm_layers=1, lm_heads=2,
    lm_epochs=4, lm_batch=32, lm_lr=3e-3, sketch=512, calibration_pairs=200, k=10, module_pairs=8, n_boot=200,
    shown_queries=3, shown_neighbours=4)
HuggingFaceConfig.PAPER = HuggingFaceConfig(
    vit_train=50000, vit_test=2000, vit_patch=7, vit_width=64, vit_layers=2, vit_heads=4, vit_epochs=8, vit_batch=64,
    vit_lr=1e-3, lm_vocab=4096, lm_length=64, lm_train=4000, lm_test=500, lm_width=128, lm_layers=2, lm_heads=4,
    lm_epochs=6, lm_batch=32, lm_lr=2e-3, sketch=1024, calibration_pairs=2000, k=10, module_pairs=40, n_boot=1000,
    shown_queries=4, shown_neighbours=6)

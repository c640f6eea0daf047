"""Notebook 06 (beyond the paper, real MNIST): auditing a data set with `netsim.SimilarityIndex`.

`data` (the training subset and its seeded label flips), `train` (training the authors' CNN,
its logits and penultimate-layer embeddings), `scoring` (suspicion scores: neighbours' label
disagreement, per-sample loss, streamed Euclidean k-NN), `metrics` (AUROC, precision at k)
and `config` (the smoke / paper settings of notebook 06).
"""

"""netsim_paper.audit.train: seeded training, embeddings that feed the last layer, and out-of-fold
probabilities from models that never saw the sample."""

from __future__ import annotations

import pytest
import torch

from netsim_paper.audit.train import embeddings, logits, out_of_fold_probabilities, train_classifier
from netsim_paper.mnist.speedup import mnist_cnn


def test_training_is_seeded_and_embeddings_feed_the_last_layer():
    images = torch.randn(48, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(48) % 10
    models = [mnist_cnn(seed=1) for _ in range(2)]
    losses = [train_classifier(m, images, labels, epochs=2, batch_size=16, lr=1e-3, seed=2) for m in models]
    assert losses[0] == losses[1] and len(losses[0]) == 2 and losses[0][1] < losses[0][0]
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)
    features = embeddings(models[0], images)
    assert features.shape == (48, 256)
    torch.testing.assert_close(models[0][-1](features), logits(models[0], images))
    with pytest.raises(ValueError):
        train_classifier(models[0], images, labels[:5], epochs=1, batch_size=16, lr=1e-3, seed=0)


def test_out_of_fold_probabilities_come_from_models_that_never_saw_the_sample():
    images = torch.randn(30, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(30) % 10
    built = []

    def build(fold):
        built.append(mnist_cnn(seed=fold))
        return built[-1]

    probabilities = out_of_fold_probabilities(build, images, labels, folds=3, seed=0, epochs=1, batch_size=8, lr=1e-3)
    assert probabilities.shape == (30, 10) and len(built) == 3
    torch.testing.assert_close(probabilities.sum(1), torch.ones(30))
    held_out = torch.tensor_split(torch.randperm(30, generator=torch.Generator().manual_seed(0)), 3)
    for model, rows in zip(built, held_out, strict=True):
        torch.testing.assert_close(probabilities[rows], torch.softmax(model(images[rows]), 1))
    with pytest.raises(ValueError):
        out_of_fold_probabilities(build, images, labels, folds=1, seed=0, epochs=1, batch_size=8, lr=1e-3)

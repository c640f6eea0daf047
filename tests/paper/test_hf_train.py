"""netsim_paper.hf.models and .train: seeded Hugging Face models from configs, their training and read-back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from netsim_paper.hf.models import gpt2_lm, vit_classifier
from netsim_paper.hf.train import class_logits, sequence_losses, train_classifier, train_lm


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_models_are_seeded_in_eval_mode_and_leave_the_global_generator_alone():
    state = torch.random.get_rng_state()
    a, b = (gpt2_lm(vocab_size=40, width=16, layers=1, heads=2, length=8, seed=3) for _ in range(2))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _same(a, b) and not a.training
    assert a.lm_head.weight is a.transformer.wte.weight   # GPT-2 ties its head to the token embedding
    assert not _same(a, gpt2_lm(vocab_size=40, width=16, layers=1, heads=2, length=8, seed=4))
    vit = vit_classifier(image_size=8, patch_size=4, width=16, layers=1, heads=2, classes=3)
    assert class_logits(vit, torch.randn(5, 1, 8, 8)).shape == (5, 3) and not vit.training


def test_lm_training_is_seeded_lowers_the_loss_and_sequence_losses_are_the_models_own():
    ids = torch.randint(3, 40, (24, 8), generator=torch.Generator().manual_seed(0))
    models = [gpt2_lm(vocab_size=40, width=16, layers=1, heads=2, length=8) for _ in range(2)]
    losses = [train_lm(m, ids, epochs=3, batch_size=8, lr=1e-2, seed=1) for m in models]
    assert losses[0] == losses[1] and losses[0][-1] < losses[0][0] and _same(*models)
    assert not models[0].training
    per_window = sequence_losses(models[0], ids)
    with torch.no_grad():   # Hugging Face's loss: the mean over every predicted token
        torch.testing.assert_close(per_window.mean(), models[0](input_ids=ids, labels=ids).loss)


def test_classifier_training_checks_its_labels_and_a_diverging_run_stops():
    vit = vit_classifier(image_size=8, patch_size=4, width=16, layers=1, heads=2, classes=3)
    images, labels = torch.randn(12, 1, 8, 8), torch.arange(12) % 3
    assert len(train_classifier(vit, images, labels, epochs=2, batch_size=4, lr=1e-3, seed=0)) == 2
    with pytest.raises(ValueError, match="as many labels"):
        train_classifier(vit, images, labels[:5], epochs=1, batch_size=4, lr=1e-3, seed=0)
    with pytest.raises(FloatingPointError, match="non-finite"):
        train_classifier(vit, images * float("nan"), labels, epochs=1, batch_size=4, lr=1e-3, seed=0)
    assert not vit.training

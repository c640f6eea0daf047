"""The Hugging Face model classes used here, built from configs (randomly initialised, seeded; no hub).

Example:
    >>> model = gpt2_lm(vocab_size=500, width=32, layers=1, heads=2, length=16)
    >>> sum(p.numel() for p in model.parameters()) > 0, model.training
    (True, False)
"""

from __future__ import annotations

import torch
from torch import nn

from .text import EOS_ID, PAD_ID


def gpt2_lm(*, vocab_size: int, width: int, layers: int, heads: int, length: int, seed: int = 0) -> nn.Module:
    """`GPT2LMHeadModel` (tied token embedding and head), feed-forward 4 x width, no dropout, eval mode."""
    import transformers as t

    config = t.GPT2Config(vocab_size=vocab_size, n_embd=width, n_layer=layers, n_head=heads, n_positions=length,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
                          pad_token_id=PAD_ID)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = t.GPT2LMHeadModel(config).eval()
    model.loss_type = "ForCausalLM"   # what transformers falls back to anyway, without its warning
    return model


def vit_classifier(*, image_size: int, patch_size: int, width: int, layers: int, heads: int, classes: int,
                   seed: int = 0) -> nn.Module:
    """`ViTForImageClassification` on 1-channel images, feed-forward 2 x width, no dropout, eval mode."""
    import transformers as t

    config = t.ViTConfig(image_size=image_size, patch_size=patch_size, num_channels=1, hidden_size=width,
                         num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * width,
                         num_labels=classes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return t.ViTForImageClassification(config).eval()

"""Shared small models and the plain reference path (a per-sample backward loop)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netsim


def mlp(d_in: int = 3, hidden: int = 8, d_out: int = 1, depth: int = 2, act=nn.Tanh, seed: int = 0,
        dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    layers, width = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), act()]
        width = hidden
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers).to(dtype)


class SmallCNN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> pool -> Linear: weight sharing, buffers, d outputs."""

    def __init__(self, d_out: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, d_out)
        with torch.no_grad():  # non-trivial running statistics, so the buffers matter
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = nn.functional.avg_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.head(h.flatten(1))


class TinyTransformer(nn.Module):
    """Text classifier: Embedding(vocab, 16) -> 2 TransformerEncoderLayers (batch_first) -> masked mean over
    tokens -> Linear(16, d_out). forward(tokens (B, T) long, padding_mask (B, T) bool, True = padding) -> (B, d_out)."""

    def __init__(self, vocab: int = 50, d_model: int = 16, d_out: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, d_out)

    def forward(self, tokens, padding_mask=None):
        h = self.encoder(self.embed(tokens), src_key_padding_mask=padding_mask)
        if padding_mask is None:
            return self.head(h.mean(1))
        keep = (~padding_mask).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1).clamp_min(1.0))


def token_batch(n: int, length: int = 6, vocab: int = 50, padded: bool = False, seed: int = 0):
    """(n, length) long tokens; with `padded`, also an (n, length) bool mask (True = padding) whose rows keep
    between 2 and `length` tokens, padding at the end."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, length), generator=g)
    if not padded:
        return tokens
    keep = torch.randint(2, length + 1, (n,), generator=g)
    return tokens, torch.arange(length).unsqueeze(0) >= keep.unsqueeze(1)


class _ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> 2 residual blocks (conv-BN-ReLU-conv-BN + skip) -> adaptive average pool ->
    Linear(width, d_out). Input (B, c_in, H, W). BatchNorm running statistics are non-trivial; use in eval mode."""

    def __init__(self, c_in: int = 1, width: int = 4, d_out: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(_ResidualBlock(width), _ResidualBlock(width))
        self.head = nn.Linear(width, d_out)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        self.eval()

    def forward(self, x):
        h = self.blocks(self.stem(x))
        return self.head(nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))


def jacobian_grads(*args, **kwargs) -> torch.Tensor:
    """`netsim.per_sample_grads` on the Jacobian engine (torch.func): the reference the layer-wise
    rules are checked against, never the layer-wise engine itself (which "auto" may pick)."""
    return netsim.per_sample_grads(*args, method="jacobian", **kwargs)


def reference_jacobians(model: nn.Module, inputs: torch.Tensor, output_fn=None, targets=None) -> torch.Tensor:
    """(N, d, p) by one autograd.grad call per sample and output: the slow, obvious path."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for n in range(inputs.shape[0]):
        out = model(inputs[n:n + 1])
        if output_fn is not None:
            out = output_fn(out) if targets is None else output_fn(out, targets[n:n + 1])
        out = out.reshape(1, -1)
        grads = []
        for i in range(out.shape[1]):
            g = torch.autograd.grad(out[0, i], params, retain_graph=True, allow_unused=True)
            grads.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten()
                                    for gi, p in zip(g, params)]))
        rows.append(torch.stack(grads))
    return torch.stack(rows)


def pytest_configure(config):
    # torch.func.jvp goes through torch.jit internals that warn about their own deprecation.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def model_state(model: nn.Module) -> dict:
    """Everything a library call could leave changed on a model: parameters and buffers (copied),
    each module's training flag and its hooks."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for m in model.modules()],
    }


def assert_model_unchanged(model: nn.Module, before: dict) -> None:
    """Fails unless `model_state(model)` equals `before` exactly (bit for bit)."""
    after = model_state(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, value in before["tensors"].items():
        assert torch.equal(after["tensors"][name], value), f"{name} changed"
    for key in ("training", "requires_grad", "hooks"):
        assert after[key] == before[key], f"{key} changed"

"""The benchmark models, their inputs, their training loss, and the baseline methods.

The sinusoid MLP and the classifiers have d = 1 output after their `output_fn` (the paper's
regression output, the "right class vs the rest" output), so the correlation kernel of two
samples is the cosine of their parameter gradients. The registration network has d = 2 (the
mean displacement (dx, dy) over the output patch), reduced with the trace (`Bench.d`).

Models (`MODELS`):

- "mlp": `netsim_paper.sinusoid.data.sinusoid_mlp(seed=0)`, 21,057 parameters, inputs `(N, 2)` from
  `make_sinusoid` (points on the unit circle), epoch loss L1 (the authors' loss).
- "mnist_cnn": `netsim_paper.mnist.speedup.mnist_cnn(0)`, 317,069 parameters (PReLU), inputs
  `(N, 1, 28, 28)` standard normal with random integer labels, `output_fn=class_vs_rest`,
  epoch loss cross-entropy.
- "cnn1m": `cnn_1m()` below, 1,295,050 parameters, inputs `(N, 3, 32, 32)`, like mnist_cnn.
- "registration": the coarse stage the notebooks analyse (Figs. 1-2, 6-7): a
  `netsim_paper.registration.model.RegistrationNet` with the paper profile's channels (16, 32, 64),
  GroupNorm and first-stage cap 8 (`RegistrationConfig.PAPER`), `zero_init=False`, 313,954
  parameters (19 Conv2d, 18 GroupNorm), on (image, raster) pairs of 64 x 64 patches packed
  into one `(N, 6, 64, 64)` tensor (`PackedRegistration` splits it again), `output_fn` the mean
  over the patch of each displacement channel (d = 2), epoch loss `registration_loss`
  (weighted squared displacement error) against a synthetic target field. `zero_init=False`:
  the default zero head makes every gradient but the head's exactly zero (an untrained
  stage's output is 0 whatever its input), which would benchmark a degenerate kernel. Each
  convolution is followed by GroupNorm and ReLU(inplace=True), as in the training.
- "transformer": `TextTransformer` below, a text classifier (Embedding(1000, 64), two
  `nn.TransformerEncoderLayer(64, 4 heads, feed-forward 128, batch_first, dropout 0)`, mean
  pooling over the tokens, Linear(64 -> 4)), 131,204 parameters, inputs `(N, 32)` integer
  tokens uniform over the vocabulary, random labels, `class_vs_rest`, epoch loss
  cross-entropy.
- "resnet": `ResNet8` below, a CIFAR-style ResNet (a stem and three basic blocks of widths 16,
  32, 64 with 3 x 3 convolutions, BatchNorm after every convolution, 1 x 1 projection
  shortcuts, global average pooling, Linear(64 -> 10)), 78,042 parameters, inputs
  `(N, 3, 32, 32)` standard normal, like cnn1m. Its BatchNorm layers carry running statistics
  from a calibration pass (512 seeded inputs, cumulative average), and the kernels are those of
  the model in eval mode; the epoch runs in training mode (batch statistics), as a training
  epoch does.

Inputs are synthetic (seeded): the timings do not depend on the values, only on the shapes
(and, for ReLU networks, hardly on the activation pattern).

Baselines (`naive_grads`, `vmap_grads`, `dense_soft_density`, `dense_similarity`):

- naive: the authors' method, one autograd backward per sample (and output) into `.grad`,
  copied into a preallocated `(N, d, p)` G; then normalise, sum, dot (soft density) or
  G G^T (similarity).
- vmap: plain `torch.func.vmap(grad(f))` (`jacrev` for d > 1) over chunks of `VMAP_CHUNK`
  samples to materialise G, then the same dense steps.

The dense steps (`dense_normalise`, `dense_soft`, `dense_sim`) are shared with the peers of
`bench/peers.py` that materialise G. Normalisation: for d = 1 each row divided by its norm;
for d > 1 each sample's `(d, p)` block left-multiplied by K(x, x)^-1/2 / sqrt(rank)
(`netsim.kernel.psd_power`), so that k^C(x, y) (trace) is the plain dot product of the
flattened blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

import netsim
from netsim.kernel import psd_power
from netsim.outputs import class_vs_rest
from netsim_paper.mnist.speedup import mnist_cnn
from netsim_paper.sinusoid.data import make_sinusoid, sinusoid_mlp

#: Samples per vmap call of the plain torch.func baseline (netsim's Jacobian engine uses 64).
VMAP_CHUNK = 64
#: Batch size of the training-epoch reference.
EPOCH_BATCH = 128


def cnn_1m(seed: int = 0, n_classes: int = 10) -> nn.Sequential:
    """A >= 1M-parameter CNN for `(B, 3, 32, 32)` inputs (1,295,050 parameters).

    Conv(3->64, 3, pad 1) ReLU Conv(64->64, 3) ReLU MaxPool2 Conv(64->128, 3) ReLU MaxPool2
    Flatten Linear(4608->256) ReLU Linear(256->10). Most parameters (1.18M) sit in the first
    Linear layer, which the layer-wise engine keeps factored.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(128 * 6 * 6, 256), nn.ReLU(), nn.Linear(256, n_classes))


@dataclass
class Bench:
    """One benchmark model with its data.

    Attributes:
        name: key in `MODELS`.
        model: the network in eval mode (no BatchNorm/Dropout here, so train/eval agree).
        inputs: `(N, ...)`.
        targets: `(N,)` integer labels for `output_fn`, or None.
        output_fn: maps the raw output batch (and targets) to `(B, 1)`, or None.
        loss_targets: what the epoch loss compares the raw output with.
        loss: `loss(raw_output, loss_targets) -> scalar`, the plain training loss.
        d: outputs per sample after `output_fn` (the kernels' d).
        train_epoch: whether the epoch runs in training mode (the BatchNorm model: batch
            statistics, as in training; its running statistics are restored afterwards).
    """

    name: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor | None
    output_fn: Callable | None
    loss_targets: Tensor
    loss: Callable[[Tensor, Tensor], Tensor]
    d: int = 1
    train_epoch: bool = False

    def subset(self, n: int) -> Bench:
        return Bench(self.name, self.model, self.inputs[:n], None if self.targets is None else self.targets[:n],
                     self.output_fn, self.loss_targets[:n], self.loss, self.d, self.train_epoch)

    @property
    def n(self) -> int:
        return self.inputs.shape[0]

    def outputs(self, x: Tensor, t: Tensor | None, model: nn.Module | None = None) -> Tensor:
        """`(B, d)` reduced outputs of a batch (of `model`, default the bench's own)."""
        out = (self.model if model is None else model)(x)
        if self.output_fn is not None:
            out = self.output_fn(out) if t is None else self.output_fn(out, t)
        return out.reshape(x.shape[0], -1)


def _mlp(n: int, seed: int) -> Bench:
    data = make_sinusoid(n, frequency=4, seed=seed)
    return Bench("mlp", sinusoid_mlp(seed=0).eval(), data.inputs, None, None, data.targets,
                 nn.functional.l1_loss)


def _classifier(name: str, model: nn.Module, shape: tuple[int, ...], n: int, seed: int) -> Bench:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return Bench(name, model.eval(), x, labels, class_vs_rest, labels, nn.functional.cross_entropy)


class TextTransformer(nn.Module):
    """A small text classifier: `(B, T)` integer tokens -> `(B, classes)` logits.

    Embedding(vocab, width) -> two `nn.TransformerEncoderLayer(width, heads, ffn, batch_first,
    dropout 0)` -> mean over the tokens -> Linear(width, classes). Dropout 0: train and eval
    modes compute the same function (the epoch and the kernels see one model).
    """

    def __init__(self, vocab: int = 1000, width: int = 64, heads: int = 4, ffn: int = 128, classes: int = 4,
                 seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(vocab, width)
            layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=ffn, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
            self.head = nn.Linear(width, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (identity, or a strided 1 x 1 conv and BN
    where the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet8(nn.Module):
    """A CIFAR-style ResNet for `(B, 3, 32, 32)` inputs: conv3x3(3 -> 16)-BN-ReLU, basic blocks
    16 -> 16, 16 -> 32 (stride 2), 32 -> 64 (stride 2), global average pooling, Linear(64 ->
    classes). Built in eval mode with running statistics from `calibrate` (seeded)."""

    def __init__(self, classes: int = 10, seed: int = 0, calibration: int = 512):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.blocks = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2))
            self.head = nn.Linear(64, classes)
            self.calibrate(torch.randn(calibration, 3, 32, 32))
        self.eval()

    @torch.no_grad()
    def calibrate(self, x: Tensor, batch: int = 128) -> None:
        """Running statistics of every BatchNorm as the cumulative average over the batches of
        `x` (training-mode forwards, no gradient), as a trained network would carry."""
        norms = [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        self.train()
        for start in range(0, x.shape[0], batch):
            self(x[start:start + batch])
        for m in norms:
            m.momentum = 0.1
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


#: Tokens per text sample and classes of the transformer bench.
TEXT_LENGTH, TEXT_CLASSES = 32, 4


def _transformer(n: int, seed: int) -> Bench:
    g = torch.Generator().manual_seed(seed)
    model = TextTransformer(classes=TEXT_CLASSES).eval()
    tokens = torch.randint(0, model.embed.num_embeddings, (n, TEXT_LENGTH), generator=g)
    labels = torch.randint(0, TEXT_CLASSES, (n,), generator=g)
    return Bench("transformer", model, tokens, labels, class_vs_rest, labels, nn.functional.cross_entropy)


def _resnet(n: int, seed: int) -> Bench:
    b = _classifier("resnet", ResNet8(), (3, 32, 32), n, seed)
    b.train_epoch = True
    return b


class PackedRegistration(nn.Module):
    """A two-input registration network on one `(B, 6, h, w)` tensor: channels 0-2 are the
    image, 3-5 the raster (the engines and the peers take one input tensor)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x[:, :3], x[:, 3:])


#: Side of the registration patches.
REGISTRATION_PATCH = 64


def registration_net(seed: int = 0) -> PackedRegistration:
    """The registration stage the notebooks analyse, the coarse stage of the paper profile
    (`RegistrationConfig.PAPER`: channels, GroupNorm, its cap), with `zero_init=False`; seeded,
    packed for one input tensor."""
    from netsim_paper.registration.config import RegistrationConfig
    from netsim_paper.registration.model import RegistrationNet
    cfg = RegistrationConfig.PAPER
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PackedRegistration(RegistrationNet(cap=cfg.caps[0], channels=cfg.channels, zero_init=False,
                                                  norm=cfg.norm))


def mean_displacement(field: Tensor) -> Tensor:
    """`(B, 2, h, w)` field -> `(B, 2)`: the mean over the patch of each displacement channel."""
    return field.mean((2, 3))


def _registration_loss(out: Tensor, packed: Tensor) -> Tensor:
    from netsim_paper.registration.model import registration_loss
    return registration_loss(out, packed[:, :2], packed[:, 2])


def _registration(n: int, seed: int) -> Bench:
    g = torch.Generator().manual_seed(seed)
    size = (n, 3, REGISTRATION_PATCH, REGISTRATION_PATCH)
    image = torch.rand(size, generator=g)
    raster = (torch.rand(size, generator=g) > 0.8).float()        # (fill, edge, vertex) indicators
    target = (2 * torch.rand((n, 2, *size[2:]), generator=g) - 1) * 6.0
    # the loss weights of the library's convention: background 0, fill 0.1, edge 1, vertex 10
    weights = torch.maximum(torch.maximum(0.1 * raster[:, 0], raster[:, 1]), 10 * raster[:, 2])
    return Bench("registration", registration_net(0).eval(), torch.cat([image, raster], 1), None,
                 mean_displacement, torch.cat([target, weights[:, None]], 1), _registration_loss, d=2)


class HFPacked(nn.Module):
    """A Hugging Face sequence classifier fed one `(N, 2, T)` tensor, (input_ids, attention_mask)
    packed, called with its keywords and returning its logits: the bench's tensor plumbing around
    the model's own forward (masks, position ids, its attention implementation)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, packed: Tensor) -> Tensor:
        return self.model(input_ids=packed[:, 0], attention_mask=packed[:, 1]).logits


def hf_classifier(family: str, seed: int = 0, vocab: int = 1000, width: int = 64) -> nn.Module:
    """A tiny `transformers` classifier of `family` ("bert", "gpt2", "llama") sized like
    `TextTransformer`: 2 layers, width 64, 4 heads (Llama: 2 key-value heads), feed-forward 128,
    vocabulary 1000, `TEXT_CLASSES` labels, dropout 0, eval mode, sdpa attention (the default)."""
    import transformers as t  # an optional dependency of the bench, like the peers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "bert":
            config = t.BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=2 * width, max_position_embeddings=64, num_labels=TEXT_CLASSES,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            model = t.BertForSequenceClassification(config)
        elif family == "gpt2":
            config = t.GPT2Config(vocab_size=vocab, n_embd=width, n_layer=2, n_head=4, n_inner=2 * width,
                                  n_positions=64, num_labels=TEXT_CLASSES, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            model = t.GPT2ForSequenceClassification(config)
        elif family == "llama":
            config = t.LlamaConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=2 * width, max_position_embeddings=64,
                                   num_labels=TEXT_CLASSES, pad_token_id=0, bos_token_id=1, eos_token_id=1)
            model = t.LlamaForSequenceClassification(config)
        else:
            raise KeyError(family)
    return model.eval()


def _hf(family: str, n: int, seed: int) -> Bench:
    """Token ids 2..vocab of random lengths 16..32, right-padded with 0 to `TEXT_LENGTH`."""
    g = torch.Generator().manual_seed(seed)
    model = HFPacked(hf_classifier(family)).eval()
    ids = torch.randint(2, 1000, (n, TEXT_LENGTH), generator=g)
    lengths = torch.randint(TEXT_LENGTH // 2, TEXT_LENGTH + 1, (n,), generator=g)
    mask = (torch.arange(TEXT_LENGTH)[None] < lengths[:, None]).long()
    labels = torch.randint(0, TEXT_CLASSES, (n,), generator=g)
    return Bench(f"hf_{family}", model, torch.stack([ids * mask, mask], 1), labels, class_vs_rest, labels,
                 nn.functional.cross_entropy)


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


MODELS: dict[str, Callable[[int, int], Bench] | None] = {
    "mlp": _mlp,
    "mnist_cnn": lambda n, seed: _classifier("mnist_cnn", mnist_cnn(0), (1, 28, 28), n, seed),
    "cnn1m": lambda n, seed: _classifier("cnn1m", cnn_1m(0), (3, 32, 32), n, seed),
    "registration": _registration,
    "transformer": _transformer,
    "resnet": _resnet,
    **{f"hf_{family}": (lambda n, seed, family=family: _hf(family, n, seed)) if _has_transformers() else None
       for family in ("bert", "gpt2", "llama")},
}

DESCRIPTIONS = {
    "mlp": "sinusoid MLP (sinusoid_mlp(), 21k params, input (N, 2), d=1)",
    "mnist_cnn": "MNIST CNN (mnist_cnn(0), 317k params, input (N, 1, 28, 28), class_vs_rest, d=1)",
    "cnn1m": "1.3M-param CNN (bench/models.py cnn_1m, input (N, 3, 32, 32), class_vs_rest, d=1)",
    "registration": "registration U-Net (the paper profile's coarse stage: RegistrationNet(cap=8, "
                    "channels=(16, 32, 64), norm='group', zero_init=False), 314k params, "
                    "(image, raster) 64x64 patches packed as (N, 6, 64, 64), mean displacement, d=2, trace)",
    "transformer": "text transformer (bench/models.py TextTransformer: Embedding(1000, 64), 2 x "
                   "TransformerEncoderLayer(64, 4 heads, ffn 128, batch_first), mean pooling, Linear(64, 4); "
                   "131k params, eval mode, input (N, 32) tokens, class_vs_rest, d=1)",
    **{f"hf_{family}": f"Hugging Face {name} (transformers {name}ForSequenceClassification, 2 layers, width 64, "
                        "4 heads, ffn 128, vocabulary 1000, dropout 0, eval mode, sdpa attention; input (N, 32) token "
                        "ids of random lengths 16-32, right-padded, with their attention mask, packed as (N, 2, 32) "
                        "and passed as keywords by HFPacked; class_vs_rest on the logits, d=1)"
       for family, name in (("bert", "Bert"), ("gpt2", "GPT2"), ("llama", "Llama"))},
    "resnet": "ResNet-8 with BatchNorm (bench/models.py ResNet8: widths 16/32/64, 78k params, eval mode with "
              "calibrated running statistics, input (N, 3, 32, 32), class_vs_rest, d=1; epoch in training mode)",
}


def available_models() -> list[str]:
    return [k for k, v in MODELS.items() if v is not None]


def make_bench(name: str, n: int, seed: int = 0) -> Bench:
    """The model `name` with n seeded samples.

    Raises:
        KeyError: unknown model; NotImplementedError: a model that does not exist yet.
    """
    factory = MODELS[name]
    if factory is None:
        raise NotImplementedError(f"{name}: not yet available")
    return factory(n, seed)


# --------------------------------------------------------------------------- reference work

def epoch(b: Bench, batch: int = EPOCH_BATCH) -> None:
    """The training-epoch reference: forward + backward of the plain loss, batches of `batch`
    over the N samples. No optimizer step (Adam is excluded). With `b.train_epoch`, in training
    mode (BatchNorm on batch statistics); the model's mode and buffers are restored after."""
    model = b.model
    saved = {k: v.clone() for k, v in model.named_buffers()} if b.train_epoch else {}
    was_training = model.training
    model.train(b.train_epoch or was_training)
    try:
        for start in range(0, b.n, batch):
            out = model(b.inputs[start:start + batch])
            loss = b.loss(out, b.loss_targets[start:start + batch])
            model.zero_grad(set_to_none=True)
            loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        with torch.no_grad():
            for k, v in model.named_buffers():
                if k in saved:
                    v.copy_(saved[k])


def naive_grads(b: Bench) -> Tensor:
    """The authors' method: one backward per sample (and output), `(N, d, p)` G."""
    params = list(netsim.trainable_parameters(b.model).values())
    p = sum(q.numel() for q in params)
    G = torch.empty(b.n, b.d, p)
    for i in range(b.n):
        t = None if b.targets is None else b.targets[i:i + 1]
        out = b.outputs(b.inputs[i:i + 1], t)
        for a in range(b.d):
            for q in params:
                q.grad = None
            out[0, a].backward(retain_graph=a < b.d - 1)
            torch.cat([q.grad.reshape(-1) for q in params], out=G[i, a])
    for q in params:
        q.grad = None
    return G


def vmap_grads(b: Bench, chunk: int = VMAP_CHUNK) -> Tensor:
    """Plain torch.func: `vmap(grad(f))` (`vmap(jacrev(f))` for d > 1) over chunks, `(N, d, p)` G."""
    params = {k: v.detach() for k, v in netsim.trainable_parameters(b.model).items()}
    buffers = dict(b.model.named_buffers())

    def f(prm, x, t):
        out = functional_call(b.model, (prm, buffers), (x.unsqueeze(0),))
        if b.output_fn is not None:
            out = b.output_fn(out, t.unsqueeze(0)) if b.targets is not None else b.output_fn(out)
        return out.sum() if b.d == 1 else out.reshape(b.d)

    per_sample = vmap(grad(f) if b.d == 1 else jacrev(f), in_dims=(None, 0, 0))
    targets = b.targets if b.targets is not None else torch.zeros(b.n)
    p = sum(q.numel() for q in params.values())
    G = torch.empty(b.n, b.d, p)
    for start in range(0, b.n, chunk):
        g = per_sample(params, b.inputs[start:start + chunk], targets[start:start + chunk])
        n = g[next(iter(params))].shape[0]
        torch.cat([g[k].reshape(n, b.d, -1) for k in params], dim=2, out=G[start:start + chunk])
    return G


#: Rows per step of the d > 1 normalisation (its temporaries are chunk x d x p).
NORMALISE_CHUNK = 256


def dense_normalise(G: Tensor) -> Tensor:
    """Normalises a materialised `(N, d, p)` G in place (any strides) and returns it.

    d = 1: each row divided by its norm (K(x,x)^-1/2 J = g / ||g||). d > 1: each sample's
    `(d, p)` block left-multiplied by K(x,x)^-1/2 / sqrt(rank K(x,x)), so that the trace
    k^C(x, y) is the plain dot product of the normalised blocks."""
    n, d, _ = G.shape
    if d == 1:
        g = G[:, 0]
        g.div_(g.norm(dim=1, keepdim=True))
        return G
    for start in range(0, n, NORMALISE_CHUNK):
        block = G[start:start + NORMALISE_CHUNK]
        factor, rank = psd_power(block @ block.transpose(1, 2), -0.5)
        factor = factor / rank.clamp_min(1).to(factor.dtype).sqrt()[:, None, None]
        block.copy_(factor @ block)
    return G


def dense_soft(Q: Tensor) -> Tensor:
    """N_S from a normalised `(N, d, p)` Q: sum_a Q_a (sum_x' Q_a(x'))."""
    return sum(Q[:, a] @ Q[:, a].sum(0) for a in range(Q.shape[1]))


def dense_sim(Q: Tensor) -> Tensor:
    """k^C (trace) N x N from a normalised `(N, d, p)` Q: sum_a Q_a Q_a^T."""
    K = Q[:, 0] @ Q[:, 0].T
    for a in range(1, Q.shape[1]):
        K.addmm_(Q[:, a], Q[:, a].T)
    return K


def normalise_(G: Tensor) -> Tensor:
    """`dense_normalise` (kept under its old name)."""
    return dense_normalise(G)


def dense_soft_density(G: Tensor) -> Tensor:
    """N_S from a materialised `(N, d, p)` G (consumed: normalised in place)."""
    return dense_soft(dense_normalise(G))


def dense_similarity(G: Tensor) -> Tensor:
    """k^C (trace) N x N from a materialised `(N, d, p)` G (consumed)."""
    return dense_sim(dense_normalise(G))


def correlation_from_gram(K: Tensor) -> Tensor:
    """k^C (trace) `(N, N)` from the raw gradient gram K(x, y) = J(x) J(y)^T, `(N, N, d, d)`
    (the peers that return a Gram matrix / influence scores, not G)."""
    n, _, d, _ = K.shape
    idx = torch.arange(n)
    if d == 1:
        diag = K[idx, idx, 0, 0].clamp_min(torch.finfo(K.dtype).tiny).rsqrt()
        return K[:, :, 0, 0] * diag[:, None] * diag[None, :]
    factor, rank = psd_power(K[idx, idx], -0.5)                    # (N, d, d)
    factor = factor / rank.clamp_min(1).to(factor.dtype).sqrt()[:, None, None]
    # Tr(F_x K_xy F_y^T) = sum_ab (F_x K_xy)_ab F_y,ab
    left = torch.einsum("xab,xybc->xyac", factor, K)
    return torch.einsum("xyac,yac->xy", left, factor)


def ours_soft_density(b: Bench, method: str) -> Tensor:
    return netsim.soft_density(b.model, b.inputs, output_fn=b.output_fn, targets=b.targets, method=method)


def ours_similarity(b: Bench, method: str) -> Tensor:
    return netsim.similarity(b.model, b.inputs, output_fn=b.output_fn, x_targets=b.targets,
                             kind="correlation", reduce="trace", method=method)


def ours_grads(b: Bench, method: str = "jacobian") -> Tensor:
    """`(N, d, p)` G from `netsim.per_sample_grads` with `method` (the layer-wise engine writes
    each chunk's per-layer gradients straight into the result)."""
    return netsim.per_sample_grads(b.model, b.inputs, output_fn=b.output_fn, targets=b.targets, method=method)

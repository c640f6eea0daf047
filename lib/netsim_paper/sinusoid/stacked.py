"""Train S independent copies of a small model at once ("stacked" training).

The sinusoid experiment (paper Section 4.3) needs 25 trainings (5 frequencies x 5 seeds)
of 160k Adam steps each on a 21k-parameter MLP. One at a time, each step is a handful of
64x64 matrix products and the run is dominated by per-step Python and dispatch overhead.
Here the S models share one step: every parameter is stored as a stacked tensor of shape
`(S, *param.shape)`, the forward pass is a batched matrix product over the model axis,
and one optimizer step updates all models.

Why this is *exactly* S independent trainings, not an approximation:

* The summed loss `L = sum_s L_s(theta_s)` has gradient `dL/dtheta_s = dL_s/dtheta_s`:
  the slice of the stacked gradient that belongs to model s depends on model s alone
  (its parameters, its batch). This holds for any loss that is a sum of per-model terms.
* Adam is element-wise: each scalar parameter's update depends only on its own gradient
  history (first and second moments, bias correction with the shared step count). Adam on
  a stacked tensor therefore performs S independent Adam runs. The same holds for SGD,
  momentum, L2 weight decay and AMSGrad, but *not* for optimizers or tricks that couple
  elements (global-norm gradient clipping, LAMB/LARS trust ratios, Shampoo).
* Each model draws its own batch order from its own seeded generator, so model s sees
  exactly the batches it would see if trained alone, whatever else is in the stack.

The only possible difference from one-model-at-a-time training is float rounding. Adam
here is `torch.optim.Adam(fused=True)`, whose kernel rounds slightly differently from the
default for-loop implementation (~1e-8 per step), and a batched matrix product may round
differently from a single one. On the AMD machines (MKL) the sinusoid MLP under the paper's
protocol (L1, batch 64, lr 1e-4) trains bitwise identically to the same model trained alone
with fused Adam (640 steps); on an AVX512 Intel machine the two differed by one float32 ulp
(1.9e-9) after 12 steps, so the test of a short run allows a few ulps, not bitwise equality.
Do not expect elementwise agreement over long runs against any other implementation, though:
ReLU + L1 + Adam training is chaotic at the last bit. Fused vs.
for-loop Adam on one model alone, everything else identical, drift from 1e-8 to 1e-4 in
the parameters after ~380 steps and to 2e-3 after ~420 (a ReLU or a residual sign flips,
and Adam's normalisation turns the flip into a full-size step). Long-run comparisons
between implementations must therefore be statistical (losses, kernels), not per weight.

Two implementations share the epoch loop:

* "vmap" (generic): any module without buffer mutation or randomness;
  `torch.func.functional_call` + `torch.vmap` over the stacked parameters, autograd for
  the backward, `torch.optim.Adam` on the stacked leaves.
* "mlp" (fast path): an `nn.Sequential` of `Linear (ReLU Linear)*`. Forward with
  `torch.baddbmm`, backward written out by hand (three batched products per layer, no
  autograd graph), all parameters and gradients as views of one flat buffer so Adam's
  fused kernel updates everything in a single call. About 1.6x faster than "vmap" on
  CPU for the sinusoid MLP (S=25: 590 vs 360 steps/s on 2 cores); the tests check the
  two paths agree.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from netsim_paper.sinusoid.stacked import train_stacked
    >>> nets = [nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1)) for _ in range(3)]
    >>> x = torch.randn(3, 100, 2)                 # one data set per model
    >>> y = x.sum(-1, keepdim=True)
    >>> trained, history = train_stacked(nets, x, y, lr=1e-2, batch_size=16, epochs=5,
    ...                                   shuffle_seeds=[0, 1, 2], progress=False)
    >>> history.epoch_loss.shape
    torch.Size([3, 5])
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = [
    "LOSSES",
    "METHODS",
    "StackedHistory",
    "batch_slices",
    "epoch_order",
    "is_relu_mlp",
    "make_shuffle_generators",
    "stack_modules",
    "train_stacked",
    "unstack",
]

#: Per-model training losses, each the mean over the batch and output entries (like
#: `nn.L1Loss()` / `nn.MSELoss()` with the default reduction="mean").
LOSSES: tuple[str, ...] = ("l1", "mse")

#: "auto" picks "mlp" for a `Linear (ReLU Linear)*` Sequential, "vmap" otherwise.
METHODS: tuple[str, ...] = ("auto", "mlp", "vmap")


@dataclass
class StackedHistory:
    """What happened during `train_stacked`.

    Attributes:
        epoch_loss: (S, epochs) mean training loss of each model over each epoch, i.e. the
            per-sample loss averaged over all N samples as seen during that epoch (while
            the parameters were still moving; not a re-evaluation at the epoch's end).
        method: the implementation used, "mlp" or "vmap".
        steps: optimizer steps taken (the same for every model).
        seconds: wall time of the training loop (set-up excluded).
    """

    epoch_loss: Tensor
    method: str
    steps: int
    seconds: float

    @property
    def steps_per_second(self) -> float:
        """Optimizer steps per second (each step advances all S models)."""
        return self.steps / self.seconds if self.seconds > 0 else float("inf")


# --------------------------------------------------------------------------- stacking


def _check_same_structure(models: Sequence[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """Named parameters of models[0], after checking every model has the same ones."""
    if len(models) == 0:
        raise ValueError("need at least one model to stack")
    reference = list(models[0].named_parameters())
    if not reference:
        raise ValueError("models[0] has no parameters to train")
    signature = [(name, p.shape, p.dtype, p.device) for name, p in reference]
    for s, model in enumerate(models[1:], start=1):
        other = [(name, p.shape, p.dtype, p.device) for name, p in model.named_parameters()]
        if other != signature:
            raise ValueError(
                f"models[{s}] does not have the same parameters (names, shapes, dtypes, "
                f"devices) as models[0]; stacked training needs identical architectures")
    for name, p in reference:
        if not p.requires_grad:
            raise ValueError(f"parameter {name!r} is frozen (requires_grad=False); stacked "
                             "training trains every parameter, unfreeze it or use your own loop")
    return reference


def stack_modules(models: Sequence[nn.Module]) -> dict[str, Tensor]:
    """Stack the parameters of identically-shaped models along a new leading axis.

    Args:
        models: S modules with the same parameter names, shapes, dtypes and devices.

    Returns:
        Parameter name -> leaf tensor of shape (S, *param.shape) with requires_grad=True,
        detached from (and not sharing memory with) the input models.

    Raises:
        ValueError: empty list, differing architectures, or frozen parameters.
    """
    names = [name for name, _ in _check_same_structure(models)]
    per_model = [dict(model.named_parameters()) for model in models]
    return {name: torch.stack([params[name].detach() for params in per_model]).requires_grad_()
            for name in names}


def unstack(template: nn.Module, stacked: dict[str, Tensor], index: int) -> nn.Module:
    """A fresh deep copy of `template` holding slice `index` of the stacked parameters.

    Args:
        template: a module with the architecture of the stacked models (its parameter
            values are ignored; its buffers, hooks and train/eval mode are copied).
        stacked: parameter name -> (S, *param.shape), e.g. from `stack_modules`.
        index: which model to extract, in [0, S).

    Returns:
        An ordinary `nn.Module`, independent of `stacked` (values are copied).

    Raises:
        ValueError: the parameter names or shapes do not match the template.
    """
    model = copy.deepcopy(template)
    params = dict(model.named_parameters())
    if set(params) != set(stacked):
        raise ValueError(f"stacked parameters {sorted(stacked)} do not match the template's "
                         f"{sorted(params)}")
    with torch.no_grad():
        for name, p in params.items():
            value = stacked[name][index]
            if value.shape != p.shape:
                raise ValueError(f"stacked {name!r} has per-model shape {tuple(value.shape)}, "
                                 f"the template expects {tuple(p.shape)}")
            p.copy_(value)
    return model


# ----------------------------------------------------------------------- batch order


def make_shuffle_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per model, seeded, for the per-epoch shuffles."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def epoch_order(generators: Sequence[torch.Generator], n: int) -> Tensor:
    """The sample order of one epoch for every model: (S, n) int64, row s a permutation.

    Row s is `torch.randperm(n, generator=generators[s])`, so a model's order depends on
    its own generator only (not on its position in the stack). This is the order a
    one-model loop `for idx in torch.randperm(n, generator=g).split(batch_size)` visits;
    it has the distribution of `DataLoader(shuffle=True)`, but not its exact draws (the
    DataLoader also consumes its generator for worker seeds).
    """
    return torch.stack([torch.randperm(n, generator=g) for g in generators])


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive batches over n samples; the last one is short if batch_size does not
    divide n (like a DataLoader with drop_last=False)."""
    return [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


# ------------------------------------------------------------------- fast MLP path


def is_relu_mlp(model: nn.Module) -> bool:
    """True if `model` is an `nn.Sequential` of `Linear (ReLU Linear)*` with biases.

    Such a model qualifies for the hand-written "mlp" path. (That path computes the
    forward pass itself: forward hooks on the model are not called during training.)
    """
    if type(model) is not nn.Sequential or len(model) % 2 == 0:
        return False
    for position, layer in enumerate(model):
        if position % 2 == 0 and not (type(layer) is nn.Linear and layer.bias is not None):
            return False
        if position % 2 == 1 and type(layer) is not nn.ReLU:
            return False
    return True


class _StackedReluMlp:
    """S `Linear (ReLU Linear)*` models as views of one flat parameter buffer.

    Layer l has weight (S, out_l, in_l) (the `nn.Linear` layout) and bias (S, 1, out_l)
    (broadcast over the batch by `baddbmm`). Gradients live in a second flat buffer with
    the same views and are overwritten (never accumulated) at every step, so the
    optimizer sees one (P*S,) tensor and its fused kernel updates all models in one call.
    """

    def __init__(self, models: Sequence[nn.Module], optimizer_factory: Callable, device, dtype):
        self.linear_names = [name for name, _ in models[0].named_children()][0::2]
        S = len(models)
        shapes = []
        for layer in models[0][0::2]:
            shapes.append((S, layer.out_features, layer.in_features))
            shapes.append((S, 1, layer.out_features))
        total = sum(a * b * c for a, b, c in shapes)
        self.flat = torch.empty(total, device=device, dtype=dtype, requires_grad=True)
        self.flat.grad = torch.zeros_like(self.flat, requires_grad=False)
        param_views = self._views(self.flat.detach(), shapes)
        grad_views = self._views(self.flat.grad, shapes)
        self.weights, self.biases = param_views[0::2], param_views[1::2]
        self.weight_grads, self.bias_grads = grad_views[0::2], grad_views[1::2]
        with torch.no_grad():
            for k, name in enumerate(self.linear_names):
                for s, model in enumerate(models):
                    layer = getattr(model, name)
                    self.weights[k][s].copy_(layer.weight)
                    self.biases[k][s, 0].copy_(layer.bias)
        self.optimizer = optimizer_factory([self.flat])

    @staticmethod
    def _views(buffer: Tensor, shapes: list[tuple[int, int, int]]) -> list[Tensor]:
        views, offset = [], 0
        for shape in shapes:
            size = shape[0] * shape[1] * shape[2]
            views.append(buffer[offset:offset + size].view(shape))
            offset += size
        return views

    def step(self, inputs: Tensor, targets: Tensor, loss: str) -> Tensor:
        """One Adam step of every model on its batch.

        Args:
            inputs: (S, B, in) the batch of each model.
            targets: (S, B, out).
            loss: "l1" or "mse".

        Returns:
            (S,) each model's loss summed over the batch and output entries (before the
            step), for the epoch average.
        """
        # Forward, keeping each layer's input: post-ReLU outputs suffice for backward,
        # since relu(z) > 0 exactly where z > 0.
        activations = [inputs]
        h = inputs
        last = len(self.weights) - 1
        for k, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(bias, h, weight.transpose(1, 2))
            if k < last:
                h = h.relu_()
                activations.append(h)
        residual = h - targets
        # Mean over the batch and output entries, as nn.L1Loss / nn.MSELoss do.
        scale = 1.0 / (residual.shape[1] * residual.shape[2])
        if loss == "l1":
            loss_sums = residual.abs().sum(dim=(1, 2))
            grad = residual.sign_().mul_(scale)  # sign(0) = 0, like autograd's abs
        else:
            loss_sums = residual.square().sum(dim=(1, 2))
            grad = residual.mul_(2.0 * scale)
        # Backward, written into the flat gradient buffer in place (no zero_grad needed).
        for k in range(last, -1, -1):
            layer_input = activations[k]
            torch.bmm(grad.transpose(1, 2), layer_input, out=self.weight_grads[k])
            torch.sum(grad, dim=1, keepdim=True, out=self.bias_grads[k])
            if k > 0:
                grad = torch.bmm(grad, self.weights[k])
                # The exact kernel autograd uses for ReLU's backward.
                grad = torch.ops.aten.threshold_backward(grad, layer_input, 0)
        self.optimizer.step()
        return loss_sums

    def stacked_parameters(self) -> dict[str, Tensor]:
        """Parameter name -> (S, *param.shape), detached copies."""
        params = {}
        for k, name in enumerate(self.linear_names):
            params[f"{name}.weight"] = self.weights[k].detach().clone()
            params[f"{name}.bias"] = self.biases[k][:, 0].detach().clone()
        return params


# --------------------------------------------------------------- generic vmap path


class _StackedVmap:
    """S copies of any buffer-free-forward module, trained with vmap + autograd."""

    def __init__(self, models: Sequence[nn.Module], optimizer_factory: Callable, device, dtype):
        self.params = stack_modules([model.to(device) for model in
                                     (copy.deepcopy(m) for m in models)])
        # Buffers are stacked too and only read (vmap cannot batch in-place updates of an
        # unbatched buffer, e.g. BatchNorm running stats in training mode).
        buffer_names = [name for name, _ in models[0].named_buffers()]
        self.buffers = {name: torch.stack([dict(m.named_buffers())[name].detach().to(device)
                                           for m in models]) for name in buffer_names}
        # A parameter-free skeleton: functional_call supplies the tensors at each call.
        self.skeleton = copy.deepcopy(models[0]).to("meta")
        self.batched_forward = torch.vmap(self._forward_one, in_dims=(0, 0, 0))
        self.optimizer = optimizer_factory(list(self.params.values()))

    def _forward_one(self, params: dict[str, Tensor], buffers: dict[str, Tensor],
                     inputs: Tensor) -> Tensor:
        return torch.func.functional_call(self.skeleton, (params, buffers), (inputs,))

    def step(self, inputs: Tensor, targets: Tensor, loss: str) -> Tensor:
        """Same contract as `_StackedReluMlp.step`."""
        outputs = self.batched_forward(self.params, self.buffers, inputs)
        residual = outputs - targets
        per_entry = residual.abs() if loss == "l1" else residual.square()
        per_model_mean = per_entry.mean(dim=(1, 2))
        # Summing over models keeps each model's gradient slice its own (see module doc).
        per_model_mean.sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return per_model_mean.detach() * (residual.shape[1] * residual.shape[2])

    def stacked_parameters(self) -> dict[str, Tensor]:
        return {name: p.detach().clone() for name, p in self.params.items()}


# ------------------------------------------------------------------------ training


def _as_stacked_data(data: Tensor, S: int, what: str) -> Tensor:
    """(N, k) -> expanded (S, N, k) view; (S, N, k) passes through; else ValueError."""
    if data.dim() == 2:
        return data.unsqueeze(0).expand(S, -1, -1)
    if data.dim() == 3:
        if data.shape[0] != S:
            raise ValueError(f"{what} has {data.shape[0]} stacked data sets for {S} models")
        return data
    raise ValueError(f"{what} must be (N, features) shared by all models or "
                     f"(S, N, features) per model, got shape {tuple(data.shape)}")


def _check_io(model: nn.Module, inputs: Tensor, targets: Tensor) -> None:
    """Run models[0] on one sample: a clear ValueError beats a shape error mid-training."""
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            output = model(inputs[0, :1].to(device))
    except RuntimeError as error:
        raise ValueError(f"the models cannot take inputs with {inputs.shape[2]} features "
                         f"(inputs of shape {tuple(inputs.shape)}): {error}") from error
    if output.shape != (1, targets.shape[2]):
        raise ValueError(f"the models output {tuple(output.shape[1:])} per sample, the "
                         f"targets have {targets.shape[2]} features (targets of shape "
                         f"{tuple(targets.shape)}); expected (batch, out) outputs")


def _adam_factory(lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                  device: torch.device) -> Callable:
    # The fused kernel (one pass over memory for all tensors) is the fastest on CPU and
    # CUDA; foreach elsewhere. All variants compute the same element-wise update.
    fused = device.type in ("cpu", "cuda")
    def make(params):
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                fused=fused, foreach=None if fused else True)
    return make


def _split_into_groups(S: int, workers: int) -> list[range]:
    """Contiguous, near-equal index ranges, at most S of them (no empty group)."""
    groups = min(workers, S)
    bounds = [round(g * S / groups) for g in range(groups + 1)]
    return [range(bounds[g], bounds[g + 1]) for g in range(groups)]


@dataclass
class _GroupResult:
    trained: list[nn.Module]
    epoch_loss: Tensor  # (S_group, epochs) on the CPU
    seconds: float


def _train_group(models: Sequence[nn.Module], inputs: Tensor, targets: Tensor, *,
                 seeds: Sequence[int], epochs: int, batch_size: int, loss: str, method: str,
                 make_adam: Callable, progress: bool, description: str,
                 single_thread: bool) -> _GroupResult:
    """The epoch loop for one stack of models (all of them, or one worker's share)."""
    if single_thread:
        # Per-thread setting: this worker drives one core, its sibling the other.
        torch.set_num_threads(1)
    dtype, device = inputs.dtype, inputs.device
    if method == "mlp":
        stack = _StackedReluMlp(models, make_adam, device, dtype)
    else:
        stack = _StackedVmap(models, make_adam, device, dtype)
    S, n = inputs.shape[0], inputs.shape[1]
    generators = make_shuffle_generators(seeds)
    batches = batch_slices(n, batch_size)
    # Losses stay on the device until the end: no host sync per step.
    epoch_loss = torch.zeros(epochs, S, device=device, dtype=dtype)
    entries_per_epoch = n * targets.shape[2]
    bar = tqdm(range(epochs), desc=description, disable=not progress, unit="epoch")
    postfix_every = max(1, epochs // 50)
    start = time.perf_counter()
    for epoch in bar:
        order = epoch_order(generators, n).to(device)
        # One gather per epoch, then each batch is a strided view (no per-step indexing).
        epoch_inputs = inputs.gather(1, order.unsqueeze(-1).expand(-1, -1, inputs.shape[2]))
        epoch_targets = targets.gather(1, order.unsqueeze(-1).expand(-1, -1, targets.shape[2]))
        loss_sums = epoch_loss[epoch]
        for batch in batches:
            loss_sums += stack.step(epoch_inputs[:, batch], epoch_targets[:, batch], loss)
        loss_sums /= entries_per_epoch
        if progress and (epoch % postfix_every == 0 or epoch == epochs - 1):
            bar.set_postfix(mean_loss=f"{loss_sums.mean().item():.4g}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    stacked = stack.stacked_parameters()
    trained = [unstack(model, stacked, s).to(device) for s, model in enumerate(models)]
    return _GroupResult(trained, epoch_loss.T.contiguous().cpu(), seconds)


def train_stacked(
    models: Sequence[nn.Module],
    inputs: Tensor,
    targets: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    loss: str = "l1",
    shuffle_seeds: Sequence[int] | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    method: str = "auto",
    workers: int = 1,
    progress: bool = True,
) -> tuple[list[nn.Module], StackedHistory]:
    """Train S models at once, each exactly as Adam would train it alone.

    Model s is trained on (inputs[s], targets[s]) for `epochs` epochs; each epoch visits
    its N samples in the order `torch.randperm(N, generator=g_s)` (g_s seeded with
    `shuffle_seeds[s]`, see `epoch_order`), in consecutive batches of `batch_size` (the
    last one shorter if batch_size does not divide N), with one Adam step per batch.
    Everything runs on the device of `inputs`.

    On a small CPU, `workers=2` with one intra-op thread each is as fast as one stack with
    `torch.set_num_threads(2)` when the machine is idle, and degrades gracefully when
    another process competes for a core, where two OpenMP threads stall at every barrier
    (measured on 2 cores, S = 25 sinusoid MLPs: 509 vs 517 steps/s idle, ~270 vs ~12
    steps/s with one competing process).

    Args:
        models: S modules of identical architecture (left untouched: trained copies are
            returned). Their forward must not mutate buffers or draw random numbers.
        inputs: (S, N, in) one data set per model, or (N, in) shared by all.
        targets: (S, N, out) or (N, out). Both are cast to the parameters' dtype.
        epochs: number of passes over the data.
        lr: Adam learning rate.
        batch_size: samples per step.
        loss: "l1" (mean absolute error) or "mse" (mean squared error), per model.
        shuffle_seeds: S seeds for the per-model batch orders; default `range(S)`.
        betas, eps, weight_decay: the other `torch.optim.Adam` settings.
        method: "mlp" (hand-written ReLU-MLP path), "vmap" (generic) or "auto" (mlp when
            `is_relu_mlp(models[0])`).
        workers: split the models into this many contiguous groups, each trained as its
            own stack in its own Python thread (torch kernels release the GIL) with one
            intra-op thread. Use about one worker per core on CPU; 1 (the default) trains
            a single stack in the calling thread with torch's current thread settings.
            Which group a model lands in does not change its training.
        progress: show a tqdm bar over epochs (the first group's, when workers > 1).

    Returns:
        (trained, history): `trained[s]` an ordinary module (a deep copy of models[s] with
        the trained parameters, on the data's device) and a `StackedHistory` whose
        epoch_loss is (S, epochs), on the CPU.

    Raises:
        ValueError: mismatched shapes or counts, unknown loss/method, "mlp" requested for a
            model that is not a ReLU MLP, or models of differing architecture.
    """
    S = len(models)
    parameters = _check_same_structure(models)
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid losses: {', '.join(LOSSES)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if epochs < 0 or batch_size < 1 or workers < 1:
        raise ValueError(f"need epochs >= 0, batch_size >= 1 and workers >= 1, got {epochs}, "
                         f"{batch_size} and {workers}")
    dtype, device = parameters[0][1].dtype, inputs.device
    inputs = _as_stacked_data(inputs, S, "inputs").to(dtype)
    targets = _as_stacked_data(targets, S, "targets").to(device=device, dtype=dtype)
    n = inputs.shape[1]
    if targets.shape[1] != n:
        raise ValueError(f"inputs have {n} samples per model, targets {targets.shape[1]}")
    if n == 0:
        raise ValueError("no training samples")
    seeds = list(range(S)) if shuffle_seeds is None else list(shuffle_seeds)
    if len(seeds) != S:
        raise ValueError(f"got {len(seeds)} shuffle seeds for {S} models")
    _check_io(models[0], inputs, targets)
    if method == "auto":
        method = "mlp" if is_relu_mlp(models[0]) else "vmap"
    if method == "mlp" and not is_relu_mlp(models[0]):
        raise ValueError("method='mlp' needs an nn.Sequential of Linear (ReLU Linear)* "
                         "with biases; use method='vmap' for other models")

    groups = _split_into_groups(S, workers)
    description = f"stacked {method} x{S}" + (f" ({len(groups)} workers)" if len(groups) > 1 else "")
    common = dict(epochs=epochs, batch_size=batch_size, loss=loss, method=method,
                  make_adam=_adam_factory(lr, betas, eps, weight_decay, device),
                  description=description, single_thread=len(groups) > 1)
    def run(g: int, members: range) -> _GroupResult:
        part = slice(members.start, members.stop)  # a view, even of broadcast inputs
        return _train_group(list(models[part]), inputs[part], targets[part], seeds=seeds[part],
                            progress=progress and g == 0, **common)

    if len(groups) == 1:
        results = [run(0, groups[0])]
    else:
        threads_before = torch.get_num_threads()
        try:
            with ThreadPoolExecutor(max_workers=len(groups)) as pool:
                futures = [pool.submit(run, g, members) for g, members in enumerate(groups)]
                results = [future.result() for future in futures]
        finally:
            torch.set_num_threads(threads_before)  # the workers' setting must not leak
    history = StackedHistory(
        epoch_loss=torch.cat([r.epoch_loss for r in results]), method=method,
        steps=epochs * len(batch_slices(n, batch_size)),
        seconds=max(r.seconds for r in results))
    return [model for r in results for model in r.trained], history

"""Similarity-enforcing training criteria (paper section 5), differentiable by double backprop.

- `pair_loss`: -k^C(x, x'), asks the network to see two given inputs as similar.
- `group_loss`: compares the batch-mean gradients mu_1, mu_2 of two mini-batches drawn from a
  set that should be seen as similar (one class):

  * "paper":   n_B ||mu_1 - mu_2||^2 / (||mu_1|| ||mu_2||)   (the paper's criterion)
  * "neg_cos": -cos(mu_1, mu_2)                              (same aim, scale-free)
  * "pos_cos": +cos(mu_1, mu_2)                              (the sign in the authors' released
    code: it pushes same-class gradients apart, the opposite of the text; an ablation)

  The factor n_B counterbalances the 1/sqrt(n_B) shrinking of the batch-mean's noise.

The gradients are those of a scalar output per sample (d = 1), e.g. the binarised classifier
output `netsim.outputs.class_vs_rest`. `group_criterion` holds the formulas once; the autograd
functions here and the vectorised trainer of the MNIST experiment both call it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .checks import NonFiniteError, buffers_restored_on_error, check_batch, check_choice
from .data import Inputs, input_rows
from .grads import OutputFn, run_model, trainable_parameters
from .params import ParamSpec
from .threads import model_lock

CRITERIA = ("paper", "neg_cos", "pos_cos")


def group_criterion(mu1: Tensor, mu2: Tensor, n_b: int, criterion: str = "paper") -> Tensor:
    """The group criterion between two flat batch-mean gradients `(p,)`, a scalar.

    A pure formula (no data-dependent branch), so it also runs under `torch.func` transforms;
    callers check that neither gradient is zero (`batch_mean_gradient` does).

    Raises:
        ValueError: unknown criterion.
    """
    check_choice("criterion", criterion, CRITERIA)
    n1, n2 = mu1.norm(), mu2.norm()
    if criterion == "paper":
        return n_b * (mu1 - mu2).pow(2).sum() / (n1 * n2)
    cos = (mu1 * mu2).sum() / (n1 * n2)
    return -cos if criterion == "neg_cos" else cos


def batch_mean_gradient(model: nn.Module, inputs: Inputs, output_fn: OutputFn | None = None,
                        targets: Tensor | None = None, *, params: ParamSpec = None) -> Tensor:
    """mu = grad_theta (1/n) sum_i f(x_i), flat `(p,)`, kept in the graph (create_graph=True).

    Args:
        model: the network being trained (training mode allowed: BatchNorm then uses the
            batch's statistics and updates its running ones, as in any training step; a call
            that raises puts the running statistics back).
        inputs: `(n, ...)` one mini-batch (or a dict of such tensors, the model's keyword inputs).
        output_fn: maps the raw output batch to `(n, 1)` or `(n,)` (d = 1), called with targets
            when given.
        params: the parameters whose gradient is taken (`netsim.params`; default all trainable).

    Raises:
        ValueError: an output that is not one scalar per sample; a zero batch-mean gradient.
        NonFiniteError: a NaN or infinite batch-mean gradient.
    """
    selected = list(trainable_parameters(model, params).values())
    check_batch(model, inputs, targets)
    n = input_rows(inputs)
    with buffers_restored_on_error(model), model_lock(model):
        out = run_model(model, inputs)
        if output_fn is not None:
            out = output_fn(out) if targets is None else output_fn(out, targets)
        if not isinstance(out, Tensor):
            raise TypeError(f"the model (after output_fn) returned a {type(out).__name__}: pass output_fn mapping "
                            "it to one scalar per sample")
        if out.ndim == 2 and out.shape[1] == 1:
            out = out[:, 0]
        if out.ndim != 1 or out.shape[0] != n:
            raise ValueError(f"enforcing criteria need one scalar output per sample (d = 1), got "
                             f"{tuple(out.shape)}; binarise a classifier with netsim.outputs.class_vs_rest")
        grads = torch.autograd.grad(out.mean(), selected, create_graph=True, allow_unused=True)
        mu = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, selected)])
        if not bool(torch.isfinite(mu.detach()).all()):
            raise NonFiniteError({"batch-mean gradient": list(range(n))})
        if not bool(mu.detach().any()):
            raise ValueError("the batch-mean gradient is zero: the criteria compare gradient directions")
    return mu


def pair_loss(model: nn.Module, x1: Inputs, x2: Inputs, *, output_fn: OutputFn | None = None,
              targets1: Tensor | None = None, targets2: Tensor | None = None, params: ParamSpec = None) -> Tensor:
    """-k^C(x1, x2) for one pair of single inputs `(1, ...)` (tensors or dicts of keyword inputs),
    differentiable w.r.t. the parameters (those of `params`, `netsim.params`)."""
    for x in (x1, x2):
        check_batch(model, x)
    if input_rows(x1) != 1 or input_rows(x2) != 1:
        raise ValueError("pair_loss compares two single inputs: pass (1, ...) tensors")
    with buffers_restored_on_error(model):
        g1 = batch_mean_gradient(model, x1, output_fn, targets1, params=params)
        g2 = batch_mean_gradient(model, x2, output_fn, targets2, params=params)
    return group_criterion(g1, g2, 1, "neg_cos")


def group_loss(model: nn.Module, batch1: Inputs, batch2: Inputs, *, criterion: str = "paper",
               output_fn: OutputFn | None = None, targets1: Tensor | None = None,
               targets2: Tensor | None = None, params: ParamSpec = None) -> Tensor:
    """The group criterion between two mini-batches `(n_B, ...)` of one similar set (tensors or
    dicts of keyword inputs), over the parameters of `params` (`netsim.params`; default all trainable).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> loss = group_loss(net, torch.randn(3, 4), torch.randn(3, 4))
        >>> loss.backward()          # double backprop: gradients of a function of gradients
    """
    check_choice("criterion", criterion, CRITERIA)
    for batch in (batch1, batch2):
        check_batch(model, batch)
    n1, n2 = input_rows(batch1), input_rows(batch2)
    if n1 != n2:
        raise ValueError(f"the two batches must have the same size n_B, got {n1} and {n2}")
    with buffers_restored_on_error(model):  # the first batch's forward must not stay if the second fails
        mu1 = batch_mean_gradient(model, batch1, output_fn, targets1, params=params)
        mu2 = batch_mean_gradient(model, batch2, output_fn, targets2, params=params)
    return group_criterion(mu1, mu2, n1, criterion)

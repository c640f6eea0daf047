"""Which parameters the kernels differentiate against: the `params=` argument of every public function.

- None (default): every parameter with `requires_grad=True`;
- a list of name patterns (`fnmatch`, e.g. `["classifier.*", "layer4.*"]`) matched against the
  names of `model.named_parameters()`; a parameter is kept when any pattern matches it;
- a callable `(name, parameter) -> bool`.

A selection only picks among the trainable parameters: a frozen parameter stays frozen even if
a pattern names it. The model's `requires_grad` flags are never changed (a selection is passed
down to the engines), so the same model may serve several selections at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase

from torch import Tensor, nn

ParamSpec = None | Sequence[str] | Callable[[str, nn.Parameter], bool]


def check_params(params) -> None:
    """Raise a clear error unless `params` is None, a list/tuple of strings or a callable."""
    if params is None or callable(params):
        return
    if isinstance(params, str):
        raise TypeError(f"params must be a list of name patterns, got the string {params!r}: write [{params!r}]")
    if not isinstance(params, Sequence) or not all(isinstance(p, str) for p in params):
        raise TypeError("params must be None, a list of parameter-name patterns (fnmatch, e.g. ['head.*']) or a "
                        f"callable (name, parameter) -> bool; got {type(params).__name__}")
    if not params:
        raise ValueError("params is an empty list: no parameter would be differentiated")


def select_parameters(model: nn.Module, params: ParamSpec = None) -> dict[str, Tensor]:
    """`{name: parameter}` of the selected trainable parameters, in `named_parameters()` order.

    Raises:
        TypeError: a `params` of the wrong type.
        ValueError: the model has no trainable parameter; a pattern matches no trainable parameter
            (the error lists some names); the selection is empty.
    """
    check_params(params)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameter (requires_grad=True): "
            "the gradient kernels are defined by parameter gradients, so there is nothing to compare.")
    if params is None:
        return trainable
    if callable(params):
        chosen = {name: p for name, p in trainable.items() if params(name, p)}
    else:
        for pattern in params:
            if not any(fnmatchcase(name, pattern) for name in trainable):
                raise ValueError(f"params pattern {pattern!r} matches no trainable parameter; names are like "
                                 f"{_some_names(trainable)}")
        chosen = {name: p for name, p in trainable.items() if any(fnmatchcase(name, pat) for pat in params)}
    if not chosen:
        raise ValueError(f"params selects no trainable parameter; names are like {_some_names(trainable)}")
    return chosen


def _some_names(named: dict, limit: int = 12) -> str:
    names = list(named)
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")

"""Several threads calling netsim on one model: what keeps their calls apart.

netsim does more than read a model when it evaluates it: the layer-wise engine registers forward
hooks on its modules (and a recording forward on attention modules), the Jacobian engine and the
forward-mode pass swap its parameters for plain tensors inside `torch.func.functional_call`, and
both switch off PyTorch's fused attention, a process-wide setting. Two calls on one model at once
would record each other's forward passes or run on each other's swapped parameters (a web service, or
a notebook with a background job, calling `similarity` from two threads crashed with "module '0'
ran 3 times in one forward pass"). So:

- every model evaluation (a chunk's forward and backward passes) runs under `model_lock(model)`, one
  re-entrant lock per model: calls on one model take turns chunk by chunk, calls on different models
  run in parallel, and so do the kernels' products between evaluations;
- the hooks record the forward passes of the thread that registered them only (a forward the
  user runs in another thread, outside netsim, is not recorded);
- the fused-attention setting is switched off by the first call that needs it and restored by the
  last one (`shared_setting`, used by `grads.unfused_attention`).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock that serialises netsim's evaluations of `model` (created on first use, dropped with the model)."""
    with _GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


_SHARED: dict[Callable, list] = {}   # switch -> [threads inside, its restore function]
_SHARED_GUARD = threading.Lock()


@contextmanager
def shared_setting(switch: Callable[[], Callable[[], None]]) -> Iterator[None]:
    """Runs the block with a process-wide setting switched on: `switch()` turns it on and returns the
    function that restores it; the first thread to enter switches, the last to leave restores (a
    thread restoring on its way out would pull the setting from under another still inside)."""
    with _SHARED_GUARD:
        state = _SHARED.setdefault(switch, [0, None])
        if state[0] == 0:
            state[1] = switch()
        state[0] += 1
    try:
        yield
    finally:
        with _SHARED_GUARD:
            state[0] -= 1
            if state[0] == 0:
                state[1]()
                state[1] = None

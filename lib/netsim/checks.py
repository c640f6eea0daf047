"""Validation shared by the public functions: one home for the checks on models, inputs
and outputs, so every entry point raises the same clear error for the same mistake."""

from __future__ import annotations

from torch import Tensor, nn

_MODES_THAT_MIX_SAMPLES = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def check_model_mode(model: nn.Module) -> None:
    """Raise ValueError if a BatchNorm or Dropout module is in training mode (per-sample
    gradients are then undefined: the output depends on the batch or on random draws)."""
    for name, module in model.named_modules():
        if module.training and isinstance(module, _MODES_THAT_MIX_SAMPLES):
            raise ValueError(
                f"module {name or type(model).__name__!r} ({type(module).__name__}) is in training "
                "mode: its output depends on the rest of the batch or on random draws, so a "
                "per-sample gradient is not defined. Call model.eval() first."
            )


def check_inputs(model: nn.Module, inputs: Tensor, targets: Tensor | None) -> None:
    """Raise a clear error unless `inputs` is a non-empty `(N, ...)` tensor on the model's
    device and `targets`, if given, has one row per input on the same device."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty batch (N, ...), got shape {tuple(inputs.shape)}")
    device = next(p for p in model.parameters() if p.requires_grad).device
    if inputs.device != device:
        raise ValueError(
            f"inputs are on {inputs.device} but the model's parameters are on {device}: "
            "move one of them (e.g. inputs.to(device))."
        )
    if targets is not None:
        if targets.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"targets has {targets.shape[0]} rows for {inputs.shape[0]} inputs: one per sample needed"
            )
        if targets.device != device:
            raise ValueError(f"targets are on {targets.device} but the model is on {device}")


def as_output_matrix(out: Tensor, batch: int) -> Tensor:
    """Checks that an output batch is `(B, d)`; a `(B,)` output is read as d = 1."""
    if out.ndim == 1 and out.shape[0] == batch:
        return out.unsqueeze(1)
    if out.ndim != 2 or out.shape[0] != batch:
        raise ValueError(
            f"the (reduced) model output must have shape (B, d) = ({batch}, d), got {tuple(out.shape)}. "
            "Pass output_fn mapping the raw output batch to (B, d), e.g. the displacement at the "
            "patch centre, or netsim.outputs.class_vs_rest for a classifier."
        )
    return out

"""What counts as one number in an argument: a real number (a loss scale, a damping) or an integer
(a training step), given as a Python number, a numpy scalar or one-element array, or a one-element
tensor. Bools are never numbers here: `scale=True` or `step=False` is a slip, not a 1 or a 0.

These read host values only; a tensor on an accelerator is read with a host sync, so callers that
must not sync (a loss scale on the GPU) keep such tensors as they are.
"""

from __future__ import annotations

import decimal
import numbers

import numpy as np
import torch
from torch import Tensor

INT64 = (-(2**63), 2**63 - 1)


def real_number(value) -> float | None:
    """`value` as a float when it is one real number (it may be inf or nan), else None."""
    if isinstance(value, (Tensor, np.ndarray)):
        if (value.size if isinstance(value, np.ndarray) else value.numel()) != 1:
            return None
        kind = value.dtype.kind if isinstance(value, np.ndarray) else _tensor_kind(value)
        if kind not in "iuf":
            return None
        return float(value.reshape(()).item())
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, decimal.Decimal)):
        return None
    try:
        return float(value)
    except (OverflowError, ValueError, TypeError):  # an int past float's range; an odd Real
        return None


def integer(value) -> int | None:
    """`value` as an int when it is one integer in int64's range (a Python or numpy int, or a 0-d
    integer tensor or array), else None."""
    if isinstance(value, (Tensor, np.ndarray)):
        if value.ndim != 0:
            return None
        kind = value.dtype.kind if isinstance(value, np.ndarray) else _tensor_kind(value)
        if kind not in "iu":
            return None
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return None
    value = int(value)
    return value if INT64[0] <= value <= INT64[1] else None


def _tensor_kind(t: Tensor) -> str:
    """numpy's dtype kind letter for a tensor: b(ool), i(nt), u(nsigned), f(loat), c(omplex)."""
    if t.dtype == torch.bool:
        return "b"
    if t.is_complex():
        return "c"
    if t.is_floating_point():
        return "f"
    return "u" if t.dtype == torch.uint8 else "i"


def shown(value) -> str:
    """A value as an error message shows it: an array or tensor by its shape, anything else by a
    repr cut to 60 characters."""
    if isinstance(value, (Tensor, np.ndarray)):
        return f"a {type(value).__name__} of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."

"""One batch's capture context, shared by logging (`Run.capture`) and queries (`Query.capture`).

It validates ids and mask before the forward, installs the hooks for the block, and at its end
turns the hooks' blocks into rows of each example's own-loss gradient: the hooks see c * grad
(loss_i), where c comes from the loss reduction the user names, and the rows are divided by c.
What happens to the rows is the owner's business (`accept`).

Scaling applied after the loss is computed (gradient accumulation, a loss scaler, DeepSpeed's
`engine.backward`) is measured rather than declared: `capture.loss(loss)` hooks the loss tensor,
and the gradient that reaches it during backward multiplies c.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import CaptureError, ConfigError
from .hooks import Collector, Watched
from .scalars import INT64, real_number, shown

REDUCTIONS = ("mean", "sum")


def normalize_ids(ids: Any) -> list:
    """ids as a list of Python ints or of strs, one kind only, each storable as it is."""
    if isinstance(ids, Tensor):
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise CaptureError(f"ids as a tensor must be 1-D integers, got {ids.dtype} of shape {tuple(ids.shape)}")
        return ids.tolist()
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise CaptureError(f"ids must be 1-D, got shape {ids.shape}")
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise CaptureError(f"ids must be a sequence of ints or strings, one per example, got {type(ids).__name__}")
    ids = list(ids)
    if ids and set(map(type, ids)) == {int}:  # the usual case, checked at C speed (a bool's type is bool)
        low, high = min(ids), max(ids)
        if low < INT64[0] or high > INT64[1]:
            raise CaptureError(f"integer id {low if low < INT64[0] else high} does not fit in int64")
        return ids
    if ids and all(isinstance(i, str) for i in ids):
        for i in ids:
            if "\x00" in i:
                raise CaptureError(f"string ids cannot contain NUL characters: {i!r}")
            try:
                i.encode("utf-8")
            except UnicodeEncodeError as e:
                raise CaptureError(f"string id {i!r} is not valid Unicode text: {e}") from None
        return ids
    out = []
    for i in ids:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise CaptureError(f"ids must be all ints or all strings; got {type(i).__name__} {i!r}")
        if not INT64[0] <= int(i) <= INT64[1]:
            raise CaptureError(f"integer id {i} does not fit in int64")
        out.append(int(i))
    return out


@dataclass(frozen=True)
class LossSpec:
    """How the backpropagated loss relates to the examples' own losses: the arguments users pass
    to `Run.capture` and `Query.capture` (see Run.capture), validated once."""

    mask: Tensor | None = None
    reduction: str = "mean"
    scale: float | Tensor | None = None
    scaler: Any = None

    def __post_init__(self):
        """Refuse what cannot describe a loss before any hook runs; the mask and scale are kept in
        the form the capture uses (a CPU scale as a float)."""
        if not isinstance(self.reduction, str) or self.reduction not in REDUCTIONS:
            raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        object.__setattr__(self, "mask", _checked_mask(self.mask))
        object.__setattr__(self, "scale", _checked_scale(self.scale))
        if self.scaler is not None and not callable(getattr(self.scaler, "get_scale", None)):
            raise ConfigError(
                f"scaler must be a torch GradScaler (anything with get_scale()), got {shown(self.scaler)}"
            )

    def check_batch(self, batch: int) -> None:
        """The mask has one row per example of the batch."""
        if self.mask is not None and self.mask.shape[0] != batch:
            raise CaptureError(
                f"mask must be a (batch, positions) tensor with {batch} rows, got {tuple(self.mask.shape)}"
            )


def _checked_mask(mask: Any) -> Tensor | None:
    """A (batch, positions) tensor of 0/1 values, bool or numeric; anything else is refused.

    A mask on an accelerator is not read (that would wait for the device at every step): there,
    one that is not all 0/1 is made all NaN instead, so every row of its batch comes out flagged
    non-finite and its statistics are left out, as for a non-finite gradient.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise CaptureError(f"mask must be a (batch, positions) tensor, got {shown(mask)}")
    if mask.is_complex():
        raise CaptureError(f"mask must hold 0/1 values, bool or real numbers; got a {mask.dtype} tensor")
    if mask.dtype == torch.bool:
        return mask
    binary = (mask == 0) | (mask == 1)
    if mask.device.type != "cpu":
        floating = mask if mask.is_floating_point() else mask.float()
        return torch.where(binary.all(), floating, float("nan"))
    if not bool(binary.all()):
        bad = mask.detach()[~binary]
        raise CaptureError(
            f"mask must hold only 0 and 1 (1 keeps a position), got {bad[0].item()} at {_first_place(~binary)} "
            f"({len(bad)} such values): a NaN or a weight in the mask would spoil the rows and the statistics"
        )
    return mask


def _checked_scale(scale: Any) -> float | Tensor | None:
    """A loss scale as a float, or as the tensor it is when on an accelerator (reading it would
    sync: a zero or non-finite one there shows up as flagged rows instead)."""
    if scale is None:
        return None
    if isinstance(scale, Tensor) and scale.device.type != "cpu":
        if scale.numel() != 1 or scale.is_complex() or scale.dtype == torch.bool:
            raise ConfigError(
                f"scale must be one real number, got a {scale.dtype} tensor of shape {tuple(scale.shape)}"
            )
        return scale
    value = real_number(scale)
    if value is None or not math.isfinite(value):
        raise ConfigError(f"scale must be one finite real number (or a one-element tensor), got {shown(scale)}")
    if value == 0.0:
        raise CaptureError("the loss scale is zero: the rows would divide by zero")
    if not math.isfinite(1.0 / value):
        raise ConfigError(f"scale {value!r} is too small to divide out of the rows (1/scale overflows)")
    return value


def _first_place(where: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.nonzero(where)[0])


class Capture:
    """Context manager for one batch; see `Run.capture` for the arguments users pass.

    check(ids) runs before the forward: it raises to refuse the batch, or returns None or a list of
    booleans, one per example, False for examples to leave out of the rows and the statistics (ids
    already logged). accept(ids, rows, factor) gets the (B, D) rows of own-loss gradients after a
    clean exit, as PendingRows (logix.call_groups: formed when the owner asks, so a writer thread
    can form them off the training thread; rows of left-out examples are zero); discard() is called
    when the block raised or the batch was refused after the backward.
    """

    def __init__(
        self,
        watched: list[Watched],
        ids: Any,
        loss: LossSpec,
        *,
        accept: Callable[[list, Tensor, float], None],
        check: Callable[[list], list | None] = lambda ids: None,
        observer: Callable | None = None,
        discard: Callable[[], None] = lambda: None,
        keep_rows: bool = True,
        label: str = "run.capture",
    ):
        self.watched = watched
        self.ids = normalize_ids(ids)
        if not self.ids:
            raise CaptureError("capture got no ids: an empty batch has no rows to log; skip it")
        loss.check_batch(len(self.ids))
        self.mask, self.reduction, self.scale, self.scaler = loss.mask, loss.reduction, loss.scale, loss.scaler
        self._check, self._accept, self._observer, self._discard = check, accept, observer, discard
        self.keep_rows = keep_rows
        self.label = label  # how the user created it, for messages: "run.capture" or "q.capture"
        self.entered = False  # a capture created but never entered logs nothing: its owner refuses that
        self.collector: Collector | None = None
        self.keep: list[bool] | None = None
        self.active = False  # between __enter__ and __exit__: adapters find the open capture by it
        self._backprop_scale: Tensor | None = None

    def __enter__(self) -> Capture:
        self.entered = True
        self.keep = self._check(self.ids)
        keep = None if self.keep is None or all(self.keep) else torch.tensor(self.keep)
        self.collector = Collector(
            self.watched, mask=self.mask, keep=keep, observer=self._observer, keep_rows=self.keep_rows, label=self.label
        )
        self.collector.__enter__()
        self.active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.active = False
        self.collector.__exit__(exc_type, exc, tb)
        if exc_type is not None:
            self._discard()
            return  # the user's error propagates; nothing from this batch is kept
        try:
            batch = self.collector.batch()
            if batch != len(self.ids):
                raise CaptureError(
                    f"{len(self.ids)} ids were given but the watched modules saw a batch of {batch} examples"
                )
            factor = self._loss_factor(batch)
            rows = self.collector.pending_rows(factor)
        except BaseException:
            self._discard()
            raise
        self._accept(self.ids, rows, factor)

    def loss(self, loss: Tensor) -> Tensor:
        """Declare the loss that `reduction`/`scale` describe; returns it, for use inline.

        Whatever multiplies it on the way to `.backward()` (dividing by accumulation steps, a
        GradScaler, `accelerator.backward`, DeepSpeed's `engine.backward`) is then measured during
        the backward pass and divided out too, so it need not be declared:

            with run.capture(ids) as cap:
                engine.backward(cap.loss(F.cross_entropy(engine(x), y)))
        """
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise CaptureError(f"capture.loss expects the scalar loss tensor, got {shown(loss)}")
        if not loss.requires_grad:
            raise CaptureError("capture.loss: this loss needs no gradient (computed under torch.no_grad()?)")
        if self.scaler is not None:
            raise ConfigError("pass either scaler= or capture.loss(...), not both: loss() already measures the scaler")

        def record(grad: Tensor) -> None:
            self._backprop_scale = grad.detach().reshape(()).float()

        loss.register_hook(record)
        return loss

    def _loss_factor(self, batch: int) -> float | Tensor:
        """c such that the backpropagated loss is c * sum_i loss_i (a device scalar when measured)."""
        factor = 1.0 / batch if self.reduction == "mean" else 1.0
        device_scale = None  # a scale on the GPU stays there: reading it would sync every step
        if isinstance(self.scale, Tensor) and self.scale.device.type != "cpu":
            device_scale = self.scale.detach().reshape(()).float()
        elif self.scale is not None:
            factor *= float(self.scale)
        if self.scaler is not None:
            got = self.scaler.get_scale()
            value = real_number(got)
            if value is None or not math.isfinite(value) or value == 0.0:
                raise CaptureError(f"scaler.get_scale() gave {shown(got)}, not a finite nonzero number")
            factor *= value
        if factor == 0.0:
            raise CaptureError("the loss scale is zero: the rows would divide by zero")
        if not (math.isfinite(factor) and math.isfinite(1.0 / factor)):
            raise CaptureError(f"the loss scale {factor!r} (scale x scaler / batch) is beyond float range")
        for measured in (device_scale, self._backprop_scale):
            if measured is not None:  # no host sync; a zero shows up as flagged rows
                factor = measured * factor
        return factor


def refuse_unentered(cap: Capture | None) -> None:
    """Raise if `cap` was created but its block never ran: that batch was silently not logged."""
    if cap is not None and not cap.entered:
        ids = cap.ids[:5]
        raise CaptureError(
            f"{cap.label}(ids) for ids {ids}{'...' if len(cap.ids) > 5 else ''} was created but never entered, so "
            f"that batch was not captured: use it as `with {cap.label}(ids):` around the forward and backward"
        )


def running(cap: Capture | None) -> Capture | None:
    """`cap` if its block is running now, else None (how adapters find the capture to hook)."""
    return cap if cap is not None and cap.active else None

"""DeepSpeed: make `engine.backward(loss)` inside a capture divide out DeepSpeed's own loss scaling.

`run.watch(engine)` calls `attach(run, engine)` when the model is a `DeepSpeedEngine`:

    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    run = logix.init("runs/ds", rank=16)
    run.watch(engine)                        # names as for the bare model: no "module." prefix
    with run.capture(ids):                   # reduction="mean": the loss is a batch mean
        engine.backward(F.cross_entropy(engine(x), y))
    engine.step()

`engine.backward` divides the loss by `gradient_accumulation_steps` and, with fp16, multiplies it by
the dynamic loss scale. Inside a capture the wrapped `backward` hands the loss to
`capture.loss(loss)` first, which measures that factor from the gradient reaching the loss during
the backward pass, so the rows are each example's own-loss gradient without the user declaring
anything (do not pass `scale=1/gas` as well: that would count it twice).

ZeRO 1-3 also let users call `loss.backward()` directly; DeepSpeed then divides the gradient at
the engine's outputs by `gradient_accumulation_steps`, in a tensor hook that runs *after* logix's
hook on any watched layer whose output is the model's output, so that layer would see another
scale than the rest. Inside a capture with gradient_accumulation_steps > 1 that raises
CaptureError before DeepSpeed starts its backward (use `engine.backward(loss)`); with 1 it is fine.

Under ZeRO-3 parameters are partitioned to shape (0,); logix takes layer dimensions from module
attributes, and `attach` checks them against DeepSpeed's record of the full shapes (`ds_shape`),
so a registered kind that read weight shapes would be refused with a clear error rather than
logging rows of the wrong width.

Outside a capture, and once the run is closed, the wrappers only call through: DeepSpeed's
arguments, return values and errors are untouched. `detach(engine)` removes them.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch

from logix.engines import register
from logix.errors import CaptureError, ConfigError
from logix.extras import require_installed

require_installed(__name__, "deepspeed", "deepspeed")  # checked, not imported: the user's import picks the accelerator
_STATE = "_logix_deepspeed"  # engine attribute holding the attachment


class _Attachment:
    """Wrappers installed on one engine, serving every run attached to it (held weakly)."""

    def __init__(self):
        self.owners: list[weakref.ref] = []
        self.backward = None
        self.prologue = None

    def add(self, owner: Any) -> None:
        self.owners = [r for r in self.owners if r() is not None and r() is not owner]
        self.owners.append(weakref.ref(owner))

    def active_capture(self):
        """The open capture of the most recently attached owner that has one, or None."""
        for ref in reversed(self.owners):
            owner = ref()
            if owner is None or getattr(owner, "_closed", False):
                continue
            cap = getattr(owner, "active_capture", None)
            if cap is not None:
                return cap
        return None


def attach(run: Any, engine: Any) -> None:
    """Wrap `engine.backward` (and guard DeepSpeed's torch-style backward) to feed `run`'s captures.

    Idempotent: attaching again, or attaching another run to the same engine, installs nothing
    new (the most recently attached run with an open capture is served). Called by `run.watch`.
    """
    if not hasattr(engine, "backward") or not callable(engine.backward):
        raise ConfigError(f"logix.integrations.deepspeed.attach expects a DeepSpeedEngine, got {type(engine).__name__}")
    _check_partitioned_dims(run, engine)
    state = engine.__dict__.get(_STATE)
    if state is None:
        state = _Attachment()
        _install(engine, state)
        engine.__dict__[_STATE] = state
    state.add(run)


def detach(engine: Any) -> None:
    """Remove the wrappers `attach` installed, restoring DeepSpeed's own methods. Idempotent."""
    state = engine.__dict__.pop(_STATE, None)
    if state is None:
        return
    for name, wrapper in (("backward", state.backward), ("_backward_prologue", state.prologue)):
        if wrapper is not None and engine.__dict__.get(name) is wrapper:
            del engine.__dict__[name]  # the class's method shows through again
    state.owners = []  # if someone wrapped on top of ours, ours now only calls through


def _install(engine: Any, state: _Attachment) -> None:
    original_backward = engine.backward  # bound method (or a user's wrapper already on the instance)

    @functools.wraps(original_backward)
    def backward(loss, *args, **kwargs):
        cap = state.active_capture()
        if cap is not None and _is_scalar_loss(loss):
            _measure(cap, loss)
        return original_backward(loss, *args, **kwargs)

    engine.backward = backward
    state.backward = backward

    original_prologue = getattr(engine, "_backward_prologue", None)
    if original_prologue is None:  # a DeepSpeed without torch-style backward: nothing to guard
        return

    @functools.wraps(original_prologue)
    def prologue(*args, **kwargs):
        if not getattr(engine, "_running_engine_backward", True) and state.active_capture() is not None:
            gas = engine.gradient_accumulation_steps()
            if gas != 1:
                raise CaptureError(
                    f"loss.backward() on a DeepSpeed engine with gradient_accumulation_steps={gas} inside a logix "
                    "capture: DeepSpeed then divides the gradient at the engine's outputs, after logix's hook on a "
                    "layer whose output is the model's output has run, so the rows cannot be made consistent. Call "
                    "engine.backward(loss) instead (logix measures its scaling)"
                )
        return original_prologue(*args, **kwargs)

    engine._backward_prologue = prologue  # looked up when the backward starts, so this is seen
    state.prologue = prologue


def _is_scalar_loss(loss: Any) -> bool:
    """Only losses capture.loss can hook; anything else goes to DeepSpeed, which reports it."""
    return isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad


def _measure(cap: Any, loss: torch.Tensor) -> None:
    if getattr(cap, "scaler", None) is not None:
        raise ConfigError(
            "engine.backward measures DeepSpeed's loss scaling itself: do not pass scaler= to run.capture "
            "when training with a DeepSpeedEngine"
        )
    cap.loss(loss)


def _check_partitioned_dims(run: Any, engine: Any) -> None:
    """Under ZeRO-3 compare each watched module's dims with its parameters' full shapes (ds_shape)."""
    for w in getattr(run, "watched", []):
        weight = getattr(w.module, "weight", None)
        shape = getattr(weight, "ds_shape", None)
        if shape is None:
            continue  # not partitioned: the weight has its real shape
        bias = getattr(w.module, "bias", None)
        full_bias = None
        if isinstance(bias, torch.Tensor):
            full_bias = torch.empty(tuple(getattr(bias, "ds_shape", bias.shape)), device="meta")
        try:
            matrix = w.kind.as_matrix(w.module, torch.empty(tuple(shape), device="meta"), full_bias)
            expected = (int(matrix.shape[1]), int(matrix.shape[0]))
        except Exception:  # noqa: BLE001 - a kind whose layout we cannot reproduce: trust its dims
            continue
        if expected != (w.d_in, w.d_out):
            raise ConfigError(
                f"module {w.name!r} ({type(w.module).__name__}, kind {w.kind.name!r}) is partitioned by ZeRO-3: its "
                f"weight has shape {tuple(weight.shape)} (full shape {tuple(shape)}), and its kind reported "
                f"d_in={w.d_in}, d_out={w.d_out} where the full weight gives d_in={expected[0]}, d_out={expected[1]}. "
                "A kind must take its dimensions from module attributes, not weight shapes: fix the kind, exclude "
                "the module from watch(), or call run.watch(model) on the bare model before deepspeed.initialize "
                "and then logix.integrations.deepspeed.attach(run, engine)"
            )


register("DeepSpeedEngine", attach)  # also declared as a logix.engines entry point, for run.watch(engine)

"""Accelerate: `accelerator.backward(loss)` inside a capture, with Accelerate's scaling divided out.

    accelerator = Accelerator(gradient_accumulation_steps=2)
    model, opt, loader = accelerator.prepare(model, opt, DataLoader(logix.WithIds(train), ...))
    run = logix.init("runs/acc", rank=16)        # after Accelerator(): every rank opens the run
    run.watch(model)
    logix.integrations.accelerate.attach(run, accelerator)
    for ids, x, y in loader:
        with accelerator.accumulate(model), run.capture(ids):
            accelerator.backward(F.cross_entropy(model(x), y))
        opt.step(); opt.zero_grad()
    run.finalize()

`accelerator.backward` divides the loss by the accumulation steps and, with fp16, scales it; the
wrapper hands the loss to `capture.loss`, which measures that factor during the backward pass.
Multi-process runs need nothing more: logix reads the process group Accelerate set up, and the
repeats that Accelerate's even_batches adds at the end of an epoch are logged once.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

from logix.errors import ConfigError
from logix.extras import require_installed

require_installed(__name__, "hf", "accelerate")  # the adapter wraps an Accelerator; it imports nothing of accelerate
_WRAPPED = "_logix_backward"


def attach(run: Any, accelerator: Any) -> None:
    """Route `accelerator.backward` through `run`'s open capture (idempotent; inert once the run closes)."""
    backward = getattr(accelerator, "backward", None)
    if not callable(backward):
        raise ConfigError(f"attach expects an accelerate.Accelerator, got {type(accelerator).__name__}")
    original = getattr(backward, _WRAPPED, backward)
    runs = weakref.ref(run)

    @functools.wraps(original)
    def wrapped(loss, *args, **kwargs):
        owner = runs()
        cap = owner.active_capture if owner is not None and not owner._closed else None
        if cap is not None:
            cap.loss(loss)
        return original(loss, *args, **kwargs)

    setattr(wrapped, _WRAPPED, original)
    accelerator.backward = wrapped


def detach(accelerator: Any) -> None:
    """Restore the accelerator's own backward."""
    original = getattr(accelerator.backward, _WRAPPED, None)
    if original is not None:
        accelerator.backward = original

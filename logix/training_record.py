"""What each pass trained with: its optimizer steps, the sum of their learning rates, and the
learning rate step by step.

Attribution across training weighs a pass by these (logix.across_training), and Source places each
row at the step that used it, at that step's learning rate. They are counted by a hook on the
user's optimizer (`run.watch(model, optimizer=opt)`) into the open pass's `meta["training"]`, which
the manifest keeps. The per-step rates are kept at a bounded size: `lrs` holds the mean learning
rate of each run of `lr_bin` consecutive steps, at most LR_ENTRIES of them (when a pass outgrows
them, neighbouring runs merge and `lr_bin` doubles), so a long pass costs the manifest a few KB.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError

LR_ENTRIES = 256  # per-step learning rates kept per pass, at most (even: runs merge in pairs)


class TrainingRecord:
    """A step hook on one optimizer: calls `on_step` at each step, and while a pass is open adds
    the step and its learning rate to that pass's record."""

    def __init__(self, optimizer: Any, on_step: Callable[[], None]):
        inner = torch_optimizer(optimizer)
        if inner is None:
            raise ConfigError(f"watch(optimizer=...) needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._on_step = on_step
        self._meta: dict | None = None  # the open pass's metadata
        self._lr_on_device: Tensor | None = None  # tensor learning rates of the open pass, not yet read
        self._hook = inner.register_step_post_hook(self._step)

    def begin(self, meta: dict) -> None:
        """Record into this pass's metadata from now on."""
        self._meta = meta

    def end(self) -> None:
        """Settle the learning rates summed on the device (one host read) and stop recording."""
        if self._lr_on_device is not None and self._meta is not None:
            self._meta["training"]["lr_sum"] += float(self._lr_on_device)
        self._lr_on_device = None
        self._meta = None

    def remove(self) -> None:
        self._hook.remove()

    def _step(self, optimizer, *args) -> None:
        self._on_step()
        if self._meta is None:
            return
        group = optimizer.param_groups[0]
        record = self._meta.get("training")
        if record is None:
            record = self._meta["training"] = {
                "steps": 0, "lr_sum": 0.0, "optimizer": type(optimizer).__name__, "momentum": momentum(group),
                "lrs": [], "lr_bin": 1,
            }  # fmt: skip
        record["steps"] += 1
        lr = group["lr"]
        if isinstance(lr, Tensor):  # a device scalar (capturable optimizers): summed there, read at the pass's end
            if self._lr_on_device is None:
                self._lr_on_device = lr.detach().clone()
            else:
                self._lr_on_device.add_(lr.detach())  # in place: no new tensor per step
            record["lrs"] = None  # reading each step's rate would wait for the device every step
        else:
            record["lr_sum"] += float(lr)
            if record.get("lrs") is not None:
                add_step_lr(record, float(lr))


def add_step_lr(record: dict, lr: float) -> None:
    """Count the learning rate of step record["steps"] (1-based) into the record's bounded `lrs`."""
    lrs, position = record["lrs"], record["steps"] - 1
    if position // record["lr_bin"] >= LR_ENTRIES:  # full: merge neighbouring runs, each twice as long
        record["lrs"] = lrs = [(a + b) / 2 for a, b in zip(lrs[::2], lrs[1::2])]
        record["lr_bin"] *= 2
    index, within = divmod(position, record["lr_bin"])
    if index == len(lrs):
        lrs.append(lr)
    else:  # a running mean over the run's steps so far
        lrs[index] += (lr - lrs[index]) / (within + 1)


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside Accelerate's or DeepSpeed's wrapper (whose step calls its step),
    or None where there is none to hook."""
    inner = optimizer
    while not hasattr(inner, "_optimizer_step_post_hooks") and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer) or not hasattr(inner, "_optimizer_step_post_hooks"):
        return None
    return inner


def momentum(group: dict) -> float | None:
    """The momentum of an optimizer's parameter group: SGD's `momentum`, Adam's first beta."""
    if "momentum" in group:
        return float(group["momentum"] or 0.0)
    if "betas" in group:
        return float(group["betas"][0])
    return None

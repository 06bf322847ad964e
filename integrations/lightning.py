"""PyTorch Lightning: log every training example's projected gradient with one callback.

    from logix.integrations.lightning import LogIXCallback
    loader = DataLoader(logix.WithIds(dataset), batch_size=32)      # batches are (ids, x, y)
    trainer = L.Trainer(callbacks=[LogIXCallback("runs/lit", rank=16)], accumulate_grad_batches=2)
    trainer.fit(model, loader)                                      # training_step unpacks `_, x, y = batch`
    log = logix.open("runs/lit")                                    # one pass per epoch: "epoch0", ...

The training_step's loss must be a mean over the batch (or say `reduction="sum"`). Lightning's
division by `accumulate_grad_batches` and a GradScaler's scale are divided out; anything else between
on_before_backward and the backward (e.g. DeepSpeed's engine.backward) is measured by `capture.loss`.
One backward per training batch; validation, test and sanity-check forwards are never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from logix.capture import Capture, normalize_ids
from logix.errors import CaptureError
from logix.extras import require
from logix.run import Run, init

# lightning's unified package, else the standalone pytorch_lightning
_callbacks = require(__name__, "lightning", "lightning", "lightning.pytorch.callbacks", "pytorch_lightning.callbacks")
Callback = _callbacks.Callback

logger = logging.getLogger("logix")


def batch_ids(batch: Any) -> Any:
    """The default `ids`: batch["id"] or batch["ids"] for dict batches, else the batch's first element."""
    if isinstance(batch, Mapping):
        for key in ("id", "ids"):
            if key in batch:
                return batch[key]
    elif isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise CaptureError("no ids found in the batch (no 'id'/'ids' key, not a tuple)")


class LogIXCallback(Callback):
    """Opens a logix run at fit start, captures each training batch, one pass per epoch ("epoch{N}").

    ids(batch) -> the batch's example ids; include/exclude choose modules as in `run.watch`;
    reduction: "mean" (default) or "sum", how training_step reduced the loss over the batch;
    rank, statistics and **init_kwargs go to `logix.init`. `self.run` is the open run.
    """

    def __init__(
        self,
        path: str,
        rank: int | str | tuple = 64,
        *,
        ids: Callable[[Any], Any] = batch_ids,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
        reduction: str = "mean",
        statistics: str | list[str] | None = None,
        **init_kwargs: Any,
    ):
        self.path, self.ids, self.include, self.exclude, self.reduction = path, ids, include, exclude, reduction
        self.init_kwargs = dict(rank=rank, statistics=statistics, **init_kwargs)
        self.run: Run | None = None
        self._cap: Capture | None = None
        self._in_batch = False

    def on_fit_start(self, trainer, pl_module) -> None:
        self.run = init(self.path, **self.init_kwargs)
        optimizers = [o for o in getattr(trainer, "optimizers", []) if isinstance(o, torch.optim.Optimizer)]
        # one optimizer: each pass records its steps and learning rates (attribution across training)
        optimizer = optimizers[0] if len(optimizers) == 1 else None
        self.run.watch(pl_module, include=self.include, exclude=self.exclude, optimizer=optimizer)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        opts = trainer.optimizers
        lr = opts[0].param_groups[0]["lr"] if opts else None
        self.run.start_pass(f"epoch{trainer.current_epoch}", step=trainer.global_step, lr=lr)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        try:
            ids = normalize_ids(self.ids(batch))
        except CaptureError as e:
            raise CaptureError(
                f"LogIXCallback: no ids in training batch {batch_idx} ({e}); batches need one id per example: wrap "
                "the dataset in logix.WithIds (batches (ids, x, y) or dicts with an 'id' key) or pass ids=fn(batch)"
            ) from e
        accum = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # AMP scales before on_before_backward
        scale = (float(scaler.get_scale()) if scaler is not None else 1.0) / accum
        cap = self.run.capture(ids, reduction=self.reduction, scale=scale, step=trainer.global_step)
        self._cap, self._in_batch = cap.__enter__(), True

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self._cap is None and self._in_batch:
            raise CaptureError("LogIXCallback logs one backward per training batch; this batch ran a second one")
        if self._cap is not None:
            self._cap.loss(loss)  # measures whatever scales `loss` on its way to the backward

    def on_after_backward(self, trainer, pl_module) -> None:
        if self._cap is not None:
            cap, self._cap = self._cap, None
            cap.__exit__(None, None, None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_batch = False
        if self._cap is not None:  # training_step returned None: no backward, nothing to log
            self._close_capture(_SkippedBatch())

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.run is not None:
            self.run.finalize()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.run is not None:
            self.run.close()  # no-op after finalize

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        try:  # never hide the user's error behind one of ours
            self._close_capture(exception)
            if self.run is not None:
                self.run.close()  # rows so far are committed; passes stay unfinalized
        except Exception as e:  # noqa: BLE001
            logger.error("logix: closing %s after %r failed: %r", self.path, exception, e)

    def _close_capture(self, exception: BaseException) -> None:
        cap, self._cap, self._in_batch = self._cap, None, False
        if cap is not None:
            cap.__exit__(type(exception), exception, exception.__traceback__)  # removes hooks, keeps no rows


class _SkippedBatch(Exception):
    """Passed to Capture.__exit__ to drop a batch whose training_step returned None."""

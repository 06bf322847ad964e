"""LogIXCallback: a logix pass per epoch while `Trainer.train()` runs, ids read from the sampler."""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, IterableDataset

from logix.errors import CaptureError, ConfigError
from logix.extras import require
from logix.log import Log
from logix.run import Run, init
from logix.training_record import torch_optimizer

from .convention import DEFAULT_STATISTICS, _batch_mask, _exclude, _loss_labels, _LossConvention, _model_loss

TrainerCallback = require(__package__, "hf", "transformers").TrainerCallback  # the package names the extra

# -- dataset indices from the sampler ----------------------------------------------------------------


class _RecordingBatchSampler(BatchSampler):
    """Yields what the wrapped batch sampler yields and records each index list in a FIFO.

    A BatchSampler subclass so that code inspecting the dataloader (accelerate's
    skip_first_batches) treats it as one; every other attribute is the wrapped sampler's.
    """

    def __init__(self, inner, fifo: collections.deque):  # noqa: D107 - BatchSampler.__init__ is not called
        self._inner = inner
        self._fifo = fifo

    def __iter__(self):
        for batch in self._inner:
            self._fifo.append([int(i) for i in batch])
            yield batch

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str):
        if name in ("_inner", "_fifo"):
            raise AttributeError(name)
        return getattr(self._inner, name)


def _install_recorder(dataloader: Any, fifo: collections.deque):
    """Wrap the outermost batch sampler of `dataloader`; returns a function that undoes it."""
    loader = dataloader
    while "base_dataloader" in vars(loader):  # accelerate's DataLoaderShard/Dispatcher wrap a DataLoader
        loader = vars(loader)["base_dataloader"]
    if not isinstance(loader, DataLoader):
        raise CaptureError(
            f"LogIXCallback cannot read dataset indices from a {type(dataloader).__name__} train dataloader; "
            "give every example an id column and pass LogIXCallback(..., id_column='<column>') "
            "(with TrainingArguments(remove_unused_columns=False) or a collator that keeps it)"
        )
    if isinstance(loader.dataset, IterableDataset):
        raise CaptureError(
            "the train dataset is an IterableDataset: it has no indices to use as ids. Add an id column to its "
            "examples and pass LogIXCallback(..., id_column='<column>') (with "
            "TrainingArguments(remove_unused_columns=False) or a collator that keeps the column)"
        )
    if isinstance(loader.sampler, BatchSampler):
        attr = "sampler"
    elif loader.batch_sampler is not None:
        attr = "batch_sampler"
    else:
        raise CaptureError(
            "the train dataloader has no batch sampler whose indices could serve as ids; "
            "pass LogIXCallback(..., id_column='<column>')"
        )
    original = getattr(loader, attr)
    if isinstance(original, _RecordingBatchSampler):  # left over from a run that failed: rewrap cleanly
        original = original._inner
    object.__setattr__(loader, attr, _RecordingBatchSampler(original, fifo))  # DataLoader forbids setattr

    def undo() -> None:
        object.__setattr__(loader, attr, original)

    return undo


# -- the callback ----------------------------------------------------------------------------------------


class LogIXCallback(TrainerCallback):
    """Log every training example's projected gradient while a HuggingFace `Trainer` trains.

        Trainer(..., callbacks=[LogIXCallback("runs/gpt2", rank=32)]).train()

    path, rank and the other logix.init settings (dtype, projection="gaussian", seed, on_duplicate,
    queue_size, commit_interval) describe the log. statistics: curvature gathered while training,
    EK-FAC by default (what `log.influence(q, "ekfac")` needs); None for rows only.
    id_column: a batch column holding each example's id (ints or strings) instead of the dataset
    index; it needs TrainingArguments(remove_unused_columns=False) or a collator that keeps it,
    and is removed from the model's inputs. include / exclude / include_frozen: which modules (as
    `run.watch`); exclude defaults to DEFAULT_EXCLUDE (position embeddings, which have no
    per-example gradient). check_loss: recompute the first batch's loss from the logits and refuse
    a loss this integration cannot relate to the examples' own losses.

    One pass per epoch ("epoch0", ...), with meta step (global step at its start) and lr; rows
    record the global step at which their gradient was taken. `trainer.train(resume_from_checkpoint=...)`
    continues the log (ids committed before are not written twice). The run is finalized at
    `on_train_end`; if training raises, call `callback.close()` to remove the hooks and commit the
    rows written so far (the passes stay unfinalized and can be resumed).
    """

    def __init__(
        self,
        path: str | Path,
        rank: int | str | tuple = 64,
        *,
        statistics: str | Sequence[str] | None = DEFAULT_STATISTICS,
        id_column: str | None = None,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        include_frozen: bool = False,
        check_loss: bool = True,
        **init_kwargs: Any,
    ):
        if "resume" in init_kwargs:
            raise ConfigError(
                "LogIXCallback resumes the log by itself when the Trainer resumes from a checkpoint; "
                "do not pass resume="
            )
        if init_kwargs.get("projection", "gaussian") == "pca":
            raise ConfigError(
                "projection='pca' needs a statistics pass before logging, which a training run cannot provide: "
                "fit the projections with run.fit_projections() on a log first, then train with that log's path"
            )
        if id_column is not None and (not isinstance(id_column, str) or not id_column):
            raise ConfigError(f"id_column must be a column name, got {id_column!r}")
        self.path = Path(path)
        self.rank = rank
        self.statistics = statistics
        self.id_column = id_column
        self.include = include
        self.exclude = _exclude(exclude)
        self.include_frozen = include_frozen
        self.check_loss = check_loss
        self.init_kwargs = init_kwargs
        self.run: Run | None = None
        self.modules: list[str] = []
        self._model: nn.Module | None = None
        self._handles: list = []
        self._undo_recorder = None
        self._fifo: collections.deque = collections.deque()
        self._skip = 0
        self._state = None
        self._convention: _LossConvention | None = None
        self._cap = None
        self._loss_seen = False
        self._loss_reached = False

    # -- events ------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._teardown()  # a previous train() that raised may have left hooks behind
        if getattr(args, "label_smoothing_factor", 0):
            raise ConfigError(
                "label_smoothing_factor is set: the Trainer then computes the loss outside the model, where "
                "LogIXCallback cannot see it, and a smoothed loss is not each example's own loss. Train without "
                "label smoothing to log, or log with logix.init/run.capture in your own loop"
            )
        if model is None:
            raise CaptureError("LogIXCallback: the Trainer passed no model to on_train_begin")
        resumed = state.global_step > 0
        self._fifo.clear()
        self._skip = 0
        if self.id_column is None:
            if train_dataloader is None:
                raise CaptureError("LogIXCallback: no train dataloader to read ids from; pass id_column=")
            self._undo_recorder = _install_recorder(train_dataloader, self._fifo)
            if resumed and not getattr(args, "ignore_data_skip", False):
                # what Trainer._init_training_state computes: batches skip_first_batches consumes
                batches = len(train_dataloader)
                accum = args.gradient_accumulation_steps
                per_epoch = max(batches // accum + int(batches % accum > 0), 1)
                self._skip = (state.global_step % per_epoch) * accum
        try:
            unfinished = self._unfinished_epochs(self._epoch(state)) if resumed else []
            self.run = init(self.path, self.rank, statistics=self.statistics, resume=resumed, **self.init_kwargs)
            optimizer = torch_optimizer(kwargs.get("optimizer"))  # passes then record their steps and learning rates
            self.modules = self.run.watch(model, self.include, self.exclude, self.include_frozen, optimizer=optimizer)
            for name in unfinished:  # continued in this session, so that its finalize completes them
                self.run.start_pass(name)
        except BaseException:
            self._teardown()
            raise
        self._model = model
        self._state = state
        self._convention = _LossConvention(model, self.check_loss)
        self._handles = [
            model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            model.register_forward_hook(self._post_forward, with_kwargs=True),
        ]

    def on_epoch_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if self.run is None:
            return
        self._close_capture()
        if self._skip == 0:
            self._fifo.clear()  # indices an epoch stopped early (max_steps) never trained on
        name = f"epoch{self._epoch(state)}"
        lr = _learning_rate(optimizer, lr_scheduler)
        try:
            self.run.start_pass(name, step=state.global_step, lr=lr, epoch=self._epoch(state))
        except ConfigError as e:
            self._teardown()
            raise ConfigError(
                f"{e}. (LogIXCallback names passes by epoch: train from scratch into a new log path; "
                "trainer.train(resume_from_checkpoint=...) continues the passes a crash left unfinalized)"
            ) from None

    def on_substep_end(self, args, state, control, **kwargs):
        self._close_capture()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._close_capture()

    def on_epoch_end(self, args, state, control, **kwargs):
        self._close_capture()

    def on_save(self, args, state, control, **kwargs):
        if self.run is not None:
            self.run.flush()  # the log on disk covers at least the checkpoint's steps

    def on_train_end(self, args, state, control, **kwargs):
        if self.run is None:
            return
        try:
            self._close_capture()
        finally:
            self._teardown(finalize=True)

    def close(self) -> None:
        """Remove the hooks and commit the rows written so far, without finalizing (after a failure)."""
        self._teardown()

    # -- hooks -----------------------------------------------------------------------------------

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        ids_value, changed = None, False
        if self.id_column is not None and self.id_column in kwargs:
            ids_value = kwargs[self.id_column]
            kwargs = {k: v for k, v in kwargs.items() if k != self.id_column}
            changed = True
        if self.run is not None and module.training and torch.is_grad_enabled():
            try:
                self._open_capture(kwargs, ids_value)
            except BaseException:
                self._teardown()
                raise
        return (args, kwargs) if changed else None

    def _open_capture(self, kwargs: dict, ids_value: Any) -> None:
        if self._cap is not None:
            if not self._loss_reached:
                raise CaptureError(
                    "two training forwards of the model ran before a backward (a custom compute_loss or "
                    "training_step calling the model twice?): LogIXCallback logs one forward and backward "
                    "per micro-batch"
                )
            self._close_capture()
        labels, shift = _loss_labels(kwargs)
        if not isinstance(labels, Tensor):
            raise CaptureError(
                "a training forward of the model received no labels, so the model computes no loss that "
                "LogIXCallback could see: the Trainer pops the labels when compute_loss_func or label smoothing "
                "is used, and then computes the loss outside the model. Let the model compute the loss "
                "(labels in the batch, no compute_loss_func), or log with logix.init/run.capture in your own loop"
            )
        batch = labels.shape[0]
        if self.id_column is not None:
            if ids_value is None:
                raise CaptureError(
                    f"the batch has no {self.id_column!r} column: TrainingArguments(remove_unused_columns=True) "
                    "(the default) drops columns the model does not take. Pass remove_unused_columns=False "
                    f"or use a data collator that keeps {self.id_column!r}"
                )
            ids = ids_value
        else:
            while self._skip and self._fifo:
                self._fifo.popleft()  # batches skip_first_batches consumed when resuming
                self._skip -= 1
            if not self._fifo:
                raise CaptureError(
                    "LogIXCallback recorded no sampler indices for this training batch: the model ran on a batch "
                    "that did not come from the train dataloader the callback wrapped at on_train_begin. "
                    "Pass LogIXCallback(..., id_column='<column>') to take ids from the batch instead"
                )
            ids = self._fifo.popleft()
        n_ids = len(ids) if not isinstance(ids, Tensor) else ids.shape[0]
        if n_ids != batch:
            raise CaptureError(
                f"{n_ids} ids for a training batch of {batch} examples: the sampler's indices do not match the "
                "batches the model sees (a collator that drops, splits or packs examples?). Pass "
                "LogIXCallback(..., id_column='<column>') with an id per example of the batch"
            )
        num_items = kwargs.get("num_items_in_batch")
        scale = 1.0 / self._convention.divisor(labels, num_items, shift)
        self._loss_seen = self._loss_reached = False
        cap = self.run.capture(
            ids,
            mask=_batch_mask(self._model, kwargs, batch),
            reduction="sum",
            scale=scale,
            step=self._state.global_step if self._state is not None else None,
        )
        cap.__enter__()
        self._cap = cap
        self._cap_labels, self._cap_num_items, self._cap_shift = labels, num_items, shift

    def _post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        cap = self._cap
        if cap is None or not cap.active or self._loss_seen or not (module.training and torch.is_grad_enabled()):
            return None
        try:
            loss = _model_loss(output)
            if not isinstance(loss, Tensor):
                raise CaptureError(
                    "the model returned no loss although it received labels; LogIXCallback needs the model's "
                    "outputs.loss"
                )
            self._convention.verify(output, loss, self._cap_labels, self._cap_num_items, self._cap_shift)
            cap.loss(loss)
            loss.register_hook(self._on_loss_grad)
            self._loss_seen = True
        except BaseException:
            self._teardown()
            raise
        return None

    def _on_loss_grad(self, grad: Tensor) -> None:
        self._loss_reached = True

    def _close_capture(self) -> None:
        cap, self._cap = self._cap, None
        self._cap_labels = self._cap_num_items = None
        if cap is None or not cap.active:
            return
        if not self._loss_reached:
            error = CaptureError(
                "the loss the Trainer backpropagated is not the model's outputs.loss (no gradient reached it): "
                "a compute_loss_func, label smoothing or a compute_loss override computes its own loss, which "
                "LogIXCallback cannot see. Let the model compute the loss, or log with logix.init/run.capture "
                "in your own loop"
            )
            cap.__exit__(CaptureError, error, None)
            self._teardown()
            raise error
        try:
            cap.__exit__(None, None, None)
        except BaseException:
            self._teardown()
            raise

    # -- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _epoch(state) -> int:
        return int(math.floor((state.epoch or 0) + 1e-9))

    def _unfinished_epochs(self, epoch: int) -> list[str]:
        """On resume: the passes of epochs before `epoch` that a crash left unfinalized."""
        if not (self.path / "manifest.json").is_file():
            return []
        return [
            p.name
            for p in Log(self.path).passes
            if p.name.startswith("epoch") and p.name[5:].isdigit() and int(p.name[5:]) < epoch and not p.finalized
        ]

    def _teardown(self, finalize: bool = False) -> None:
        """Drop an open capture, remove hooks and the index recorder, close the run (unfinalized)."""
        cap, self._cap = self._cap, None
        if cap is not None and cap.active:
            cap.__exit__(CaptureError, CaptureError("capture abandoned"), None)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._undo_recorder is not None:
            self._undo_recorder()
            self._undo_recorder = None
        self._fifo.clear()
        self._model = self._state = None
        run, self.run = self.run, None
        if run is not None:
            if finalize:
                run.finalize()
            else:
                run.close()


LogixCallback = LogIXCallback


def _learning_rate(optimizer, lr_scheduler) -> float | None:
    try:
        if lr_scheduler is not None and hasattr(lr_scheduler, "get_last_lr"):
            return float(lr_scheduler.get_last_lr()[0])
        if optimizer is not None:
            return float(optimizer.param_groups[0]["lr"])
    except Exception:  # noqa: BLE001 - metadata only
        return None
    return None

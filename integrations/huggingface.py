"""HuggingFace Trainer integration: log per-example gradients while `Trainer.train()` runs.

    from logix.integrations.huggingface import LogIXCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[LogIXCallback("runs/gpt2", rank=32)])
    trainer.train()                       # one pass per epoch ("epoch0", "epoch1", ...), finalized at the end

    log = logix.open("runs/gpt2")
    q = lm_query(log, model, [(prompt_ids, continuation_ids)])   # query loss on the continuation only
    log.influence(q, preconditioner="ekfac", top_k=5)

How it works (callback events never see the batch): at `on_train_begin` the callback opens the log,
watches the model, and puts a forward pre-hook and a forward hook on it. The pre-hook sees the
batch's keyword arguments (`input_ids`, `attention_mask`, `labels`, `num_items_in_batch`) and, for
a training forward (`model.training` and gradients enabled; evaluation is never logged), opens a
capture; the forward hook declares the model's `outputs.loss` to it (`capture.loss`), so whatever
the Trainer does to the loss afterwards (gradient accumulation, `accelerator.backward`, a loss
scaler, the world-size factor) is measured and divided out. Each micro-batch's capture closes at
`on_substep_end` / `on_pre_optimizer_step`, the first events after its backward.

Ids are the dataset indices the train sampler yields (read by a recording proxy around the
dataloader's batch sampler) or, with `id_column=`, a column of the batch that the pre-hook removes
before the model sees it. An example's own loss is the sum of its label-token losses (labels
-100 excluded, after the causal shift) for a language model, its loss for a classifier; the
model's `outputs.loss` is that sum over the batch divided by `num_items_in_batch` when the Trainer
passes it, else by the number of label items in the micro-batch. The first training batch checks
this against the logits and refuses a loss it cannot explain.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, IterableDataset

import logix
from logix.errors import CaptureError, ConfigError
from logix.extras import require
from logix.run import torch_optimizer

TrainerCallback = require(__name__, "hf", "transformers").TrainerCallback

__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_STATISTICS",
    "LogIXCallback",
    "LogixCallback",
    "continuation_batch",
    "lm_query",
    "log_dataset",
]


DEFAULT_STATISTICS = ("ekfac",)
# Position embeddings look up (1, T) positions shared by the whole batch (GPT-2's wpe, BERT's
# position_embeddings when position_ids are not passed): they have no per-example gradient.
DEFAULT_EXCLUDE = ("*wpe", "*position_embeddings", "*embed_positions")
IGNORE_INDEX = -100
_LOSS_RTOL = 2e-3


# -- the loss convention ----------------------------------------------------------------------------


def _shifts_labels(model: nn.Module) -> bool:
    """Whether the model's loss shifts labels (causal LM: position t predicts label t+1)."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss

        if getattr(model, "loss_function", None) is ForCausalLMLoss:
            return True
    except Exception:  # noqa: BLE001 - older transformers, or a model without loss_function
        pass
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


class _LossConvention:
    """How a HuggingFace model's `outputs.loss` relates to its examples' own losses.

    outputs.loss = sum over the batch's label items of their loss / N, where N is
    `num_items_in_batch` when given, else the number of label items (labels != -100, after the
    shift for a causal LM) in the batch. The first batch is checked against the logits.
    """

    def __init__(self, model: nn.Module, check: bool = True):
        self.shift = _shifts_labels(model)
        self.check = check
        self.checked = False

    def items(self, labels: Tensor, shift: bool | None = None) -> Tensor:
        shift = self.shift if shift is None else shift
        if shift and labels.dim() >= 2:
            labels = labels[..., 1:]
        return labels.ne(IGNORE_INDEX).sum()

    def divisor(self, labels: Tensor, num_items: Any, shift: bool | None = None) -> Any:
        """N, as a Python number or a 0-d tensor (never zero: an empty batch's rows are zero anyway)."""
        if num_items is not None:
            return num_items
        return int(self.items(labels, shift).clamp(min=1))

    def verify(self, output: Any, loss: Tensor, labels: Tensor, num_items: Any, shift: bool | None = None) -> None:
        """On the first batch: recompute the loss from the logits; adopt the shift that explains it.

        shift: given (False for `shift_labels`, which are aligned with the logits already), only that
        convention is tried.
        """
        if not self.check or self.checked:
            return
        logits = _get(output, "logits")
        if not isinstance(logits, Tensor) or labels.is_floating_point():
            self.checked = True  # regression, multi-label or custom heads: trusted as documented
            return
        with torch.no_grad():
            got = float(loss.detach().float())
            tried = []
            for candidate in (self.shift, not self.shift) if shift is None else (shift,):
                own = _own_losses(logits, labels, candidate)
                if own is None:
                    continue
                n = float(num_items) if num_items is not None else max(int(self.items(labels, candidate)), 1)
                want = float(own.sum()) / n
                tried.append(f"{want:.6g} ({'shifted' if candidate else 'unshifted'} labels)")
                if math.isclose(got, want, rel_tol=_LOSS_RTOL, abs_tol=1e-6):
                    if shift is None and labels.dim() >= 2:
                        self.shift = candidate
                    self.checked = True
                    return
                if labels.dim() < 2:
                    break
        if not tried:
            self.checked = True
            return
        raise CaptureError(
            f"the model's loss {got:.6g} is not the sum of its label tokens' cross-entropy divided by "
            f"{'num_items_in_batch' if num_items is not None else 'the number of label tokens'} "
            f"(expected {' or '.join(tried)}). logix logs each example's own loss and can only divide out "
            "a known reduction: label smoothing, class weights or another loss inside the model cannot be "
            "logged by this integration (log with logix.init/run.capture in your own loop, or pass "
            "check_loss=False if the loss is a sum of per-example losses divided by that count)"
        )


def _own_losses(logits: Tensor, labels: Tensor, shift: bool) -> Tensor | None:
    """(B,) sums of each example's label-item cross-entropies, or None if the shapes do not fit."""
    labels = labels.to(logits.device)
    logits = logits.detach().float()
    if labels.dim() == 1:
        if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
            return None
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    if logits.shape[:-1] != labels.shape:
        return None
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return ce.reshape(labels.shape[0], -1).sum(dim=1)


def _get(output: Any, key: str) -> Any:
    if isinstance(output, Mapping):
        return output.get(key)
    return getattr(output, key, None)


def _model_loss(output: Any) -> Tensor | None:
    loss = _get(output, "loss")
    if loss is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        loss = output[0] if output[0].numel() == 1 else None
    return loss


def _batch_mask(model: nn.Module, kwargs: Mapping, batch: int) -> Tensor | None:
    """The (B, T) attention mask, for the capture to leave padding out (decoder-only and encoder models).

    An encoder-decoder's mask covers the encoder's positions only, and the decoder's could have the
    same length by chance: no mask there (padded positions get no gradient either way; the mask
    only keeps them out of the activation statistics).
    """
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[0] == batch:
        return mask
    return None


def _loss_labels(kwargs: Mapping) -> tuple[Any, bool | None]:
    """The labels the model's loss uses, and the shift to assume (`shift_labels` are pre-shifted)."""
    shifted = kwargs.get("shift_labels")
    if isinstance(shifted, Tensor):
        return shifted, False
    return kwargs.get("labels"), None


def _exclude(exclude: Iterable[str] | None) -> tuple:
    return DEFAULT_EXCLUDE if exclude is None else tuple(exclude)


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
        self.run: logix.Run | None = None
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
            self.run = logix.init(self.path, self.rank, statistics=self.statistics, resume=resumed, **self.init_kwargs)
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
            for p in logix.open(self.path).passes
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


# -- a logging pass at a fixed checkpoint -------------------------------------------------------------


class _Frozen:
    """Model in eval (or train) mode, gradients set aside, restored on exit; parameters never change."""

    def __init__(self, model: nn.Module, train_mode: bool):
        self.model, self.train_mode = model, train_mode

    def __enter__(self):
        self.was_training = self.model.training
        self.grads = [(p, p.grad) for p in self.model.parameters()]
        for p, _ in self.grads:
            p.grad = None
        self.model.train(self.train_mode)
        return self

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)
        for p, g in self.grads:
            p.grad = g


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _default_collator():
    try:
        from transformers import default_data_collator

        return default_data_collator
    except ImportError:  # pragma: no cover
        from torch.utils.data import default_collate

        return default_collate


def log_dataset(
    model: Any,
    dataset: Any = None,
    path: str | Path | None = None,
    rank: int | str | tuple = 64,
    *,
    batch_size: int = 8,
    data_collator: Any = None,
    id_column: str | None = None,
    pass_name: str | None = None,
    statistics: str | Sequence[str] | None = DEFAULT_STATISTICS,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    include_frozen: bool = False,
    checkpoint: str | None = None,
    step: int | None = None,
    train_mode: bool = False,
    num_workers: int = 0,
    check_loss: bool = True,
    **init_kwargs: Any,
) -> logix.Log:
    """Log every example of `dataset` at the model's current parameters (no optimizer step); returns the Log.

        log = log_dataset(model, train_ds, "runs/ckpt1000", rank=32, data_collator=collator)

    `model` may be a Trainer: its model, data_collator, train_dataset (when `dataset` is None) and
    global step are used. Batches are the dataset in order (ids: indices, or the `id_column` values,
    removed before the forward); each example's row is the gradient of its own loss (the summed
    label-token loss for a language model). The model runs in eval mode (no dropout) unless
    `train_mode`; its parameters are unchanged and any `.grad` it held is restored afterwards.
    One pass per call (`pass_name`, default "pass<N>"), finalized with `statistics` (EK-FAC by default).
    """
    trainer = None
    if not isinstance(model, nn.Module) and hasattr(model, "model") and hasattr(model, "args"):
        trainer, model = model, model.model
        dataset = trainer.train_dataset if dataset is None else dataset
        data_collator = data_collator or trainer.data_collator
        step = trainer.state.global_step if step is None else step
    if dataset is None or path is None:
        raise ConfigError("log_dataset needs a dataset and a path (or a Trainer with a train_dataset, and a path)")
    if isinstance(dataset, IterableDataset) and id_column is None:
        raise CaptureError("an IterableDataset has no indices to use as ids: pass id_column='<column>'")
    collate = data_collator or _default_collator()
    device = next(model.parameters()).device
    convention = _LossConvention(model, check_loss)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers)
    with logix.init(path, rank, statistics=statistics, **init_kwargs) as run:
        run.watch(model, include, _exclude(exclude), include_frozen)
        run.start_pass(pass_name, step=step, checkpoint=checkpoint)
        offset = 0
        with _Frozen(model, train_mode), torch.enable_grad():
            for batch in loader:
                batch = dict(batch)
                if id_column is not None:
                    if id_column not in batch:
                        raise CaptureError(
                            f"the collated batch has no {id_column!r} column (a collator that drops it?)"
                        )
                    ids = batch.pop(id_column)
                labels = batch.get("labels")
                if not isinstance(labels, Tensor):
                    raise CaptureError("log_dataset needs batches with labels, so that the model computes its loss")
                n = labels.shape[0]
                if id_column is None:
                    ids = list(range(offset, offset + n))
                offset += n
                inputs = _to_device(batch, device)
                _capture_batch(run.capture, model, inputs, ids, convention)
        run.finalize()
    return logix.open(path, pass_name=pass_name) if pass_name else logix.open(path)


def _capture_batch(capture, model: nn.Module, inputs: dict, ids: Any, convention: _LossConvention) -> None:
    """One forward and backward of `model(**inputs)` inside `capture(...)`, with the HF loss convention."""
    labels, shift = _loss_labels(inputs)
    scale = 1.0 / convention.divisor(labels, None, shift)
    with capture(ids, mask=_batch_mask(model, inputs, labels.shape[0]), reduction="sum", scale=scale) as cap:
        output = model(**inputs)
        loss = _model_loss(output)
        if not isinstance(loss, Tensor):
            raise CaptureError("the model returned no loss for a batch with labels")
        convention.verify(output, loss, labels, None, shift)
        cap.loss(loss).backward()
    for p in model.parameters():
        p.grad = None


# -- queries -----------------------------------------------------------------------------------------------


def continuation_batch(
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    pad_token_id: int = 0,
) -> dict[str, Tensor]:
    """input_ids = prompt + continuation (right-padded), labels -100 except on the continuation.

    With a causal LM's shifted loss, the loss is then exactly the continuation's tokens given
    everything before them: the prompt conditions but is not scored.
    """
    if len(prompts) != len(continuations):
        raise ConfigError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    rows = [(list(map(int, p)), list(map(int, c))) for p, c in zip(prompts, continuations)]
    if any(not p or not c for p, c in rows):
        raise ConfigError(
            "every prompt needs at least one token (the first is never predicted) and every continuation at least one"
        )
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (p, c) in enumerate(rows):
        seq = torch.tensor(p + c, dtype=torch.long)
        input_ids[r, : len(seq)] = seq
        labels[r, len(p) : len(seq)] = torch.tensor(c, dtype=torch.long)
        mask[r, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def lm_query(
    log: Any,
    model: nn.Module,
    queries: Any,
    *,
    ids: Sequence | None = None,
    batch_size: int = 8,
    pad_token_id: int = 0,
    check_loss: bool = True,
) -> logix.Query:
    """Query gradients for a HuggingFace model, with the same own-loss convention as the logged rows.

    queries: a list of (prompt_token_ids, continuation_token_ids) pairs (the query loss covers the
    continuation only; see `continuation_batch`), or a batch dict with `input_ids`, `labels` (-100
    where not scored) and optionally `attention_mask`, e.g. from `continuation_batch` or a collator.
    Each query's row is the gradient of the sum of its scored tokens' losses (for a classifier, of
    its loss). The model runs in eval mode; parameters and `.grad` are left as they were.
    `log`: a Log or a log path. Then: `log.influence(q, preconditioner="ekfac", top_k=5)`.
    """
    if not isinstance(log, logix.Log):
        log = logix.open(log)
    if isinstance(queries, Mapping):
        batch = dict(queries)
    else:
        pairs = list(queries)
        batch = continuation_batch([p for p, _ in pairs], [c for _, c in pairs], pad_token_id)
    if not isinstance(batch.get("input_ids"), Tensor) and not isinstance(batch.get("labels"), Tensor):
        raise ConfigError("queries must be (prompt, continuation) pairs or a dict with input_ids and labels tensors")
    if not isinstance(batch.get("labels"), Tensor):
        raise ConfigError("the query batch needs labels (-100 where a token is not part of the query loss)")
    total = batch["labels"].shape[0]
    ids = list(range(total)) if ids is None else list(ids)
    if len(ids) != total:
        raise ConfigError(f"{len(ids)} ids for {total} queries")
    device = next(model.parameters()).device
    convention = _LossConvention(model, check_loss)
    query = log.query(model)
    with _Frozen(model, False), torch.enable_grad():
        for start in range(0, total, batch_size):
            part = {k: v[start : start + batch_size] if isinstance(v, Tensor) else v for k, v in batch.items()}
            _capture_batch(query.capture, model, _to_device(part, device), ids[start : start + batch_size], convention)
    return query

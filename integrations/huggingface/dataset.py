"""log_dataset: a logix pass over a dataset at a fixed checkpoint, outside any Trainer."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from logix.errors import CaptureError, ConfigError
from logix.frozen import Frozen
from logix.log import Log
from logix.run import init

from .convention import DEFAULT_STATISTICS, _capture_batch, _exclude, _LossConvention, _to_device


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
) -> Log:
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
    with init(path, rank, statistics=statistics, **init_kwargs) as run:
        run.watch(model, include, _exclude(exclude), include_frozen)
        run.start_pass(pass_name, step=step, checkpoint=checkpoint)
        offset = 0
        with Frozen(model, train_mode), torch.enable_grad():
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
    return Log(path, pass_name=pass_name or None)

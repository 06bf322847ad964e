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

The package splits by job: `convention` (the loss convention), `callback` (LogIXCallback),
`dataset` (log_dataset) and `query` (continuation_batch, lm_query).
"""

from .callback import LogIXCallback, LogixCallback, TrainerCallback
from .convention import DEFAULT_EXCLUDE, DEFAULT_STATISTICS
from .dataset import log_dataset
from .query import continuation_batch, lm_query

__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_STATISTICS",
    "LogIXCallback",
    "LogixCallback",
    "TrainerCallback",
    "continuation_batch",
    "lm_query",
    "log_dataset",
]

"""Queries for language models: a prompt's continuation as the query loss (lm_query)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from logix.errors import ConfigError
from logix.frozen import Frozen
from logix.log import Log
from logix.query import Query

from .convention import IGNORE_INDEX, _capture_batch, _LossConvention, _to_device


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
) -> Query:
    """Query gradients for a HuggingFace model, with the same own-loss convention as the logged rows.

    queries: a list of (prompt_token_ids, continuation_token_ids) pairs (the query loss covers the
    continuation only; see `continuation_batch`), or a batch dict with `input_ids`, `labels` (-100
    where not scored) and optionally `attention_mask`, e.g. from `continuation_batch` or a collator.
    Each query's row is the gradient of the sum of its scored tokens' losses (for a classifier, of
    its loss). The model runs in eval mode; parameters and `.grad` are left as they were.
    `log`: a Log or a log path. Then: `log.influence(q, preconditioner="ekfac", top_k=5)`.
    """
    if not isinstance(log, Log):
        log = Log(log)
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
    with Frozen(model, False), torch.enable_grad():
        for start in range(0, total, batch_size):
            part = {k: v[start : start + batch_size] if isinstance(v, Tensor) else v for k, v in batch.items()}
            _capture_batch(query.capture, model, _to_device(part, device), ids[start : start + batch_size], convention)
    return query

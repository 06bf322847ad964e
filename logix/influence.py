"""Influence scores over a log: streamed scoring, top-k and self-influence.

    score(q, i) = g_q^T (F + lambda I)^{-1} g_i

Sign convention, everywhere in logix: a POSITIVE score means training example i HELPS query q,
i.e. a gradient step on i lowers q's loss. F and lambda come from logix.curvature.
Only the query side is preconditioned at query time; train rows stream from the log in blocks,
one matrix product per block. Normalised modes divide by preconditioned norms:
cosine by both sides', relative (RelatIF) by the train side's, sqrt(g_i^T (F + lambda I)^{-1} g_i).
Self-influence streams any (ids, rows) blocks: a Log's, or the rows finalize reads before the log
is whole (self_influences).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .curvature import Preconditioner
from .errors import ConfigError, LogFormatError
from .progress import progress_bar
from .results import Scores, TopK, as_ids

MODES = ("dot", "cosine", "relative")
AGGREGATES = ("sum", "mean")


def _train_ids(log, train_ids) -> np.ndarray:
    """train_ids as an array of the log's id kind; anything else is a ConfigError, never a silent miss."""
    if isinstance(train_ids, (str, bytes, int)) or not hasattr(train_ids, "__iter__"):
        raise ConfigError(f"train_ids must be a list of ids, got {type(train_ids).__name__} {train_ids!r}")
    values = train_ids.tolist() if hasattr(train_ids, "tolist") else list(train_ids)
    if not isinstance(values, list):  # a 0-d tensor or array holds one id, not a list of them
        raise ConfigError(f"train_ids must be a list of ids, got {type(train_ids).__name__} {train_ids!r}")
    id_kind = "str" if log.ids.dtype.kind in "OUS" else "int"
    for i in values:
        ok = isinstance(i, str) if id_kind == "str" else isinstance(i, (int, np.integer)) and not isinstance(i, bool)
        if not ok:
            raise ConfigError(f"this log's ids are {id_kind}s; train_ids holds {type(i).__name__} {i!r}")
    return np.asarray(values, dtype=object if id_kind == "str" else np.int64)


def _shard_rows(log, shard) -> tuple[slice | None, int]:
    """The stored-row range of shard (i, n), and how many valid rows precede it."""
    if shard is None:
        return None, 0
    if (
        not isinstance(shard, tuple)
        or len(shard) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
        or not 0 <= shard[0] < shard[1]
    ):
        raise ConfigError(f"shard must be (index, count) with 0 <= index < count, got {shard!r}")
    stored = len(log.committed_ids)
    index, count = shard
    start, stop = stored * index // count, stored * (index + 1) // count
    return slice(start, stop), int(log.valid_mask[:start].sum())


def aggregate_queries(q_pre, q_ids: np.ndarray, aggregate: str, groups) -> tuple:
    """Preconditioned query rows summed (or averaged) per group: (G, D) rows and the G labels.

    Scoring these rows gives, for every train example, the sum (mean) over a group's queries of
    its scores in any mode, exactly: the score is linear in the preconditioned query row, which
    the caller has divided by the query's own norm for cosine; relative divides by the train side
    only. One GEMM row per group instead of per query, and no Q x N matrix. Groups keep the order
    of their first query; without groups the one label is the aggregate's name."""
    if not isinstance(aggregate, str) or aggregate not in AGGREGATES:
        raise ConfigError(f"aggregate must be one of {AGGREGATES} or None, got {aggregate!r}")
    if groups is None:
        labels, index = as_ids([aggregate]), torch.zeros(len(q_ids), dtype=torch.long)
    else:
        wanted = f"query_groups must be one int or str label per query row ({len(q_ids)})"
        try:
            values = as_ids(groups)
        except (TypeError, ValueError):
            raise ConfigError(f"{wanted}, got {groups!r}"[:300]) from None
        if values.ndim != 1 or len(values) != len(q_ids):
            raise ConfigError(f"{wanted}, got shape {values.shape}")
        first = {}
        for label in values.tolist():
            first.setdefault(label, len(first))
        labels = as_ids(list(first))
        index = torch.tensor([first[label] for label in values.tolist()], dtype=torch.long)
    sums = torch.zeros(len(labels), q_pre.shape[1], dtype=torch.float64).index_add_(0, index, q_pre.double())
    if aggregate == "mean":
        sums /= torch.bincount(index, minlength=len(labels)).double()[:, None]
    return sums.float(), labels


@dataclass(frozen=True)
class ScoreOptions:
    """How `log.influence` scores: the options that travel together from the call to the loop
    (what each means: `Log.influence`)."""

    preconditioner: str = "auto"
    damping: Any = None
    damping_factor: float | None = None
    mode: str = "dot"
    top_k: int | None = None
    largest: bool = True
    modules: Any = None
    train_ids: Any = None
    block_rows: int | None = None
    progress: bool | None = None
    shard: tuple[int, int] | None = None
    curvature: str = "auto"
    aggregate: str | None = None
    query_groups: Any = None


def score(log, query, options: ScoreOptions):
    """Scores (or, with top_k, a streamed TopK) of the query rows against the log's train rows."""
    o = options
    preconditioner, damping, damping_factor, mode = o.preconditioner, o.damping, o.damping_factor, o.mode
    top_k, largest, modules, train_ids, curvature = o.top_k, o.largest, o.modules, o.train_ids, o.curvature
    block_rows, progress, shard = o.block_rows, o.progress, o.shard
    if not isinstance(mode, str) or mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k must be a positive int, got {top_k!r}")
    q_rows, q_ids = query.rows, as_ids(query.ids)
    if q_rows.shape[0] == 0:
        raise ConfigError("the query holds no rows: capture query gradients with q.capture(ids) first")
    if q_rows.shape[1] != log.width:
        raise ConfigError(f"query rows have {q_rows.shape[1]} columns, the log {log.width}: not this log's query")
    if o.aggregate is None and o.query_groups is not None:
        raise ConfigError("query_groups needs aggregate='sum' or 'mean'")
    pre = Preconditioner(log, preconditioner, damping, damping_factor, modules, curvature)
    q_pre = pre.apply(q_rows).float()
    scale_q = torch.ones(q_rows.shape[0])
    if mode == "cosine":
        scale_q = (pre.columns(q_rows).double() * q_pre.double()).sum(dim=1).clamp_min(0).sqrt().float()
    if o.aggregate is not None:
        q_pre, q_ids = aggregate_queries(q_pre / scale_q.clamp_min(1e-30)[:, None], q_ids, o.aggregate, o.query_groups)
        scale_q = torch.ones(q_pre.shape[0])
    train_norms = None
    if mode != "dot":  # aligned with log.blocks order, so a block's norms are a slice
        train_norms = log.self_influence(
            pre.preconditioner, damping, damping_factor, modules, progress=progress, curvature=curvature
        )
        train_norms = train_norms.values.float().clamp_min(0).sqrt()
    if not isinstance(largest, bool):
        raise ConfigError(f"largest must be True or False, got {largest!r}")
    wanted = None if train_ids is None else _train_ids(log, train_ids)
    rows_range, offset = _shard_rows(log, shard)

    kept_ids, kept_scores = [], []
    best_v, best_i = None, None
    with progress_bar(len(log), progress, "scoring") as bar:
        for block_ids, rows in log.blocks(block_rows=block_rows, rows=rows_range, check_finite=False, recycle=True):
            bar.update(len(block_ids))
            norms = None
            if train_norms is not None:
                norms = train_norms[offset : offset + len(block_ids)]
            offset += len(block_ids)
            if wanted is not None:
                keep = np.isin(block_ids, wanted)
                block_ids, rows = block_ids[keep], rows[torch.from_numpy(keep)]
                norms = None if norms is None else norms[torch.from_numpy(keep)]
            if len(block_ids) == 0:
                continue
            s = q_pre @ pre.columns(rows).T  # (Q, b): the one GEMM per block
            if not bool(torch.isfinite(s).all()):  # cheaper than checking every number of the rows
                bad = block_ids[int(torch.nonzero(~torch.isfinite(s).all(dim=0))[0])]
                raise LogFormatError(
                    f"{log.path}: the row of train id {bad!r} gives non-finite scores: it holds NaN/Inf but is "
                    "not flagged (damaged data), or numbers too large for float32"
                )
            if norms is not None:
                s = s / (norms[None, :] * scale_q[:, None]).clamp_min(1e-30)
            if top_k is None:
                kept_ids.append(block_ids)
                kept_scores.append(s)
                continue
            ids_here = np.asarray(block_ids)
            if best_v is None:
                cand_v, cand_i = s, np.broadcast_to(ids_here, s.shape)
            else:
                cand_v = torch.cat([best_v, s], dim=1)
                cand_i = np.concatenate([best_i, np.broadcast_to(ids_here, s.shape)], axis=1)
            k = min(top_k, cand_v.shape[1])
            best_v, index = torch.topk(cand_v, k, dim=1, largest=largest)
            best_i = np.take_along_axis(cand_i, index.numpy(), axis=1)
    if top_k is not None:
        if best_v is None:
            return TopK(np.zeros((len(q_ids), 0), dtype=log.ids.dtype), torch.zeros(len(q_ids), 0), q_ids)
        return TopK(best_i, best_v, q_ids)
    values = torch.cat(kept_scores, dim=1) if kept_scores else torch.zeros(len(q_ids), 0)
    train = np.concatenate(kept_ids) if kept_ids else np.zeros(0, dtype=log.ids.dtype)
    return Scores(values, q_ids, train)

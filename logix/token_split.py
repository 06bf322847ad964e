"""Token-level influence: a sequence's score split over its positions.

A logged row is, per module, the projected sum over positions G = sum_t delta_t a_t^T, so its
influence on a query, q^T (F + lambda I)^{-1} g, is a sum of one term per position t:
score_t = (P q)^T vec(delta~_t a~_t^T), with P the preconditioner and ~ the log's projections
(Grosse et al., 2023; the same split Kronfluence reports). Rows hold only the sum, so the parts are
recomputed for the few sequences asked about: the inputs run through the model again, at the
parameters the rows were logged at. That is only true of a pass logged at a fixed checkpoint (no
optimizer step during it): a pass logix knows was logged while training moved the parameters (a
watched optimizer stepped, or the pass names a learning rate) is refused. A plain loop that
steps an optimizer logix does not watch cannot be told apart: split only a fixed-checkpoint pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from .curvature import Preconditioner
from .errors import ConfigError
from .frozen import Frozen
from .results import _Saved, _values, as_ids

if TYPE_CHECKING:
    from .query import Query


@dataclass(eq=False)
class TokenScores(_Saved):
    """values[q, i, t]: the part of train sequence ids[i]'s influence on query query_ids[q] that
    position t carries: a position of the train sequence (`log.token_influence`) or of the query
    (`log.query_token_influence`); positions past a sequence's end are 0, and values.sum(-1) is
    the sequence's score. Saved and loaded like the other results."""

    values: Tensor  # (Q, n, T) float64
    ids: np.ndarray
    query_ids: np.ndarray

    def __post_init__(self):
        self.values = _values(self.values)
        self.ids, self.query_ids = as_ids(self.ids), as_ids(self.query_ids)

    def __repr__(self) -> str:
        q, n, t = self.values.shape
        return f"TokenScores(queries={q}, sequences={n}, positions={t})"


def check_fixed_checkpoint(log) -> None:
    """Refuse a pass whose parameters moved while it was logged (its rows cannot be recomputed):
    one in which a watched optimizer stepped (`run.watch(model, optimizer=opt)`, as the Trainer
    callback does), or which names its learning rate (`start_pass(..., lr=...)`)."""
    info = log.current
    steps = (info.meta.get("training") or {}).get("steps") or 0
    if steps or info.meta.get("lr") is not None:
        moved = f"{steps} optimizer steps" if steps else f"learning rate {info.meta['lr']}"
        raise ConfigError(
            f"pass {info.name!r} was logged during training ({moved}): its rows were taken at parameters that "
            "moved, so they cannot be split by position at the model's parameters now. Log a pass at a fixed "
            "checkpoint (the trained model in eval mode, no optimizer step) and split that pass's rows"
        )


def token_influence(
    log,
    query: Query,
    model: nn.Module,
    ids,
    inputs,
    losses: Callable,
    *,
    preconditioner: str = "auto",
    damping=None,
    damping_factor: float | None = None,
    modules=None,
    curvature: str = "auto",
) -> TokenScores:
    """Split the influence of train sequences `ids` on the query rows by position.

    inputs: what `losses(model, inputs)` takes for those sequences, in the order of ids;
    losses(model, inputs) -> (n,) each sequence's own loss exactly as its row was logged (e.g. the
    sum of its token losses for a `capture(..., reduction="sum")` of their sum). The model must be
    the one the pass was logged at; it runs in eval mode, its parameters and .grad left as they
    were. Positions are those of the watched modules' inputs (tokens for a language model).
    preconditioner, damping, damping_factor, modules, curvature: as `log.influence` (mode dot).
    """
    check_fixed_checkpoint(log)
    ids = as_ids(ids)
    if len(ids) == 0:
        raise ConfigError("ids is empty: name the train sequences to split")
    watched = log.query(model).watched  # the log's modules, checked against the model, with projections
    pre = Preconditioner(log, preconditioner, damping, damping_factor, modules, curvature)
    query_rows = query.rows
    if len(query_rows) == 0:
        raise ConfigError("the query holds no rows: capture the query examples first")
    weights = pre.apply(query_rows)  # (Q, D_sel) float64
    parts = _position_rows(watched, model, inputs, losses, len(ids), log.width)  # (n, T, D)
    n, positions, width = parts.shape
    selected = pre.columns(parts.reshape(n * positions, width)).double()
    values = (selected @ weights.T).reshape(n, positions, -1).permute(2, 0, 1)
    return TokenScores(values.contiguous(), ids, query.ids)


def query_token_influence(
    log,
    model: nn.Module,
    inputs,
    losses: Callable,
    train_ids,
    *,
    query_ids=None,
    preconditioner: str = "auto",
    damping=None,
    damping_factor: float | None = None,
    modules=None,
    curvature: str = "auto",
) -> TokenScores:
    """The query side's split: which of the query's positions (the completion tokens) each train
    sequence's score on the query comes from.

    inputs: the query examples' batch; losses(model, inputs) -> (Q,) each query's loss as its row
    is captured (e.g. the sum of its scored tokens' losses, as `lm_query` does). train_ids: the
    train sequences whose scores to split (their logged rows are used as they are, so any pass
    will do). Returns TokenScores whose values[q, i, t] is query q's position t's part of train
    sequence train_ids[i]'s score; they add up over t to `log.influence`'s score.
    """
    train_ids = as_ids(train_ids)
    if len(train_ids) == 0:
        raise ConfigError("train_ids is empty: name the train sequences whose scores to split")
    parts = _position_rows(log.query(model).watched, model, inputs, losses, None, log.width)
    n, positions, width = parts.shape
    query = SimpleNamespace(rows=parts.reshape(n * positions, width), ids=list(range(n * positions)))  # per position
    scores = log.influence(query, preconditioner, damping=damping, damping_factor=damping_factor, modules=modules,
                           train_ids=train_ids, curvature=curvature)  # fmt: skip
    column = {i: c for c, i in enumerate(scores.train_ids.tolist())}
    order = [column[i] for i in train_ids.tolist()]
    values = scores.values.double()[:, order].reshape(n, positions, len(order)).permute(0, 2, 1)
    names = np.arange(n) if query_ids is None else as_ids(query_ids)
    if len(names) != n:
        raise ConfigError(f"{len(names)} query_ids for {n} queries")
    return TokenScores(values.contiguous(), train_ids, names)


def _position_rows(watched, model: nn.Module, inputs, losses: Callable, n: int | None, width: int) -> Tensor:
    """(n, T, D) float32: each sequence's row split by position, laid out like the log's rows
    (n: how many losses `losses` must give; None: as many as it gives)."""
    held: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}

    def forward_hook(w):
        def hook(module, args, output):
            held[w.name] = args[0].detach()
            if isinstance(output, Tensor) and output.requires_grad:
                output.register_hook(lambda g: grads.__setitem__(w.name, g.detach()))

        return hook

    with Frozen(model):
        handles = [w.module.register_forward_hook(forward_hook(w)) for w in watched]
        try:
            per_example = losses(model, inputs)
            given = len(per_example) if isinstance(per_example, Tensor) and per_example.dim() == 1 else None
            if given is None or (n is not None and given != n):
                wanted = "n" if n is None else n
                raise ConfigError(f"losses(model, inputs) must give one loss per id, shape ({wanted},)")
            n = len(per_example)
            per_example.sum().backward()
        finally:
            for h in handles:
                h.remove()
    blocks = []
    for w in watched:
        if w.name not in held or w.name not in grads:
            raise ConfigError(f"module {w.name!r} took no part in the loss: cannot split its rows")
        proj_in, proj_out = w.projections(held[w.name].device)
        a = w.kind.project_inputs(w.module, held[w.name], proj_in)  # (n, *positions, k_in)
        delta = w.kind.output_grads(w.module, grads[w.name]).float()  # (n, *positions, d_out)
        if proj_out is not None:
            delta = delta @ proj_out
        a, delta = a.reshape(n, -1, a.shape[-1]), delta.reshape(n, -1, delta.shape[-1])
        blocks.append(torch.einsum("nto,nti->ntoi", delta, a).reshape(n, a.shape[1], -1))
    positions = max(b.shape[1] for b in blocks)
    if any(b.shape[1] != positions for b in blocks):
        raise ConfigError("the watched modules see different numbers of positions: no common token split")
    rows = torch.zeros(n, positions, width)
    for w, block in zip(watched, blocks):
        rows[:, :, w.offset : w.offset + block.shape[-1]] = block
    return rows

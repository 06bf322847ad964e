"""Attribution across training: every pass of the log, each taken where training used it.

A log written during training holds each example's gradient at the parameters of the step that
used it, pass after pass (an epoch, or any segment of training), and each pass's curvature. A
single-checkpoint influence uses one pass as if the model had been trained to convergence at
once. These methods use all of them (positive = the training example helps, as everywhere):

    tracin   sum_p  eta_k  g_q(theta_p)^T  P_p  g_i^p
             eta_k the effective learning rate of the step k that used the row (the pass's mean
             where the log cannot place it, as for source below), g_q(theta_p) the query gradient
             at the pass's checkpoint, P_p identity (TracIn-CP) or the pass's damped inverse
             curvature. Self-influence across training weighs each pass's g_i^T P_p g_i alike.
    source   sum_l  [E_{l+1} ... E_L g_q(theta_T)]^T  R_l(k)  g_i^l
             E_l = prod_k (I - eta_k H_l) over segment l's K_l steps: the later segments' training,
                   carried back to segment l
             R_l(k) = eta_k prod_{k' > k} (I - eta_k' H_l): the rest of segment l after the step k
                   that used the row (its `step` column), at each step's own learning rate (the
                   training record's `lrs`); where the log cannot place a row (no per-step rates,
                   rows logged at a fixed checkpoint with `uses`, steps outside the pass) the
                   segment's sum_{j<K_l} (I - eta_l H_l)^j eta_l / K_l * uses_l instead: averaged
                   over where in the segment the example came, at the mean learning rate eta_l
             H_l the pass's curvature (raw, kfac or ekfac statistics; no damping needed, R_l <= eta_l
             as an eigenvalue goes to 0): from the pass's curvature pass where the log has one
             (labels drawn from the model: the true Fisher), else from its own rows (the empirical
             Fisher); g_q(theta_T) at the final model. With SGD momentum m the
             query side is the adjoint of (parameters, momentum buffer), moved per eigenvalue by
             the 2 x 2 step [[1 - eta lam, -eta m], [lam, m]] transposed (segment_powers).
    checkpoint   the last pass alone, preconditioned, at the final model (single-checkpoint
             influence, for comparison).

Both follow from unrolling SGD, theta_{k+1} = theta_k - eta_k grad(batch mean loss), and asking
how the final query loss moves with a weight eps on example i's loss at each step that used it
(score = -dL_q/d eps, per unit weight on the example's own loss, the batch's 1/B left out):

    -dL_q(theta_T)/d eps = sum_k eta_k g_q(theta_T)^T [prod_{k' > k} (I - eta_k' H_k')] g_i(theta_k)

TracIn drops the Hessian products and moves the query gradient to theta_k (exact when every pass
is one step and its checkpoint the parameters that step started from). Source (Bae et al., 2024)
holds H constant within a segment and averages the product over the example's position in its
segment (the paper writes (I - eta H)^K as exp(-eta K H)); logix keeps the power, which is what SGD
does, follows momentum, which the paper leaves out, and places each row at its own step, which the
log records (steps of a long pass in at most LR_ENTRIES runs, and fewer where the query sides of
every run would pass SIDE_BYTES). TracIn counts SGD momentum m as
learning rate eta / (1 - m). Adam(W)'s per-parameter scaling is not modelled (its passes are
weighted by their learning rate like SGD's): prefer tracin there.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .curvature import Preconditioner, check_damping, load_curvature, self_influence_values
from .disk.statistics import ROW_GROUP
from .errors import ConfigError, LogFormatError, NotInLogError
from .results import Scores, SelfInfluence, as_ids, check_top_k

METHODS = ("source", "tracin", "checkpoint")
SIDE_BYTES = 256 << 20  # Source's query sides of one segment's runs of steps, at most (float32)
CURVATURES = ("raw", "kfac", "ekfac", "row")


@dataclass(frozen=True)
class Segment:
    """What one pass contributes: its optimizer steps K and the learning rates it trained with."""

    name: str
    steps: int  # K: optimizer steps taken during the pass
    lr_sum: float  # the learning rates of those steps, summed
    momentum: float = 0.0  # SGD heavy-ball momentum
    uses: int = 1  # how many of the K steps each of the pass's rows stands for
    start: int | None = None  # the step the pass started at (rows record theirs)
    lrs: tuple | None = None  # mean learning rate of each run of lr_bin steps (logix.training_record)
    lr_bin: int = 1

    @property
    def rate(self) -> float:
        """TracIn's weight: the learning rate of one step, on average over the segment, each step
        counted 1 / (1 - momentum) times (what momentum adds up to)."""
        return self.lr / (1.0 - self.momentum)

    @property
    def lr(self) -> float:
        """eta: the learning rate of one step, on average over the segment."""
        return self.lr_sum / self.steps


def segments(log, passes: Sequence[str]) -> list[Segment]:
    """The Segment of each pass, from the training record `watch(optimizer=...)` keeps, or else
    from the pass's `lr` metadata and the steps its rows record."""
    out = []
    for name in passes:
        info = log.pass_info(name)
        meta = info.meta
        record = meta.get("training") or {}
        steps, lr_sum = record.get("steps"), record.get("lr_sum")
        momentum = record.get("momentum") or 0.0
        if record.get("optimizer", "SGD") != "SGD":
            momentum = 0.0  # Adam's first moment averages, it does not accumulate steps
        if not steps:
            steps = len(np.unique(log.select(name).steps)) if info.rows else 0
            lr = meta.get("lr")
            if lr is None:
                raise ConfigError(
                    f"pass {name!r} records no learning rate: log with run.watch(model, optimizer=opt), "
                    "or give run.start_pass(name, lr=...)"
                )
            lr_sum = float(lr) * steps
        if not steps or lr_sum is None or not math.isfinite(lr_sum) or lr_sum < 0:
            raise ConfigError(f"pass {name!r} records no optimizer steps: it cannot be weighed by its training")
        if not 0.0 <= float(momentum) < 1.0:
            raise ConfigError(f"pass {name!r}: momentum {momentum!r} is not in [0, 1)")
        uses = meta.get("uses", 1)
        uses = steps if uses == "all" else uses
        if isinstance(uses, bool) or not isinstance(uses, int) or not 1 <= uses <= steps:
            raise ConfigError(f"pass {name!r}: uses must be 'all' or an int in 1..{steps}, got {meta.get('uses')!r}")
        lrs, lr_bin = _step_lrs(name, record, int(steps))
        start = meta.get("step")
        start = start if isinstance(start, int) and not isinstance(start, bool) else None
        out.append(Segment(name, int(steps), float(lr_sum), float(momentum), uses, start, lrs, lr_bin))
    return out


def _step_lrs(name: str, record: dict, steps: int) -> tuple[tuple | None, int]:
    """The pass's per-step learning rates (runs of lr_bin steps), or (None, 1) where it has none."""
    lrs, lr_bin = record.get("lrs"), record.get("lr_bin", 1)
    if lrs is None:
        return None, 1
    sound = (
        isinstance(lrs, list)
        and isinstance(lr_bin, int)
        and not isinstance(lr_bin, bool)
        and lr_bin >= 1
        and len(lrs) == -(-steps // lr_bin)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in lrs)
    )
    if not sound:
        raise LogFormatError(
            f"pass {name!r}: its training record's per-step learning rates (lrs, lr_bin) do not fit its "
            f"{steps} steps; the manifest is damaged"
        )
    return tuple(float(v) for v in lrs), lr_bin


def training_passes(log, passes: Sequence[str] | None) -> list[str]:
    """The passes to attribute over, in log order: those named, or every training pass that holds
    rows (curvature passes are not training)."""
    names = [p.name for p in log.passes]
    curvature_passes = {p.name for p in log.passes if p.curvature_for is not None}
    if passes is None:
        chosen = [p.name for p in log.passes if p.rows and p.name not in curvature_passes]
    else:
        if not isinstance(passes, (list, tuple, set, frozenset)) or not all(isinstance(n, str) for n in passes):
            raise ConfigError(f"passes must be a list of pass names, got {passes!r}")
        unknown = [n for n in passes if n not in names]
        if unknown:
            raise NotInLogError(f"passes {unknown} are not in {log.path}; passes: {names}")
        wrong = [n for n in passes if n in curvature_passes]
        if wrong:
            raise ConfigError(f"passes {wrong} are curvature passes (gradients at sampled labels), not training")
        chosen = [n for n in names if n in set(passes)]
    if not chosen:
        raise ConfigError(f"{log.path} holds no pass with rows to attribute over")
    return chosen


class _Accumulator:
    """Scores of several passes added up by train id (an id may appear in several passes)."""

    def __init__(self, queries: int):
        self.queries = queries
        self.columns: dict = {}
        self.parts: list[tuple[np.ndarray, Tensor]] = []

    def add(self, ids: np.ndarray, values: Tensor) -> None:
        index = np.empty(len(ids), dtype=np.int64)
        for j, i in enumerate(ids.tolist()):
            index[j] = self.columns.setdefault(i, len(self.columns))
        self.parts.append((index, values))

    def result(self, dtype) -> tuple[np.ndarray, Tensor]:
        values = torch.zeros(self.queries, len(self.columns), dtype=torch.float64)
        for index, part in self.parts:
            values.index_add_(1, torch.from_numpy(index), part.double())
        ids = np.empty(len(self.columns), dtype=object if dtype.kind in "OUS" else np.int64)
        for i, j in self.columns.items():
            ids[j] = i
        return ids, values


def _stream(view, query_side: Tensor, accumulator: _Accumulator, block_rows, scale=1.0, run_of_row=None):
    """Add scale * query_side @ rows^T over the pass's rows (one GEMM per block). With `run_of_row`
    (one index per valid row), query_side is (runs, Q, D) and each row meets its own run's side;
    `scale` is a number or one per valid row."""
    at = 0
    for ids, rows in view.blocks(block_rows=block_rows, check_finite=False, recycle=True):
        here = slice(at, at + len(rows))
        at += len(rows)
        if run_of_row is None:
            values = query_side @ rows.T
        else:  # rows come in step order: each stretch of one run is a slice, scored without a copy
            runs = run_of_row[here]
            values = rows.new_empty(query_side.shape[1], len(rows))
            edges = [0, *(np.flatnonzero(np.diff(runs)) + 1).tolist(), len(rows)]
            for lo, hi in zip(edges[:-1], edges[1:]):
                values[:, lo:hi] = query_side[int(runs[lo])] @ rows[lo:hi].T
        values = values * (torch.from_numpy(scale[here]).to(values.dtype) if isinstance(scale, np.ndarray) else scale)
        if not bool(torch.isfinite(values).all()):
            raise LogFormatError(f"{view.path}: pass {view.current.name!r} gives non-finite scores (damaged rows?)")
        accumulator.add(np.asarray(ids), values)


def row_rates(segment: Segment, steps: np.ndarray) -> np.ndarray | float:
    """TracIn's weight for each of the pass's valid rows: the learning rate of the step that used
    it, over 1 - momentum, where the log can place the row (see step_runs); else the segment's
    mean, `segment.rate`, for all."""
    runs, run_of_row = step_runs(segment, steps, max_runs=len(segment.lrs or ()) or 1)
    if run_of_row is None:
        return segment.rate
    return np.array([run.rate for run in runs])[run_of_row]


def _capture(log, model: nn.Module, queries: Callable) -> tuple[Tensor, np.ndarray]:
    """Query rows of `queries(q, model)` at the model's current parameters."""
    q = log.query(model)
    with q:
        queries(q, model)
    model.zero_grad(set_to_none=True)
    rows = q.rows
    if rows.shape[0] == 0:
        raise ConfigError("queries(q, model) captured nothing: call q.capture(ids) around forward and backward")
    return rows, as_ids(q.ids)


def influence_across_training(
    log,
    model: nn.Module | None,
    queries: Callable,
    *,
    method: str = "source",
    load: Callable | None = None,
    models: Mapping[str, nn.Module] | None = None,
    passes: Sequence[str] | None = None,
    preconditioner: str | None = None,
    damping=None,
    damping_factor: float | None = None,
    top_k: int | None = None,
    largest: bool = True,
    block_rows: int | None = None,
    curvature: str = "auto",
):
    """Influence over the whole of training: every pass, each where training used it (as
    `log.influence_across_training(model, queries, ...)`).

    queries(q, model) captures the query examples (`with q.capture(ids): loss.backward()`); it is
    called at each checkpoint the method needs, with the model loaded.
    method: "source" (default; the final model and each pass's curvature: statistics needed),
        "tracin" (each pass's rows against query gradients at that pass's checkpoint, weighted by
        its learning rate; preconditioner identity by default), or "checkpoint" (the last pass
        alone at the final model, for comparison).
    model: the final model; for tracin also where `load(pass_info, model)` puts each pass's
        checkpoint (logix itself never unpickles a file); it is left as given. Or models={pass name: model}.
    passes: the passes to use (default: every training pass with rows), in log order; an id's
        scores add up over the passes that hold it.
    curvature: each pass's statistics from its own rows ("own", the empirical Fisher), from its
        curvature pass ("sampled"), or the latter where the log has one ("auto").
    Returns Scores over the union of the passes' train ids (or, with top_k, a TopK).
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if not callable(queries):
        raise ConfigError("queries must be a function queries(q, model) that captures the query examples")
    check_damping(damping, damping_factor, log.modules)  # "source" uses no damping_factor: still a mistake to name
    if top_k is not None:
        check_top_k(top_k, largest)
    names = training_passes(log, passes)
    if method == "tracin":
        values, query_ids, train_ids = _tracin(
            log,
            names,
            model,
            queries,
            load,
            models,
            preconditioner or "identity",
            damping,
            damping_factor,
            block_rows,
            curvature,
        )
    else:
        if model is None:
            raise ConfigError(f"method {method!r} needs the final model: influence_across_training(model, ...)")
        q_rows, query_ids = _capture(log, model, queries)
        if method == "source":
            values, train_ids = _source(log, names, q_rows, preconditioner or "ekfac", damping, block_rows, curvature)
        else:
            view = log.select(names[-1])
            pre = Preconditioner(view, preconditioner or "ekfac", damping, damping_factor, curvature=curvature)
            accumulator = _Accumulator(len(query_ids))
            _stream(view, pre.apply(q_rows).float(), accumulator, block_rows)
            train_ids, values = accumulator.result(log.ids.dtype)
    scores = Scores(values, query_ids, train_ids)
    return scores if top_k is None else scores.top_k(top_k, largest=largest)


def _tracin(log, names, model, queries, load, models, preconditioner, damping, damping_factor, block_rows, curvature):
    """sum over passes of that pass's scores (query gradients at the pass's checkpoint), each row
    weighted by its step's effective learning rate (row_rates)."""
    if models is not None and load is not None:
        raise ConfigError("pass load= or models=, not both")
    if models is not None:
        missing = [n for n in names if n not in models]
        if missing:
            raise ConfigError(f"models has no model for passes {missing}")
    elif model is None or load is None:
        raise ConfigError(
            "method 'tracin' needs each pass's checkpoint: load=fn(pass_info, model) that puts it into the model "
            "(from the file pass_info.meta['checkpoint'] names, say), or models={pass name: model}"
        )
    weights = segments(log, names)
    saved = copy.deepcopy(model.state_dict()) if models is None else None
    accumulator, query_ids = None, None
    try:
        for segment in weights:
            view = log.select(segment.name)
            if models is not None:
                at = models[segment.name]
            else:
                at = model
                load(view.current, model)
            q_rows, ids = _capture(log, at, queries)
            if query_ids is None:
                query_ids, accumulator = ids, _Accumulator(len(ids))
            elif not np.array_equal(ids, query_ids):
                raise ConfigError(f"queries(q, model) captured other query ids at pass {segment.name!r}")
            side = Preconditioner(view, preconditioner, damping, damping_factor, curvature=curvature).apply(q_rows)
            _stream(view, side.float(), accumulator, block_rows, scale=row_rates(segment, view.steps))
    finally:
        if saved is not None:
            model.load_state_dict(saved)  # the model is left as the caller gave it
    train_ids, values = accumulator.result(log.ids.dtype)
    return values, query_ids, train_ids


def _capped(lam: Tensor, eta: float, m: float) -> Tensor:
    """Eigenvalues clamped to [0, (1 + m) / eta] (see segment_powers); uncapped above for eta = 0, a warm-up's start."""
    return lam.clamp(min=0.0, max=(1.0 + m) / eta if eta > 0 else None)


def segment_powers(lam: Tensor, segment: Segment) -> tuple[Tensor, Tensor]:
    """(P, S), each (n, 2, 2): P = (M^T)^K and S = sum_{j<K} (M^T)^j for each eigenvalue lam of H.

    M is one step of SGD with heavy-ball momentum m (torch.optim.SGD: v <- m v + g, theta <- theta - eta v)
    linearised along an eigenvector of H, acting on (d theta, d v): [[1 - eta lam, -eta m], [lam, m]].
    The query side, an adjoint, moves with its transpose. Computed by repeated squaring. An eigenvalue
    past eta lam = 1 + m (along which training would overshoot, and an estimated curvature too large
    would blow up) is taken as 1 + m: that direction is settled within a step or two either way.
    """
    eta, m = segment.lr, segment.momentum
    lam = _capped(lam.reshape(-1).double(), eta, m)
    step = torch.zeros(len(lam), 2, 2, dtype=torch.float64)
    step[:, 0, 0], step[:, 0, 1], step[:, 1, 0], step[:, 1, 1] = 1 - eta * lam, lam, -eta * m, m
    eye = torch.eye(2, dtype=torch.float64).expand(len(lam), 2, 2)
    power, total = eye.clone(), torch.zeros_like(step)  # (M^T)^k and sum_{j<k}, k the steps taken
    square, square_sum = step, eye.clone()  # (M^T)^b and sum_{j<b}, b a power of two
    k = segment.steps
    while k:
        if k & 1:
            total = total + power @ square_sum
            power = power @ square
        square_sum = square_sum + square @ square_sum
        square = square @ square
        k >>= 1
    return power, total


def _source(log, names, q_rows: Tensor, preconditioner: str, damping, block_rows, curvature):
    """Segments from the last to the first: score each pass's rows with the rest of its segment's
    training after their step (or averaged over their place in it), then carry the query side to
    the segment's start.

    The query side is the adjoint (u_theta, u_v) of (parameters, momentum buffer); without momentum
    u_v stays 0 and this is Source's (I - eta H)^K and sum_j (I - eta H)^j eta / K."""
    if preconditioner not in CURVATURES:
        raise ConfigError(f"method 'source' needs curvature: a preconditioner of {CURVATURES}, got {preconditioner!r}")
    accumulator = _Accumulator(q_rows.shape[0])
    u_theta, u_v = q_rows.double(), torch.zeros_like(q_rows, dtype=torch.float64)
    max_runs = max(1, SIDE_BYTES // (4 * q_rows.numel()))
    for segment in reversed(segments(log, names)):
        view = log.select(segment.name)
        blocks = load_curvature(view, preconditioner, 0.0 if damping is None else damping, curvature=curvature)
        runs, run_of_row = step_runs(segment, view.steps, max_runs)
        sides, theta, v = [], [], []
        for name, c in blocks.items():
            columns = slice(None) if name == ROW_GROUP else view.modules[name].columns  # row: one block, all of it
            a, b = c.rotate(u_theta[:, columns]), c.rotate(u_v[:, columns])
            scored, a, b = _through_runs(c.values + c.damping, a, b, runs)
            sides.append(c.unrotate(scored.reshape(-1, scored.shape[-1]).float()).reshape(len(runs), len(a), -1))
            theta.append(c.unrotate(a))
            v.append(c.unrotate(b))
        side = torch.cat(sides, dim=2)  # (runs, Q, D)
        if run_of_row is None:
            _stream(view, side[0], accumulator, block_rows)
        else:
            _stream(view, side, accumulator, block_rows, run_of_row=run_of_row)
        u_theta, u_v = torch.cat(theta, dim=1), torch.cat(v, dim=1)
    train_ids, values = accumulator.result(log.ids.dtype)
    return values, train_ids


def _through_runs(lam: Tensor, a: Tensor, b: Tensor, runs: list[Segment]) -> tuple[Tensor, Tensor, Tensor]:
    """Carry the query side (a, b), in a block's eigenbasis, back through the runs from the last:
    (each run's score side (runs, Q, n) in that basis, a and b at the first run's start). A row's
    gradient moves (theta, v) by (-eta g, g); its score is -dL_q/d eps per use."""
    scored = a.new_empty(len(runs), *a.shape)
    lam = lam.reshape(-1).double()
    for r in range(len(runs) - 1, -1, -1):
        run = runs[r]
        if run.steps == 1 and run.uses == 1:  # one step: the side just after it, then the step's transpose
            eta, m = run.lr, run.momentum
            step_lam = _capped(lam, eta, m)
            scored[r] = eta * a - b
            a, b = a - eta * step_lam * a + step_lam * b, m * (b - eta * a)
            continue
        power, total = segment_powers(lam, run)
        mean_theta = total[:, 0, 0] * a + total[:, 0, 1] * b
        mean_v = total[:, 1, 0] * a + total[:, 1, 1] * b
        scored[r] = (run.lr * mean_theta - mean_v) * (run.uses / run.steps)
        a, b = power[:, 0, 0] * a + power[:, 0, 1] * b, power[:, 1, 0] * a + power[:, 1, 1] * b
    return scored, a, b


def step_runs(segment: Segment, steps: np.ndarray, max_runs: int) -> tuple[list[Segment], np.ndarray | None]:
    """The segment as consecutive runs of steps, each with its own learning rate, and the run that
    holds each row (from the row's step): at most max_runs runs, one per step where they fit.
    ([segment], None) where rows cannot be placed: no per-step rates, `uses` other than 1, or a
    row's step outside the pass's steps (rows given another `step=`)."""
    if segment.lrs is None or segment.uses != 1 or segment.start is None or len(steps) == 0:
        return [segment], None
    position = steps.astype(np.int64) - segment.start
    if position.min() < 0 or position.max() >= segment.steps:
        return [segment], None
    per_run = -(-len(segment.lrs) // max_runs)  # lrs entries per run
    width = segment.lr_bin * per_run  # steps per run
    runs = []
    for first in range(0, segment.steps, width):
        count = min(width, segment.steps - first)
        entries = range(first // segment.lr_bin, -(-(first + count) // segment.lr_bin))
        lr_sum = sum(
            segment.lrs[e] * (min((e + 1) * segment.lr_bin, first + count) - max(e * segment.lr_bin, first))
            for e in entries
        )
        runs.append(Segment(segment.name, count, lr_sum, segment.momentum))
    return runs, position // width


def self_influence_across_training(
    log,
    preconditioner: str = "identity",
    *,
    passes: Sequence[str] | None = None,
    damping=None,
    damping_factor: float | None = None,
    block_rows: int | None = None,
    progress: bool | None = None,
    curvature: str = "auto",
) -> SelfInfluence:
    """sum over passes of eta_k g_i^T P_p g_i for every train id, eta_k the rate of the step that
    used the row (mislabeled examples rank high), as
    `log.self_influence_across_training(preconditioner)`."""
    names = training_passes(log, passes)
    accumulator = _Accumulator(1)
    for segment in segments(log, names):
        view = log.select(segment.name)
        pre = Preconditioner(view, preconditioner, damping, damping_factor, curvature=curvature)
        ids, values = self_influence_values(view, pre, block_rows, progress)
        rates = row_rates(segment, view.steps)
        rates = torch.from_numpy(rates) if isinstance(rates, np.ndarray) else rates
        accumulator.add(np.asarray(ids), values[None] * rates)
    ids, values = accumulator.result(log.ids.dtype)
    return SelfInfluence(values[0], ids)

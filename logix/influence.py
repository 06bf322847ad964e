"""Influence scores over a log: preconditioners, streamed scoring, top-k and self-influence.

    score(q, i) = g_q^T (F + lambda I)^{-1} g_i

Sign convention, everywhere in logix: a POSITIVE score means training example i HELPS query q,
i.e. a gradient step on i lowers q's loss. F is block-diagonal over modules and, per module, one of

    identity  F = 0 and no damping: plain gradient dot products (TracIn at one checkpoint)
    raw       F = mean_i vec(G~_i) vec(G~_i)^T, the projected empirical Fisher
    kfac      F = S (x) A (row-major (k_out, k_in) rows, so S comes first)
    ekfac     F = (Q_S (x) Q_A) diag(Lambda*) (Q_S (x) Q_A)^T

preconditioner="auto" (the default) takes the first of ekfac, kfac, raw the pass has statistics for,
else identity (resolve_preconditioner). Damping lambda is per module: 0.1 x the trace of that
module's block over its unprojected dimension d_in d_out by default (the mean eigenvalue at rank
full; `damping_factor` changes the 0.1), or an absolute value (`damping=`, a float or
{module: float}).
Only the query side is preconditioned at query time; train rows stream from the log in blocks,
one matrix product per block. Normalised modes divide by preconditioned norms:
cosine by both sides', relative (RelatIF) by the train side's, sqrt(g_i^T (F + lambda I)^{-1} g_i).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .disk.results import read_result, write_result
from .disk.statistics import open_statistics
from .errors import ConfigError, LogFormatError, NotInLogError
from .statistics import RAW_MAX_WIDTH, preconditioners

PRECONDITIONERS = ("identity", "raw", "kfac", "ekfac")
AUTO = ("ekfac", "kfac", "raw")  # what preconditioner="auto" takes, the first the pass has statistics for
MODES = ("dot", "cosine", "relative")
DEFAULT_DAMPING_FACTOR = 0.1
# the default damping rule, recorded with the self-influences finalize stores: values stored under
# another rule (an older logix) are recomputed, never reused
DAMPING_RULE = "damping_factor x trace / (d_in d_out)"


@dataclass
class ModuleCurvature:
    """What one module's block needs: eigenvalues to damp and invert, in its eigenbasis."""

    name: str
    k_in: int
    k_out: int
    preconditioner: str  # identity, raw, kfac or ekfac
    vec_a: Tensor | None = None  # (k_in, k_in)   kfac/ekfac eigenbasis, input side
    vec_s: Tensor | None = None  # (k_out, k_out) output side
    values: Tensor | None = None  # (k_out, k_in) for kfac/ekfac; (k_in*k_out,) for raw
    vec_f: Tensor | None = None  # raw: eigenvectors of the dense Fisher
    damping: float = 0.0

    def apply(self, rows: Tensor) -> Tensor:
        """(n, k_out*k_in) -> (F + lambda I)^{-1} rows, in float64."""
        if self.preconditioner == "identity":
            return rows.double()
        return self.apply_function(rows, 1.0 / (self.values + self.damping))

    def rotate(self, rows: Tensor) -> Tensor:
        """(n, k_out*k_in) rows -> their coordinates in the block's eigenbasis, float64, shaped like
        `values` flattened."""
        g = rows.double()
        if self.preconditioner == "raw":
            return g @ self.vec_f
        return (self.vec_s.T @ g.reshape(-1, self.k_out, self.k_in) @ self.vec_a).reshape(rows.shape[0], -1)

    def unrotate(self, coordinates: Tensor) -> Tensor:
        """The inverse of `rotate`: eigenbasis coordinates -> (n, k_out*k_in) rows."""
        if self.preconditioner == "raw":
            return coordinates @ self.vec_f.T
        c = coordinates.reshape(-1, self.k_out, self.k_in)
        return (self.vec_s @ c @ self.vec_a.T).reshape(coordinates.shape[0], -1)

    def apply_function(self, rows: Tensor, multipliers: Tensor) -> Tensor:
        """(n, k_out*k_in) -> f(F) rows in float64, f given by its value at each eigenvalue of F
        (`multipliers`, shaped like `values`): the block's eigenbasis, scaled, and back."""
        g = rows.double()
        if self.preconditioner == "raw":
            return ((g @ self.vec_f) * multipliers) @ self.vec_f.T
        g = g.reshape(-1, self.k_out, self.k_in)
        rotated = (self.vec_s.T @ g @ self.vec_a) * multipliers
        return (self.vec_s @ rotated @ self.vec_a.T).reshape(rows.shape[0], -1)


CURVATURE_SOURCES = ("auto", "own", "sampled")


def statistics_file(log, curvature: str = "auto") -> str:
    """The statistics file the pass's curvature comes from, or a clear error if it has none.

    curvature: "own" is the pass's own rows (the empirical Fisher, gathered while training);
    "sampled" the curvature pass made for it (`start_pass(..., curvature_for=<pass>)`, gradients at
    labels drawn from the model: the true Fisher); "auto" the curvature pass where the log has a
    finalized one, else the pass's own.
    """
    p = log._require_pass()
    if curvature not in CURVATURE_SOURCES:
        raise ConfigError(f"curvature must be one of {CURVATURE_SOURCES}, got {curvature!r}")
    if curvature != "own":
        other = log.curvature_pass()
        if other is not None and other.name in log._stats_files:
            return log._stats_files[other.name]
        if curvature == "sampled":
            why = "none was logged" if other is None else f"{other.name!r} is not finalized"
            raise LogFormatError(
                f"pass {p.name!r} of {log.path} has no sampled-label curvature ({why}): log one with "
                f"run.start_pass(..., curvature_for={p.name!r}), or use curvature='own'"
            )
    name = log._stats_files.get(p.name)
    if name is None:
        why = "it is not finalized" if not p.finalized else "the log was written without statistics="
        raise LogFormatError(
            f"pass {p.name!r} of {log.path} has no curvature statistics ({why}); "
            "finalize the run (logix.init(..., statistics='ekfac')) or use preconditioner='identity'"
        )
    return name


def available_preconditioners(log) -> list[str]:
    """What the current pass can be scored with: identity always; the rest once it is finalized."""
    p = log.current
    if p is None or not p.finalized:
        return ["identity"]
    return preconditioners(log.config.statistics)


def resolve_preconditioner(log, preconditioner: str) -> str:
    """ "auto" -> the first of ekfac, kfac, raw the current pass has statistics for (raw only when
    every module has it), else identity; any other name is returned as it is.

    EK-FAC first: on both tasks of benchmarks/attribution_quality.py it is the best on the language
    model and within 0.03 LDS of the best on digits at every rank (K-FAC is 0.01 to 0.03 ahead
    there, 0.02 behind on the language model)."""
    if preconditioner != "auto":
        return preconditioner
    if log.current is None or log.current.name not in log._stats_files:  # e.g. a finalized pass with no rows
        return "identity"
    have = available_preconditioners(log)
    narrow = all(m.width <= RAW_MAX_WIDTH for m in log.modules.values())
    return next((p for p in AUTO if p in have and (p != "raw" or narrow)), "identity")


def load_curvature(
    log, preconditioner: str, damping=None, damping_factor=DEFAULT_DAMPING_FACTOR, names=None, curvature="auto"
):
    """{module: ModuleCurvature} for the current pass (some modules only), damping resolved per module;
    `curvature` says whose statistics (see statistics_file)."""
    if preconditioner not in PRECONDITIONERS:
        raise ConfigError(f"preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
    if curvature not in CURVATURE_SOURCES:
        raise ConfigError(f"curvature must be one of {CURVATURE_SOURCES}, got {curvature!r}")
    names = list(log.modules) if names is None else names
    if preconditioner == "identity":
        return build_curvature(log.modules, names, preconditioner, None, damping, damping_factor)
    with open_statistics(log.path / statistics_file(log, curvature)) as stats:
        return build_curvature(log.modules, names, preconditioner, stats.module, damping, damping_factor)


def build_curvature(
    modules, names, preconditioner: str, statistics, damping=None, damping_factor=DEFAULT_DAMPING_FACTOR
) -> dict[str, ModuleCurvature]:
    """{module: ModuleCurvature} from each module's statistics: statistics(name) has has(key) and
    array(key, shape, eigenvalues) (a statistics file's group, or arrays finalize holds in memory)."""
    out = {}
    for name in names:
        m = modules[name]
        c = ModuleCurvature(name, m.k_in, m.k_out, preconditioner)
        out[name] = c
        if preconditioner == "identity":
            continue
        group = statistics(name)
        if preconditioner == "raw":
            if not group.has("fisher_eig"):
                raise LogFormatError(f"module {name!r}: no raw Fisher in this log (statistics=['raw'] at init)")
            w = m.k_in * m.k_out
            c.values = group.array("fisher_eig", (w,), eigenvalues=True)
            c.vec_f = group.array("fisher_vec", (w, w))
            continue
        if not group.has("vec_a"):
            raise LogFormatError(f"module {name!r}: no K-FAC factors in this log (statistics='kfac')")
        c.vec_a = group.array("vec_a", (m.k_in, m.k_in))
        c.vec_s = group.array("vec_s", (m.k_out, m.k_out))
        if preconditioner == "kfac":
            eig_a = group.array("eig_a", (m.k_in,), eigenvalues=True)
            eig_s = group.array("eig_s", (m.k_out,), eigenvalues=True)
            c.values = eig_s[:, None] * eig_a[None, :]
        else:
            if not group.has("lambda_star"):
                raise LogFormatError(f"module {name!r}: no EK-FAC eigenvalues (statistics='ekfac')")
            c.values = group.array("lambda_star", (m.k_out, m.k_in), eigenvalues=True)
    for name, c in out.items():
        if c.values is not None:
            m = modules[name]
            c.damping = _damping(name, c.values, damping, damping_factor, m.d_in * m.d_out)
    return out


def _damping(name: str, values: Tensor, damping, factor: float, unprojected: int) -> float:
    """The module's lambda: given (a float or {module: float}), or factor x its block's trace over
    the unprojected dimension d_in d_out. A Gaussian projection keeps the trace but shrinks the
    dimension, so the mean eigenvalue of a projected block grows as the rank falls; measured
    against the unprojected dimension, the default means the same at every rank (at rank full it
    is the block's mean eigenvalue)."""
    if isinstance(damping, dict):
        if name not in damping:
            raise ConfigError(f"damping given per module but not for {name!r}")
        damping = damping[name]
    if damping is not None:
        value = _number(damping)
        if value is None or not np.isfinite(value) or value < 0:
            raise ConfigError(f"damping must be a non-negative number, got {damping!r}")
        return value
    value = _number(factor)
    if value is None or not np.isfinite(value) or value <= 0:
        raise ConfigError(f"damping_factor must be a positive number, got {factor!r}")
    factor = value
    lam = factor * float(values.sum()) / unprojected
    if lam <= 0:  # an all-zero block: any positive damping inverts it
        lam = factor
    return lam


def _number(value) -> float | None:
    """A real number given as int, float, or a numpy / one-element torch scalar; None otherwise."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            return None
        return float(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value)


class Preconditioner:
    """All modules' curvature, applied to full rows (or to the selected modules' columns)."""

    def __init__(
        self,
        log,
        preconditioner: str,
        damping=None,
        damping_factor: float = DEFAULT_DAMPING_FACTOR,
        modules=None,
        curvature: str = "auto",
    ):
        preconditioner = resolve_preconditioner(log, preconditioner)
        self.preconditioner = preconditioner
        names = list(log.modules) if modules is None else _module_names(modules)
        for n in names:
            if n not in log.modules:
                raise NotInLogError(f"module {n!r} is not in this log; logged modules: {list(log.modules)}")
        self._use(log, load_curvature(log, preconditioner, damping, damping_factor, names, curvature))

    @classmethod
    def from_curvature(cls, log, preconditioner: str, blocks: dict) -> Preconditioner:
        """A Preconditioner over curvature already built (finalize's, before it is on disk)."""
        self = cls.__new__(cls)
        self.preconditioner = preconditioner
        self._use(log, blocks)
        return self

    def _use(self, log, blocks: dict) -> None:
        names = list(blocks)
        self.parts = [(log.modules[n].columns, blocks[n]) for n in names]
        self._whole_row = names == list(log.modules)  # modules sit in log order: rows need no gather

    def columns(self, rows: Tensor) -> Tensor:
        """The selected modules' columns of full rows, side by side."""
        if self._whole_row:
            return rows
        return torch.cat([rows[:, cols] for cols, _ in self.parts], dim=1)

    def apply(self, rows: Tensor) -> Tensor:
        """Full rows (n, D) -> preconditioned selected columns (n, D_sel), float64."""
        return torch.cat([c.apply(rows[:, cols]) for cols, c in self.parts], dim=1)


def _progress(total: int, progress: bool | None, what: str):
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    return tqdm(total=total, desc=what, unit="rows", disable=disable, leave=False)


def self_influence_values(
    log, pre: Preconditioner, block_rows: int | None = None, progress=None
) -> tuple[np.ndarray, Tensor]:
    """(ids, g_i^T (F + lambda I)^{-1} g_i) for every valid row, preconditioning blockwise."""
    ids, values = self_influences(log, {"": pre}, block_rows, progress)
    return ids, values[""]


def self_influences(
    log, pres: dict[str, Preconditioner], block_rows: int | None = None, progress=None
) -> tuple[np.ndarray, dict[str, Tensor]]:
    """Self-influence under several preconditioners with one read of the rows."""
    ids, values = [], {name: [] for name in pres}
    with _progress(len(log), progress, "self-influence") as bar:
        for block_ids, rows in log.blocks(block_rows=block_rows, recycle=True):
            for name, pre in pres.items():
                values[name].append((pre.columns(rows).double() * pre.apply(rows)).sum(dim=1))
            ids.append(block_ids)
            bar.update(len(block_ids))
    if not ids:
        empty = torch.zeros(0, dtype=torch.float64)
        return np.zeros(0, dtype=log.ids.dtype), {name: empty for name in pres}
    return np.concatenate(ids), {name: torch.cat(v) for name, v in values.items()}


def as_ids(ids) -> np.ndarray:
    """ids in the results' convention, as `Log.ids` gives them: int64, or an object array of str."""
    if isinstance(ids, Tensor):
        ids = ids.numpy()
    array = np.asarray(ids)
    if array.dtype.kind in "iu":
        return array.astype(np.int64, copy=False)
    if array.dtype.kind == "U":  # a list of str: numpy picks fixed-width unicode; ids stay Python str
        return array.astype(object)
    if array.size == 0:
        return array if array.dtype.kind == "O" else array.astype(np.int64)
    if array.dtype.kind == "O" and isinstance(array.flat[0], str):  # Log.ids' form for string ids
        return array
    if array.dtype.kind == "O" and isinstance(array.flat[0], (int, np.integer)):
        return array.astype(np.int64)
    raise TypeError(f"ids must be ints or strings, got an array of {array.dtype}")


def _values(values) -> Tensor:
    return values if isinstance(values, Tensor) else torch.as_tensor(np.asarray(values))


class _Saved:
    """save(path) / load(path): a result as plain HDF5 datasets (logix.disk.results)."""

    def _saved_fields(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}

    def save(self, path) -> None:
        fields = {k: v if isinstance(v, Tensor) else as_ids(v) for k, v in self._saved_fields().items()}
        write_result(path, type(self).__name__, fields)

    @classmethod
    def load(cls, path):
        fields = read_result(path, cls.__name__)
        return cls(**{k: v if k == "values" else as_ids(v) for k, v in fields.items()})


def _same_queries(parts) -> np.ndarray | None:
    """The query ids every part shares; parts scored for different queries cannot be merged."""
    first = parts[0].query_ids
    for part in parts[1:]:
        same = part.query_ids is None if first is None else np.array_equal(part.query_ids, first)
        if not same:
            raise ConfigError("the parts were scored for different queries: merge parts of the same query only")
    return first


class _TopKFields(NamedTuple):
    ids: np.ndarray
    values: Tensor


class TopK(_Saved, _TopKFields):
    """The k best train ids and their scores, best first: a named tuple, so `ids, values = top` unpacks.

    ids: numpy (int64, or object str, as `Log.ids`), values: a torch tensor of the same shape,
    (Q, k) per query (row q for query_ids[q]) or (k,) from `SelfInfluence.top_k`. `query_ids`
    (numpy, or None for a self-influence top-k) is an attribute, not a field, so unpacking gives two.
    """

    query_ids: np.ndarray | None = None  # also the value when a tuple method builds one without __new__

    def __new__(cls, ids, values, query_ids=None):
        self = super().__new__(cls, as_ids(ids), _values(values))
        self.query_ids = None if query_ids is None else as_ids(query_ids)
        return self

    def _saved_fields(self) -> dict:
        fields = {"ids": self.ids, "values": self.values, "query_ids": self.query_ids}
        return {k: v for k, v in fields.items() if v is not None}

    def _replace(self, **changes) -> TopK:  # the tuple's own would drop query_ids
        return type(self)(changes.get("ids", self.ids), changes.get("values", self.values), self.query_ids)

    def __repr__(self) -> str:
        k = self.values.shape[-1]
        if self.query_ids is None:
            return f"TopK(k={k})"
        return f"TopK(queries={len(self.query_ids)}, k={k})"

    @classmethod
    def merge(cls, parts: list[TopK], largest: bool = True) -> TopK:
        """The top-k over all parts (shards of the train rows scored separately for the same queries)."""
        query_ids = _same_queries(parts)
        k = max(part.values.shape[-1] for part in parts)
        values = torch.cat([part.values for part in parts], dim=-1)
        ids = np.concatenate([part.ids for part in parts], axis=-1)
        values, index = torch.topk(values, min(k, values.shape[-1]), dim=-1, largest=largest)
        return cls(np.take_along_axis(ids, index.numpy(), axis=-1), values, query_ids)


@dataclass(repr=False)
class Scores(_Saved):
    """values[q, i]: influence of train example train_ids[i] on query query_ids[q] (+ = helps).

    values: a (Q, N) float32 torch tensor; query_ids, train_ids: numpy (int64, or object str, as `Log.ids`).
    """

    values: Tensor  # (Q, N) float32
    query_ids: np.ndarray
    train_ids: np.ndarray

    def __post_init__(self):
        self.values = _values(self.values)
        self.query_ids, self.train_ids = as_ids(self.query_ids), as_ids(self.train_ids)

    def __repr__(self) -> str:
        return f"Scores(queries={len(self.query_ids)}, train={len(self.train_ids)})"

    @classmethod
    def merge(cls, parts: list[Scores]) -> Scores:
        """The scores of all parts side by side (shards of the train rows, in shard order)."""
        query_ids = _same_queries(parts)
        values = torch.cat([part.values for part in parts], dim=1)
        return cls(values, query_ids, np.concatenate([part.train_ids for part in parts]))

    def top_k(self, k: int, largest: bool = True) -> TopK:
        """The k most helpful train ids per query (largest=False: the k most harmful)."""
        k = min(k, self.values.shape[1])
        values, index = torch.topk(self.values, k, dim=1, largest=largest)
        return TopK(self.train_ids[index.numpy()], values, self.query_ids)


@dataclass(repr=False)
class SelfInfluence(_Saved):
    """values[i] = g_i^T (F + lambda I)^{-1} g_i for train id ids[i]: high = atypical or mislabeled.

    values: an (N,) float64 torch tensor; ids: numpy (int64, or object str, as `Log.ids`).
    """

    values: Tensor  # (N,) float64
    ids: np.ndarray

    def __post_init__(self):
        self.values, self.ids = _values(self.values), as_ids(self.ids)

    def __repr__(self) -> str:
        return f"SelfInfluence(train={len(self.ids)})"

    def top_k(self, k: int, largest: bool = True) -> TopK:
        """TopK (ids, values) of the k highest (or lowest) self-influences; its query_ids is None."""
        k = min(k, len(self.ids))
        values, index = torch.topk(self.values, k, largest=largest)
        return TopK(self.ids[index.numpy()], values)


def _module_names(modules) -> list[str]:
    """A list of distinct module names (a lone string is one name, not its characters)."""
    names = [modules] if isinstance(modules, str) else modules
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"modules must be a list of module names, got {modules!r}")
    if not names:
        raise ConfigError("modules is empty: name at least one module, or pass None for all")
    if len(set(names)) != len(names):
        raise ConfigError(f"modules names a module more than once: {list(names)}")
    return list(names)


def _train_ids(log, train_ids) -> np.ndarray:
    """train_ids as an array of the log's id kind; anything else is a ConfigError, never a silent miss."""
    if isinstance(train_ids, (str, bytes, int)) or not hasattr(train_ids, "__iter__"):
        raise ConfigError(f"train_ids must be a list of ids, got {type(train_ids).__name__} {train_ids!r}")
    values = train_ids.tolist() if hasattr(train_ids, "tolist") else list(train_ids)
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
    return slice(start, stop), int(log._valid()[:start].sum())


@dataclass(frozen=True)
class ScoreOptions:
    """How `log.influence` scores: the options that travel together from the call to the loop
    (what each means: `Log.influence`)."""

    preconditioner: str = "auto"
    damping: Any = None
    damping_factor: float = DEFAULT_DAMPING_FACTOR
    mode: str = "dot"
    top_k: int | None = None
    largest: bool = True
    modules: Any = None
    train_ids: Any = None
    block_rows: int | None = None
    progress: bool | None = None
    shard: tuple[int, int] | None = None
    curvature: str = "auto"


def score(log, query, options: ScoreOptions):
    """Scores (or, with top_k, a streamed TopK) of the query rows against the log's train rows."""
    o = options
    preconditioner, damping, damping_factor, mode = o.preconditioner, o.damping, o.damping_factor, o.mode
    top_k, largest, modules, train_ids, curvature = o.top_k, o.largest, o.modules, o.train_ids, o.curvature
    block_rows, progress, shard = o.block_rows, o.progress, o.shard
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k must be a positive int, got {top_k!r}")
    q_rows, q_ids = query.rows, as_ids(query.ids)
    if q_rows.shape[0] == 0:
        raise ConfigError("the query holds no rows: capture query gradients with q.capture(ids) first")
    if q_rows.shape[1] != log.width:
        raise ConfigError(f"query rows have {q_rows.shape[1]} columns, the log {log.width}: not this log's query")
    pre = Preconditioner(log, preconditioner, damping, damping_factor, modules, curvature)
    q_pre = pre.apply(q_rows).float()
    scale_q = torch.ones(q_rows.shape[0])
    if mode == "cosine":
        scale_q = (pre.columns(q_rows).double() * q_pre.double()).sum(dim=1).clamp_min(0).sqrt().float()
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
    with _progress(len(log), progress, "scoring") as bar:
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

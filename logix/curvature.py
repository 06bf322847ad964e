"""Curvature of a pass, ready to apply: per-module eigenbases and damped eigenvalues, and its
quadratic form on every row (self-influence).

    (F + lambda I)^{-1} g, with F block-diagonal over modules and, per module, one of

    identity  F = 0 and no damping: plain gradient dot products (TracIn at one checkpoint)
    raw       F = mean_i vec(G~_i) vec(G~_i)^T, the projected empirical Fisher
    kfac      F = S (x) A (row-major (k_out, k_in) rows, so S comes first)
    ekfac     F = (Q_S (x) Q_A) diag(Lambda*) (Q_S (x) Q_A)^T
    row       not block-diagonal: F = mean_i r_i r_i^T over whole rows r_i (D x D), one block

preconditioner="auto" (the default, resolve_preconditioner) takes row where the curvature comes from
a curvature pass (labels drawn from the model) that has it, else the first of ekfac, kfac, raw, row
the pass has statistics for, else identity. Damping lambda is per module: 0.1 x the trace of that
module's block over its unprojected dimension d_in d_out by default (the mean eigenvalue at rank
full; `damping_factor` changes the 0.1), or an absolute value (`damping=`, a float or
{module: float}); for row, 0.3 x trace(F) / D (its mean eigenvalue), or one absolute value.
`curvature=` says whose statistics: the pass's own rows, or the curvature pass logged for it
(statistics_file). The curvature is built from a statistics file, or from the arrays
finalize holds in memory before it writes one (build_curvature, Preconditioner.from_curvature).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .disk.statistics import RAW_MAX_WIDTH, ROW_GROUP, open_statistics, preconditioners
from .errors import ConfigError, LogFormatError, NotInLogError
from .progress import progress_bar
from .scalars import real_number, shown

PRECONDITIONERS = ("identity", "raw", "kfac", "ekfac", "row")
AUTO = ("ekfac", "kfac", "raw")  # what preconditioner="auto" takes, the first the pass has statistics for
DEFAULT_DAMPING_FACTOR = 0.1  # per module block
ROW_DAMPING_FACTOR = 0.3  # the whole row's: best of 0.1 / 0.3 / 1 on both tasks of benchmarks/row_fisher.py
# the default damping rules, recorded with the self-influences finalize stores: values stored under
# another rule (an older logix) are recomputed, never reused
DAMPING_RULE = "damping_factor x trace / (d_in d_out)"
ROW_DAMPING_RULE = "damping_factor x trace / D"


def default_damping(preconditioner: str) -> tuple[str, float]:
    """(rule, factor) of the default damping of a preconditioner."""
    if preconditioner == "row":
        return ROW_DAMPING_RULE, ROW_DAMPING_FACTOR
    return DAMPING_RULE, DEFAULT_DAMPING_FACTOR


@dataclass
class ModuleCurvature:
    """What one module's block needs: eigenvalues to damp and invert, in its eigenbasis."""

    name: str
    k_in: int
    k_out: int
    preconditioner: str  # identity, raw, kfac, ekfac; or row (one block over the whole row: k_in = D, k_out = 1)
    vec_a: Tensor | None = None  # (k_in, k_in)   kfac/ekfac eigenbasis, input side
    vec_s: Tensor | None = None  # (k_out, k_out) output side
    values: Tensor | None = None  # (k_out, k_in) for kfac/ekfac; (k_in*k_out,) for raw and row
    vec_f: Tensor | None = None  # raw and row: eigenvectors of the dense Fisher
    damping: float = 0.0
    modules: list | None = None  # row: the modules whose columns the block spans, in row order

    @property
    def dense(self) -> bool:
        """Whether the block is a dense Fisher in its own eigenbasis (raw, row), not Kronecker factors."""
        return self.preconditioner in ("raw", "row")

    def apply(self, rows: Tensor) -> Tensor:
        """(n, k_out*k_in) -> (F + lambda I)^{-1} rows, in float64."""
        if self.preconditioner == "identity":
            return rows.double()
        return self.apply_function(rows, 1.0 / (self.values + self.damping))

    def rotate(self, rows: Tensor) -> Tensor:
        """(n, k_out*k_in) rows -> their coordinates in the block's eigenbasis, float64, shaped like
        `values` flattened."""
        g = rows.double()
        if self.dense:
            return g @ self.vec_f
        return (self.vec_s.T @ g.reshape(-1, self.k_out, self.k_in) @ self.vec_a).reshape(rows.shape[0], -1)

    def unrotate(self, coordinates: Tensor) -> Tensor:
        """The inverse of `rotate`: eigenbasis coordinates -> (n, k_out*k_in) rows, in the
        coordinates' dtype (float32 ones are rotated in float32: twice as fast, for results kept
        in float32 anyway)."""
        dtype = coordinates.dtype
        if self.dense:
            return coordinates @ self.vec_f.to(dtype).T
        c = coordinates.reshape(-1, self.k_out, self.k_in)
        return (self.vec_s.to(dtype) @ c @ self.vec_a.to(dtype).T).reshape(coordinates.shape[0], -1)

    def apply_function(self, rows: Tensor, multipliers: Tensor) -> Tensor:
        """(n, k_out*k_in) -> f(F) rows in float64, f given by its value at each eigenvalue of F
        (`multipliers`, shaped like `values`): the block's eigenbasis, scaled, and back."""
        g = rows.double()
        if self.dense:
            return ((g @ self.vec_f) * multipliers) @ self.vec_f.T
        g = g.reshape(-1, self.k_out, self.k_in)
        rotated = (self.vec_s.T @ g @ self.vec_a) * multipliers
        return (self.vec_s @ rotated @ self.vec_a.T).reshape(rows.shape[0], -1)


CURVATURE_SOURCES = ("auto", "own", "sampled")


def check_curvature(curvature) -> None:
    if not isinstance(curvature, str) or curvature not in CURVATURE_SOURCES:
        raise ConfigError(f"curvature must be one of {CURVATURE_SOURCES}, got {curvature!r}")


def statistics_file(log, curvature: str = "auto") -> str:
    """The statistics file the pass's curvature comes from, or a clear error if it has none.

    curvature: "own" is the pass's own rows (the empirical Fisher, gathered while training);
    "sampled" the curvature pass made for it (`start_pass(..., curvature_for=<pass>)`, gradients at
    labels drawn from the model: the true Fisher); "auto" the curvature pass where the log has a
    finalized one, else the pass's own.
    """
    p = log.pass_info()
    files = log.statistics_files
    check_curvature(curvature)
    if curvature != "own":
        other = log.curvature_pass()
        if other is not None and other.name in files:
            return files[other.name]
        if curvature == "sampled":
            why = "none was logged" if other is None else f"{other.name!r} is not finalized"
            raise LogFormatError(
                f"pass {p.name!r} of {log.path} has no sampled-label curvature ({why}): log one with "
                f"run.start_pass(..., curvature_for={p.name!r}), or use curvature='own'"
            )
    name = files.get(p.name)
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


def resolve_preconditioner(log, preconditioner: str, curvature: str = "auto") -> str:
    """ "auto" -> row where the curvature comes from a curvature pass (labels drawn from the model,
    `curvature` as in statistics_file) that has it; else the first of ekfac, kfac, raw, row the
    current pass has statistics for (raw only when every module has it); else identity. Any other
    name is returned as it is.

    Row first, from sampled labels: at rank 16's bytes it scores above full-rank EK-FAC on both
    tasks of benchmarks/row_fisher.py (0.71 against 0.62 LDS on digits, 0.61 against 0.55 on the
    language model); from the pass's own rows (the empirical Fisher) it is behind EK-FAC on the
    language model, so there it comes after the per-module blocks. Then EK-FAC: on both tasks of
    benchmarks/attribution_quality.py it is the best per-module block on the language model and
    within 0.03 LDS of the best on digits (K-FAC is 0.01 to 0.03 ahead there)."""
    if not isinstance(preconditioner, str) or preconditioner not in ("auto", *PRECONDITIONERS):
        raise ConfigError(f"preconditioner must be one of {('auto', *PRECONDITIONERS)}, got {preconditioner!r}")
    if preconditioner != "auto":
        return preconditioner
    if log.current is None or log.current.name not in log.statistics_files:  # e.g. a finalized pass with no rows
        return "identity"
    have = available_preconditioners(log)
    if "row" in have and curvature != "own":
        sampled = log.curvature_pass()
        if sampled is not None and sampled.name in log.statistics_files:
            return "row"
    narrow = all(m.width <= RAW_MAX_WIDTH for m in log.modules.values())
    return next((p for p in (*AUTO, "row") if p in have and (p != "raw" or narrow)), "identity")


def load_curvature(log, preconditioner: str, damping=None, damping_factor=None, names=None, curvature="auto"):
    """{module: ModuleCurvature} for the current pass (some modules only), damping resolved per module
    ({ROW_GROUP: one block over the modules' columns} for row); `curvature` says whose statistics
    (see statistics_file)."""
    if preconditioner not in PRECONDITIONERS:
        raise ConfigError(f"preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
    check_curvature(curvature)
    names = list(log.modules) if names is None else names
    damping, damping_factor = check_damping(damping, damping_factor, log.modules)
    if preconditioner == "identity":
        return build_curvature(log.modules, names, preconditioner, None, damping, damping_factor)
    with open_statistics(log.path / statistics_file(log, curvature)) as stats:
        return build_curvature(log.modules, names, preconditioner, stats.module, damping, damping_factor)


def build_curvature(
    modules, names, preconditioner: str, statistics, damping=None, damping_factor=None
) -> dict[str, ModuleCurvature]:
    """{module: ModuleCurvature} from each module's statistics: statistics(name) has has(key) and
    array(key, shape, eigenvalues) (a statistics file's group, or arrays finalize holds in memory)."""
    if preconditioner == "row":
        return {ROW_GROUP: _row_curvature(modules, names, statistics, damping, damping_factor)}
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
            c.damping = _damping(name, c.values, damping, damping_factor or DEFAULT_DAMPING_FACTOR, m.d_in * m.d_out)
    return out


def _row_curvature(modules, names, statistics, damping, damping_factor) -> ModuleCurvature:
    """The whole row's Fisher as one block over the columns of `names` (all modules: as stored; some:
    the stored Fisher's sub-block on their columns, decomposed again), damped by damping_factor x
    its trace over its width (its mean eigenvalue), or by `damping`, one number."""
    if isinstance(damping, dict):
        raise ConfigError("preconditioner='row' is one block over the whole row: give damping as one number")
    width = sum(m.width for m in modules.values())
    try:
        group = statistics(ROW_GROUP)
    except LogFormatError:
        group = None
    if group is None or not group.has("fisher_eig"):
        raise LogFormatError("no Fisher over the whole row in this log (logix.init(..., statistics=[..., 'row']))")
    values = group.array("fisher_eig", (width,), eigenvalues=True)
    vectors = group.array("fisher_vec", (width, width))
    if names != list(modules):
        part = vectors[row_columns(modules, names)]
        values, vectors = torch.linalg.eigh((part * values) @ part.T)
        values = values.clamp_min(0.0)
    c = ModuleCurvature(ROW_GROUP, len(values), 1, "row", values=values, vec_f=vectors, modules=list(names))
    c.damping = _damping(ROW_GROUP, values, damping, damping_factor or ROW_DAMPING_FACTOR, len(values))
    return c


def row_columns(modules, names) -> Tensor:
    """The row positions of the modules `names`, side by side in that order."""
    return torch.cat([torch.arange(modules[n].columns.start, modules[n].columns.stop) for n in names])


def check_damping(damping, damping_factor, modules) -> tuple[float | dict[str, float] | None, float | None]:
    """(damping, damping_factor) checked and as floats, whatever the preconditioner (identity uses
    neither, but a bad value is still a mistake to name): damping None, a non-negative number or
    {module: number} naming modules of the log (`modules`), damping_factor a positive number or
    None (the preconditioner's default: DEFAULT_DAMPING_FACTOR per module, ROW_DAMPING_FACTOR for row)."""
    if isinstance(damping, dict):
        for name in damping:
            if not isinstance(name, str):
                raise ConfigError(f"damping per module is keyed by module names, got the key {name!r}")
            if name not in modules:
                raise NotInLogError(f"damping names module {name!r}, which is not in this log: {list(modules)}")
        damping = {name: _damping_value(value) for name, value in damping.items()}
    elif damping is not None:
        damping = _damping_value(damping)
    if damping_factor is None:
        return damping, None
    factor = real_number(damping_factor)
    if factor is None or not math.isfinite(factor) or factor <= 0:
        raise ConfigError(f"damping_factor must be a positive number, got {shown(damping_factor)}")
    return damping, factor


def _damping_value(damping) -> float:
    value = real_number(damping)
    if value is None or not math.isfinite(value) or value < 0:
        raise ConfigError(f"damping must be a non-negative number (or {{module: number}}), got {shown(damping)}")
    return value


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
        return _damping_value(damping)
    factor = check_damping(None, factor, ())[1]
    lam = factor * float(values.sum()) / unprojected
    if lam <= 0:  # an all-zero block: any positive damping inverts it
        lam = factor
    return lam


class Preconditioner:
    """All modules' curvature, applied to full rows (or to the selected modules' columns)."""

    def __init__(
        self,
        log,
        preconditioner: str,
        damping=None,
        damping_factor: float | None = None,
        modules=None,
        curvature: str = "auto",
    ):
        preconditioner = resolve_preconditioner(log, preconditioner, curvature)
        self.preconditioner = preconditioner
        names = list(log.modules) if modules is None else _module_names(modules)
        for n in names:
            if n not in log.modules:
                raise NotInLogError(f"module {n!r} is not in this log; logged modules: {list(log.modules)}")
        self._use(log.modules, load_curvature(log, preconditioner, damping, damping_factor, names, curvature))

    @classmethod
    def from_curvature(cls, modules: dict, preconditioner: str, blocks: dict) -> Preconditioner:
        """A Preconditioner over curvature already built (finalize's, before it is on disk), for
        rows laid out as `modules` ({name: ModuleInfo}) says."""
        self = cls.__new__(cls)
        self.preconditioner = preconditioner
        self._use(modules, blocks)
        return self

    def _use(self, modules: dict, blocks: dict) -> None:
        row = blocks.get(ROW_GROUP)
        names = list(blocks) if row is None else row.modules
        self._whole_row = names == list(modules)  # modules sit in log order: rows need no gather
        if row is None:
            self.parts = [(modules[n].columns, blocks[n]) for n in names]
        else:  # one block over the selected modules' columns, side by side
            self.parts = [(slice(None) if self._whole_row else row_columns(modules, names), row)]

    def columns(self, rows: Tensor) -> Tensor:
        """The selected modules' columns of full rows, side by side."""
        if self._whole_row:
            return rows
        return torch.cat([rows[:, cols] for cols, _ in self.parts], dim=1)

    def apply(self, rows: Tensor) -> Tensor:
        """Full rows (n, D) -> preconditioned selected columns (n, D_sel), float64."""
        return torch.cat([c.apply(rows[:, cols]) for cols, c in self.parts], dim=1)

    def self_products(self, rows: Tensor) -> Tensor:
        """(n,) float64: g^T (F + lambda I)^{-1} g for each full row g (over the selected modules)."""
        return (self.columns(rows).double() * self.apply(rows)).sum(dim=1)


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


def self_influence_values(
    log, pre: Preconditioner, block_rows: int | None = None, progress=None
) -> tuple[np.ndarray, Tensor]:
    """(ids, g_i^T (F + lambda I)^{-1} g_i) for every valid row of the log, preconditioning blockwise."""
    blocks = log.blocks(block_rows=block_rows, recycle=True)
    ids, values = self_influences(blocks, {"": pre}, len(log), progress, log.ids.dtype)
    return ids, values[""]


def self_influences(
    blocks, pres: dict[str, Preconditioner], total: int, progress=None, id_dtype=np.int64
) -> tuple[np.ndarray, dict[str, Tensor]]:
    """Self-influence under several preconditioners with one pass over `blocks`, (ids, float32 rows)
    of valid rows (a log's or a PassRows' blocks); total: how many rows they hold (for progress),
    id_dtype: the ids' dtype when there are none."""
    ids, values = [], {name: [] for name in pres}
    with progress_bar(total, progress, "self-influence") as bar:
        for block_ids, rows in blocks:
            for name, pre in pres.items():
                values[name].append(pre.self_products(rows))
            ids.append(block_ids)
            bar.update(len(block_ids))
    if not ids:
        empty = torch.zeros(0, dtype=torch.float64)
        return np.zeros(0, dtype=id_dtype), {name: empty for name in pres}
    return np.concatenate(ids), {name: torch.cat(v) for name, v in values.items()}

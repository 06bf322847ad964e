"""Curvature statistics in the projected space: K-FAC factors gathered during capture, and what
finalize derives from them (eigenbases, EK-FAC eigenvalues, the raw projected Fisher).

Per module, with a~ = P_in a (bias 1 appended) and d~ = P_out d, d from each example's own loss:

    A = mean over unmasked positions of a~ a~^T            (k_in x k_in)
    S = mean over examples of sum_t d~_t d~_t^T             (k_out x k_out)

A logged row is vec(G~) row-major over (k_out, k_in), so vec(d~ a~^T) = d~ (x) a~ and the K-FAC
approximation of the projected Fisher is S (x) A. EK-FAC keeps the eigenbasis Q_S (x) Q_A and
replaces the eigenvalues by Lambda*_jk = mean_i (Q_S^T G~_i Q_A)_jk^2, which finalize computes with one
read of the logged rows. Both are approximations when the parameters move during logging.

Sums accumulate on the device in float64 with their counts; a batch whose contribution is not
finite is left out and counted (no host sync in the hot path); decompositions run in float64.

`derive` is pure computation: it takes the modules, an iterator of row blocks (the one scoring
reads) and the summed factors, and returns arrays; it neither opens nor writes a file
(logix.finalize feeds it and has the disk wing write what it returns).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .disk.statistics import RAW_MAX_WIDTH, ROW_GROUP, SUM_KEYS
from .errors import StatisticsError


class _ShapeSums:
    """The sums of every module with one (k_in, k_out) on one device, stacked: one slot per module,
    so a group of calls adds in with one operation per array whatever its number of modules."""

    def __init__(self, k_in: int, k_out: int, device: torch.device):
        self.k_in, self.k_out, self.device = k_in, k_out, device
        self.names: list[str] = []
        self.slots: dict[tuple, Tensor] = {}  # a group's module names -> their slot indices
        self.totals: dict[str, Tensor] = {}  # a_sum, s_sum (float64); a_count, s_count, skipped
        self.batch: dict[str, Tensor] | None = None  # this batch: a, s (float32), positions, seen
        self.examples = None

    def _zeros(self, n: int, name: str, dtype=torch.float64) -> Tensor:
        side = {"a": self.k_in, "a_sum": self.k_in, "s": self.k_out, "s_sum": self.k_out}.get(name)
        shape = (n,) if side is None else (n, side, side)
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def _slots(self, names: tuple) -> Tensor:
        idx = self.slots.get(names)
        if idx is None:
            new = [n for n in dict.fromkeys(names) if n not in self.names]
            if new:  # modules first seen: every stacked array grows by their slots
                self.names += new
                for store, dtype in ((self.totals, torch.float64), (self.batch or {}, None)):
                    for key, value in store.items():
                        grown = self._zeros(len(new), key, value.dtype if dtype is None else dtype)
                        store[key] = torch.cat([value, grown])
            idx = torch.tensor([self.names.index(n) for n in names], device=self.device)
            self.slots[names] = idx
        return idx

    def add(self, names: tuple, a_cov: Tensor, s_cov: Tensor, positions, examples) -> None:
        idx = self._slots(names)
        n = len(self.names)
        if self.batch is None:
            self.batch = {
                "a": self._zeros(n, "a", a_cov.dtype),
                "s": self._zeros(n, "s", s_cov.dtype),
                "positions": self._zeros(n, "positions"),
                "seen": self._zeros(n, "seen"),
            }
        self.batch["a"].index_add_(0, idx, a_cov)
        self.batch["s"].index_add_(0, idx, s_cov)
        positions = positions.double().expand(len(names)) if isinstance(positions, Tensor) else (
            torch.full((len(names),), float(positions), dtype=torch.float64, device=self.device))  # fmt: skip
        self.batch["positions"].index_add_(0, idx, positions)
        self.batch["seen"].index_fill_(0, idx, 1.0)
        self.examples = examples  # the same for every call of a capture

    def close(self, factor) -> None:
        """Fold the batch in: each module's contribution if all of it is finite, else count it skipped."""
        batch, self.batch = self.batch, None
        if batch is None:
            return
        n = len(self.names)
        if not self.totals:
            self.totals = {key: self._zeros(n, key) for key in (*SUM_KEYS, "batches")}
        s = batch["s"] / (factor * factor)
        ok = torch.isfinite(batch["a"]).flatten(1).all(1) & torch.isfinite(s).flatten(1).all(1)
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.totals["a_sum"] += torch.where(ok[:, None, None], batch["a"].double(), zero)
        self.totals["s_sum"] += torch.where(ok[:, None, None], s.double(), zero)
        self.totals["a_count"] += torch.where(ok, batch["positions"], zero)  # not ok * count: NaN * 0 is NaN
        self.totals["s_count"] += ok.double() * batch["seen"] * self.examples
        self.totals["skipped"] += (~ok).double() * batch["seen"]
        self.totals["batches"] += batch["seen"]

    def per_module(self) -> dict[str, dict[str, Tensor]]:
        """{module: {a_sum, a_count, s_sum, s_count, skipped}} on the host, for the modules some
        closed batch saw (one seen only in discarded batches has no sums, as it had none)."""
        if not self.totals:
            return {}
        host = {key: value.to("cpu", copy=True) for key, value in self.totals.items()}
        return {
            name: {key: host[key][slot] for key in SUM_KEYS}
            for slot, name in enumerate(self.names)
            if host["batches"][slot] > 0
        }


class CovarianceSums:
    """Running sums of the K-FAC factors for every watched module, fed by the capture hooks.

    `observe` is the Collector's observer: it adds one group of module calls' raw contributions to
    the current batch. `close_batch(factor)` divides out the loss factor c (the hooks see c * d)
    and folds the batch in for each module whose contribution is all finite.
    """

    def __init__(self):
        self._shapes: dict[tuple, _ShapeSums] = {}

    def observe(self, names: tuple, acts: Tensor, delta: Tensor, mask: Tensor | None, examples) -> None:
        """acts (E, B, T, k_in), delta (E, B, T, k_out) raw, one per call of the modules `names`;
        mask (B, T) or None; examples counted in S."""
        e, k_in, k_out = acts.shape[0], acts.shape[-1], delta.shape[-1]
        if mask is not None:
            delta = delta * mask.unsqueeze(-1)
            positions = mask.sum()  # stays on the device: no sync
        else:
            positions = acts.shape[1] * acts.shape[2]
        a = acts.reshape(e, -1, k_in)
        d = delta.reshape(e, -1, k_out)
        a_cov, s_cov = torch.bmm(a.transpose(1, 2), a), torch.bmm(d.transpose(1, 2), d)
        key = (k_in, k_out, acts.device)
        sums = self._shapes.get(key)
        if sums is None:
            sums = self._shapes[key] = _ShapeSums(k_in, k_out, acts.device)
        sums.add(names, a_cov, s_cov, positions, examples)

    def held_tensors(self) -> list[Tensor]:
        """The tensors the sums keep between batches."""
        return [t for sums in self._shapes.values() for t in sums.totals.values()]

    @property
    def empty(self) -> bool:
        """Whether no batch has been folded in yet."""
        return not any(sums.totals for sums in self._shapes.values())

    def close_batch(self, factor: float) -> None:
        """Fold the batch in, with the loss factor c divided out of S (d enters squared)."""
        for sums in self._shapes.values():
            sums.close(factor)

    def discard_batch(self) -> None:
        for sums in self._shapes.values():
            sums.batch = None

    def to_host(self) -> dict[str, dict[str, Tensor]]:
        """{module: {a_sum, a_count, s_sum, s_count, skipped}} as float64 CPU tensors."""
        out: dict[str, dict[str, Tensor]] = {}
        for sums in self._shapes.values():
            for name, arrays in sums.per_module().items():
                if name in out:  # the same module seen on two devices
                    arrays = {key: out[name][key] + value for key, value in arrays.items()}
                out[name] = arrays
        return out


def factors(sums: dict[str, Tensor], name: str) -> tuple[Tensor, Tensor]:
    """A and S (float64) from sums; raises StatisticsError naming the module when unusable."""
    if float(sums["a_count"]) <= 0 or float(sums["s_count"]) <= 0:
        raise StatisticsError(f"module {name!r}: no finite batch contributed to its covariances")
    a = sums["a_sum"] / sums["a_count"]
    s = sums["s_sum"] / sums["s_count"]
    for label, m in (("A (activations)", a), ("S (output gradients)", s)):
        if not torch.isfinite(m).all():
            raise StatisticsError(f"module {name!r}: covariance {label} is not finite")
    return a, s


def eigh(matrix: Tensor, name: str, label: str) -> tuple[Tensor, Tensor]:
    """Symmetric eigendecomposition in float64 with eigenvalues clamped at 0 (PSD by construction)."""
    m = matrix.double()
    if not torch.isfinite(m).all():
        raise StatisticsError(f"module {name!r}: {label} is not finite")
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return values.clamp_min(0.0), vectors


def derive(modules: dict, blocks, sums: dict, wanted: tuple, pass_name: str) -> tuple[dict, list]:
    """Per module: A, S, their eigenbases and counts (from the sums), and from one pass over the row
    blocks EK-FAC's Lambda* = mean_i (Q_S^T G_i Q_A)^2 and the raw Fisher mean_i g_i g_i^T where
    asked (modules up to RAW_MAX_WIDTH); with "row", the Fisher over the whole row, mean_i r_i r_i^T,
    under ROW_GROUP. Returns ({module or ROW_GROUP: {array name: tensor}}, modules with a raw Fisher).

    modules: {name: ModuleInfo} (k_in, k_out, width, columns in a row). blocks: (ids, float32 rows)
    over the pass's valid rows, iterated only when Lambda* or a dense Fisher is asked for."""
    derived: dict[str, dict[str, Tensor]] = {name: {} for name in modules}
    if "kfac" in wanted or "ekfac" in wanted:
        for name in modules:
            if name not in sums:
                raise StatisticsError(f"module {name!r}: no covariance was gathered in pass {pass_name!r}")
            a, s = factors(sums[name], name)
            eig_a, vec_a = eigh(a, name, "A")
            eig_s, vec_s = eigh(s, name, "S")
            derived[name].update(a=a, s=s, eig_a=eig_a, vec_a=vec_a, eig_s=eig_s, vec_s=vec_s)
            derived[name].update({k: sums[name][k] for k in SUM_KEYS})
    raw_modules = [n for n, m in modules.items() if "raw" in wanted and m.width <= RAW_MAX_WIDTH]
    if "raw" in wanted and len(raw_modules) < len(modules):
        skipped = sorted(set(modules) - set(raw_modules))
        logging.getLogger("logix").warning("logix: raw Fisher skipped for %s (k_in*k_out > %d)", skipped, RAW_MAX_WIDTH)
    if "ekfac" in wanted or raw_modules or "row" in wanted:
        acc = {n: 0 for n in modules}
        fisher = {n: 0 for n in raw_modules}
        whole = 0
        count = 0
        for _, rows in blocks:
            rows = rows.double()
            count += rows.shape[0]
            if "row" in wanted:
                whole = whole + rows.T @ rows
            for name, m in modules.items():
                g = rows[:, m.columns]
                if "ekfac" in wanted:
                    rotated = derived[name]["vec_s"].T @ g.reshape(-1, m.k_out, m.k_in) @ derived[name]["vec_a"]
                    acc[name] = acc[name] + (rotated**2).sum(dim=0)
                if name in fisher:
                    fisher[name] = fisher[name] + g.T @ g
        if count == 0:
            raise StatisticsError(f"pass {pass_name!r} has no valid rows to compute curvature from")
        for name in modules:
            if "ekfac" in wanted:
                derived[name]["lambda_star"] = acc[name] / count
            if name in fisher:
                f_matrix = fisher[name] / count
                values, vectors = eigh(f_matrix, name, "the raw Fisher")
                derived[name].update(fisher=f_matrix, fisher_eig=values, fisher_vec=vectors)
        if "row" in wanted:
            values, vectors = eigh(whole / count, ROW_GROUP, "the Fisher over the whole row")
            derived[ROW_GROUP] = dict(fisher_eig=values, fisher_vec=vectors)
    return derived, raw_modules

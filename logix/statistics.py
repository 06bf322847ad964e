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

from .disk.statistics import RAW_MAX_WIDTH, SUM_KEYS
from .errors import StatisticsError


class CovarianceSums:
    """Running sums of the K-FAC factors for every watched module, fed by the capture hooks.

    `observe` is the Collector's observer: it adds one module call's raw contribution to the
    current batch. `close_batch(factor)` divides out the loss factor c (the hooks see c * d) and
    folds the batch into the totals if every number in it is finite.
    """

    def __init__(self):
        self.a_sum: dict[str, Tensor] = {}
        self.s_sum: dict[str, Tensor] = {}
        self.a_count: dict[str, Tensor] = {}
        self.s_count: dict[str, Tensor] = {}
        self.skipped: dict[str, Tensor] = {}
        self._batch: dict[str, list] = {}

    def observe(self, watched, acts: Tensor, delta: Tensor, mask: Tensor | None, examples) -> None:
        """acts (B, T, k_in), delta (B, T, k_out) raw; mask (B, T) or None; examples counted in S."""
        if mask is not None:
            delta = delta * mask.unsqueeze(-1)
            positions = mask.sum()  # stays on the device: no sync
        else:
            positions = float(acts.shape[0] * acts.shape[1])
        a = acts.reshape(-1, acts.shape[-1])
        d = delta.reshape(-1, delta.shape[-1])
        entry = self._batch.get(watched.name)
        a_cov, s_cov = a.T @ a, d.T @ d
        if entry is None:
            self._batch[watched.name] = [a_cov, s_cov, positions, examples]
        else:
            entry[0] = entry[0] + a_cov
            entry[1] = entry[1] + s_cov
            entry[2] = entry[2] + positions
            # examples: a module called twice per forward still sees each example once
            entry[3] = entry[3] if isinstance(examples, Tensor) else max(entry[3], examples)

    def close_batch(self, factor: float) -> None:
        """Fold the batch in, with the loss factor c divided out of S (d enters squared)."""
        for name, (a_cov, s_cov, positions, examples) in self._batch.items():
            s_cov = s_cov / (factor * factor)
            ok = torch.isfinite(a_cov).all() & torch.isfinite(s_cov).all()
            if name not in self.a_sum:
                device = a_cov.device
                self.a_sum[name] = torch.zeros(a_cov.shape, dtype=torch.float64, device=device)
                self.s_sum[name] = torch.zeros(s_cov.shape, dtype=torch.float64, device=device)
                for store in (self.a_count, self.s_count, self.skipped):
                    store[name] = torch.zeros((), dtype=torch.float64, device=device)
            zero = torch.zeros((), dtype=torch.float64, device=a_cov.device)
            self.a_sum[name] += torch.where(ok, a_cov.double(), zero)
            self.s_sum[name] += torch.where(ok, s_cov.double(), zero)
            self.a_count[name] += torch.where(ok, positions, zero)  # not ok * positions: a NaN count times 0 is NaN
            self.s_count[name] += ok.double() * examples
            self.skipped[name] += (~ok).double()
        self._batch.clear()

    def discard_batch(self) -> None:
        self._batch.clear()

    def to_host(self) -> dict[str, dict[str, Tensor]]:
        """{module: {a_sum, a_count, s_sum, s_count, skipped}} as float64 CPU tensors."""
        return {
            name: {
                "a_sum": self.a_sum[name].cpu(),
                "a_count": self.a_count[name].cpu(),
                "s_sum": self.s_sum[name].cpu(),
                "s_count": self.s_count[name].cpu(),
                "skipped": self.skipped[name].cpu(),
            }
            for name in self.a_sum
        }


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
    asked (modules up to RAW_MAX_WIDTH). Returns ({module: {array name: tensor}}, modules with a raw
    Fisher).

    modules: {name: ModuleInfo} (k_in, k_out, width, columns in a row). blocks: (ids, float32 rows)
    over the pass's valid rows, iterated only when Lambda* or a raw Fisher is asked for."""
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
    if "ekfac" in wanted or raw_modules:
        acc = {n: 0 for n in modules}
        fisher = {n: 0 for n in raw_modules}
        count = 0
        for _, rows in blocks:
            rows = rows.double()
            count += rows.shape[0]
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
    return derived, raw_modules

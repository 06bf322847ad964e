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
"""

from __future__ import annotations

import logging

import h5py
import torch
from torch import Tensor

from .disk import replace_atomic
from .errors import LogFormatError, StatisticsError


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
            self.a_count[name] += ok.double() * positions
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


# -- on disk ---------------------------------------------------------------------------------------
#
# statistics/pNNN-rR-sSSS.h5   raw sums and counts of one (pass, rank, session), written when
#                              that writer's part of the pass ends (so a resumed pass can add to it)
# statistics/pNNN.h5           what finalize derives for the whole pass: per module group
#                              a, s, a_count, s_count, eig_a, vec_a, eig_s, vec_s, and where asked
#                              lambda_star (k_out, k_in), fisher (k_in*k_out square); plus
#                              self_influence/<preconditioner> (N,) at default damping

SUM_KEYS = ("a_sum", "a_count", "s_sum", "s_count", "skipped")


def save_sums(path, sums: dict[str, dict[str, Tensor]], attrs: dict | None = None) -> None:
    """Write partial sums atomically (a temporary file renamed into place); attrs: small metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs.update(attrs or {})
        for name, values in sums.items():
            group = f.create_group(name)
            for key in SUM_KEYS:
                group.create_dataset(key, data=values[key].numpy())
    replace_atomic(tmp, path)


def read_sums_attrs(path) -> dict:
    """The metadata save_sums stored with a partial-sums file ({} when it cannot be read)."""
    try:
        with h5py.File(path, "r") as f:
            return {key: f.attrs[key].item() if hasattr(f.attrs[key], "item") else f.attrs[key] for key in f.attrs}
    except OSError:
        return {}


def load_sums(paths) -> dict[str, dict[str, Tensor]]:
    """Add up the partial sums of several (rank, session) files of one pass."""

    total: dict[str, dict[str, Tensor]] = {}
    for path in paths:
        try:
            with h5py.File(path, "r") as f:
                parts = {name: _read_sums(path, name, group) for name, group in f.items()}
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
            if isinstance(e, LogFormatError):
                raise
            raise LogFormatError(f"statistics {path} cannot be read: {e}") from e
        for name, part in parts.items():
            if name in total:
                if any(total[name][key].shape != part[key].shape for key in SUM_KEYS):
                    raise LogFormatError(f"statistics {path}: module {name!r} has other shapes than in earlier parts")
                for key in SUM_KEYS:
                    total[name][key] = total[name][key] + part[key]
            else:
                total[name] = part
    return total


def _read_sums(path, name: str, group) -> dict[str, Tensor]:
    """One module's partial sums, checked: square float matrices, scalar counts, all finite."""

    where = f"statistics {path}: module {name!r}"
    if not isinstance(group, h5py.Group):
        raise LogFormatError(f"{where} is not a group; the file is damaged")
    part = {}
    for key in SUM_KEYS:
        if key not in group or not isinstance(group[key], h5py.Dataset) or group[key].dtype.kind != "f":
            raise LogFormatError(f"{where} lacks {key!r} (or it is not numbers); the file is damaged")
        part[key] = torch.as_tensor(group[key][()].astype("f8", copy=False))
    for key in ("a_sum", "s_sum"):
        shape = part[key].shape
        if len(shape) != 2 or shape[0] != shape[1]:
            raise LogFormatError(f"{where}: {key} has shape {tuple(shape)}, expected a square matrix")
    for key in ("a_count", "s_count", "skipped"):
        if part[key].shape != () or float(part[key]) < 0:
            raise LogFormatError(f"{where}: {key} must be one non-negative number, got shape {tuple(part[key].shape)}")
    if not all(torch.isfinite(v).all() for v in part.values()):
        raise LogFormatError(f"{where} holds non-finite sums; the file is damaged")
    return part


RAW_MAX_WIDTH = 4096  # k_in * k_out above which the dense projected Fisher is not built


def finalize_pass(root, pass_name: str, parts: list, wanted: tuple, block_rows: int | None = None) -> str | None:
    """Derive a pass's curvature from its partial sums and rows; returns the statistics file name.

    parts: the pass's partial-sum files (relative to root). wanted: the config's statistics.
    Reads the rows once for EK-FAC's Lambda* and the raw Fisher, once more for the self-influence
    under every preconditioner the statistics allow.
    """
    from . import influence
    from .log import Log

    if not wanted:
        return None
    log = Log(root, pass_name=pass_name)
    index = log.current.index
    file = f"statistics/p{index:03d}.h5"
    sums = load_sums([root / p for p in parts]) if parts else {}
    derived: dict[str, dict[str, Tensor]] = {name: {} for name in log.modules}
    factors_wanted = "kfac" in wanted or "ekfac" in wanted
    for name in log.modules:
        if factors_wanted:
            if name not in sums:
                raise StatisticsError(f"module {name!r}: no covariance was gathered in pass {pass_name!r}")
            a, s = factors(sums[name], name)
            eig_a, vec_a = eigh(a, name, "A")
            eig_s, vec_s = eigh(s, name, "S")
            derived[name].update(a=a, s=s, eig_a=eig_a, vec_a=vec_a, eig_s=eig_s, vec_s=vec_s)
            derived[name].update({k: sums[name][k] for k in SUM_KEYS})
    # one read of the rows: Lambda* = mean_i (Q_S^T G_i Q_A)^2 and the raw Fisher sum_i g_i g_i^T
    raw_modules = [n for n, m in log.modules.items() if "raw" in wanted and m.width <= RAW_MAX_WIDTH]
    if "raw" in wanted and len(raw_modules) < len(log.modules):
        skipped = sorted(set(log.modules) - set(raw_modules))
        logging.getLogger("logix").warning("logix: raw Fisher skipped for %s (k_in*k_out > %d)", skipped, RAW_MAX_WIDTH)
    if "ekfac" in wanted or raw_modules:
        acc = {n: 0 for n in log.modules}
        fisher = {n: 0 for n in raw_modules}
        count = 0
        for _, rows in log.blocks(block_rows=block_rows, recycle=True):
            rows = rows.double()
            count += rows.shape[0]
            for name, m in log.modules.items():
                g = rows[:, m.columns]
                if "ekfac" in wanted:
                    rotated = derived[name]["vec_s"].T @ g.reshape(-1, m.k_out, m.k_in) @ derived[name]["vec_a"]
                    acc[name] = acc[name] + (rotated**2).sum(dim=0)
                if name in fisher:
                    fisher[name] = fisher[name] + g.T @ g
        if count == 0:
            raise StatisticsError(f"pass {pass_name!r} has no valid rows to compute curvature from")
        for name in log.modules:
            if "ekfac" in wanted:
                derived[name]["lambda_star"] = acc[name] / count
            if name in fisher:
                f_matrix = fisher[name] / count
                values, vectors = eigh(f_matrix, name, "the raw Fisher")
                derived[name].update(fisher=f_matrix, fisher_eig=values, fisher_vec=vectors)
    path = root / file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for name, values in derived.items():
            group = f.create_group(name)
            for key, value in values.items():
                group.create_dataset(key, data=value.numpy() if isinstance(value, Tensor) else value)
    replace_atomic(tmp, path)
    # self-influence at default damping, kept so normalised scores never recompute it
    log._stats_files[pass_name] = file
    available = ["identity"] + [p for p in ("kfac", "ekfac") if p in wanted or (p == "kfac" and "ekfac" in wanted)]
    if raw_modules and len(raw_modules) == len(log.modules):
        available.append("raw")
    pres = {name: influence.Preconditioner(log, name, curvature="own") for name in available}
    _, values = influence.self_influences(log, pres, block_rows, progress=False)  # one read for all
    with h5py.File(path, "a") as f:
        for name, v in values.items():
            dataset = f.create_dataset(f"self_influence/{name}", data=v.numpy())
            dataset.attrs.update(
                damping_rule=influence.DAMPING_RULE,
                damping_factor=influence.DEFAULT_DAMPING_FACTOR,
                curvature="own",
            )
    return file

"""Statistics files: the covariance sums each writer checkpoints, and what finalize derives for a
pass (curvature per module and the self-influences it stored), written in one atomic step.

    statistics/pNNN-rR-sSSS.h5          sums and counts of one (pass, process, session), written when
                                        that writer's part of the pass ends (a resumed pass adds to it)
    statistics/pNNN-rR-sSSS.partial.h5  the same, checkpointed while the pass runs
    statistics/pNNN.h5                  per module group: a, s, their eigenbases, counts, and where
                                        asked lambda_star (k_out, k_in), fisher (k_in*k_out square);
                                        "whole row" (statistics="row"): fisher_eig (D,), fisher_vec
                                        (D, D), the Fisher over the whole row in its eigenbasis;
                                        plus self_influence/<preconditioner> (N,) at default damping
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from ..errors import LogFormatError, LogixError, refused_writes
from .files import replace_atomic
from .hdf5_files import new_hdf5
from .untrusted import open_hdf5

STATISTICS = "statistics"
SUM_KEYS = ("a_sum", "a_count", "s_sum", "s_count", "skipped")
_SUMS = re.compile(r"p([0-9]{3,})-r(0|[1-9][0-9]*)-s([0-9]{3,})(\.partial)?\.h5")


def _open(path: Path) -> h5py.File:
    """A statistics or sums file (statistics/<file> of a log), opened and checked whole before
    anything reads it (logix.disk.untrusted)."""
    return open_hdf5(path, path.parent.parent, "statistics", LogFormatError)


def preconditioners(statistics, raw: bool = True) -> list[str]:
    """What a pass finalized with these statistics can be scored with: identity always, raw where
    gathered and built for every module (raw=False says it was not), kfac from K-FAC or EK-FAC
    factors, ekfac from EK-FAC's eigenvalues, row from the whole row's Fisher."""
    out = ["identity"]
    if "row" in statistics:
        out.append("row")
    if "raw" in statistics and raw:
        out.append("raw")
    if "kfac" in statistics or "ekfac" in statistics:
        out.append("kfac")
    if "ekfac" in statistics:
        out.append("ekfac")
    return out


RAW_MAX_WIDTH = 4096  # k_in * k_out above which the dense projected Fisher is not built
ROW_GROUP = "whole row"  # the group of the whole row's Fisher (a space: no torch module is named so)


def statistics_name(pass_index: int) -> str:
    """The file finalize writes for a pass."""
    return f"{STATISTICS}/p{pass_index:03d}.h5"


def sums_name(pass_index: int, process_index: int, session: int, partial: bool = False) -> str:
    """The sums file of one (pass, process, session); `partial` while the pass still runs."""
    return f"{STATISTICS}/p{pass_index:03d}-r{process_index}-s{session:03d}{'.partial' if partial else ''}.h5"


def sums_owner(name: str) -> tuple[int, int]:
    """(process_index, session) of a sums file name."""
    match = _SUMS.fullmatch(Path(name).name)
    if match is None:
        raise LogFormatError(f"{name!r} is not the name of a statistics sums file")
    return int(match.group(2)), int(match.group(3))


def partial_sums(root: Path, pass_index: int) -> list[str]:
    """The checkpointed (partial) sums files of a pass found on disk, as names under the log."""
    found = (root / STATISTICS).glob(f"p{pass_index:03d}-r*-s*.partial.h5")
    return [f"{STATISTICS}/{f.name}" for f in sorted(found) if _SUMS.fullmatch(f.name)]


# ids of rows other sessions committed whose statistics these sums count (a crash had lost them);
# module groups are named as torch names modules, never with a leading dot
RECOUNTED = ".recounted_ids"


def save_sums(path: Path, sums: dict[str, dict[str, Tensor]], attrs: dict | None = None, recounted=()) -> None:
    """Write sums atomically; attrs: small metadata (rows covered so far); recounted: ids of rows
    other sessions committed whose statistics these sums count, so no later session counts them again."""
    path.parent.mkdir(exist_ok=True)  # statistics/ of a log that exists: a deleted log is not remade
    tmp = path.with_name(path.name + ".tmp")
    with refused_writes(tmp), new_hdf5(tmp) as f:
        f.attrs.update(attrs or {})
        for name, values in sums.items():
            group = f.create_group(name)
            for key in SUM_KEYS:
                group.create_dataset(key, data=values[key].numpy())
        if len(recounted):
            strings = isinstance(next(iter(recounted)), str)
            f.create_dataset(RECOUNTED, data=list(recounted), dtype=h5py.string_dtype("utf-8") if strings else "i8")
    replace_atomic(tmp, path)


def read_recounted(path: Path) -> set:
    """The ids whose statistics a sums file counted for rows of other sessions (save_sums)."""
    try:
        with _open(path) as f:
            if RECOUNTED not in f:
                return set()
            data = f[RECOUNTED]
            if not isinstance(data, h5py.Dataset) or data.ndim != 1:
                raise LogFormatError(f"statistics {path}: {RECOUNTED} is not a list of ids; the file is damaged")
            values = data.asstr()[()] if h5py.check_string_dtype(data.dtype) else data[()]
    except (OSError, RuntimeError, ValueError, TypeError) as e:
        if isinstance(e, LogFormatError):
            raise
        raise LogFormatError(f"statistics {path} cannot be read: {e}") from e
    return {v if isinstance(v, str) else int(v) for v in values.tolist()}


def read_sums_attrs(path: Path) -> dict:
    """The metadata save_sums stored with a sums file ({} when it cannot be read)."""
    try:
        with _open(path) as f:
            return {key: f.attrs[key].item() if hasattr(f.attrs[key], "item") else f.attrs[key] for key in f.attrs}
    except OSError:
        return {}


def load_sums(paths) -> dict[str, dict[str, Tensor]]:
    """Add up the sums of several (process, session) files of one pass."""
    total: dict[str, dict[str, Tensor]] = {}
    for path in paths:
        try:
            with _open(path) as f:
                names = [name for name in f if name != RECOUNTED]  # listed first: raising inside h5py's
                parts = {name: _read_sums(path, name, f[name]) for name in names}  # iteration keeps its lock
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
    """One module's sums, checked: square float matrices, scalar counts, all finite."""
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


def write_statistics(
    path: Path, derived: dict[str, dict[str, Tensor]], self_influence: dict[str, Tensor], attrs: dict[str, dict]
) -> None:
    """A pass's statistics file, whole, in one atomic replace: each module's arrays and each
    preconditioner's self-influence (with attrs[preconditioner], the damping it was computed under)."""
    path.parent.mkdir(exist_ok=True)  # statistics/ of a log that exists: a deleted log is not remade
    tmp = path.with_name(path.name + ".tmp")
    with refused_writes(tmp), new_hdf5(tmp) as f:
        for name, values in derived.items():
            group = f.create_group(name)
            for key, value in values.items():
                group.create_dataset(key, data=value.numpy() if isinstance(value, Tensor) else value)
        for name, values in self_influence.items():
            dataset = f.create_dataset(f"self_influence/{name}", data=values.numpy())
            dataset.attrs.update(attrs[name])
    replace_atomic(tmp, path)


class ModuleStatistics:
    """One module's group of a statistics file: which arrays it has, each read checked."""

    def __init__(self, group, path: Path):
        self.group, self.path = group, path

    def has(self, key: str) -> bool:
        return key in self.group

    def array(self, key: str, shape: tuple, eigenvalues: bool = False) -> Tensor:
        """float64, checked: present, of the expected shape, in this file, finite (eigenvalues >= 0)."""
        group = self.group
        where = f"statistics {self.path}: {group.name.lstrip('/')}/{key}"
        if key not in group or not isinstance(group[key], h5py.Dataset):
            raise LogFormatError(f"{where} is missing: the file is damaged")
        ds = group[key]
        if ds.shape != shape or ds.dtype.kind != "f":
            raise LogFormatError(f"{where} is {ds.dtype} of shape {ds.shape}, expected floats of shape {shape}")
        values = torch.from_numpy(np.asarray(ds[()], dtype=np.float64))
        if not torch.isfinite(values).all():
            raise LogFormatError(f"{where} holds non-finite numbers: the file is damaged")
        if eigenvalues and bool((values < 0).any()):
            raise LogFormatError(f"{where} holds negative eigenvalues: the file is damaged")
        return values


class StatisticsFile:
    """An open statistics file, read module by module."""

    def __init__(self, f, path: Path):
        self.f, self.path = f, path

    def module(self, name: str) -> ModuleStatistics:
        if name not in self.f or not isinstance(self.f[name], h5py.Group):
            raise LogFormatError(f"statistics {self.path} lack module {name!r}: the file is damaged")
        return ModuleStatistics(self.f[name], self.path)


@contextmanager
def open_statistics(path: Path) -> Iterator[StatisticsFile]:
    """Read a pass's statistics file; any failure to read it is a LogFormatError naming it."""
    try:
        with _open(path) as f:
            yield StatisticsFile(f, path)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
        if isinstance(e, LogixError):  # a damaged array, or the caller's own error: as it is
            raise
        raise LogFormatError(f"statistics {path} cannot be read: {e}") from e


def read_self_influence(path: Path, preconditioner: str) -> tuple[Tensor, dict] | None:
    """The self-influences finalize stored under `preconditioner` and their attrs, or None."""
    key = f"self_influence/{preconditioner}"
    with open_statistics(path) as stats:
        f = stats.f
        if key not in f:
            return None
        dataset = f[key]
        if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 1 or dataset.dtype.kind != "f":
            raise LogFormatError(f"statistics {path}: {key} is not a vector of floats; the file is damaged")
        attrs = dict(dataset.attrs)
        values = torch.from_numpy(dataset[()].astype(np.float64, copy=False))
    if not torch.isfinite(values).all():
        raise LogFormatError(f"statistics {path}: {key} holds non-finite numbers")
    return values, attrs


def statistics_summary(path: Path, module_names: list[str]) -> tuple[list[str], list[str]]:
    """(preconditioners every module has arrays for, self-influences stored), for `logix info`."""
    with _open(path) as f:

        def everywhere(key):
            return bool(module_names) and all(n in f and key in f[n] for n in module_names)

        have = [
            pre for pre, key in (("raw", "fisher_eig"), ("kfac", "eig_a"), ("ekfac", "lambda_star")) if everywhere(key)
        ]
        if ROW_GROUP in f:
            have.append("row")
        stored = sorted(f["self_influence"]) if "self_influence" in f else []
    return have, stored

"""projections.h5: each module's P_in and P_out, written once and checked when read."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from ..errors import LogFormatError, refused_writes
from .files import replace_atomic
from .hdf5_files import new_hdf5
from .untrusted import open_hdf5


def write_projections(path: Path, projections: dict[str, tuple]) -> None:
    """Store each module's (P_in, P_out); a missing side means identity."""
    tmp = path.with_name(path.name + ".tmp")
    with refused_writes(tmp), new_hdf5(tmp) as f:
        for name, (p_in, p_out) in projections.items():
            group = f.create_group(name)
            for side, matrix in (("in", p_in), ("out", p_out)):
                if matrix is not None:
                    group.create_dataset(side, data=matrix.numpy())
    replace_atomic(tmp, path)


def read_projections(path: Path) -> dict[str, tuple]:
    """{module: (P_in, P_out)} as stored (None for a side not stored), from the log's projections.h5
    (`path`), checked whole first (logix.disk.untrusted)."""
    out = {}
    try:
        with open_hdf5(path, path.parent, "projections", LogFormatError) as f:
            for name in list(f):  # names first: raising inside h5py's iteration keeps its lock held
                group = f[name]
                if not isinstance(group, h5py.Group):
                    raise LogFormatError(f"projections {path} are damaged: {name!r} is not a group")
                sides = []
                for side in ("in", "out"):
                    if side not in group:
                        sides.append(None)
                        continue
                    ds = group[side]
                    if not isinstance(ds, h5py.Dataset) or ds.ndim != 2 or ds.dtype.kind != "f":
                        raise LogFormatError(f"projections {path} are damaged: {name}/{side} is not a matrix of floats")
                    sides.append(torch.from_numpy(ds[()].astype(np.float32, copy=False)))
                out[name] = tuple(sides)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
        if isinstance(e, LogFormatError):
            raise
        raise LogFormatError(f"cannot read projections {path}: {e}") from e
    return out


def check_projections(projections: dict[str, tuple], modules, path: Path) -> dict[str, tuple]:
    """Each logged module has its (P_in, P_out): (k, d) and finite where k < d, absent where k == d.
    The first problem projection_problems finds is a LogFormatError."""
    problems = projection_problems(projections, modules, path)
    if problems:
        raise LogFormatError(problems[0])
    return projections


def projection_problems(projections: dict[str, tuple], modules, path: Path) -> list[str]:
    """Every way the stored projections differ from the modules' (see check_projections)."""
    problems = []
    for m in modules:
        if m.name not in projections:
            problems.append(f"projections {path} lack module {m.name!r}: the file is damaged")
            continue
        for matrix, k, d, side in zip(projections[m.name], (m.k_in, m.k_out), (m.d_in, m.d_out), ("in", "out")):
            if matrix is None:
                if k != d:
                    problems.append(f"projections {path} lack {m.name}/{side}, a ({k}, {d}) matrix")
            elif k == d:
                problems.append(
                    f"projections {path}: {m.name}/{side} is stored but that side is not projected (k = d = {d})"
                )
            elif tuple(matrix.shape) != (k, d):
                problems.append(
                    f"projections {path}: {m.name}/{side} has shape {tuple(matrix.shape)}, the manifest says ({k}, {d})"
                )
            elif not torch.isfinite(matrix).all():
                problems.append(f"projections {path}: {m.name}/{side} holds non-finite numbers")
    return problems

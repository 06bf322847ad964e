"""Saved results (`Scores`, `TopK`, `SelfInfluence`, `Complexity`): plain HDF5 datasets, one per
field, so any HDF5 reader opens them; numbers are float arrays, ids int64 or UTF-8 strings."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from ..errors import LogFormatError, refused_writes
from .hdf5_files import new_hdf5
from .untrusted import open_hdf5


def write_result(path: Path, result_type: str, fields: dict) -> None:
    """fields: name -> a float tensor (`values`, ...) or an id array (int64 or object str)."""
    with refused_writes(path), new_hdf5(path) as f:
        f.attrs["logix_result"] = result_type
        for name, value in fields.items():
            if isinstance(value, Tensor):
                data = value.numpy()
            else:
                data = value if value.dtype.kind in "iu" else value.astype(h5py.string_dtype("utf-8"))
            f.create_dataset(name, data=data)


def read_result(path: Path, result_type: str) -> dict:
    """name -> a tensor (float data) or a numpy id array, from a file write_result wrote as `result_type`,
    checked whole first (logix.disk.untrusted: nothing in it reads another file)."""
    with open_hdf5(path, None, "results", LogFormatError) as f:
        if f.attrs.get("logix_result") != result_type:
            raise LogFormatError(f"{path} does not hold logix {result_type}")
        fields = {}
        for name in list(f):  # names first: raising inside h5py's iteration keeps its lock held
            dataset = f[name]
            if not isinstance(dataset, h5py.Dataset):
                raise LogFormatError(f"{path}: {name!r} is not a dataset held in the file: refused")
            if dataset.dtype.kind == "f":
                fields[name] = torch.from_numpy(np.asarray(dataset[()]))
            else:
                fields[name] = np.asarray(dataset[()] if dataset.dtype.kind in "iu" else dataset.asstr()[()])
    return fields

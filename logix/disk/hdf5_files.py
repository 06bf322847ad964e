"""Writing an HDF5 file so that a refused write (a full disk, a file-size limit, a deleted
directory) is an exception, never a crash.

HDF5 cannot close a file whose metadata it cannot flush: the close fails, the file stays open in
the library, and the interpreter then segfaults when it cleans up at exit. So a file the disk has
refused a write is abandoned instead: its descriptor is pointed at /dev/null, where HDF5's closing
writes succeed, and closed. The bytes on disk stay as the last successful flush left them (the
rows a segment committed are still read back), and the caller raises the disk's error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py

logger = logging.getLogger("logix")


def abandon(file: h5py.File) -> None:
    """Close a file after the disk refused a write to it, without writing to the disk again.

    Call it before any plain close was tried: a second close of a file whose first close failed
    crashes HDF5."""
    if not file.id.valid:
        return
    try:
        descriptor = file.id.get_vfd_handle()
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, descriptor)
        finally:
            os.close(null)
        file.close()
    except Exception as e:  # noqa: BLE001 - the caller raises the write's own error
        logger.error("logix: could not abandon %s after a failed write: %s", file.filename, e)


@contextmanager
def new_hdf5(path: Path, mode: str = "w", **options) -> Iterator[h5py.File]:
    """`h5py.File(path, mode)` for writing: flushed and closed at the end of the block, abandoned
    (see `abandon`) if the block or the flush raises."""
    file = h5py.File(path, mode, **options)
    try:
        yield file
        file.flush()  # the writes that can fail happen here, while the file can still be abandoned
    except BaseException:
        abandon(file)
        raise
    file.close()

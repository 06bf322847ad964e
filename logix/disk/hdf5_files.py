"""Writing HDF5 files so that a refused write (a full disk, a file-size limit, a deleted
directory) is an exception, never a crash.

HDF5 cannot close a file whose metadata it cannot flush: the close fails, the file stays open in
the library, and the interpreter segfaults when it cleans up (at exit, or at the next flush). So:
- files written whole are built in memory and written to disk with plain writes (`new_hdf5`);
- a segment, written as it grows, is abandoned when the disk refuses a write (`abandon`): its
  descriptor is pointed at /dev/null, where HDF5's closing writes succeed, and closed. The bytes on
  disk stay as the last successful commit left them, and the caller raises the disk's error.
"""

from __future__ import annotations

import io
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
def new_hdf5(path: Path) -> Iterator[h5py.File]:
    """A new HDF5 file at `path`, built in memory and written with plain file writes at the end
    of the block: a refused write is then an OSError (the caller names it, errors.refused_writes),
    which HDF5's own writes are not (they fail inside object cleanup, and the next flush crashes).
    For the files of a log written whole (projections, statistics, sums) and saved results."""
    image = io.BytesIO()
    with h5py.File(image, "w") as file:
        yield file
    try:
        with open(path, "wb") as out:
            out.write(image.getbuffer())
    except OSError:
        Path(path).unlink(missing_ok=True)
        raise

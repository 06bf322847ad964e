"""The log directory's names and the one way a file in it is replaced (atomically, fsynced)."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

SCHEMA_VERSION = 1
FORMAT = "logix-log"
MANIFEST = "manifest.json"
PROJECTIONS = "projections.h5"
SEGMENTS = "segments"

FLAG_NONFINITE = 1  # the row holds NaN or Inf (or overflowed float16): never a valid gradient


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON so that a reader (or a crash) sees the old file or the new one, never half.

    The temporary file is created with mode 0666 less the umask, like every other file of the log,
    so the manifest is as readable as the rest (mkstemp would make it private to the writer).
    A refused write (a full disk, a deleted or read-only directory) raises the OSError and leaves
    the file already there as it was.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        replace_atomic(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_atomic(tmp: Path, path: Path) -> None:
    """Put a finished temporary file in `path`'s place so that a reader, a crash or a power loss
    sees the old file or the new one, never half: the file's bytes reach the disk, then the
    rename, then the directory entry that records it. The one way the log replaces a file."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)

"""How the disk wing opens a file of a log for reading: a log is untrusted input.

Every reader of a log's files goes through here, the library's and the CLI's alike:

- Nothing outside the log directory is opened: a file's path, symlinks resolved, must stay inside
  the log (a symlinked `segments/` folder, `projections.h5` or statistics file is refused), and
  only regular files are read: a FIFO would block the reader, a device such as /dev/zero never
  end (outside_problem: also what the writer lock's reader asks).
- JSON (the manifest) is read up to a size cap, checked before reading.
- An HDF5 file is checked whole (`hdf5_problems`) before any of its data is read. HDF5 lets a file
  read other files (external links, external raw storage, virtual datasets) and declare datasets
  far larger than itself (storage never written reads as zeros, allocated in full): every link
  must be a hard or a soft link (a soft link names a path in the same file), every dataset keep
  its numbers in the file and declare no more bytes than the file has.
- A segment that must be read in SWMR mode retries a metadata block that fails its checksum a
  bounded number of times: HDF5's default (100 tries with exponential back-off) waits for days on
  a damaged file.

This module is a leaf of the package's imports (every reader of the disk wing stands on it): the
functions that refuse a file raise the exception class their caller gives (the disk wing gives
logix.errors.LogFormatError), naming `what` the file is and the file.
"""

from __future__ import annotations

import ctypes
import os
import stat
from pathlib import Path

import h5py

H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)  # what h5py raises on a bad file


def outside_problem(root: Path | None, path: Path) -> str | None:
    """Why `path` may not be read as a file of the log at `root`, or None: symlinks resolved, it
    must lie inside the log directory (with no root, a file the user names rather than one a log
    names, anywhere), and if it exists be a regular file. A missing file is the caller's to name.

    A path below `root` by name with no symlink on the way is inside without resolving anything:
    one lstat per name below the root (a log with many segments opens them all)."""
    if root is not None:
        walked = _walk_below(root, path)
        if walked is not None:
            return _regular_problem(walked)
    try:
        real = os.path.realpath(path)
        base = None if root is None else os.path.realpath(root)
    except (OSError, ValueError) as e:
        return f"cannot be resolved ({e}): refused"
    if base is not None and not real.startswith(base.rstrip(os.sep) + os.sep):
        return "leads out of the log directory: refused"
    try:
        return _regular_problem(os.stat(real).st_mode)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot be examined ({e.strerror or e}): refused"


def _walk_below(root: Path, path: Path) -> int | None:
    """The mode of `path` (0 if it is missing) when it lies below `root` by name and no name on
    the way down is a symlink; None when that cannot be told without resolving the path. Plain
    strings: this runs once per file a reader opens."""
    top = os.fspath(root).rstrip(os.sep)
    below = os.fspath(path)
    if not below.startswith(top + os.sep):
        return None
    names = below[len(top) + 1 :].split(os.sep)
    if any(name in ("", ".", "..") for name in names):
        return None
    current = top
    for name in names:
        current = current + os.sep + name
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            return 0
        except OSError:
            return None
        if stat.S_ISLNK(mode):
            return None
    return mode


def _regular_problem(mode: int) -> str | None:
    """A file of this mode (0: missing) may be read: None, or why not."""
    return None if mode == 0 or stat.S_ISREG(mode) else "is not a regular file: refused"


def refuse_outside(root: Path | None, path: Path, what: str, error: type[Exception]) -> None:
    """error("<what> <path> <why>") when the file may not be read (outside_problem)."""
    problem = outside_problem(root, path)
    if problem is not None:
        raise error(f"{what} {path} {problem}")


def read_capped(path: Path, limit: int, error: type[Exception]) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, its size checked before it is read.
    FileNotFoundError when missing; `error` naming the file when it is not a regular file or too large."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO opens without blocking
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path} is not a regular file: refused")
        if info.st_size > limit:
            raise error(f"{path} has {info.st_size} bytes, more than the {limit} it may have: refused")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:  # it grew since fstat
        raise error(f"{path} has more than the {limit} bytes it may have: refused")
    return data


# -- HDF5 ------------------------------------------------------------------------------------------


def open_hdf5(path: Path, root: Path | None, what: str, error: type[Exception]) -> h5py.File:
    """A log's HDF5 file (or a saved result: root None), opened plainly and checked whole
    (checked_hdf5). A file HDF5 cannot open raises h5py's own error, for the caller to name."""
    refuse_outside(root, path, what, error)
    return checked_hdf5(h5py.File(path, "r"), path, what, error)


def checked_hdf5(f: h5py.File, path: Path, what: str, error: type[Exception], sizes: bool = True) -> h5py.File:
    """`f` when hdf5_problems finds nothing; else it is closed and the first problem raised as
    error("<what> <path> is damaged: <problem>"). sizes=False (a file being written in SWMR mode,
    whose datasets may be declared ahead of the data) leaves out the size check."""
    try:
        problems = hdf5_problems(f, os.stat(path).st_size if sizes else None)
    except H5_ERRORS as e:
        f.close()
        raise error(f"{what} {path} cannot be read: {e}") from e
    if problems:
        f.close()
        raise error(f"{what} {path} is damaged: {problems[0]}")
    return f


def hdf5_problems(f: h5py.File, size: int | None) -> list[str]:
    """Every link of an open file that is not a hard or soft link, and every dataset that keeps its
    numbers in other files or (with `size`, the file's bytes) declares more bytes than the file has.
    One pass over the file's links and objects: linear in its size, and nothing is read from
    another file (the walk follows hard links only)."""
    problems: list[str] = []

    def link(name: bytes, info) -> None:
        if info.type == h5py.h5l.TYPE_EXTERNAL:
            problems.append(f"{_text(name)!r} is a link to another file: refused")
        elif info.type not in (h5py.h5l.TYPE_HARD, h5py.h5l.TYPE_SOFT):
            problems.append(f"{_text(name)!r} is a link of a kind logix never writes: refused")

    def dataset(name: bytes, info) -> None:
        if info.type == h5py.h5o.TYPE_DATASET:
            problem = _dataset_problem(f, name, size)
            if problem is not None:
                problems.append(problem)

    f.id.links.visit(link, info=True)
    h5py.h5o.visit(f.id, dataset, info=True)
    return problems


def _dataset_problem(f: h5py.File, name: bytes, size: int | None) -> str | None:
    """Read from the dataset's creation properties and dataspace, before any of its data."""
    ds = h5py.h5d.open(f.id, name)
    plist = ds.get_create_plist()
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        return f"{_text(name)!r} keeps its data in other files (a virtual dataset): refused"
    if plist.get_external_count():
        return f"{_text(name)!r} keeps its data in other files (external raw storage): refused"
    if size is not None:
        declared = ds.get_space().get_simple_extent_npoints() * ds.get_type().get_size()
        if declared > size:
            return f"{_text(name)!r} declares {declared} bytes of data, the file has {size}: refused"
    return None


def _text(name: bytes) -> str:
    return name.decode("utf-8", "replace")


# -- SWMR ------------------------------------------------------------------------------------------

# Tries of a metadata block that fails its checksum in SWMR mode: a block the writer is rewriting
# verifies within microseconds; HDF5 sleeps about 2^k ns before try k, so 28 tries give up after
# about 0.3 s (its default, 100, after days).
SWMR_METADATA_READ_ATTEMPTS = 28


def open_swmr(path: Path) -> h5py.File:
    """h5py.File(path, "r", libver="latest", swmr=True), with its metadata retries bounded
    (SWMR_METADATA_READ_ATTEMPTS) where this HDF5 lets them be set."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    setter = _metadata_read_attempts_setter()
    if setter is None or setter(fapl.id, SWMR_METADATA_READ_ATTEMPTS) < 0:
        return h5py.File(path, "r", libver="latest", swmr=True)
    flags = h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ
    return h5py.File(h5py.h5f.open(os.fsencode(path), flags, fapl=fapl))


_setter: list = []


def _metadata_read_attempts_setter():
    """HDF5's H5Pset_metadata_read_attempts (h5py does not wrap it), from the library h5py loaded:
    a symbol looked up through one of h5py's modules resolves in the libhdf5 it links to."""
    if not _setter:
        try:
            function = ctypes.CDLL(h5py.h5p.__file__).H5Pset_metadata_read_attempts
            function.argtypes, function.restype = [ctypes.c_int64, ctypes.c_uint], ctypes.c_int
        except (OSError, AttributeError):
            function = None
        _setter.append(function)
    return _setter[0]

"""Segment files: their names, and reading their rows (checked, SWMR, torn chunks recovered)."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import h5py
import numpy as np

from ..errors import LogFormatError
from .files import FLAG_NONFINITE, SEGMENTS
from .lock import find_writer
from .untrusted import H5_ERRORS, checked_hdf5, open_swmr, refuse_outside

logger = logging.getLogger("logix")


def segment_name(pass_index: int, process_index: int, session: int) -> str:
    """The file of one (pass, process, session); its "r" and the manifest's "rank" name the process."""
    return f"{SEGMENTS}/p{pass_index:03d}-r{process_index}-s{session:03d}.h5"


def pass_segments(root: Path, pass_index: int) -> list[dict]:
    """The segment files of a pass found on disk, as manifest entries ({file, rank, session}).

    Files whose names do not follow the writer's pattern are not segments: they are left alone."""
    found = []
    pattern = re.compile(rf"p{pass_index:03d}-r(0|[1-9][0-9]*)-s([0-9]{{3,}})\.h5")
    for path in sorted((root / SEGMENTS).glob(f"p{pass_index:03d}-r*-s*.h5")):
        match = pattern.fullmatch(path.name)
        if match is None or not path.is_file() or path.is_symlink():
            logger.warning("logix: %s is not a segment file of this log; ignored", path)
            continue
        process_index, session = int(match.group(1)), int(match.group(2))
        if segment_name(pass_index, process_index, session) != f"{SEGMENTS}/{path.name}":
            logger.warning("logix: %s is not a segment file of this log; ignored", path)
            continue
        found.append({"file": f"{SEGMENTS}/{path.name}", "rank": process_index, "session": session})
    return found


def committed_ids(path: Path) -> list:
    """The ids of a segment's committed rows (ints or strs); readable while a writer appends."""
    return read_index(path)[0].tolist()


def open_segment(path: Path, root: Path | None = None) -> h5py.File:
    """Open a segment of the log at `root` for reading: plainly if no writer holds it, else in
    SWMR mode; checked whole before anything reads it (logix.disk.untrusted). `root` defaults to
    the folder above segments/ (a segment's name is segments/<file>).

    A closed segment opens plainly, so a damaged one fails at once (in SWMR mode HDF5 retries a
    metadata block whose checksum fails: bounded here, see open_swmr). A segment that a writer
    holds (or held when it was killed) refuses a plain open and is read in SWMR mode. A growing
    segment can also look truncated to a plain open (its end moves while HDF5 checks it): that one
    is read in SWMR mode while its log's writer lock is held, and is damage otherwise (SWMR mode
    would read the missing bytes as zeros).
    """
    refuse_outside(path.parent.parent if root is None else root, path, "segment", LogFormatError)
    if not path.exists():
        raise LogFormatError(f"segment {path} listed in the manifest is missing; the log is incomplete")
    try:
        return checked_hdf5(h5py.File(path, "r"), path, "segment", LogFormatError)
    except LogFormatError:
        raise
    except H5_ERRORS as e:
        truncated = "truncated file" in str(e)
        if truncated and not _being_written(path):
            raise LogFormatError(f"segment {path} is truncated: it cannot be opened (damaged: {e})") from e
        if "already open for write" not in str(e) and not truncated:
            raise LogFormatError(f"segment {path} cannot be opened (damaged or not HDF5): {e}") from e
    try:
        f = open_swmr(path)
    except H5_ERRORS as e:
        raise LogFormatError(f"segment {path} cannot be opened (damaged or not HDF5): {e}") from e
    return checked_hdf5(f, path, "segment", LogFormatError, sizes=False)  # its datasets grow ahead of `committed`


def _being_written(segment: Path) -> bool:
    """Whether a job holds the writer lock of the log this segment belongs to."""

    try:
        return find_writer(segment.parent.parent) is not None
    except OSError:
        return False


SEGMENT_DATASETS = ("committed", "ids", "grads", "flags", "step")
REOPENS = 5  # tries of a segment being written whose index read fails (see read_index)


def read_index(
    path: Path, root: Path | None = None, torn: list | None = None, **expected
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ids, flags and steps of a segment's committed rows, the segment checked first
    (check_segment, `expected` as there): what logix.open, resuming, `logix info` and `logix
    verify` read of each segment, with the same verdicts; `torn` as for read_rows. A segment being
    written is opened again when a read fails (REOPENS tries): a string id lives in a heap that
    may have grown past the end of the file as the reader saw it when it opened it, which no
    refresh of the dataset updates."""
    for attempt in range(REOPENS):
        with open_segment(path, root) as f:
            try:
                n = check_segment(f, path, **expected)
                ids = read_ids(f["ids"], n, path, torn=torn)
                return ids, read_rows(f["flags"], np.s_[:n], torn=torn), read_rows(f["step"], np.s_[:n], torn=torn)
            except LogFormatError:
                raise
            except H5_ERRORS as e:
                if isinstance(e, OSError) and f.swmr_mode and attempt + 1 < REOPENS:
                    continue
                raise LogFormatError(f"segment {path} cannot be read: {e}") from e
    raise AssertionError("unreachable")


def check_segment(f: h5py.File, path: Path, **expected) -> int:
    """The number of committed rows of an open segment; the first problem segment_problems finds
    (with `expected` its width, dtype, id_kind, rows) is a LogFormatError."""
    n, problems = segment_problems(f, path, **expected)
    if problems:
        raise LogFormatError(f"segment {path} is damaged: {problems[0]}")
    return n


def segment_problems(f: h5py.File, path: Path, **expected) -> tuple[int | None, list[str]]:
    """Every way an open segment differs from what the writer makes (names, dtypes, shapes) or from
    the manifest where it is given (`expected`: width, the row width; dtype, the storage dtype;
    id_kind; rows, the row count recorded when the segment was closed), in order: (its committed
    rows, or None when its structure cannot say; the problems). A segment HDF5 fails to read is one
    problem. `logix.open` refuses a segment with any (check_segment); `logix verify` lists them all."""
    try:
        return _segment_problems(f, path, **expected)
    except H5_ERRORS as e:
        return None, [f"it cannot be read ({e})"]


def _segment_problems(
    f: h5py.File,
    path: Path,
    *,
    width: int | None = None,
    dtype: str | None = None,
    id_kind: str | None = None,
    rows: int | None = None,
) -> tuple[int | None, list[str]]:
    problems = [
        f"it has no {name!r} dataset"
        for name in SEGMENT_DATASETS
        if not isinstance(f.get(name, getlink=True), h5py.HardLink) or not isinstance(f.get(name), h5py.Dataset)
    ]
    if problems:
        return None, problems
    committed, ids, grads, flags, step = (f[name] for name in SEGMENT_DATASETS)
    if committed.shape != (1,) or committed.dtype.kind not in "iu":
        return None, [f"'committed' must be one integer, got {committed.dtype} of shape {committed.shape}"]
    n = int(committed[0])
    if f.swmr_mode:  # a writer is appending: see the datasets as they are now, after the counter
        for ds in (ids, grads, flags, step):
            ds.refresh()
    if grads.ndim != 2 or grads.dtype not in (np.float16, np.float32):
        problems.append(f"'grads' must be (rows, width) float16 or float32, got {grads.dtype} of shape {grads.shape}")
    elif width is not None and grads.shape[1] != width:
        problems.append(f"its rows have {grads.shape[1]} numbers, the manifest says {width}")
    if dtype is not None and grads.dtype != np.dtype(dtype):
        problems.append(f"its rows are stored as {grads.dtype}, the manifest's config says {dtype}")
    if flags.dtype != np.uint8 or step.dtype.kind not in "iu":
        problems.append(f"'flags' must be uint8 and 'step' integers, got {flags.dtype} and {step.dtype}")
    string_ids = h5py.check_string_dtype(ids.dtype) is not None
    if not (ids.dtype == np.int64 or string_ids):
        problems.append(f"'ids' must be int64 or UTF-8 strings, got {ids.dtype}")
    elif id_kind is not None and string_ids != (id_kind == "str"):
        problems.append(f"its ids are {'strings' if string_ids else 'ints'}, the manifest says {id_kind}")
    shapeless = [ds for ds in (ids, grads, flags, step) if ds.ndim != (2 if ds is grads else 1)]
    problems += [f"{ds.name.lstrip('/')!r} has shape {ds.shape}" for ds in shapeless]
    if shapeless:
        return n, problems
    held = min(len(ids), len(grads), len(flags), len(step))
    if not 0 <= n <= held:
        problems.append(f"{n} rows are marked committed but it holds {held}")
    else:
        problems += _size_problems(f, path, n, (ids, grads, flags, step))
    if id_kind is None and n and width is not None:  # checked against a manifest that names no id kind
        problems.append(f"it holds {n} committed rows but the manifest's 'id_kind' is not set")
    if rows is not None and n != rows:
        problems.append(f"it holds {n} committed rows, the manifest recorded {rows} when it was closed")
    return n, problems


def _size_problems(f: h5py.File, path: Path, n: int, datasets) -> list[str]:
    """Committed rows the file's bytes cannot hold, and stored data reaching past the file's end
    (a truncated file: HDF5 reads what is missing as zeros, as many rows as declared). The writer
    stores every committed row before it moves the counter, so neither happens to a sound segment,
    and reading the committed rows never allocates more than the file's size per dataset."""
    size = path.stat().st_size
    for ds in datasets:
        need = n * ds.id.get_type().get_size() * int(np.prod(ds.shape[1:], dtype=np.int64))
        if need > size:
            name = ds.name.lstrip("/")
            return [f"{n} rows are marked committed, whose {name!r} alone needs {need} bytes; the file has {size}"]
    reach, size = data_extent(f), path.stat().st_size  # the size after the reach: a segment grows
    if reach > size:
        return [
            f"it is truncated: the file has {size} bytes, its datasets reach {reach} "
            "(what lies past the end would read as zeros)"
        ]
    return []


SWMR_READ_RETRIES = 8


def read_rows(dataset, selection, retries: int = SWMR_READ_RETRIES, torn: list | None = None):
    """dataset[selection] (rows, or rows and columns, as slices), surviving a torn last chunk.

    The last chunk of a segment is rewritten in place as rows are appended, all of it, its
    fletcher32 checksum last. A reader that catches the rewrite halfway sees a checksum mismatch
    and retries while a writer holds the file. A job killed during the rewrite leaves the chunk
    torn for good, though its committed rows were written correctly before: such a chunk is read
    raw and accepted only if its first rows, with zeros after them (as the last complete write
    left them), match the stored checksum (`verified_prefix`). Anything else is damage: the
    original error is raised. `torn` collects (dataset name, chunk index) of recovered chunks.
    """
    base = getattr(dataset, "_dset", dataset)  # an .asstr() view reads through its dataset
    for attempt in range(retries + 1):
        try:
            return dataset[selection]
        except OSError:
            if base.file.swmr_mode and attempt < retries:
                time.sleep(0.01 * (attempt + 1))
                base.refresh()
                continue
            recovered = _read_recovering(dataset, base, selection, torn)
            if recovered is None:
                raise
            return recovered


def _read_recovering(view, dataset: h5py.Dataset, selection, torn: list | None):
    """The selection read chunk by chunk, verified torn chunks included; None if one is damaged."""
    rows, columns = (selection, None) if isinstance(selection, slice) else (selection[0], selection[1:])
    if not isinstance(rows, slice) or dataset.chunks is None or not dataset.fletcher32 or dataset.compression:
        return None
    start, stop, step = rows.indices(dataset.shape[0])
    size = dataset.chunks[0]
    if step != 1 or stop <= start or dataset.chunks[1:] != dataset.shape[1:]:
        return None
    pieces = []
    for chunk in range(start // size, (stop - 1) // size + 1):
        a, b = max(start, chunk * size), min(stop, (chunk + 1) * size)
        try:
            pieces.append(view[a:b])
            continue
        except OSError:
            pass
        block = verified_prefix(dataset, chunk, b - chunk * size)
        if block is None:
            return None
        pieces.append(block[a - chunk * size :])
        if torn is not None:
            torn.append((dataset.name.lstrip("/"), chunk))
        logger.warning(
            "logix: %s: chunk %d of %r was torn by an interrupted write; its first %d rows match the checksum "
            "of the last complete write and are used",
            dataset.file.filename,
            chunk,
            dataset.name.lstrip("/"),
            b - chunk * size,
        )
    out = np.concatenate(pieces)
    return out[(slice(None), *columns)] if columns else out


def verified_prefix(dataset: h5py.Dataset, chunk: int, rows: int) -> np.ndarray | None:
    """The first `rows` rows of a chunk whose checksum fails as a whole, if some prefix of k >= rows
    rows, followed by zeros (the fill value), matches the stored fletcher32 checksum; else None.

    A chunk's last complete write held the rows committed then, zeros after them; a torn rewrite
    changed only bytes beyond those (rewriting the committed bytes with the same values), so the
    prefix that matches is exactly that write's content.
    """
    size = dataset.chunks[0]
    origin = (chunk * size,) + (0,) * (dataset.ndim - 1)
    try:
        mask, raw = dataset.id.read_direct_chunk(origin)
    except (OSError, ValueError, RuntimeError):
        return None
    row_bytes = dataset.dtype.itemsize * int(np.prod(dataset.chunks[1:], dtype=np.int64))
    if mask != 0 or len(raw) != size * row_bytes + 4:
        return None
    data, stored = raw[:-4], int.from_bytes(raw[-4:], "little")
    padded = np.frombuffer(data + b"\0" * (len(data) % 2), dtype=">u2").astype(np.int64)
    n = len(padded)
    s1 = np.concatenate([[0], np.cumsum(padded)])  # prefix sums of the 16-bit words, and of i * word
    si = np.concatenate([[0], np.cumsum(np.arange(n, dtype=np.int64) * padded)])
    raw_bytes = np.frombuffer(data, dtype=np.uint8)
    for k in range(rows, size + 1):
        kept = k * row_bytes  # bytes kept; the rest is taken as zeros
        words, partial = kept // 2, (int(raw_bytes[kept - 1]) << 8) if kept % 2 else 0
        t1 = int(s1[words]) + partial
        t2 = n * t1 - int(si[words]) - words * partial
        if fletcher32_from_sums(t1, t2) == stored:
            values = np.frombuffer(data, dtype=dataset.dtype)
            return values.reshape((size, *dataset.chunks[1:]))[:rows].copy()
    return None


def fletcher32_from_sums(t1: int, t2: int) -> int:
    """HDF5's fletcher32 of 16-bit big-endian words w_0..w_{n-1}, from t1 = sum w_i and
    t2 = sum (n - i) w_i: each half is its sum folded into 1..65535 (0 only for an all-zero chunk)."""

    def fold(t: int) -> int:
        return 0 if t == 0 else (t - 1) % 65535 + 1

    return (fold(t2) << 16) | fold(t1)


def read_ids(dataset: h5py.Dataset, n: int, path: Path, torn: list | None = None) -> np.ndarray:
    """The first n ids: int64, or str objects (strings that are not UTF-8 are a LogFormatError);
    `torn` as for read_rows."""
    if dataset.dtype.kind in "iu":
        return read_rows(dataset, np.s_[:n], torn=torn).astype("i8")
    try:
        return read_rows(dataset.asstr(), np.s_[:n], torn=torn)
    except UnicodeDecodeError as e:
        raise LogFormatError(f"segment {path} is damaged: an id is not UTF-8 text ({e})") from None


def data_extent(f: h5py.File) -> int:
    """How far into the file the datasets' stored bytes reach (HDF5 reads past the end as zeros);
    one pass over each dataset's chunk index."""
    reach = 0
    for name in list(f):  # names first: raising inside h5py's iteration keeps its lock held
        ds = f[name]
        if not isinstance(ds, h5py.Dataset):
            continue
        if ds.chunks is None:
            offset = ds.id.get_offset()
            if offset is not None:
                reach = max(reach, offset + ds.id.get_storage_size())
            continue
        ends = [reach]
        ds.id.chunk_iter(lambda info, ends=ends: ends.append(info.byte_offset + info.size))
        reach = max(ends)
    return reach


def segment_summary(path: Path, root: Path | None = None, **expected) -> tuple[int, int]:
    """(committed rows, of those flagged non-finite) of a segment, read and checked as logix.open
    reads it (read_index)."""
    flags = read_index(path, root, **expected)[1]
    return len(flags), int(((flags & FLAG_NONFINITE) != 0).sum())

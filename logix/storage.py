"""The on-disk log: manifest, projection file, segment files, and the background writer.

A log is a directory:

    manifest.json        passes, segments, modules, config, schema version (written atomically)
    projections.h5       P_in / P_out per module, so any later process rebuilds them exactly
    segments/pNNN-rR-sSSS.h5   one per (pass, rank, session), written in SWMR mode

Each segment holds `ids` (int64 or UTF-8), `grads` (N, D), `flags` (uint8), `step` (int64) and a
one-element `committed` dataset. The writer moves `committed` only after the rows below it are
written and flushed, so readers trust exactly the rows below it, even after a SIGKILL. A segment
opens only with `h5py.File(path, "r", swmr=True)`. Nothing here is pickled.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from .errors import LogFormatError, WriterError

logger = logging.getLogger("logix")

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


def read_manifest(root: Path) -> dict:
    """The manifest of the log at `root`, checked field by field: LogFormatError naming the file
    and the field when it is damaged, tampered with, or from a newer schema."""
    path = root / MANIFEST
    if not path.is_file():
        raise LogFormatError(f"{root} is not a logix log: {MANIFEST} is missing")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise LogFormatError(f"{path} is damaged: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LogFormatError(f"{path} is not a logix manifest")
    version = data.get("schema_version")
    if not _is_int(version) or not 1 <= version <= SCHEMA_VERSION:
        raise LogFormatError(
            f"{root} has schema version {version!r}; this logix reads up to {SCHEMA_VERSION}: upgrade logix"
        )
    for key in ("config", "modules", "passes", "width"):
        if key not in data:
            raise LogFormatError(f"{path} lacks {key!r}: the manifest is damaged")
    check_manifest(root, data)
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _inside(root: Path, file, folder: str, what: str, path: Path) -> None:
    """A file named by the manifest must be a relative path inside `root/folder`: never an
    absolute path, a `..`, or a link leading out of the log directory."""
    if not isinstance(file, str) or not file or "\x00" in file:
        raise LogFormatError(f"{path}: {what} must be a file name, got {file!r}")
    parts = Path(file).parts
    if Path(file).is_absolute() or ".." in parts or len(parts) < 2 or parts[0] != folder:
        raise LogFormatError(f"{path}: {what} {file!r} is not a file under {folder}/ of the log: refused")
    try:
        resolved = (root / file).resolve()
        inside = resolved.is_relative_to((root / folder).resolve())
    except (OSError, RuntimeError, ValueError):
        inside = False
    if not inside:
        raise LogFormatError(f"{path}: {what} {file!r} leads out of the log directory: refused")


def check_manifest(root: Path, data: dict) -> None:
    """Every field the readers rely on has the type and the consistency the writer gives it."""
    path = root / MANIFEST

    def bad(what: str) -> LogFormatError:
        return LogFormatError(f"{path} is damaged: {what}")

    from .config import Config  # noqa: PLC0415 - config imports nothing of storage
    from .errors import ConfigError  # noqa: PLC0415

    if not isinstance(data["config"], dict):
        raise bad(f"'config' must be an object, got {type(data['config']).__name__}")
    try:
        Config.from_json(data["config"])
    except (ConfigError, TypeError) as e:
        raise bad(f"'config' is invalid: {e}") from None
    id_kind = data.get("id_kind")
    if id_kind not in (None, "int", "str"):
        raise bad(f"'id_kind' must be 'int' or 'str', got {id_kind!r}")
    width = data["width"]
    if not _is_int(width) or width < 0:
        raise bad(f"'width' must be a non-negative int, got {width!r}")
    modules = data["modules"]
    if not isinstance(modules, list):
        raise bad(f"'modules' must be a list, got {type(modules).__name__}")
    fields = {"name", "kind", "d_in", "d_out", "k_in", "k_out", "offset", "bias"}
    names, offset = set(), 0
    for i, m in enumerate(modules):
        if not isinstance(m, dict) or set(m) != fields:
            got = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise bad(f"module #{i} must have exactly the fields {sorted(fields)}, got {got}")
        name = m["name"]
        if not isinstance(name, str) or not isinstance(m["kind"], str) or not m["kind"]:
            raise bad(f"module #{i}: name and kind must be strings, got {name!r}, {m['kind']!r}")
        if name in names:
            raise bad(f"module {name!r} is listed twice")
        names.add(name)
        for key in ("d_in", "d_out", "k_in", "k_out"):
            if not _is_int(m[key]) or m[key] < 1:
                raise bad(f"module {name!r}: {key} must be a positive int, got {m[key]!r}")
        if m["k_in"] > m["d_in"] or m["k_out"] > m["d_out"]:
            raise bad(
                f"module {name!r}: projected size (k_out={m['k_out']}, k_in={m['k_in']}) exceeds its "
                f"dimensions (d_out={m['d_out']}, d_in={m['d_in']})"
            )
        if not isinstance(m["bias"], bool):
            raise bad(f"module {name!r}: bias must be true or false, got {m['bias']!r}")
        if m["offset"] != offset or not _is_int(m["offset"]):
            raise bad(f"module {name!r}: offset {m['offset']!r}, expected {offset} (modules lie side by side in a row)")
        offset += m["k_in"] * m["k_out"]
    if offset != width:
        raise bad(f"'width' is {width} but the modules' blocks add up to {offset}")
    passes = data["passes"]
    if not isinstance(passes, list):
        raise bad(f"'passes' must be a list, got {type(passes).__name__}")
    pass_names, files = set(), set()
    for index, p in enumerate(passes):
        if not isinstance(p, dict):
            raise bad(f"pass #{index} must be an object, got {type(p).__name__}")
        for key in ("name", "index", "segments"):
            if key not in p:
                raise bad(f"pass #{index} lacks {key!r}")
        name = p["name"]
        if not isinstance(name, str) or not name or name in pass_names:
            raise bad(f"pass #{index}: name must be a unique non-empty string, got {name!r}")
        pass_names.add(name)
        if not _is_int(p["index"]) or p["index"] != index:
            raise bad(f"pass {name!r}: index {p['index']!r}, expected {index}")
        if not isinstance(p.get("meta", {}), dict):
            raise bad(f"pass {name!r}: meta must be an object")
        if not isinstance(p.get("finalized", False), bool):
            raise bad(f"pass {name!r}: finalized must be true or false, got {p['finalized']!r}")
        segments = p["segments"]
        if not isinstance(segments, list):
            raise bad(f"pass {name!r}: segments must be a list, got {type(segments).__name__}")
        for s in segments:
            if (
                not isinstance(s, dict)
                or not {"file", "rank", "session"} <= set(s)
                or set(s) - {"file", "rank", "session", "rows"}
            ):
                raise bad(f"pass {name!r}: a segment entry must be {{file, rank, session[, rows]}}, got {s!r}")
            _inside(root, s["file"], SEGMENTS, f"pass {name!r}: segment", path)
            if s["file"] in files:
                raise bad(f"segment {s['file']!r} is listed twice")
            files.add(s["file"])
            for key in ("rank", "session"):
                if not _is_int(s[key]) or s[key] < 0:
                    raise bad(f"segment {s['file']!r}: {key} must be a non-negative int, got {s[key]!r}")
            rows = s.get("rows")
            if rows is not None and (not _is_int(rows) or rows < 0):
                raise bad(f"segment {s['file']!r}: rows must be a non-negative int, got {rows!r}")
        stats = p.get("statistics")
        if stats is not None:
            _inside(root, stats, "statistics", f"pass {name!r}: statistics", path)
        parts = p.get("statistics_parts", [])
        if not isinstance(parts, list):
            raise bad(f"pass {name!r}: statistics_parts must be a list")
        for part in parts:
            _inside(root, part, "statistics", f"pass {name!r}: statistics part", path)
    sessions = data.get("sessions", 0)
    if not _is_int(sessions) or sessions < 0:
        raise bad(f"'sessions' must be a non-negative int, got {sessions!r}")


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
    try:
        with open_segment(path) as f:
            n = check_segment(f, path)
            return read_ids(f["ids"], n, path).tolist()
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
        if isinstance(e, LogFormatError):
            raise
        raise LogFormatError(f"segment {path} cannot be read: {e}") from e


def open_segment(path: Path) -> h5py.File:
    """Open a segment for reading: plainly if no writer holds it, else in SWMR mode.

    A closed segment opens plainly, so a damaged one fails at once (in SWMR mode HDF5 retries a
    metadata block whose checksum fails, with back-off, for a very long time). A segment that a
    writer holds (or held when it was killed) refuses a plain open and is read in SWMR mode. A
    growing segment can also look truncated to a plain open (its end moves while HDF5 checks it):
    that one is read in SWMR mode while its log's writer lock is held, and is damage otherwise
    (SWMR mode would read the missing bytes as zeros).
    """
    if not path.is_file():
        raise LogFormatError(f"segment {path} listed in the manifest is missing; the log is incomplete")
    try:
        return h5py.File(path, "r")
    except (OSError, RuntimeError, ValueError) as e:
        growing = "truncated file" in str(e) and _being_written(path)
        if "already open for write" not in str(e) and not growing:
            raise LogFormatError(f"segment {path} cannot be opened (damaged or not HDF5): {e}") from e
    try:
        return h5py.File(path, "r", libver="latest", swmr=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise LogFormatError(f"segment {path} cannot be opened (damaged or not HDF5): {e}") from e


def _being_written(segment: Path) -> bool:
    """Whether a job holds the writer lock of the log this segment belongs to."""
    from .lock import find_writer  # noqa: PLC0415 - lock imports errors only; keeps this module's imports light

    try:
        return find_writer(segment.parent.parent) is not None
    except OSError:
        return False


SEGMENT_DATASETS = ("committed", "ids", "grads", "flags", "step")


def check_segment(
    f: h5py.File,
    path: Path,
    width: int | None = None,
    dtype: str | None = None,
    id_kind: str | None = None,
    rows: int | None = None,
) -> int:
    """The number of committed rows of an open segment, after checking that its datasets are the
    ones the writer makes (names, dtypes, shapes) and agree with the manifest where it is given:
    row width, storage dtype, id kind, and the row count recorded when the segment was closed."""

    def bad(what: str) -> LogFormatError:
        return LogFormatError(f"segment {path} is damaged: {what}")

    for name in SEGMENT_DATASETS:
        if not isinstance(f.get(name, getlink=True), h5py.HardLink) or not isinstance(f.get(name), h5py.Dataset):
            raise bad(f"it has no {name!r} dataset")
        if not self_contained(f[name]):
            raise bad(f"{name!r} keeps its data in other files (external or virtual storage): refused")
    committed, ids, grads, flags, step = (f[name] for name in SEGMENT_DATASETS)
    if committed.shape != (1,) or committed.dtype.kind not in "iu":
        raise bad(f"'committed' must be one integer, got {committed.dtype} of shape {committed.shape}")
    n = int(committed[0])
    if f.swmr_mode:  # a writer is appending: see the datasets as they are now, after the counter
        for ds in (ids, grads, flags, step):
            ds.refresh()
    if grads.ndim != 2 or grads.dtype not in (np.float16, np.float32):
        raise bad(f"'grads' must be (rows, width) float16 or float32, got {grads.dtype} of shape {grads.shape}")
    if width is not None and grads.shape[1] != width:
        raise bad(f"its rows have {grads.shape[1]} numbers, the manifest says {width}")
    if dtype is not None and grads.dtype != np.dtype(dtype):
        raise bad(f"its rows are stored as {grads.dtype}, the manifest's config says {dtype}")
    if flags.dtype != np.uint8 or step.dtype.kind not in "iu":
        raise bad(f"'flags' must be uint8 and 'step' integers, got {flags.dtype} and {step.dtype}")
    string_ids = h5py.check_string_dtype(ids.dtype) is not None
    if not (ids.dtype == np.int64 or string_ids):
        raise bad(f"'ids' must be int64 or UTF-8 strings, got {ids.dtype}")
    if id_kind is not None and string_ids != (id_kind == "str"):
        raise bad(f"its ids are {'strings' if string_ids else 'ints'}, the manifest says {id_kind}")
    for ds in (ids, grads, flags, step):
        if ds.ndim != (2 if ds is grads else 1):
            raise bad(f"{ds.name.lstrip('/')!r} has shape {ds.shape}")
    if not 0 <= n <= min(len(ids), len(grads), len(flags), len(step)):
        raise bad(f"{n} rows are marked committed but it holds {min(len(ids), len(grads), len(flags), len(step))}")
    if id_kind is None and n and width is not None:  # checked against a manifest that names no id kind
        raise bad(f"it holds {n} committed rows but the manifest's 'id_kind' is not set")
    if rows is not None and n != rows:
        raise bad(f"it holds {n} committed rows, the manifest recorded {rows} when it was closed")
    return n


def self_contained(dataset: h5py.Dataset) -> bool:
    """Whether a dataset's numbers live in its own file: HDF5 can also point a dataset at any other
    file on the machine (external raw storage, virtual datasets), which a log never does."""
    return dataset.external is None and not dataset.is_virtual


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


def read_ids(dataset: h5py.Dataset, n: int, path: Path) -> np.ndarray:
    """The first n ids: int64, or str objects (strings that are not UTF-8 are a LogFormatError)."""
    if dataset.dtype.kind in "iu":
        return read_rows(dataset, np.s_[:n]).astype("i8")
    try:
        return read_rows(dataset.asstr(), np.s_[:n])
    except UnicodeDecodeError as e:
        raise LogFormatError(f"segment {path} is damaged: an id is not UTF-8 text ({e})") from None


def write_projections(path: Path, projections: dict[str, tuple]) -> None:
    """Store each module's (P_in, P_out); a missing side means identity."""
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for name, (p_in, p_out) in projections.items():
            group = f.create_group(name)
            for side, matrix in (("in", p_in), ("out", p_out)):
                if matrix is not None:
                    group.create_dataset(side, data=matrix.numpy())
    replace_atomic(tmp, path)


def read_projections(path: Path) -> dict[str, tuple]:
    out = {}
    try:
        with h5py.File(path, "r") as f:
            for name, group in f.items():
                if not isinstance(group, h5py.Group):
                    raise LogFormatError(f"projections {path} are damaged: {name!r} is not a group")
                sides = []
                for side in ("in", "out"):
                    if side not in group:
                        sides.append(None)
                        continue
                    ds = group[side]
                    if (
                        not isinstance(ds, h5py.Dataset)
                        or ds.ndim != 2
                        or ds.dtype.kind != "f"
                        or not self_contained(ds)
                    ):
                        raise LogFormatError(f"projections {path} are damaged: {name}/{side} is not a matrix of floats")
                    sides.append(torch.from_numpy(ds[()].astype(np.float32, copy=False)))
                out[name] = tuple(sides)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
        if isinstance(e, LogFormatError):
            raise
        raise LogFormatError(f"cannot read projections {path}: {e}") from e
    return out


def check_projections(projections: dict[str, tuple], modules, path: Path) -> dict[str, tuple]:
    """Each logged module has its (P_in, P_out): (k, d) and finite where k < d, absent where k == d."""
    for m in modules:
        if m.name not in projections:
            raise LogFormatError(f"projections {path} lack module {m.name!r}: the file is damaged")
        for matrix, k, d, side in zip(projections[m.name], (m.k_in, m.k_out), (m.d_in, m.d_out), ("in", "out")):
            if matrix is None:
                if k != d:
                    raise LogFormatError(f"projections {path} lack {m.name}/{side}, a ({k}, {d}) matrix")
            elif k == d:
                raise LogFormatError(
                    f"projections {path}: {m.name}/{side} is stored but that side is not projected (k = d = {d})"
                )
            elif tuple(matrix.shape) != (k, d):
                raise LogFormatError(
                    f"projections {path}: {m.name}/{side} has shape {tuple(matrix.shape)}, the manifest says ({k}, {d})"
                )
            elif not torch.isfinite(matrix).all():
                raise LogFormatError(f"projections {path}: {m.name}/{side} holds non-finite numbers")
    return projections


class SegmentWriter:
    """Appends rows to one segment file; owned by exactly one thread at a time."""

    def __init__(self, path: Path, width: int, dtype: str, id_kind: str, attrs: dict):
        """Build the file under a temporary name and rename it once it is in SWMR mode, so that a
        crash at any moment leaves either no segment or a well-formed one."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            raise FileExistsError(f"segment {path} exists already")
        building = path.with_name(f".{path.name}.building")
        building.unlink(missing_ok=True)  # left by a crash during an earlier creation
        self.file = h5py.File(building, "x", libver="latest")
        self.file.attrs.update(attrs)
        itemsize = np.dtype(dtype).itemsize
        chunk_rows = int(max(1, min(4096, (1 << 20) // (width * itemsize))))

        def column(name, dt, shape=()):  # fletcher32: a flipped bit is a read error, not another number
            checksum = h5py.check_string_dtype(np.dtype(dt)) is None  # HDF5 cannot filter variable-length strings
            return self.file.create_dataset(
                name, (0, *shape), maxshape=(None, *shape), dtype=dt, chunks=(chunk_rows, *shape), fletcher32=checksum
            )

        self.grads = column("grads", dtype, (width,))
        self.ids = column("ids", "i8" if id_kind == "int" else h5py.string_dtype("utf-8"))
        self.flags = column("flags", "u1")
        self.step = column("step", "i8")
        self.committed = self.file.create_dataset("committed", data=np.zeros(1, dtype="i8"))
        self.file.swmr_mode = True
        self.file.flush()
        replace_atomic(building, path)
        self.rows = 0
        self.committed_rows = 0
        self.nonfinite = 0

    def append(self, ids, grads: np.ndarray, steps: np.ndarray, flags: np.ndarray) -> None:
        n = grads.shape[0]
        if n == 0:
            return
        end = self.rows + n
        for ds, values in ((self.grads, grads), (self.ids, ids), (self.flags, flags), (self.step, steps)):
            ds.resize(end, axis=0)
            ds[self.rows : end] = values
        self.rows = end
        bad = int(flags.astype(bool).sum())
        if bad:
            self.nonfinite += bad
            logger.warning("logix: %d row(s) with non-finite gradients flagged in %s", bad, self.path.name)

    def commit(self) -> None:
        """Make every appended row durable for readers: data first, then the counter."""
        self.file.flush()
        self.committed[0] = self.rows
        self.file.flush()
        self.committed_rows = self.rows

    def close(self) -> None:
        if self.file.id.valid:
            self.commit()
            self.file.close()


@dataclass
class Batch:
    ids: list | np.ndarray
    grads: torch.Tensor  # on the host, possibly pinned and still being filled by a CUDA copy
    flags: torch.Tensor  # uint8 per row, FLAG_NONFINITE where the stored row is not finite
    step: int
    ready: object | None = None  # a torch.cuda.Event recorded after the copy, or None


_COMMIT = object()  # a queue item asking the writer to commit now


class BackgroundWriter:
    """A thread that owns a SegmentWriter and drains a bounded queue of batches into it.

    `put` blocks while the queue is full, so a slow disk slows training instead of growing memory
    or dropping rows. A failure in the thread is kept and re-raised in the training thread at the
    next `put` or at `close`; rows committed before it stay readable.
    """

    def __init__(self, segment: SegmentWriter, queue_size: int = 16, commit_interval: float = 1.0):
        self.segment = segment
        self.commit_interval = commit_interval
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name=f"logix-writer-{segment.path.name}", daemon=True)
        self.thread.start()

    def put(self, batch: Batch) -> None:
        while True:
            self._raise_if_failed()
            try:
                self.queue.put(batch, timeout=0.1)
                return
            except queue.Full:
                continue

    def flush(self) -> None:
        """Block until every queued batch is written and committed."""
        self.put(_COMMIT)
        self.queue.join()
        self._raise_if_failed()

    def close(self) -> SegmentWriter:
        """Write everything queued, commit, close the file; re-raise a writer failure."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        self._raise_if_failed()
        return self.segment

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise WriterError(
                f"writing {self.segment.path} failed: {self.error!r}. The "
                f"{self.segment.committed_rows} rows committed before the failure are kept."
            ) from self.error

    def _loop(self) -> None:
        """Write batches as they come; commit at most once per interval, and at the latest one
        interval after the last write even if no batch follows (a stalled job loses nothing)."""
        last_commit = time.monotonic()
        while True:
            uncommitted = self.segment.rows > self.segment.committed_rows and self.error is None
            wait = max(0.0, self.commit_interval - (time.monotonic() - last_commit)) if uncommitted else None
            try:
                batch, from_queue = self.queue.get(timeout=wait), True
            except queue.Empty:
                batch, from_queue = _COMMIT, False  # the interval passed with rows not yet committed
            if batch is None:
                self.queue.task_done()
                break
            try:
                if self.error is not None:
                    continue  # keep draining so put() never blocks on a dead writer
                if batch is not _COMMIT:
                    if batch.ready is not None:
                        batch.ready.synchronize()
                    grads = batch.grads.numpy()
                    steps = np.full(grads.shape[0], batch.step, dtype="i8")
                    self.segment.append(batch.ids, grads, steps, batch.flags.numpy())
                if batch is _COMMIT or time.monotonic() - last_commit >= self.commit_interval:
                    self.segment.commit()
                    last_commit = time.monotonic()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self.error = e
            finally:
                if from_queue:
                    self.queue.task_done()
        try:
            self.segment.close()
        except BaseException as e:  # noqa: BLE001
            if self.error is None:
                self.error = e

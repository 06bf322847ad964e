"""manifest.json: read, and checked field by field before anything trusts it; and the records of
what it lists that readers work with (a logged module, a segment file)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..errors import ConfigError, LogFormatError
from .files import FORMAT, MANIFEST, SCHEMA_VERSION, SEGMENTS


@dataclass(frozen=True)
class ModuleInfo:
    """A logged module: its gradient is (d_out, d_in) and each row holds a (k_out, k_in) block."""

    name: str
    kind: str
    d_in: int
    d_out: int
    k_in: int
    k_out: int
    offset: int
    bias: bool

    @property
    def width(self) -> int:
        return self.k_in * self.k_out

    @property
    def columns(self) -> slice:
        return slice(self.offset, self.offset + self.width)


@dataclass(frozen=True)
class SegmentInfo:
    """One segment file; `rows` is what its writer recorded at close (None if it never closed)."""

    file: str
    rank: int
    session: int
    rows: int | None = None


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

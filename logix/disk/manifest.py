"""manifest.json: read, and checked field by field before anything trusts it; and the records of
what it lists that readers work with (a logged module, a segment file)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..errors import ConfigError, LogFormatError
from .files import FORMAT, MANIFEST, SCHEMA_VERSION, SEGMENTS
from .untrusted import outside_problem, read_capped

# The most bytes manifest.json may have, checked before it is read: each segment adds about 100,
# so over half a million segments fit; a larger file is not read (it would take several times its
# size in memory as Python objects).
MANIFEST_MAX_BYTES = 64 << 20


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
    and the field when it is damaged, tampered with, or from a newer schema (the first problem
    load_manifest finds)."""
    data, problems = load_manifest(root)
    if problems:
        raise LogFormatError(problems[0])
    return data


def load_manifest(root: Path) -> tuple[dict | None, list[str]]:
    """The manifest's JSON and every problem with it (manifest_problems), in order; None instead of
    the JSON when it cannot be checked field by field at all (missing, not JSON, not a logix
    manifest, another schema version, a top-level field missing). `logix verify` lists them all."""
    path = root / MANIFEST
    outside = outside_problem(root, path)
    if outside is not None:
        return None, [f"{path} {outside}"]
    try:
        text = read_capped(path, MANIFEST_MAX_BYTES, LogFormatError)
    except FileNotFoundError:
        return None, [f"{root} is not a logix log: {MANIFEST} is missing"]
    except LogFormatError as e:
        return None, [str(e)]
    try:
        data = json.loads(text.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        return None, [f"{path} is damaged: {e}"]
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None, [f"{path} is not a logix manifest"]
    version = data.get("schema_version")
    if not _is_int(version) or not 1 <= version <= SCHEMA_VERSION:
        return None, [f"{root} has schema version {version!r}; this logix reads up to {SCHEMA_VERSION}: upgrade logix"]
    for key in ("config", "modules", "passes", "width"):
        if key not in data:
            return None, [f"{path} lacks {key!r}: the manifest is damaged"]
    return data, manifest_problems(root, data)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def inside_problem(root: Path, file, folder: str, what: str) -> str | None:
    """Why a file named by the manifest may not be opened, or None: it must be `folder/<name>`,
    never an absolute path, a `..` or a deeper path. Read from the name alone (cheap, for any
    number of entries); where the name leads on disk, symlinks resolved, is checked when the file
    is opened, as for every file of the log (logix.disk.untrusted)."""
    if not isinstance(file, str) or not file or "\x00" in file:
        return f"{root / MANIFEST}: {what} must be a file name, got {file!r}"
    folder_of, _, name = file.partition("/")
    if folder_of != folder or name in ("", ".", "..") or "/" in name:
        return f"{root / MANIFEST}: {what} {file!r} is not a file under {folder}/ of the log: refused"
    return None


def manifest_problems(root: Path, data: dict) -> list[str]:
    """Every way the manifest's fields differ from what the writer gives them, in order; a part
    whose structure is broken (a list that is not one, an entry without its fields) is named and
    not looked into. `data` holds the top-level fields load_manifest requires."""
    path = root / MANIFEST
    problems = _config_problems(path, data) + _modules_problems(path, data)
    problems += _passes_problems(root, data["passes"])
    sessions = data.get("sessions", 0)
    if not _is_int(sessions) or sessions < 0:
        problems.append(_damaged(path, f"'sessions' must be a non-negative int, got {sessions!r}"))
    return problems


def _damaged(path: Path, what: str) -> str:
    return f"{path} is damaged: {what}"


def _config_problems(path: Path, data: dict) -> list[str]:
    """The config, the id kind and the row width."""
    problems = []
    if not isinstance(data["config"], dict):
        problems.append(f"'config' must be an object, got {type(data['config']).__name__}")
    else:
        try:
            Config.from_json(data["config"])
        except (ConfigError, TypeError) as e:
            problems.append(f"'config' is invalid: {e}")
    id_kind = data.get("id_kind")
    if id_kind not in (None, "int", "str"):
        problems.append(f"'id_kind' must be 'int' or 'str', got {id_kind!r}")
    width = data["width"]
    if not _is_int(width) or width < 0:
        problems.append(f"'width' must be a non-negative int, got {width!r}")
    return [_damaged(path, what) for what in problems]


MODULE_FIELDS = frozenset({"name", "kind", "d_in", "d_out", "k_in", "k_out", "offset", "bias"})
MODULE_SIZES = ("d_in", "d_out", "k_in", "k_out")


def _sized(m) -> bool:
    """Whether a module entry has the writer's fields and positive int sizes (its block is known)."""
    return isinstance(m, dict) and set(m) == MODULE_FIELDS and all(_is_int(m[k]) and m[k] >= 1 for k in MODULE_SIZES)


def sound_modules(data: dict) -> list[dict]:
    """The manifest's module entries that pass their own checks (fields, name and kind, sizes, bias):
    the ones to check the log's files against."""
    modules = data.get("modules")
    if not isinstance(modules, list):
        return []
    return [m for i, m in enumerate(modules) if not _module_problems(i, m, set())]


def _modules_problems(path: Path, data: dict) -> list[str]:
    """Each module entry, then their blocks lying side by side and adding up to the width."""
    modules, width = data["modules"], data["width"]
    if not isinstance(modules, list):
        return [_damaged(path, f"'modules' must be a list, got {type(modules).__name__}")]
    problems, names, offset = [], set(), 0
    for i, m in enumerate(modules):
        problems += [_damaged(path, what) for what in _module_problems(i, m, names)]
        if offset is None or not _sized(m):
            offset = None  # past a module of unknown size, where the blocks lie is unknown
            continue
        if m["offset"] != offset or not _is_int(m["offset"]):
            what = f"offset {m['offset']!r}, expected {offset} (modules lie side by side in a row)"
            problems.append(_damaged(path, f"module {m['name']!r}: {what}"))
        offset += m["k_in"] * m["k_out"]
    if offset is not None and _is_int(width) and offset != width:
        problems.append(_damaged(path, f"'width' is {width} but the modules' blocks add up to {offset}"))
    return problems


def _module_problems(i: int, m, names: set) -> list[str]:
    """One module entry: its fields, name and kind (unique names), sizes and bias."""
    if not isinstance(m, dict) or set(m) != MODULE_FIELDS:
        got = sorted(m) if isinstance(m, dict) else type(m).__name__
        return [f"module #{i} must have exactly the fields {sorted(MODULE_FIELDS)}, got {got}"]
    name, problems = m["name"], []
    if not isinstance(name, str) or not isinstance(m["kind"], str) or not m["kind"]:
        problems.append(f"module #{i}: name and kind must be strings, got {name!r}, {m['kind']!r}")
    elif name in names:
        problems.append(f"module {name!r} is listed twice")
    if isinstance(name, str):
        names.add(name)
    bad = [key for key in MODULE_SIZES if not _is_int(m[key]) or m[key] < 1]
    problems += [f"module {name!r}: {key} must be a positive int, got {m[key]!r}" for key in bad]
    if not bad and (m["k_in"] > m["d_in"] or m["k_out"] > m["d_out"]):
        problems.append(
            f"module {name!r}: projected size (k_out={m['k_out']}, k_in={m['k_in']}) exceeds its "
            f"dimensions (d_out={m['d_out']}, d_in={m['d_in']})"
        )
    if not isinstance(m["bias"], bool):
        problems.append(f"module {name!r}: bias must be true or false, got {m['bias']!r}")
    return problems


def _passes_problems(root: Path, passes) -> list[str]:
    """Each pass entry; pass names and segment files are unique across passes."""
    if not isinstance(passes, list):
        return [_damaged(root / MANIFEST, f"'passes' must be a list, got {type(passes).__name__}")]
    problems, names, files = [], set(), set()
    for index, p in enumerate(passes):
        problems += _pass_problems(root, index, p, names, files)
    return problems


def _pass_problems(root: Path, index: int, p, names: set, files: set) -> list[str]:
    """One pass entry: its name, index, meta and finalized flag, then its segments and statistics."""
    path = root / MANIFEST
    if not isinstance(p, dict):
        return [_damaged(path, f"pass #{index} must be an object, got {type(p).__name__}")]
    missing = [key for key in ("name", "index", "segments") if key not in p]
    if missing:
        return [_damaged(path, f"pass #{index} lacks {key!r}") for key in missing]
    name, problems = p["name"], []
    if not isinstance(name, str) or not name or name in names:
        problems.append(f"pass #{index}: name must be a unique non-empty string, got {name!r}")
    else:
        names.add(name)
    if not _is_int(p["index"]) or p["index"] != index:
        problems.append(f"pass {name!r}: index {p['index']!r}, expected {index}")
    if not isinstance(p.get("meta", {}), dict):
        problems.append(f"pass {name!r}: meta must be an object")
    if not isinstance(p.get("finalized", False), bool):
        problems.append(f"pass {name!r}: finalized must be true or false, got {p['finalized']!r}")
    problems = [_damaged(path, what) for what in problems]
    problems += _segment_entries_problems(root, name, p["segments"], files)
    return problems + _statistics_entries_problems(root, name, p)


SEGMENT_FIELDS = frozenset({"file", "rank", "session"})


def _segment_entries_problems(root: Path, name, segments, files: set) -> list[str]:
    """A pass's segment entries: {file, rank, session[, rows]}, each file under segments/ and
    listed once in the whole manifest."""
    path = root / MANIFEST
    if not isinstance(segments, list):
        return [_damaged(path, f"pass {name!r}: segments must be a list, got {type(segments).__name__}")]
    problems = []
    for s in segments:
        if not isinstance(s, dict) or not SEGMENT_FIELDS <= set(s) or set(s) - SEGMENT_FIELDS - {"rows"}:
            problems.append(
                _damaged(path, f"pass {name!r}: a segment entry must be {{file, rank, session[, rows]}}, got {s!r}")
            )
            continue
        outside = inside_problem(root, s["file"], SEGMENTS, f"pass {name!r}: segment")
        if outside is not None:
            problems.append(outside)
        elif s["file"] in files:
            problems.append(_damaged(path, f"segment {s['file']!r} is listed twice"))
        else:
            files.add(s["file"])
        for key in ("rank", "session"):
            if not _is_int(s[key]) or s[key] < 0:
                problems.append(
                    _damaged(path, f"segment {s['file']!r}: {key} must be a non-negative int, got {s[key]!r}")
                )
        rows = s.get("rows")
        if rows is not None and (not _is_int(rows) or rows < 0):
            problems.append(_damaged(path, f"segment {s['file']!r}: rows must be a non-negative int, got {rows!r}"))
    return problems


def _statistics_entries_problems(root: Path, name, p: dict) -> list[str]:
    """A pass's statistics file and statistics parts: files under statistics/."""
    stats, parts = p.get("statistics"), p.get("statistics_parts", [])
    problems = []
    if stats is not None:
        problems.append(inside_problem(root, stats, "statistics", f"pass {name!r}: statistics"))
    if not isinstance(parts, list):
        problems.append(_damaged(root / MANIFEST, f"pass {name!r}: statistics_parts must be a list"))
    else:
        problems += [inside_problem(root, part, "statistics", f"pass {name!r}: statistics part") for part in parts]
    return [p for p in problems if p is not None]

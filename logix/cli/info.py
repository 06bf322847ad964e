"""`logix info`: what a log holds, read from its manifest and files without loading rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..config import Config
from ..disk import (
    FORMAT,
    PROJECTIONS,
    SEGMENTS,
    read_manifest,
)
from ..disk.lock import find_writer, last_writer
from ..disk.manifest import ModuleInfo
from ..disk.projections import projection_problems, read_projections
from ..disk.segments import segment_summary
from ..disk.statistics import statistics_summary
from ..errors import LogFormatError, NotInLogError
from .common import (
    CliError,
    Formatter,
    _log_dir,
    format_options,
    format_table,
    log_options,
    pass_option,
    write_csv,
    write_json,
)

# -- info ------------------------------------------------------------------------------------------


def _unprefixed(error: LogFormatError, what: str, path: Path) -> str:
    """A reader's complaint about a file without the "<what> <path> " it starts with."""
    prefix = f"{what} {path} "
    return str(error)[len(prefix) :] if str(error).startswith(prefix) else str(error)


def _segment_summary(root: Path, entry: dict, expected: dict) -> dict:
    """What one segment holds, committed rows and flagged rows, read and checked as logix.open
    reads it (segment_summary: the same verdict, in the same time)."""
    out = {
        "file": entry.get("file"),
        "rank": entry.get("rank"),
        "session": entry.get("session"),
        "recorded": entry.get("rows"),
        "committed": None,
        "nonfinite": None,
        "error": None,
    }
    path = root / str(entry.get("file"))
    if not os.path.lexists(path):
        out["error"] = "missing"
        return out
    try:
        out["committed"], out["nonfinite"] = segment_summary(path, root, rows=entry.get("rows"), **expected)
    except LogFormatError as e:
        out["error"] = _unprefixed(e, "segment", path)
    return out


def _statistics_summary(root: Path, p: dict, modules: list[dict]) -> dict:
    """Which curvature a pass has on disk: derived (finalize) and partial sums."""
    out = {
        "file": p.get("statistics"),
        "preconditioners": [],
        "self_influence": [],
        "partial_sums": list(p.get("statistics_parts", [])),
        "error": None,
    }
    name = p.get("statistics")
    if name is None:
        return out
    path = root / name
    if not os.path.lexists(path):
        out["error"] = "missing"
        return out
    try:
        out["preconditioners"], out["self_influence"] = statistics_summary(path, [m["name"] for m in modules])
    except LogFormatError as e:
        out["error"] = _unprefixed(e, "statistics", path)
    except (OSError, KeyError, ValueError) as e:
        out["error"] = f"cannot be read ({e})"
    return out


def _projections_summary(root: Path, modules: list[dict]) -> tuple[dict, list[str]]:
    """Which sides of each module are projected, and what is wrong with the projections, read and
    checked as logix.open's Log.projections reads them."""
    path = root / PROJECTIONS
    if not modules:
        return {}, []
    if not os.path.lexists(path):
        return {m["name"]: None for m in modules}, [f"{PROJECTIONS} missing"]
    try:
        projections = read_projections(path)
    except LogFormatError as e:
        return {m["name"]: None for m in modules}, [str(e)]
    projected = {
        m["name"]: [side for side, p in zip(("in", "out"), projections.get(m["name"], ())) if p is not None]
        for m in modules
    }
    return projected, projection_problems(projections, [ModuleInfo(**m) for m in modules], path)


def _size_on_disk(root: Path) -> tuple[int, int]:
    total = files = 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
                files += 1
            except OSError:
                pass
    return total, files


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _orphan_segments(root: Path, manifest: dict) -> list[str]:
    """Segment files on disk that the manifest does not list (a job that crashed early)."""
    listed = {s.get("file") for p in manifest["passes"] for s in p.get("segments", [])}
    folder = root / SEGMENTS
    if not folder.is_dir():
        return []
    return sorted(f"{SEGMENTS}/{p.name}" for p in folder.glob("*.h5") if f"{SEGMENTS}/{p.name}" not in listed)


def writer_status(root: Path) -> dict:
    """Whether a job is writing the log now: {"state": "writing" | "idle" | "unknown", ...}."""
    try:
        writer = find_writer(root)
    except OSError as e:
        return {"state": "unknown", "why": e.strerror or str(e), "writer": None}
    if writer is None:
        last = last_writer(root)
        return {"state": "idle", "why": None, "writer": None, "last_writer": last and vars(last)}
    return {"state": "writing", "why": None, "writer": vars(writer)}


def _pass_state(p: dict, segments: list[dict], writing: bool) -> str:
    """finalized, being written (its job holds the log now), crashed, or closed (without finalize)."""
    if p.get("finalized"):
        return "finalized"
    if writing:
        return "being written"
    return "crashed" if any(s["recorded"] is None for s in segments) else "closed"


def overview(root: Path, pass_name: str | None = None) -> dict:
    """Everything `logix info` reports, as plain data (the --json output); `pass_name`: that pass only."""
    manifest = read_manifest(root)
    status = writer_status(root)
    writing = status["state"] == "writing"
    names = [p.get("name") for p in manifest["passes"]]
    if pass_name is not None and pass_name not in names:
        raise NotInLogError(f"no pass named {pass_name!r} in {root}; passes: {names}")
    config = manifest["config"]
    modules = manifest["modules"]
    projected, problems = _projections_summary(root, modules)
    expected = dict(width=manifest["width"], dtype=Config.from_json(config).dtype, id_kind=manifest.get("id_kind"))
    passes = []
    for p in manifest["passes"]:
        if pass_name is not None and p.get("name") != pass_name:
            continue
        segments = [_segment_summary(root, s, expected) for s in p.get("segments", [])]
        for s in segments:
            if s["error"]:
                problems.append(f"pass {p['name']!r}: segment {s['file']} {s['error']}")
        readable = all(s["error"] is None for s in segments)
        rows = sum(s["committed"] or 0 for s in segments)
        nonfinite = sum(s["nonfinite"] or 0 for s in segments)
        stats = _statistics_summary(root, p, modules)
        if stats["error"]:
            problems.append(f"pass {p['name']!r}: statistics {stats['file']} {stats['error']}")
        passes.append(
            {
                "name": p["name"],
                "index": p.get("index"),
                "rows": rows if readable else None,
                "nonfinite": nonfinite if readable else None,
                "valid": rows - nonfinite if readable else None,
                "finalized": bool(p.get("finalized", False)),
                "state": _pass_state(p, segments, writing),
                "meta": p.get("meta", {}),
                "ranks": sorted({s["rank"] for s in segments}),
                "segments": segments,
                "statistics": stats,
            }
        )
    size, files = _size_on_disk(root)
    dtype = config.get("dtype", "float32")
    return {
        "path": str(root),
        "format": manifest.get("format", FORMAT),
        "schema_version": manifest.get("schema_version"),
        "logix_version": manifest.get("logix_version"),
        "created": manifest.get("created"),
        "config": config,
        "id_kind": manifest.get("id_kind"),
        "width": manifest["width"],
        "bytes_per_row": int(manifest["width"]) * np.dtype(dtype).itemsize,
        "sessions": manifest.get("sessions"),
        "ranks": sorted({s["rank"] for p in passes for s in p["segments"]}),
        "size_bytes": size,
        "files": files,
        "modules": [{**m, "projected": projected.get(m["name"])} for m in modules],
        "passes": passes,
        "orphan_segments": _orphan_segments(root, manifest),
        "writer": status,
        "problems": problems,
    }


def _writer_text(status: dict) -> str:
    if status["state"] == "unknown":
        return f"unknown: cannot test the lock ({status['why']})"
    if status["state"] == "idle":
        return "none (no job is writing this log)"
    w = status["writer"]
    if w["pid"] is None:
        return "a job that is starting (it holds the lock)"
    return f"pid {w['pid']} on host {w['host']} since {w['started']} (being written now)"


def _rank_text(config: dict) -> str:
    rank = config.get("rank")
    if isinstance(rank, list):
        return f"(k_in={rank[0]}, k_out={rank[1]})"
    if rank == "auto":
        return f"auto (within {config.get('row_bytes')} bytes per row)"
    return str(rank)


def _stats_text(stats: dict) -> str:
    if stats["error"]:
        return f"{stats['file']} {stats['error']}"
    if stats["preconditioners"]:
        return ", ".join(stats["preconditioners"])
    if stats["partial_sums"]:
        return "partial sums only"
    return None


def _meta_text(meta: dict) -> str | None:
    rest = {k: v for k, v in meta.items() if k not in ("step", "lr", "started") and v is not None}
    return " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in rest.items()) or None


INFO_TABLES = ("passes", "modules", "segments")


def _info_tables(info: dict) -> dict[str, tuple[list[str], list[list]]]:
    passes = (
        ["pass", "rows", "non-finite", "finalized", "segments", "ranks", "statistics", "step", "lr", "meta"],
        [
            [
                p["name"],
                p["rows"],
                p["nonfinite"],
                p["finalized"],
                len(p["segments"]),
                ",".join(str(r) for r in p["ranks"]) or None,
                _stats_text(p["statistics"]),
                p["meta"].get("step"),
                p["meta"].get("lr"),
                _meta_text(p["meta"]),
            ]
            for p in info["passes"]
        ],
    )
    modules = (
        ["module", "kind", "d_in", "d_out", "k_in", "k_out", "offset", "bias", "projected"],
        [
            [
                m["name"],
                m["kind"],
                m["d_in"],
                m["d_out"],
                m["k_in"],
                m["k_out"],
                m["offset"],
                m["bias"],
                "?" if m["projected"] is None else (",".join(m["projected"]) or "no"),
            ]
            for m in info["modules"]
        ],
    )
    segments = (
        ["pass", "file", "rank", "session", "committed", "non-finite", "closed"],
        [
            [
                p["name"],
                s["file"],
                s["rank"],
                s["session"],
                s["committed"] if s["error"] is None else s["error"],
                s["nonfinite"],
                s["recorded"] is not None,
            ]
            for p in info["passes"]
            for s in p["segments"]
        ],
    )
    return {"passes": passes, "modules": modules, "segments": segments}


def cmd_info(args) -> int:
    root = _log_dir(args.path)
    info = overview(root, args.pass_name)
    tables = _info_tables(info)
    if args.json:
        write_json(info)
    elif args.csv:
        write_csv(*tables[args.table or "passes"])
    elif args.table:
        print(format_table(*tables[args.table]))
    else:
        config = info["config"]
        stats = ", ".join(config.get("statistics") or []) or "none"
        total_rows = sum(p["rows"] or 0 for p in info["passes"])
        header = [
            ("log", info["path"]),
            (
                "schema",
                f"{info['format']} version {info['schema_version']} (written by logix "
                f"{info['logix_version'] or '?'}, created {info['created'] or '?'})",
            ),
            (
                "config",
                f"rank={_rank_text(config)}  dtype={config.get('dtype')}  "
                f"projection={config.get('projection')}  seed={config.get('seed')}  statistics={stats}",
            ),
            ("ids", info["id_kind"] or "none yet"),
            ("row", f"{info['width']} numbers, {info['bytes_per_row']} bytes as {config.get('dtype')}"),
            ("rows", f"{total_rows} committed in {len(info['passes'])} pass(es)"),
            ("ranks", ", ".join(str(r) for r in info["ranks"]) or "-"),
            ("sessions", info["sessions"]),
            ("writer", _writer_text(info["writer"])),
            ("size", f"{_human_bytes(info['size_bytes'])} in {info['files']} files"),
        ]
        width = max(len(k) for k, _ in header)
        print("\n".join(f"{k.ljust(width)}  {v}" for k, v in header))
        for name in INFO_TABLES[1:2] + INFO_TABLES[:1] + INFO_TABLES[2:]:
            print(f"\n{name}: {len(tables[name][1])}")
            if tables[name][1]:
                print(format_table(*tables[name]))
        notes = []
        for p in info["passes"]:
            rows = p["rows"] if p["rows"] is not None else "?"
            if p["state"] == "being written":
                notes.append(
                    f"pass {p['name']!r} is being written by {_writer_text(info['writer'])}: {rows} rows committed "
                    "so far (readable now; more will come)."
                )
            elif not p["finalized"]:
                how = (
                    "its job stopped without closing a segment (crashed or killed)"
                    if p["state"] == "crashed"
                    else "it was closed without run.finalize()"
                )
                notes.append(
                    f"pass {p['name']!r} is NOT finalized: {rows} rows committed; {how}. Its committed rows are "
                    "readable; it has no curvature statistics. Continue it with logix.init(PATH, ..., resume=True)."
                )
        for orphan in info["orphan_segments"]:
            if info["writer"]["state"] == "writing":
                notes.append(f"{orphan} is not in the manifest yet: the running job writes it")
            else:
                notes.append(f"{orphan} is on disk but not in the manifest (a crash); resume=True adopts it")
        for n in notes:
            print(f"\nnote: {n}")
        for problem in info["problems"]:
            print(f"\nproblem: {problem}")
    problems = info["problems"]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CliError(f"{root} is damaged: {problems[0]}{more}; run `logix verify {root}`", 1)
    return 0


def add_parser(subparsers) -> None:
    """`logix info`: its options and help."""
    p = subparsers.add_parser(
        "info",
        parents=[log_options(), pass_option(), format_options()],
        formatter_class=Formatter,
        help="what the log holds: passes, rows, modules, config, statistics, size",
        description="Describe a log: its config (rank, dtype, projection, seed, statistics), schema version, "
        "id kind, size on disk, the watched modules (kind, d_in, d_out, k_in, k_out), and each pass "
        "(committed rows, non-finite rows, finalized or not, segments per rank and session, "
        "statistics present, metadata such as step and lr). A pass whose job crashed or was closed "
        "without finalize is reported with its committed rows. Checks every file it reads as logix.open "
        "does and reads each segment's index (ids, flags), not its gradients; `logix verify` reads everything.",
        epilog="examples:\n  logix info runs/digits\n  logix info runs/digits --json | jq '.passes[].rows'\n"
        "  logix info runs/digits --csv --table modules",
    )
    p.add_argument(
        "--table", choices=INFO_TABLES, help="print only this table (with --csv: which table; default passes)"
    )
    p.set_defaults(func=cmd_info)

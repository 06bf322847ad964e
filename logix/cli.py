"""The `logix` command line: look into, check, score and export a log without writing Python.

    logix info PATH                      what the log holds
    logix verify PATH                    read everything; exit 1 naming each problem
    logix self-influence PATH --top 50   likely mislabeled / atypical examples
    logix top PATH --query QUERY_LOG     the most influential training examples per query
    logix export PATH --ids 1,2 --out rows.npy

`main(argv)` returns the exit status (0 ok, 1 damaged or unreadable log, 2 usage error), so tests
and other programs can call it in-process; the `logix` console script and `python -m logix` run it.
Tables go to stdout (or JSON / CSV with --json / --csv), progress bars and errors to stderr.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from .config import Config
from .errors import ConfigError, LogFormatError, LogixError, NotInLogError, StatisticsError
from .influence import CURVATURE_SOURCES, MODES, PRECONDITIONERS, available_preconditioners, resolve_preconditioner
from .lock import find_writer, last_writer
from .log import Log
from .statistics import RAW_MAX_WIDTH, SUM_KEYS
from .storage import (
    FLAG_NONFINITE,
    FORMAT,
    MANIFEST,
    PROJECTIONS,
    SCHEMA_VERSION,
    SEGMENTS,
    read_manifest,
    read_rows,
)
from .version import __version__

BLOCK_BYTES = 64 << 20  # rows read per block in verify / export: about this many bytes

DESCRIPTION = """\
Inspect, check, score and export a logix log from the shell.

A log is the directory that logix.init(PATH, ...) writes while your
training loop runs:
  manifest.json   config (rank, dtype, projection, seed, statistics),
                  watched modules, passes and their segment files (JSON)
  projections.h5  each module's projection matrices P_in, P_out
  segments/       one HDF5 file per (pass, process rank, session): one row
                  per training example (its low-rank projected gradient,
                  all modules side by side), its id, step and a non-finite
                  flag; only rows below `committed` are trusted
  statistics/     K-FAC / EK-FAC curvature per pass, from run.finalize()
A pass is an epoch or any named stretch of logging; commands read the
latest pass unless --pass NAME picks another. A pass that was never
finalized (run.close(), or a job that crashed) keeps every committed row;
it only lacks curvature statistics.

Sign convention: a POSITIVE score means the training example HELPS (a
gradient step on it lowers the query's loss); negative means it hurts.
"""

EPILOG = """\
examples:
  logix info runs/digits               passes, rows, modules, config, size
  logix info runs/digits --json        the same, machine-readable
  logix verify runs/digits             exit 0 if sound, 1 naming problems
  logix self-influence runs/digits --top 20 --preconditioner ekfac
  logix top runs/digits --query runs/digits-test --top 5 -p ekfac
  logix export runs/digits --ids 3,17,42 --out rows.npy   (+ rows.ids.npy)
  logix export runs/digits --all --module 0 --out rows.csv

exit status: 0 success; 1 a damaged or unreadable log; 2 a usage error
(bad arguments; an unknown pass, module or id; a preconditioner the pass
has no statistics for). `logix COMMAND --help` tells a command's options.
"""


class CliError(Exception):
    """An error to report as one line, with the exit status it deserves (2 usage, 1 damage)."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


# -- output ----------------------------------------------------------------------------------------


def _plain(value):
    """JSON-able Python value from numpy / torch scalars and arrays."""
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _numeric(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def format_table(headers: list[str], rows: list[list]) -> str:
    """Aligned plain text: numbers right-aligned, everything else left-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    right = [
        any(_numeric(r[i]) for r in rows) and all(_numeric(r[i]) or r[i] is None for r in rows)
        for i in range(len(headers))
    ]

    def line(values):
        out = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in cells])


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return value


def write_csv(headers: list[str], rows: list[list], stream=None) -> None:
    writer = csv.writer(stream or sys.stdout, lineterminator="\n")
    writer.writerow(headers)
    for row in rows:
        writer.writerow([_csv_value(v) for v in row])


def write_json(data) -> None:
    print(json.dumps(data, indent=1, default=_plain))


def _progress(args, total: int, what: str):
    return tqdm(total=total, desc=what, unit="rows", disable=not _bars(args), leave=False, file=sys.stderr)


def _bars(args) -> bool | None:
    """Progress bars: on a terminal, unless -q."""
    return False if args.quiet else sys.stderr.isatty()


def _say(args, message: str) -> None:
    """A human-readable remark to stderr (not part of the machine-readable output); -q silences it."""
    if not args.quiet:
        print(message, file=sys.stderr)


# -- reading ---------------------------------------------------------------------------------------


def _log_dir(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CliError(f"{p}: no such directory")
    if not p.is_dir():
        raise CliError(f"{p} is a file; a logix log is a directory (the PATH given to logix.init)")
    return p


def open_log(path: str, pass_name: str | None) -> Log:
    root = _log_dir(path)
    try:
        return Log(root, pass_name=pass_name)
    except NotInLogError as e:
        raise CliError(str(e)) from None


def require_intact(log: Log) -> None:
    """Refuse a pass with a truncated segment: HDF5 reads bytes past the end of a file as zeros, so
    its rows would otherwise look valid. Reads only metadata (where each chunk lies)."""
    if log.current is None:
        return
    for segment in log.current.segments:
        path = log.path / segment.file
        try:
            with h5py.File(path, "r", libver="latest", swmr=True) as f:
                reach = _data_extent(f)
            size = path.stat().st_size
        except (OSError, ValueError) as e:
            raise CliError(f"segment {path} cannot be read: {e}", 1) from None
        if reach > size:
            raise CliError(
                f"segment {path} is truncated ({size} bytes, its data reach {reach}); run `logix verify {log.path}`",
                1,
            )


def _modules_arg(log: Log, text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n for n in (s.strip() for s in text.split(",")) if n]
    unknown = [n for n in names if n not in log.modules]
    if unknown or not names:
        raise CliError(f"unknown module(s) {unknown or text!r}; this log's modules: {', '.join(log.modules)}")
    return names


def _check_preconditioner(log: Log, preconditioner: str, modules: list[str] | None) -> None:
    if log.current is None:
        raise CliError(f"{log.path} holds no pass yet: nothing was captured", 1)
    have = available_preconditioners(log)
    if preconditioner not in have:
        if not log.current.finalized:
            why = "it is not finalized (run.finalize() never ran: closed early or crashed)"
        else:
            why = f"the log was written with statistics={list(log.config.statistics)}"
        raise CliError(
            f"pass {log.current.name!r} has no statistics for --preconditioner {preconditioner} ({why}); "
            f"available: {', '.join(have)}"
        )
    if preconditioner == "raw":
        wide = [n for n in modules or log.modules if log.modules[n].width > RAW_MAX_WIDTH]
        if wide:
            raise CliError(
                f"modules {wide} have k_in * k_out > {RAW_MAX_WIDTH}: no raw Fisher was built for them; "
                "leave them out with --modules or pick another --preconditioner"
            )


# -- info ------------------------------------------------------------------------------------------


def _segment_summary(root: Path, entry: dict) -> dict:
    """What one segment holds, read without trusting it: committed rows and flagged rows."""
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
    if not path.is_file():
        out["error"] = "missing"
        return out
    try:
        with h5py.File(path, "r", libver="latest", swmr=True) as f:
            n = int(f["committed"][0])
            out["committed"] = n
            out["nonfinite"] = int(((read_rows(f["flags"], np.s_[:n]) & FLAG_NONFINITE) != 0).sum())
    except (OSError, KeyError, ValueError, IndexError) as e:
        out["error"] = f"cannot be read ({e})"
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
    if not path.is_file():
        out["error"] = "missing"
        return out
    try:
        with h5py.File(path, "r") as f:
            names = [m["name"] for m in modules]

            def everywhere(key):
                return bool(names) and all(n in f and key in f[n] for n in names)

            out["preconditioners"] = [
                pre
                for pre, key in (("raw", "fisher_eig"), ("kfac", "eig_a"), ("ekfac", "lambda_star"))
                if everywhere(key)
            ]
            if "self_influence" in f:
                out["self_influence"] = sorted(f["self_influence"])
    except (OSError, KeyError, ValueError) as e:
        out["error"] = f"cannot be read ({e})"
    return out


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
    projected = {}
    problems = []
    try:
        with h5py.File(root / PROJECTIONS, "r") as f:
            for m in modules:
                group = f.get(m["name"])
                projected[m["name"]] = [s for s in ("in", "out") if group is not None and s in group]
    except OSError as e:
        projected = {m["name"]: None for m in modules}
        if modules:
            problems.append(
                f"{PROJECTIONS} " + ("missing" if not (root / PROJECTIONS).exists() else f"unreadable ({e})")
            )
    passes = []
    for p in manifest["passes"]:
        if pass_name is not None and p.get("name") != pass_name:
            continue
        segments = [_segment_summary(root, s) for s in p.get("segments", [])]
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


# -- verify ----------------------------------------------------------------------------------------


class Verifier:
    """Reads every committed row and statistic of a log, collecting every problem it finds."""

    def __init__(self, root: Path, args):
        self.root = root
        self.args = args
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.manifest_refused = False
        self.counts = {"passes": 0, "segments": 0, "rows": 0, "nonfinite": 0, "projections": 0, "statistics_files": 0}

    def problem(self, message: str) -> None:
        self.problems.append(message)

    def run(self) -> None:
        try:
            manifest = read_manifest(self.root)
        except LogFormatError as e:
            self.problem(str(e))
            self.manifest_refused = True  # its own checks named the manifest's fault: no repeat below
            manifest = self._raw_manifest()
            if manifest is None:
                return
        wanted = getattr(self.args, "pass_name", None)
        names = [p.get("name") for p in manifest["passes"] if isinstance(p, dict)]
        if wanted is not None and wanted not in names:
            raise NotInLogError(f"no pass named {wanted!r} in {self.root}; passes: {names}")
        try:
            self._check(manifest)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            self.problem(f"{MANIFEST}: cannot check further, a field has the wrong type ({type(e).__name__}: {e})")

    def _raw_manifest(self) -> dict | None:
        """The manifest as JSON even when read_manifest refuses it, to check the rest of the log."""
        try:
            data = json.loads((self.root / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if isinstance(data, dict) and all(k in data for k in ("config", "modules", "passes", "width")):
            return data
        return None

    def _inside(self, file, folder: str, what: str) -> Path | None:
        """The path of a file the manifest names, if it lies inside the log's folder; else a problem
        (a tampered manifest never makes verify open files elsewhere)."""
        if not isinstance(file, str) or not file:
            self.problem(f"{MANIFEST}: {what} must be a file name, got {file!r}")
            return None
        path = self.root / file
        try:
            inside = not Path(file).is_absolute() and path.resolve().is_relative_to((self.root / folder).resolve())
        except (OSError, RuntimeError, ValueError):
            inside = False
        if not inside:
            if self.problems and repr(file) in self.problems[0]:
                return None  # read_manifest refused the manifest for this very file: said already
            self.problem(f"{MANIFEST}: {what} {file!r} is not a file under {folder}/ of the log: not opened")
            return None
        return path

    def _check(self, manifest: dict) -> None:
        version = manifest.get("schema_version")
        if isinstance(version, int) and version > SCHEMA_VERSION:
            return  # already reported: this logix cannot judge a newer format
        config = None
        try:
            config = Config.from_json(manifest["config"])
        except (ConfigError, TypeError) as e:
            if not self.manifest_refused:
                self.problem(f"{MANIFEST}: the config is invalid: {e}")
        modules = self._check_modules(manifest)
        self._check_projections(modules)
        width = manifest["width"]
        dtype = config.dtype if config else None
        wanted = getattr(self.args, "pass_name", None)
        status = writer_status(self.root)
        if status["state"] == "writing":
            self.notes.append(
                f"the log is being written by {_writer_text(status)}: rows committed after this check are not covered"
            )
        jobs = []
        for p in manifest["passes"]:
            if wanted is not None and p.get("name") != wanted:
                continue
            self.counts["passes"] += 1
            jobs.append((p, self._open_segments(p, width, dtype, manifest.get("id_kind"))))
        total = sum(n for _, segs in jobs for _, n in segs)
        with _progress(self.args, total, "verify") as bar:
            for p, segments in jobs:
                valid = self._check_rows(p, segments, width, bar)
                self._check_statistics(p, modules, config, valid)
        for orphan in _orphan_segments(self.root, manifest):
            if status["state"] == "writing":
                self.notes.append(f"{orphan} is not in the manifest yet: the running job writes it")
            else:
                self.notes.append(f"{orphan} is on disk but not in the manifest (a crash); resume=True adopts it")

    def _check_modules(self, manifest: dict) -> list[dict]:
        problem = (lambda message: None) if self.manifest_refused else self.problem
        modules = manifest["modules"]
        offset = 0
        good = []
        for m in modules:
            name = m.get("name")
            try:
                k_in, k_out, d_in, d_out = (int(m[k]) for k in ("k_in", "k_out", "d_in", "d_out"))
            except (KeyError, TypeError, ValueError) as e:
                problem(f"{MANIFEST}: module {name!r} lacks a valid size ({e})")
                continue
            if not (0 < k_in <= d_in and 0 < k_out <= d_out):
                problem(f"{MANIFEST}: module {name!r} has k_in={k_in}, k_out={k_out} for d_in={d_in}, d_out={d_out}")
            if m.get("offset") != offset:
                problem(f"{MANIFEST}: module {name!r} has offset {m.get('offset')}, expected {offset}")
            offset += k_in * k_out
            good.append(m)
        if manifest["width"] != offset:
            problem(f"{MANIFEST}: width is {manifest['width']} but the modules' blocks add up to {offset}")
        return good

    def _check_projections(self, modules: list[dict]) -> None:
        if not modules:
            return
        path = self.root / PROJECTIONS
        if not path.is_file():
            self.problem(f"{PROJECTIONS} is missing")
            return
        try:
            with h5py.File(path, "r") as f:
                for m in modules:
                    group = f.get(m["name"])
                    for side, k, d in (("in", m["k_in"], m["d_in"]), ("out", m["k_out"], m["d_out"])):
                        what = f"{PROJECTIONS}: {m['name']}/{side}"
                        present = group is not None and side in group
                        if not present:
                            if k < d:
                                self.problem(f"{what} is missing (the ({k}, {d}) projection of a projected side)")
                            continue
                        ds = group[side]
                        if not isinstance(ds, h5py.Dataset) or ds.shape != (k, d):
                            shape = getattr(ds, "shape", None)
                            self.problem(f"{what} has shape {shape}, the manifest says ({k}, {d})")
                            continue
                        if ds.dtype.kind != "f":
                            self.problem(f"{what} has dtype {ds.dtype}, expected floats")
                            continue
                        if not np.isfinite(ds[()]).all():
                            self.problem(f"{what} holds non-finite numbers")
                        self.counts["projections"] += 1
        except (OSError, KeyError, ValueError) as e:
            self.problem(f"{PROJECTIONS} cannot be read: {e}")

    def _open_segments(self, p: dict, width, dtype, id_kind) -> list[tuple[dict, int]]:
        """Check each segment's structure; the ones whose rows can be read, with their committed count."""
        out = []
        for entry in p.get("segments", []):
            self.counts["segments"] += 1
            file = entry.get("file")
            where = f"pass {p['name']!r}: segment {file}"
            path = self._inside(file, SEGMENTS, f"pass {p['name']!r}: segment")
            if path is None:
                continue
            if not path.is_file():
                self.problem(f"{where} is missing")
                continue
            try:
                with h5py.File(path, "r", libver="latest", swmr=True) as f:
                    missing = [k for k in ("committed", "ids", "grads", "flags", "step") if k not in f]
                    if missing:
                        self.problem(f"{where} lacks dataset(s) {missing}")
                        continue
                    n = int(f["committed"][0])
                    grads, ids, flags, step = f["grads"], f["ids"], f["flags"], f["step"]
                    ok = True
                    if grads.ndim != 2 or grads.shape[1] != width:
                        self.problem(f"{where}: grads has shape {grads.shape}, the manifest's width is {width}")
                        ok = False
                    if dtype is not None and grads.dtype != np.dtype(dtype):
                        self.problem(f"{where}: grads are {grads.dtype}, the config says {dtype}")
                    string_ids = h5py.check_string_dtype(ids.dtype) is not None
                    if id_kind is not None and string_ids != (id_kind == "str"):
                        self.problem(
                            f"{where}: ids are {'strings' if string_ids else ids.dtype}, the manifest says {id_kind}"
                        )
                    if flags.dtype != np.uint8 or step.dtype.kind not in "iu":
                        self.problem(f"{where}: flags are {flags.dtype} (want uint8), steps {step.dtype} (want int)")
                    held = min(len(grads), len(ids), len(flags), len(step))
                    if not 0 <= n <= held:
                        self.problem(f"{where}: {n} rows marked committed but it holds {held}")
                        ok = False
                    recorded = entry.get("rows")
                    if recorded is not None and recorded != n:
                        self.problem(f"{where}: {n} rows committed, the manifest recorded {recorded} at close")
                    reach = _data_extent(f)
                    size = path.stat().st_size
                    if reach > size:
                        self.problem(
                            f"{where} is truncated: the file has {size} bytes, its datasets reach {reach} "
                            "(what lies past the end would read as zeros)"
                        )
                        ok = False
                    attr = f.attrs.get("pass")
                    if attr is not None and attr != p["name"]:
                        self.problem(f"{where}: the file says it belongs to pass {attr!r}")
                    if ok:
                        out.append((entry, n))
            except (OSError, KeyError, ValueError, IndexError, TypeError) as e:
                self.problem(f"{where} cannot be read: {e}")
        return out

    def _check_rows(self, p: dict, segments: list[tuple[dict, int]], width: int, bar) -> int | None:
        """Read every committed row; flags must match finiteness; ids unique. Returns valid rows."""
        seen: dict = {}
        valid = 0
        readable = len(segments) == len(p.get("segments", []))
        duplicates = []
        block = max(1, BLOCK_BYTES // max(1, width * 4))
        for entry, n in segments:
            where = f"pass {p['name']!r}: segment {entry['file']}"
            try:
                with h5py.File(self.root / entry["file"], "r", libver="latest", swmr=True) as f:
                    torn: list = []
                    string_ids = h5py.check_string_dtype(f["ids"].dtype) is not None
                    ids = read_rows(f["ids"].asstr() if string_ids else f["ids"], np.s_[:n], torn=torn)
                    flags = read_rows(f["flags"], np.s_[:n], torn=torn)
                    if np.any(flags & ~np.uint8(FLAG_NONFINITE)):
                        self.problem(f"{where}: flags hold values other than 0 and {FLAG_NONFINITE}")
                    flagged = (flags & FLAG_NONFINITE) != 0
                    for i in ids.tolist():
                        if i in seen:
                            duplicates.append(i)
                        seen[i] = True
                    unflagged_bad, flagged_good, corrupt = [], [], []
                    grads = f["grads"]
                    for start, end, rows in _readable_blocks(grads, n, block, corrupt, torn):
                        finite = np.isfinite(rows).all(axis=1)
                        unflagged_bad.extend((start + np.flatnonzero(~finite & ~flagged[start:end])).tolist())
                        flagged_good.extend((start + np.flatnonzero(finite & flagged[start:end])).tolist())
                        bar.update(end - start)
                    read_rows(f["step"], np.s_[:n], torn=torn)
                    for name, chunk in sorted(set(torn)):
                        self.notes.append(
                            f"{where}: chunk {chunk} of {name!r} was torn by an interrupted write (a crash); its "
                            "committed rows match the checksum of the last complete write"
                        )
                    if corrupt:
                        bad = [i for a, b in corrupt for i in range(a, b)]
                        self.problem(
                            f"{where}: {len(bad)} row(s) fail their checksum (damaged data): rows "
                            f"{', '.join(f'{a}..{b - 1}' for a, b in corrupt[:5])}, ids {_some([ids[i] for i in bad])}"
                        )
                    self.counts["rows"] += n
                    self.counts["nonfinite"] += int(flagged.sum())
                    valid += n - int(flagged.sum())
                    if unflagged_bad:
                        self.problem(
                            f"{where}: {len(unflagged_bad)} row(s) hold NaN/Inf but are not flagged (damaged data): "
                            f"rows {_some(unflagged_bad)}, ids {_some([ids[i] for i in unflagged_bad])}"
                        )
                    if flagged_good:
                        self.problem(
                            f"{where}: {len(flagged_good)} row(s) are flagged non-finite but are finite: "
                            f"rows {_some(flagged_good)}, ids {_some([ids[i] for i in flagged_good])}"
                        )
            except (OSError, KeyError, ValueError, IndexError, TypeError) as e:
                self.problem(f"{where}: committed rows cannot be read: {e}")
                readable = False
        if duplicates:
            self.problem(f"pass {p['name']!r}: {len(duplicates)} id(s) appear more than once: {_some(duplicates)}")
        if not p.get("finalized", False):
            self.notes.append(f"pass {p['name']!r} is not finalized ({valid} valid rows committed; no statistics)")
        return valid if readable else None

    def _check_statistics(self, p: dict, modules: list[dict], config: Config | None, valid: int | None) -> None:
        wanted = config.statistics if config is not None else ()
        where = f"pass {p['name']!r}"
        for part in p.get("statistics_parts", []):
            path = self._inside(part, "statistics", f"{where}: statistics part")
            if path is not None:
                self._check_sums(f"{where}: statistics part {part}", path, modules)
        name = p.get("statistics")
        if name is None:
            if p.get("finalized") and wanted and p.get("segments") and valid:
                self.problem(
                    f"{where} is finalized with statistics={list(wanted)} but the manifest names no statistics file"
                )
            return
        path = self._inside(name, "statistics", f"{where}: statistics")
        if path is None:
            return
        what = f"{where}: statistics {name}"
        if not path.is_file():
            self.problem(f"{what} is missing")
            return
        self.counts["statistics_files"] += 1
        factors = "kfac" in wanted or "ekfac" in wanted
        try:
            with h5py.File(path, "r") as f:
                for m in modules:
                    ki, ko = m["k_in"], m["k_out"]
                    expected = {}
                    if factors:
                        expected.update(
                            a=(ki, ki),
                            s=(ko, ko),
                            eig_a=(ki,),
                            vec_a=(ki, ki),
                            eig_s=(ko,),
                            vec_s=(ko, ko),
                            a_sum=(ki, ki),
                            s_sum=(ko, ko),
                            a_count=(),
                            s_count=(),
                            skipped=(),
                        )
                    if "ekfac" in wanted:
                        expected["lambda_star"] = (ko, ki)
                    w = ki * ko
                    if "raw" in wanted and w <= RAW_MAX_WIDTH:
                        expected.update(fisher=(w, w), fisher_eig=(w,), fisher_vec=(w, w))
                    group = f.get(m["name"])
                    if expected and group is None:
                        self.problem(f"{what} lacks module {m['name']!r}")
                        continue
                    for key, shape in expected.items():
                        self._check_array(
                            f"{what}: {m['name']}/{key}",
                            group.get(key),
                            shape,
                            nonnegative=key in ("eig_a", "eig_s", "fisher_eig", "lambda_star"),
                        )
                kinds = ["identity"] + [k for k in ("kfac", "ekfac") if k in wanted or (k == "kfac" and factors)]
                if "raw" in wanted and all(m["k_in"] * m["k_out"] <= RAW_MAX_WIDTH for m in modules):
                    kinds.append("raw")
                stored = f.get("self_influence")
                for kind in kinds:
                    ds = None if stored is None else stored.get(kind)
                    shape = (valid,) if valid is not None else None
                    self._check_array(f"{what}: self_influence/{kind}", ds, shape, nonnegative=True)
        except (OSError, KeyError, ValueError, TypeError) as e:
            self.problem(f"{what} cannot be read: {e}")

    def _check_sums(self, what: str, path: Path, modules: list[dict]) -> None:
        if not path.is_file():
            self.problem(f"{what} is missing")
            return
        self.counts["statistics_files"] += 1
        try:
            with h5py.File(path, "r") as f:
                for m in modules:
                    group = f.get(m["name"])
                    if group is None:
                        self.problem(f"{what} lacks module {m['name']!r}")
                        continue
                    ki, ko = m["k_in"], m["k_out"]
                    shapes = {"a_sum": (ki, ki), "s_sum": (ko, ko), "a_count": (), "s_count": (), "skipped": ()}
                    for key in SUM_KEYS:
                        self._check_array(f"{what}: {m['name']}/{key}", group.get(key), shapes[key])
        except (OSError, KeyError, ValueError, TypeError) as e:
            self.problem(f"{what} cannot be read: {e}")

    def _check_array(self, what: str, ds, shape, nonnegative: bool = False) -> None:
        if ds is None:
            self.problem(f"{what} is missing")
            return
        if not isinstance(ds, h5py.Dataset):
            self.problem(f"{what} is not a dataset")
            return
        if shape is not None and ds.shape != tuple(shape):
            self.problem(f"{what} has shape {ds.shape}, expected {tuple(shape)}")
            return
        if ds.dtype.kind != "f":
            self.problem(f"{what} has dtype {ds.dtype}, expected floats")
            return
        values = ds[()]
        if not np.isfinite(values).all():
            self.problem(f"{what} holds non-finite numbers")
        elif nonnegative and np.any(values < 0):
            self.problem(f"{what} holds negative values (it must be >= 0)")


def _data_extent(f: h5py.File) -> int:
    """How far into the file the datasets' stored bytes reach (HDF5 reads past the end as zeros)."""
    reach = 0
    for ds in f.values():
        if not isinstance(ds, h5py.Dataset):
            continue
        if ds.chunks is None:
            offset = ds.id.get_offset()
            if offset is not None:
                reach = max(reach, offset + ds.id.get_storage_size())
            continue
        for i in range(ds.id.get_num_chunks()):
            info = ds.id.get_chunk_info(i)
            if info.byte_offset is not None:
                reach = max(reach, info.byte_offset + info.size)
    return reach


def _readable_blocks(grads, n: int, block: int, corrupt: list, torn: list):
    """(start, end, rows) over the committed rows; ranges whose checksum fails go to `corrupt`,
    narrowed down to the HDF5 chunks that hold them (a torn chunk whose committed rows verify is read)."""
    chunk = grads.chunks[0] if grads.chunks else block
    for start in range(0, n, block):
        end = min(n, start + block)
        try:
            yield start, end, read_rows(grads, np.s_[start:end], torn=torn)
        except OSError:
            for a in range(start, end, chunk):
                b = min(end, a + chunk)
                try:
                    yield a, b, read_rows(grads, np.s_[a:b], torn=torn)
                except OSError:
                    corrupt.append((a, b))


def _some(values: list, n: int = 5) -> str:
    shown = ", ".join(str(v) for v in values[:n])
    return shown + (f" and {len(values) - n} more" if len(values) > n else "")


def cmd_verify(args) -> int:
    root = _log_dir(args.path)
    v = Verifier(root, args)
    v.run()
    c = v.counts
    if args.json:
        write_json({"path": str(root), "ok": not v.problems, "problems": v.problems, "notes": v.notes, "checked": c})
    else:
        print(
            f"checked {c['passes']} pass(es), {c['segments']} segment(s), {c['rows']} committed rows "
            f"({c['nonfinite']} flagged non-finite), {c['projections']} projection(s), "
            f"{c['statistics_files']} statistics file(s)"
        )
        for n in v.notes:
            print(f"note: {n}")
        if v.problems:
            print(f"DAMAGED: {len(v.problems)} problem(s):")
            for problem in v.problems:
                print(f"  - {problem}")
        else:
            print(f"OK: {root} is sound")
    if v.problems:
        raise CliError(f"{root} is damaged: {len(v.problems)} problem(s), listed above", 1)
    return 0


# -- self-influence --------------------------------------------------------------------------------


def cmd_self_influence(args) -> int:
    log = open_log(args.path, args.pass_name)
    modules = _modules_arg(log, args.modules)
    args.preconditioner = resolve_preconditioner(log, args.preconditioner)  # "auto" named as what it chose
    _check_preconditioner(log, args.preconditioner, modules)
    require_intact(log)
    si = log.self_influence(
        args.preconditioner,
        damping=args.damping,
        damping_factor=args.damping_factor,
        modules=modules,
        progress=_bars(args),
        curvature=args.curvature,
    )
    n = len(si.ids) if args.all else args.top
    ids, values = si.top_k(n, largest=not args.lowest)
    ids, values = ids.tolist(), values.tolist()
    if args.json:
        write_json(
            {
                "path": str(log.path),
                "pass": log.current.name,
                "preconditioner": args.preconditioner,
                "curvature": args.curvature,
                "order": "lowest" if args.lowest else "highest",
                "rows": len(log),
                "results": [{"id": i, "value": v} for i, v in zip(ids, values)],
            }
        )
        return 0
    table = (["rank", "id", "self_influence"], [[r + 1, i, v] for r, (i, v) in enumerate(zip(ids, values))])
    if args.csv:
        write_csv(*table)
    else:
        _say(
            args,
            f"pass {log.current.name!r}: {len(values)} of {len(log)} rows, "
            f"{'lowest' if args.lowest else 'highest'} self-influence ({args.preconditioner})",
        )
        print(format_table(*table))
    return 0


# -- top -------------------------------------------------------------------------------------------


def _row_config(config: Config) -> dict:
    """The settings that decide what a row means (statistics only add curvature)."""
    out = config.to_json()
    out.pop("statistics", None)
    return out


def check_query_log(train: Log, query: Log) -> None:
    """A query log must have been written with the same config, modules and projection matrices."""
    problems = []
    a, b = _row_config(train.config), _row_config(query.config)
    problems += [f"{k}: {b[k]!r} in the query log, {a[k]!r} in the train log" for k in a if a.get(k) != b.get(k)]
    if list(train.modules) != list(query.modules):
        problems.append(f"modules: {list(query.modules)} in the query log, {list(train.modules)} in the train log")
    else:
        for name, m in train.modules.items():
            if query.modules[name] != m:
                problems.append(f"module {name!r}: {query.modules[name]} in the query log, {m} in the train log")
    if not problems:
        mine, theirs = train.projections(), query.projections()
        for name in train.modules:
            for side, x, y in zip(("in", "out"), mine.get(name, (None, None)), theirs.get(name, (None, None))):
                same = (x is None and y is None) or (
                    x is not None and y is not None and x.shape == y.shape and torch.equal(x, y)
                )
                if not same:
                    problems.append(f"projection {name}/{side} differs")
    if problems:
        raise CliError(
            f"{query.path} is not a query log for {train.path} (write it with the same rank, dtype, projection, "
            f"seed and watched modules): " + "; ".join(problems)
        )


def cmd_top(args) -> int:
    log = open_log(args.path, args.pass_name)
    modules = _modules_arg(log, args.modules)
    args.preconditioner = resolve_preconditioner(log, args.preconditioner)  # "auto" named as what it chose
    _check_preconditioner(log, args.preconditioner, modules)
    require_intact(log)
    qlog = open_log(args.query, args.query_pass)
    check_query_log(log, qlog)
    require_intact(qlog)
    if qlog.current is None:
        raise CliError(f"the query log {qlog.path} holds no pass: nothing was captured", 1)
    q_ids = qlog.ids.tolist()
    if not q_ids:
        raise CliError(f"pass {qlog.current.name!r} of the query log {qlog.path} holds no valid rows")
    if qlog.current.nonfinite:
        _say(args, f"logix: {qlog.current.nonfinite} query row(s) flagged non-finite are left out")
    query = SimpleNamespace(rows=qlog.rows(), ids=q_ids)
    result = log.influence(
        query,
        args.preconditioner,
        damping=args.damping,
        damping_factor=args.damping_factor,
        mode=args.mode,
        top_k=args.top,
        largest=not args.lowest,
        modules=modules,
        progress=_bars(args),
        curvature=args.curvature,
    )
    values, ids = result.values.tolist(), np.asarray(result.ids).tolist()
    if args.json:
        write_json(
            {
                "path": str(log.path),
                "pass": log.current.name,
                "query": str(qlog.path),
                "query_pass": qlog.current.name,
                "preconditioner": args.preconditioner,
                "curvature": args.curvature,
                "mode": args.mode,
                "order": "lowest" if args.lowest else "highest",
                "queries": [
                    {"query_id": q, "results": [{"id": i, "score": v} for i, v in zip(ids[r], values[r])]}
                    for r, q in enumerate(result.query_ids)
                ],
            }
        )
        return 0
    rows = [
        [q, rank + 1, i, v]
        for r, q in enumerate(result.query_ids)
        for rank, (i, v) in enumerate(zip(ids[r], values[r]))
    ]
    table = (["query_id", "rank", "train_id", "score"], rows)
    if args.csv:
        write_csv(*table)
    else:
        _say(
            args,
            f"pass {log.current.name!r} ({len(log)} rows) against {len(q_ids)} queries of "
            f"{qlog.path} pass {qlog.current.name!r}: {args.preconditioner}, {args.mode}, "
            f"{'most harmful' if args.lowest else 'most helpful'} first",
        )
        print(format_table(*table))
    return 0


# -- export ----------------------------------------------------------------------------------------


def _parse_ids(tokens: list[str], id_kind: str | None) -> list:
    out = []
    for t in tokens:
        if id_kind == "str":
            out.append(t)
            continue
        try:
            out.append(int(t))
        except ValueError:
            raise CliError(f"id {t!r} is not an integer; this log's ids are ints") from None
    return out


def _wanted_ids(args, log: Log) -> list | None:
    if args.all:
        return None
    if args.ids is not None:
        tokens = [t.strip() for t in args.ids.split(",") if t.strip()]
    else:
        try:
            text = sys.stdin.read() if args.ids_file == "-" else Path(args.ids_file).read_text()
        except OSError as e:
            raise CliError(f"cannot read --ids-file: {e}") from None
        tokens = [t.strip() for line in text.splitlines() for t in line.split(",")]
        tokens = [t for t in tokens if t and not t.startswith("#")]
    if not tokens:
        raise CliError("no ids given")
    return _parse_ids(tokens, log.id_kind)


def _column_names(log: Log, module: str | None) -> list[str]:
    names = []
    for m in [log.modules[module]] if module else log.modules.values():
        names += [f"{m.name}:{o}:{i}" for o in range(m.k_out) for i in range(m.k_in)]
    return names


def cmd_export(args) -> int:
    out = Path(args.out) if args.out != "-" else None
    fmt = "csv" if out is None else out.suffix.lower().lstrip(".")
    if fmt not in ("npy", "csv"):
        raise CliError(f"--out must end in .npy or .csv (or be - for CSV on stdout), got {args.out!r}")
    log = open_log(args.path, args.pass_name)
    if log.current is None:
        raise CliError(f"{log.path} holds no pass yet: nothing was captured", 1)
    if args.module is not None and args.module not in log.modules:
        raise CliError(f"unknown module {args.module!r}; this log's modules: {', '.join(log.modules)}")
    require_intact(log)
    columns = log.modules[args.module].columns if args.module else slice(0, log.width)
    width = columns.stop - columns.start
    all_ids = log.ids
    wanted = _wanted_ids(args, log)
    if wanted is None:
        positions = np.arange(len(all_ids))
        ids = all_ids.tolist()
    else:
        index = {i: n for n, i in enumerate(all_ids.tolist())}
        unknown = [i for i in wanted if i not in index]
        if unknown:
            flagged = set(log.flagged_ids.tolist())
            bad = [i for i in unknown if i in flagged]
            if bad:
                raise CliError(
                    f"{len(bad)} id(s) have rows flagged non-finite (not valid gradients) in pass "
                    f"{log.current.name!r}: {_some(bad, 10)}"
                )
            raise CliError(
                f"{len(unknown)} id(s) are not in pass {log.current.name!r} of {log.path}: {_some(unknown, 10)}"
            )
        positions = np.array([index[i] for i in wanted], dtype=np.int64)
        ids = wanted
    data = np.empty((len(positions), width), dtype=np.float32)
    if len(positions):
        order = np.argsort(positions, kind="stable")
        sorted_pos = positions[order]
        done, offset = 0, 0
        block = max(1, BLOCK_BYTES // max(1, log.width * 4))
        with _progress(args, len(all_ids), "export") as bar:
            for block_ids, rows in log.blocks(columns=columns, block_rows=block, recycle=True):
                end = offset + len(block_ids)
                stop = np.searchsorted(sorted_pos, end, side="left")
                if stop > done:
                    data[order[done:stop]] = rows.numpy()[sorted_pos[done:stop] - offset]
                    done = stop
                bar.update(len(block_ids))
                offset = end
                if done == len(sorted_pos):
                    break
    if args.module:
        m = log.modules[args.module]
        data_out = data.reshape(-1, m.k_out, m.k_in)
    else:
        data_out = data
    if fmt == "npy":
        np.save(out, data_out)
        ids_path = ids_file_for(out)
        id_array = np.array(ids, dtype=np.int64) if log.id_kind != "str" else np.array(ids, dtype=str)
        np.save(ids_path, id_array)
        _say(
            args,
            f"wrote {data_out.shape} float32 rows of pass {log.current.name!r} to {out} and their ids to {ids_path}",
        )
        return 0
    stream = sys.stdout if out is None else open(out, "w", newline="")  # noqa: SIM115
    try:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(["id"] + _column_names(log, args.module))
        for i, row in zip(ids, data):
            writer.writerow([i] + [f"{v:.9g}" for v in row.tolist()])
    finally:
        if out is not None:
            stream.close()
    if out is not None:
        _say(args, f"wrote {len(ids)} rows x {width} columns of pass {log.current.name!r} to {out}")
    return 0


def ids_file_for(out: Path) -> Path:
    """rows.npy -> rows.ids.npy: where `export` puts the ids of a .npy export."""
    return out.with_name(out.name[: -len(out.suffix)] + ".ids.npy")


# -- the parser ------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not np.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


class _Formatter(argparse.HelpFormatter):
    """Wraps each line of a description on its own, keeping the line breaks and indents written."""

    def _fill_text(self, text, width, indent):
        out = []
        for line in text.splitlines():
            body = line.lstrip(" ")
            pad = indent + " " * (len(line) - len(body))
            out.append(textwrap.fill(body, width, initial_indent=pad, subsequent_indent=pad + "  ") if body else "")
        return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logix", description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"logix {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or remarks on stderr")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or remarks on stderr"
    )
    common.add_argument("path", metavar="PATH", help="the log directory (the path given to logix.init)")
    passes = argparse.ArgumentParser(add_help=False)
    passes.add_argument("--pass", dest="pass_name", metavar="NAME", help="the pass to read (default: the latest)")
    formats = argparse.ArgumentParser(add_help=False)
    group = formats.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    group.add_argument("--csv", action="store_true", help="CSV on stdout (a header line, then one line per row)")
    scoring = argparse.ArgumentParser(add_help=False)
    scoring.add_argument(
        "--preconditioner",
        "-p",
        choices=("auto", *PRECONDITIONERS),
        default="auto",
        help="curvature F in g_q^T (F + lambda I)^-1 g_i: identity (gradient dot product, always "
        "available), raw, kfac, ekfac (need statistics from a finalized pass); auto, the default: "
        "the first of ekfac, kfac, raw the pass has, else identity",
    )
    scoring.add_argument(
        "--damping",
        type=_nonnegative_float,
        metavar="LAMBDA",
        help="absolute damping lambda for every module (default: F x each block's trace per unprojected dimension)",
    )
    scoring.add_argument(
        "--damping-factor",
        type=float,
        default=0.1,
        metavar="F",
        help="lambda = F x each module block's trace / (d_in d_out), its mean eigenvalue at rank full (default 0.1)",
    )
    scoring.add_argument(
        "--curvature",
        choices=CURVATURE_SOURCES,
        default="auto",
        help="whose statistics precondition: the pass's own rows (own), its curvature pass at labels drawn "
        "from the model (sampled), or the latter where the log has one (auto, the default)",
    )
    scoring.add_argument("--modules", metavar="A,B", help="score with these modules only (comma-separated names)")
    scoring.add_argument("--lowest", action="store_true", help="the lowest values first instead of the highest")

    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    p = sub.add_parser(
        "info",
        parents=[common, passes, formats],
        formatter_class=_Formatter,
        help="what the log holds: passes, rows, modules, config, statistics, size",
        description="Describe a log: its config (rank, dtype, projection, seed, statistics), schema version, "
        "id kind, size on disk, the watched modules (kind, d_in, d_out, k_in, k_out), and each pass "
        "(committed rows, non-finite rows, finalized or not, segments per rank and session, "
        "statistics present, metadata such as step and lr). A pass whose job crashed or was closed "
        "without finalize is reported with its committed rows. Reads only counters, not the rows; "
        "`logix verify` reads everything.",
        epilog="examples:\n  logix info runs/digits\n  logix info runs/digits --json | jq '.passes[].rows'\n"
        "  logix info runs/digits --csv --table modules",
    )
    p.add_argument(
        "--table", choices=INFO_TABLES, help="print only this table (with --csv: which table; default passes)"
    )
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "verify",
        parents=[common, passes],
        formatter_class=_Formatter,
        help="read every committed row and statistic; exit 0 if sound, 1 naming each problem",
        description="Check a log end to end: the manifest (config, module sizes and offsets, width), the "
        "projection matrices (present where a side is projected, right shapes, finite), every "
        "segment (present, readable, datasets of the manifest's width and dtype, committed counts "
        "consistent with the manifest), every committed row (read in blocks: a row flagged "
        "non-finite must be non-finite, an unflagged row finite; ids unique within a pass), and "
        "every statistics file (shapes and finiteness of the covariances, eigenvalues and "
        "self-influences). Prints a summary; exits 0 if the log is sound, 1 if anything is damaged, "
        "naming each problem. Unfinalized passes are noted, not counted as damage.",
        epilog="examples:\n  logix verify runs/digits\n  logix verify -q runs/digits --json",
    )
    p.add_argument("--json", action="store_true", help="the result as JSON on stdout: ok, problems, notes, counts")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "self-influence",
        parents=[common, passes, scoring, formats],
        formatter_class=_Formatter,
        help="examples ranked by self-influence g_i^T (F + lambda I)^-1 g_i (high: atypical or mislabeled)",
        description="Rank the pass's training examples by self-influence, g_i^T (F + lambda I)^-1 g_i. High "
        "values flag examples the model finds atypical or mislabeled. Prints rank, id and value; "
        "values finalize stored are read back, others computed streaming the rows.",
        epilog="examples:\n  logix self-influence runs/digits --top 20 --preconditioner ekfac\n"
        "  logix self-influence runs/digits --all --csv > self_influence.csv",
    )
    p.add_argument("--top", type=_positive_int, default=50, metavar="N", help="how many examples (default 50)")
    p.add_argument("--all", action="store_true", help="every example, sorted")
    p.set_defaults(func=cmd_self_influence)

    p = sub.add_parser(
        "top",
        parents=[common, passes, scoring, formats],
        formatter_class=_Formatter,
        help="for each query example of another log, the most influential training examples",
        description="Score every query example against the pass's training examples and print, per query id, "
        "the top train ids with their scores (positive = the train example helps the query).\n\n"
        "The queries come from QUERY_LOG, another logix log holding the query examples' rows: "
        "write it like the train log, with the same rank, dtype, projection and seed and the same "
        "watched modules (logix.init(QUERY_LOG, rank=..., seed=...); run.watch(model); capture the "
        "query examples with the trained model; run.finalize()). Its config, module list and "
        "projection matrices must match the train log's, which is checked.",
        epilog="examples:\n  logix top runs/digits --query runs/digits-test --top 5 --preconditioner ekfac\n"
        "  logix top runs/digits --query runs/test --mode relative --lowest --json",
    )
    p.add_argument("--query", required=True, metavar="QUERY_LOG", help="the log holding the query examples' rows")
    p.add_argument("--query-pass", metavar="NAME", help="the query log's pass (default: its latest)")
    p.add_argument("--top", type=_positive_int, default=10, metavar="K", help="train ids per query (default 10)")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="dot",
        help="dot (the formula), cosine (divided by both sides' preconditioned norms), relative "
        "(RelatIF: by the train side's); default dot",
    )
    p.set_defaults(func=cmd_top)

    p = sub.add_parser(
        "export",
        parents=[common, passes],
        formatter_class=_Formatter,
        help="rows of some ids (or all) as .npy or .csv, for other tools",
        description="Write rows (float32) of the pass for other tools, in the order the ids are given (--all: "
        "log order).\n"
        "  FILE.npy  an array (n, D) of whole rows, or (n, k_out, k_in) with --module; the ids go to "
        "FILE.ids.npy (int64, or unicode strings)\n"
        "  FILE.csv  a header line (id, then MODULE:OUT:IN for each column), then one line per id\n"
        "Rows flagged non-finite are not valid gradients and are not exported.",
        epilog="examples:\n  logix export runs/digits --ids 3,17,42 --out rows.npy\n"
        "  logix export runs/digits --ids-file ids.txt --module 0 --out block.npy\n"
        "  logix export runs/digits --all --out - | head",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--ids", metavar="1,2,3", help="comma-separated ids")
    which.add_argument("--ids-file", metavar="FILE", help="ids one per line or comma-separated ('-': stdin)")
    which.add_argument("--all", action="store_true", help="every valid row of the pass")
    p.add_argument("--module", metavar="NAME", help="one module's (k_out, k_in) block instead of whole rows")
    p.add_argument("--out", required=True, metavar="FILE", help="FILE.npy, FILE.csv, or - for CSV on stdout")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 damaged log, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error argparse already reported
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        status = args.func(args)
        sys.stdout.flush()  # a reader that left early (`| head`) shows up here, not at exit
        return status
    except CliError as e:
        return _fail(str(e), e.status)
    except (ConfigError, NotInLogError) as e:
        return _fail(str(e), 2)
    except (LogFormatError, StatisticsError) as e:
        return _fail(str(e), 1)
    except LogixError as e:
        return _fail(str(e), 1)
    except BrokenPipeError:
        try:  # the reader (head, less) went away: it has what it wanted, so stop quietly and succeed
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except OSError as e:
        return _fail(f"{e}", 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def _fail(message: str, status: int) -> int:
    print(f"logix: error: {' '.join(message.split())}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())

"""`logix verify`: read everything in a log and name each problem."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..config import Config
from ..disk import (
    FLAG_NONFINITE,
    MANIFEST,
    PROJECTIONS,
    SEGMENTS,
    ModuleInfo,
    default_block_rows,
    open_segment,
    read_projections,
    read_rows,
)
from ..disk.manifest import inside_problem, load_manifest, sound_modules
from ..disk.projections import projection_problems
from ..disk.rows import index_problems
from ..disk.segments import read_index, segment_problems
from ..disk.statistics import (
    RAW_MAX_WIDTH,
    ROW_GROUP,
    ModuleStatistics,
    load_sums,
    open_statistics,
    preconditioners,
    read_self_influence,
)
from ..errors import ConfigError, LogFormatError, NotInLogError
from .common import CliError, Formatter, _log_dir, _progress, _some, log_options, pass_option, write_json
from .info import _orphan_segments, _writer_text, writer_status

# -- verify ----------------------------------------------------------------------------------------


class Verifier:
    """Reads every committed row and statistic of a log, collecting every problem it finds."""

    def __init__(self, root: Path, args):
        self.root = root
        self.args = args
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.listed: set[str] = set()  # the segment files the manifest lists, as they are checked
        self.counts = {"passes": 0, "segments": 0, "rows": 0, "nonfinite": 0, "projections": 0, "statistics_files": 0}

    def problem(self, message: str) -> None:
        self.problems.append(message)

    def run(self) -> None:
        manifest, problems = load_manifest(self.root)  # the library's checks: every problem, in order
        self.problems += problems
        if manifest is None:
            return  # not a manifest this logix can check field by field (named above)
        wanted = getattr(self.args, "pass_name", None)
        names = [p["name"] for p in _passes(manifest)]
        if wanted is not None and wanted not in names:
            raise NotInLogError(f"no pass named {wanted!r} in {self.root}; passes: {names}")
        try:
            self._check(manifest)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            self.problem(f"{MANIFEST}: cannot check further, a field has the wrong type ({type(e).__name__}: {e})")

    def _inside(self, file, folder: str, what: str) -> Path | None:
        """The path of a file the manifest names, if the manifest's check lets it be opened; None
        otherwise (a tampered manifest never makes verify open files elsewhere; load_manifest named it)."""
        return None if inside_problem(self.root, file, folder, what) else self.root / file

    def _check(self, manifest: dict) -> None:
        """What the manifest lists, as far as its entries are sound: projections, segments, rows, statistics."""
        config = _config(manifest)
        modules = sound_modules(manifest)
        self._check_projections(modules)
        width = manifest["width"] if _is_count(manifest["width"]) else None
        dtype = config.dtype if config else None
        id_kind = manifest.get("id_kind") if manifest.get("id_kind") in ("int", "str") else None
        wanted = getattr(self.args, "pass_name", None)
        status = writer_status(self.root)
        if status["state"] == "writing":
            self.notes.append(
                f"the log is being written by {_writer_text(status)}: rows committed after this check are not covered"
            )
        jobs = []
        for p in _passes(manifest):
            if wanted is not None and p["name"] != wanted:
                continue
            self.counts["passes"] += 1
            jobs.append((p, self._open_segments(p, width, dtype, id_kind)))
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

    def _check_projections(self, modules: list[dict]) -> None:
        """The library's own reading and checks (logix.disk.projections), one module at a time."""
        if not modules:
            return
        path = self.root / PROJECTIONS
        if not os.path.lexists(path):  # anything else there is the reader's to name, as for logix.open
            self.problem(f"{path} is missing: the log's projections are lost")
            return
        try:
            projections = read_projections(path)
        except LogFormatError as e:
            self.problem(str(e))
            return
        infos = [ModuleInfo(**m) for m in modules]
        for problem in projection_problems(projections, infos, path):
            self.problem(problem)
        self.counts["projections"] += sum(m is not None for pair in projections.values() for m in pair)

    def _open_segments(self, p: dict, width, dtype, id_kind) -> list[tuple[dict, int]]:
        """Each segment opened and checked as logix.open does (logix.disk.segments: open_segment,
        segment_problems), then for what only verify looks at (the pass it names); the ones whose
        rows can be read, with their committed count."""
        out = []
        for entry in _segments(p):
            self.counts["segments"] += 1
            file = entry.get("file")
            where = f"pass {p['name']!r}: segment {file}"
            path = self._inside(file, SEGMENTS, f"pass {p['name']!r}: segment")
            if path is None or file in self.listed:
                continue  # the manifest's problems name it: outside the log, or listed twice
            self.listed.add(file)
            try:
                with open_segment(path, self.root) as f:  # a missing or unreadable one named as logix.open names it
                    n, problems = segment_problems(
                        f, path, width=width, dtype=dtype, id_kind=id_kind, rows=entry.get("rows")
                    )
                    for problem in problems:
                        self.problem(f"pass {p['name']!r}: segment {path} is damaged: {problem}")
                    if problems:
                        continue
                    attr = f.attrs.get("pass")
                    if attr is not None and attr != p["name"]:
                        self.problem(f"{where}: the file says it belongs to pass {attr!r}")
                    out.append((entry, n))
            except LogFormatError as e:
                self.problem(f"pass {p['name']!r}: {e}")
            except (OSError, RuntimeError, KeyError, ValueError, IndexError, TypeError) as e:
                self.problem(f"{where} cannot be read: {e}")
        return out

    def _check_rows(self, p: dict, segments: list[tuple[dict, int]], width: int, bar) -> int | None:
        """Read every committed row (flags must match finiteness), then the pass's index as
        logix.open checks it (index_problems: ids unique, flags known). Returns the valid rows, or
        None when some segment cannot be read."""
        index = []
        readable = len(segments) == len(_segments(p))
        block = default_block_rows(width)
        for entry, _ in segments:
            where = f"pass {p['name']!r}: segment {entry['file']}"
            try:
                index.append(self._check_segment_rows(where, self.root / entry["file"], block, bar))
            except (OSError, RuntimeError, KeyError, ValueError, IndexError, TypeError) as e:
                self.problem(f"{where}: committed rows cannot be read: {e}")
                readable = False
        if index:
            ids, flags = (np.concatenate([part[i] for part in index]) for i in (0, 1))
            draws = isinstance(p.get("meta"), dict) and "curvature_for" in p["meta"]
            for problem in index_problems(self.root, p["name"], ids, flags, draws):
                self.problem(problem)
        valid = sum(int(((flags & FLAG_NONFINITE) == 0).sum()) for _, flags in index)
        if not p.get("finalized", False):
            self.notes.append(f"pass {p['name']!r} is not finalized ({valid} valid rows committed; no statistics)")
        return valid if readable else None

    def _check_segment_rows(self, where: str, path: Path, block: int, bar) -> tuple[np.ndarray, np.ndarray]:
        """One segment's index read as logix.open reads it (read_index), then its committed rows in
        blocks: checksums, and flags against finiteness. Returns its ids and flags."""
        torn: list = []
        ids, flags, _ = read_index(path, self.root, torn=torn)
        n = len(ids)
        with open_segment(path, self.root) as f:
            flagged = (flags & FLAG_NONFINITE) != 0
            unflagged_bad, flagged_good, corrupt = [], [], []
            for start, end, rows in _readable_blocks(f["grads"], n, block, corrupt, torn):
                finite = np.isfinite(rows).all(axis=1)
                unflagged_bad.extend((start + np.flatnonzero(~finite & ~flagged[start:end])).tolist())
                flagged_good.extend((start + np.flatnonzero(finite & flagged[start:end])).tolist())
                bar.update(end - start)
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
        self.counts["rows"] += n
        self.counts["nonfinite"] += int(flagged.sum())
        return ids, flags

    def _check_statistics(self, p: dict, modules: list[dict], config: Config | None, valid: int | None) -> None:
        wanted = config.statistics if config is not None else ()
        where = f"pass {p['name']!r}"
        parts = p.get("statistics_parts", [])
        for part in parts if isinstance(parts, list) else []:
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
        if not os.path.lexists(path):
            self.problem(f"{what} is missing")
            return
        self.counts["statistics_files"] += 1
        factors = "kfac" in wanted or "ekfac" in wanted
        try:
            with open_statistics(path) as stats:
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
                    if not expected:
                        continue
                    try:
                        group = stats.module(m["name"])
                    except LogFormatError as e:
                        self.problem(str(e))
                        continue
                    for key, shape in expected.items():
                        self._check_array(group, key, shape, key in ("eig_a", "eig_s", "fisher_eig", "lambda_star"))
                if "row" in wanted:  # the Fisher over the whole row, in its eigenbasis
                    self._check_whole_row(stats, sum(m["k_in"] * m["k_out"] for m in modules))
        except LogFormatError as e:
            self.problem(str(e))
            return
        self._check_self_influence(what, path, wanted, modules, valid)

    def _check_self_influence(self, what: str, path: Path, wanted, modules: list[dict], valid: int | None) -> None:
        """The self-influences finalize stored, read as logix.open reads them (read_self_influence);
        then what only verify asks: one per valid row, none negative."""
        raw = all(m["k_in"] * m["k_out"] <= RAW_MAX_WIDTH for m in modules)
        for kind in preconditioners(wanted, raw=raw):
            try:
                stored = read_self_influence(path, kind)
            except LogFormatError as e:
                self.problem(str(e))
                continue
            if stored is None:
                self.problem(f"{what}: self_influence/{kind} is missing")
                continue
            values = stored[0]
            if valid is not None and len(values) != valid:
                self.problem(f"{what}: self_influence/{kind} holds {len(values)} values, the pass {valid} valid rows")
            elif bool((values < 0).any()):
                self.problem(f"{what}: self_influence/{kind} holds negative values (g^T (F + lambda I)^-1 g >= 0)")

    def _check_sums(self, what: str, path: Path, modules: list[dict]) -> None:
        """A sums file, read as finalize reads it (logix.disk.statistics.load_sums), then its shapes
        against the manifest's modules."""
        if not os.path.lexists(path):
            self.problem(f"{what} is missing")
            return
        self.counts["statistics_files"] += 1
        try:
            sums = load_sums([path])
        except LogFormatError as e:
            self.problem(str(e))
            return
        for m in modules:
            if m["name"] not in sums:
                self.problem(f"{what} lacks module {m['name']!r}")
                continue
            ki, ko = m["k_in"], m["k_out"]
            for key, shape in (("a_sum", (ki, ki)), ("s_sum", (ko, ko))):
                if tuple(sums[m["name"]][key].shape) != shape:
                    self.problem(
                        f"{what}: {m['name']}/{key} has shape {tuple(sums[m['name']][key].shape)}, expected {shape}"
                    )

    def _check_whole_row(self, stats, width: int) -> None:
        try:
            group = stats.module(ROW_GROUP)
        except LogFormatError as e:
            self.problem(str(e))
            return
        self._check_array(group, "fisher_eig", (width,), True)
        self._check_array(group, "fisher_vec", (width, width), False)

    def _check_array(self, group: ModuleStatistics, key: str, shape, nonnegative: bool) -> None:
        """One stored array, read and checked by the library (present, shape, in the file, finite,
        >= 0 where it must be); its complaint, if any, is a problem."""
        try:
            group.array(key, tuple(shape), eigenvalues=nonnegative)
        except LogFormatError as e:
            self.problem(str(e))


def _passes(manifest: dict) -> list[dict]:
    """The manifest's pass entries with a name and a list of segments (the others are among its
    problems, and not looked into)."""
    passes = manifest["passes"]
    if not isinstance(passes, list):
        return []
    return [p for p in passes if isinstance(p, dict) and "name" in p and isinstance(p.get("segments"), list)]


def _segments(p: dict) -> list[dict]:
    """A pass's segment entries that name a file (the others are among the manifest's problems)."""
    segments = p.get("segments")
    return [s for s in segments if isinstance(s, dict) and "file" in s] if isinstance(segments, list) else []


def _config(manifest: dict) -> Config | None:
    """The manifest's config, or None where it is invalid (among the manifest's problems)."""
    try:
        return Config.from_json(manifest["config"])
    except (ConfigError, TypeError, AttributeError):
        return None


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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


def add_parser(subparsers) -> None:
    """`logix verify`: its options and help."""
    p = subparsers.add_parser(
        "verify",
        parents=[log_options(), pass_option()],
        formatter_class=Formatter,
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

"""The manifest's record of passes: checks on a new pass, what a resumed pass adopts from the
sessions that crashed in it, and every process's segments gathered at a pass's end.

A pass entry is a dict of the manifest: name, index, meta, segments ({file, rank, session, rows}),
statistics_parts (the sums files that count), finalized, and statistics once finalized.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from .disk.segments import committed_ids, pass_segments
from .disk.statistics import partial_sums, read_recounted, read_sums_attrs, sums_owner
from .errors import ConfigError

logger = logging.getLogger("logix")


def pass_to_continue(passes: list[dict], name: Any, resume: bool, path: Path) -> dict | None:
    """The existing pass `name` to continue (resume=True and not finalized); None for a new name."""
    if name is not None and (not isinstance(name, str) or not name):
        raise ConfigError(f"a pass name must be a non-empty string, got {name!r}")
    existing = next((p for p in passes if p["name"] == name), None)
    if existing is None:
        return None
    if not resume:
        raise ConfigError(
            f"pass {name!r} already exists in {path}; pick a new name, "
            "or open the log with logix.init(..., resume=True) to continue it"
        )
    if existing["finalized"]:
        raise ConfigError(f"pass {name!r} in {path} is finalized; it cannot be continued")
    return existing


def new_pass(
    passes: list[dict], name: str | None, meta: dict, curvature_for: Any, statistics: tuple, path: Path
) -> dict:
    """The entry of a pass to append to `passes` (named pass<index> by default), its metadata checked."""
    index = len(passes)
    if curvature_for is not None:
        check_curvature_for(passes, curvature_for, statistics, path)
        meta["curvature_for"] = curvature_for
    check_meta(meta)
    return {
        "name": f"pass{index}" if name is None else name,
        "index": index,
        "meta": meta,
        "segments": [],
        "finalized": False,
    }


def check_meta(meta: dict) -> None:
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"pass metadata must be JSON-serialisable: {e}") from None


def check_curvature_for(passes: list[dict], target: Any, statistics: tuple, path: Path) -> None:
    """A curvature pass needs statistics and names one earlier training pass that has none yet."""
    by_name = {p["name"]: p for p in passes}
    if not statistics:
        raise ConfigError("a curvature pass needs statistics: logix.init(..., statistics='ekfac')")
    if not isinstance(target, str) or target not in by_name:
        raise ConfigError(f"curvature_for={target!r} names no pass of {path}; passes: {list(by_name)}")
    if "curvature_for" in by_name[target]["meta"]:
        raise ConfigError(f"pass {target!r} is itself a curvature pass; name the pass it is for")
    taken = [p["name"] for p in passes if p["meta"].get("curvature_for") == target]
    if taken:
        raise ConfigError(f"pass {target!r} already has a curvature pass, {taken[0]!r}")


def adopt_crashed(root: Path, p: dict, session: int, gathers_sums: bool) -> dict[tuple[int, int], int]:
    """What crashed sessions left of a pass: segments the manifest never listed, and their
    checkpointed statistics; {(process, session): rows the statistics cover}.

    A session that ended cleanly covers all its rows; a crashed one the rows committed at its last
    statistics checkpoint (none without one). `session` is this one, whose files are its own."""
    listed = {s["file"] for s in p["segments"]}
    for entry in pass_segments(root, p["index"]):
        if entry["file"] not in listed and entry["session"] != session:
            p["segments"].append({**entry, "rows": None})
    parts = p.setdefault("statistics_parts", [])
    finished = {sums_owner(f)[1] for f in parts}
    covered = {}
    if gathers_sums:
        for entry in p["segments"]:
            if entry["session"] not in finished:
                covered[(entry["rank"], entry["session"])] = 0
    for name in partial_sums(root, p["index"]):
        process_index, owner = sums_owner(name)
        if owner in finished or owner == session or name in parts:
            continue
        parts.append(name)
        covered[(process_index, owner)] = int(read_sums_attrs(root / name).get("rows_covered", 0))
    return covered


def committed_ids_of(root: Path, p: dict, covered_rows: dict[tuple[int, int], int]) -> tuple[Counter, Counter]:
    """(ids whose rows and statistics are in, ids whose rows are in but statistics were lost), each
    id counted once per committed row (a curvature pass holds several draws of an id).

    A row's statistics are in when the sums of its own session cover it (covered_rows), or when a
    later session counted them again and its sums say so (read_recounted)."""
    covered, uncovered = Counter(), Counter()
    for entry in p["segments"]:
        if (root / entry["file"]).is_file():
            ids = committed_ids(root / entry["file"])
            n = covered_rows.get((entry["rank"], entry["session"]), len(ids))
            covered.update(ids[:n])
            uncovered.update(ids[n:])
    for part in p.get("statistics_parts", []):
        for i in read_recounted(root / part) & uncovered.keys():
            covered[i] += uncovered.pop(i)
    return covered, uncovered


def gather_segments(p: dict, reports: list[dict]) -> bool:
    """Add every process's new segments to the pass entry, in (session, process) order; whether
    any process's writer failed. reports: each process's {"segments", "failed"}."""
    listed = {s["file"] for s in p["segments"]}
    for report in reports:
        p["segments"].extend(s for s in report["segments"] if s["file"] not in listed)
    p["segments"].sort(key=lambda s: (s["session"], s["rank"]))
    return any(report["failed"] for report in reports)


def pass_to_resume(passes: list[dict]) -> str | None:
    """The pass a resumed run's first capture continues: the last one, if it is not finalized."""
    return passes[-1]["name"] if passes and not passes[-1]["finalized"] else None


def record_closed_segment(root: Path, p: dict, segment) -> None:
    """Note in the pass entry the rows this process's segment committed, now that it is closed."""
    if segment is None:
        return
    entry = next(s for s in p["segments"] if root / s["file"] == segment.path)
    entry["rows"] = segment.committed_rows
    logger.info("logix: %s: %d rows (%d non-finite)", segment.path.name, segment.rows, segment.nonfinite)

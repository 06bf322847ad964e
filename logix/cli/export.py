"""`logix export`: rows of chosen ids to .npy / .h5 / .csv."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

from ..log import Log, default_block_rows
from .common import (
    CliError,
    Formatter,
    _log_dir,
    _progress,
    _say,
    _some,
    log_options,
    pass_option,
)

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
    log = Log(_log_dir(args.path), pass_name=args.pass_name)
    if log.current is None:
        raise CliError(f"{log.path} holds no pass yet: nothing was captured", 1)
    if args.module is not None and args.module not in log.modules:
        raise CliError(f"unknown module {args.module!r}; this log's modules: {', '.join(log.modules)}")
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
        block = default_block_rows(log.width)
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


def add_parser(subparsers) -> None:
    """`logix export`: its options and help."""
    p = subparsers.add_parser(
        "export",
        parents=[log_options(), pass_option()],
        formatter_class=Formatter,
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

"""What every command shares: errors, output (tables, CSV, JSON, progress), the log directory a
PATH names, and the checks a scoring command runs on the log it opened."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from ..curvature import available_preconditioners
from ..disk.statistics import RAW_MAX_WIDTH

if TYPE_CHECKING:  # for annotations only: the commands open logs, this module only reads them
    from ..log import Log


class CliError(Exception):
    """An error to report as one line, with the exit status it deserves (2 usage, 1 damage)."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


# -- options -------------------------------------------------------------------------------------


class Formatter(argparse.HelpFormatter):
    """Wraps each line of a description on its own, keeping the line breaks and indents written."""

    def _fill_text(self, text, width, indent):
        out = []
        for line in text.splitlines():
            body = line.lstrip(" ")
            pad = indent + " " * (len(line) - len(body))
            out.append(textwrap.fill(body, width, initial_indent=pad, subsequent_indent=pad + "  ") if body else "")
        return "\n".join(out)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not np.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


QUIET_HELP = "no progress bars or remarks on stderr"


def log_options() -> argparse.ArgumentParser:
    """A parent parser: -q and the log's PATH, which every command takes."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
    parent.add_argument("path", metavar="PATH", help="the log directory (the path given to logix.init)")
    return parent


def pass_option() -> argparse.ArgumentParser:
    """A parent parser: --pass NAME."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--pass", dest="pass_name", metavar="NAME", help="the pass to read (default: the latest)")
    return parent


def format_options() -> argparse.ArgumentParser:
    """A parent parser: --json or --csv, one at most."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    group.add_argument("--csv", action="store_true", help="CSV on stdout (a header line, then one line per row)")
    return parent


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


def _some(values: list, n: int = 5) -> str:
    shown = ", ".join(str(v) for v in values[:n])
    return shown + (f" and {len(values) - n} more" if len(values) > n else "")

"""The parser and `main`: one subcommand per module of this package."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import ConfigError, LogFormatError, LogixError, NotInLogError, StatisticsError
from ..version import __version__
from . import export, info, report, scores, verify
from .common import QUIET_HELP, CliError, Formatter

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
  logix report runs/lm --scores top.h5 --texts train.jsonl --queries q.jsonl --out report.html

exit status: 0 success; 1 a damaged or unreadable log; 2 a usage error
(bad arguments; an unknown pass, module or id; a preconditioner the pass
has no statistics for). `logix COMMAND --help` tells a command's options.
"""


# -- the parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each command's module adds its own subcommand(s)."""
    parser = argparse.ArgumentParser(prog="logix", description=DESCRIPTION, epilog=EPILOG, formatter_class=Formatter)
    parser.add_argument("--version", action="version", version=f"logix {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    info.add_parser(sub)
    verify.add_parser(sub)
    scores.add_parsers(sub)
    export.add_parser(sub)
    report.add_parser(sub)
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

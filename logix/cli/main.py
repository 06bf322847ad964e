"""The parser and `main`: one subcommand per module of this package."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

import numpy as np

from ..curvature import CURVATURE_SOURCES, PRECONDITIONERS
from ..errors import ConfigError, LogFormatError, LogixError, NotInLogError, StatisticsError
from ..influence import MODES
from ..version import __version__
from .common import CliError
from .export import cmd_export
from .info import INFO_TABLES, cmd_info
from .scores import cmd_self_influence, cmd_top
from .verify import cmd_verify

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

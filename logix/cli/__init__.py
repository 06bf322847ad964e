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

from .main import build_parser, main

__all__ = ["build_parser", "main"]

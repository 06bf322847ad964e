"""`logix report`: the report page from stored results and the training texts."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from ..curvature import resolve_preconditioner
from ..errors import ConfigError, LogFormatError
from ..log import Log
from ..report import report
from ..results import Scores, TopK
from ..token_split import TokenScores
from .common import (
    CliError,
    Formatter,
    _bars,
    _check_preconditioner,
    _log_dir,
    _say,
    log_options,
    pass_option,
    positive_int,
)


def _jsonl(path: str, what: str) -> list[dict]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise CliError(f"cannot read {what} {path}: {e.strerror or e}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CliError(f"{path}:{number}: not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise CliError(f"{path}:{number}: each line must be a JSON object")
        records.append(record)
    return records


def _texts(path: str) -> dict:
    texts = {}
    for number, record in enumerate(_jsonl(path, "--texts"), 1):
        if "id" not in record or not ("text" in record or "tokens" in record):
            raise CliError(f"{path}: record {number} needs an id and a text (or tokens)")
        value = record.get("tokens", record.get("text"))
        if not isinstance(value, str) and not (isinstance(value, list) and all(isinstance(t, str) for t in value)):
            raise CliError(f"{path}: record {number}: text must be a string, tokens a list of strings")
        texts[record["id"]] = value
    return texts


def _scores(path: str):
    for kind in (TopK, Scores):
        try:
            return kind.load(path)
        except LogFormatError:
            continue
    raise CliError(f"{path} holds no saved TopK or Scores (save them with top.save(path) / scores.save(path))")


def _scored_from_query_log(args, log: Log) -> TopK:
    """The top --top train ids per query of QUERY_LOG (a log of the query examples' rows)."""
    from .scores import check_query_log  # here, not at the top: `logix report` with stored scores needs none of it

    qlog = Log(_log_dir(args.query))
    check_query_log(log, qlog)
    if qlog.current is None or not len(qlog):
        raise CliError(f"the query log {qlog.path} holds no valid rows", 1)
    query = SimpleNamespace(rows=qlog.rows(), ids=qlog.ids.tolist())
    return log.influence(query, args.scoring, top_k=args.top, progress=_bars(args))


def cmd_report(args) -> int:
    log = Log(_log_dir(args.path), pass_name=args.pass_name)
    if args.query:
        args.scoring = resolve_preconditioner(log, args.preconditioner if args.preconditioner != "none" else "auto")
        _check_preconditioner(log, args.scoring, None)
        scores = _scored_from_query_log(args, log)
    else:
        scores = _scores(args.scores)
    queries = [(r.get("prompt", ""), r.get("completion", "")) for r in _jsonl(args.queries, "--queries")]
    tokens = None
    if args.tokens:
        try:
            tokens = TokenScores.load(args.tokens)
        except LogFormatError as e:
            raise CliError(f"--tokens: {e}") from None
    self_influence = None
    if args.preconditioner != "none":
        args.preconditioner = resolve_preconditioner(log, args.preconditioner)  # "auto" named as what it chose
        _check_preconditioner(log, args.preconditioner, None)
        self_influence = log.self_influence(args.preconditioner, progress=_bars(args))
    try:
        out = report(args.out, queries, scores, _texts(args.texts), tokens=tokens, self_influence=self_influence,
                     top=args.top, title=args.title)  # fmt: skip
    except OSError as e:
        raise CliError(f"cannot write --out {args.out}: {e.strerror or e}") from None
    except ConfigError as e:
        raise CliError(str(e)) from None
    _say(args, f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        parents=[log_options(), pass_option()],
        formatter_class=Formatter,
        help="an HTML page: each query's most influential training texts, their tokens highlighted",
        description="Write one self-contained HTML page (nothing fetched when it opens; training text "
        "escaped) from results saved in Python: per query its prompt and completion, the top training "
        "sequences with score, share and token highlighting, and the log's self-influence.",
        epilog="examples:\n  logix report runs/lm --scores top.h5 --tokens tokens.h5 --texts train.jsonl "
        "--queries queries.jsonl --out report.html\n\n"
        "  logix report runs/lm --query runs/lm-queries --texts train.jsonl --queries queries.jsonl --out r.html\n\n"
        "files: --scores a TopK or Scores saved with .save(path); --tokens a TokenScores from "
        "log.token_influence(...).save(path); --texts JSON lines {\"id\": 3, \"text\": \"...\"} (or "
        "\"tokens\": [...], the strings the token split counts); --queries JSON lines {\"prompt\": \"...\", "
        "\"completion\": \"...\"}, one per query row, in the scores' order",
    )
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--scores", metavar="FILE", help="a saved TopK or Scores of the queries")
    given.add_argument("--query", metavar="QUERY_LOG", help="a log of the query examples' rows, scored here "
                       "(as `logix top --query`) with --preconditioner")  # fmt: skip
    p.add_argument("--texts", required=True, metavar="FILE", help="the training texts, JSON lines keyed by id")
    p.add_argument("--queries", required=True, metavar="FILE", help="prompt and completion per query, JSON lines")
    p.add_argument("--tokens", metavar="FILE", help="a saved TokenScores, for token highlighting")
    p.add_argument("--top", type=positive_int, default=20, metavar="K", help="training sequences per query")
    p.add_argument("--title", default="logix report", help="the page's title")
    p.add_argument(
        "-p", "--preconditioner", default="auto", metavar="NAME",
        help="the preconditioner of self-influence and of --query's scores (identity, raw, kfac, ekfac, auto); "
        "none leaves self-influence out",
    )  # fmt: skip
    p.add_argument("--out", required=True, metavar="FILE", help="the page to write")
    p.set_defaults(func=cmd_report)

"""`logix self-influence` and `logix top`: scoring from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..config import Config
from ..curvature import CURVATURE_SOURCES, PRECONDITIONERS, resolve_preconditioner
from ..influence import MODES
from ..log import Log
from .common import (
    CliError,
    Formatter,
    _bars,
    _check_preconditioner,
    _log_dir,
    _modules_arg,
    _say,
    format_options,
    format_table,
    log_options,
    nonnegative_float,
    pass_option,
    positive_int,
    write_csv,
    write_json,
)

# -- self-influence --------------------------------------------------------------------------------


def _scored_log(args):
    """The log to score and its --modules, its preconditioner resolved and checked (its segments were
    checked when it was opened: a truncated one is refused there)."""
    log = Log(_log_dir(args.path), pass_name=args.pass_name)
    modules = _modules_arg(log, args.modules)
    args.preconditioner = resolve_preconditioner(log, args.preconditioner, args.curvature)  # "auto" named as chosen
    _check_preconditioner(log, args.preconditioner, modules)
    return log, modules


def cmd_self_influence(args) -> int:
    log, modules = _scored_log(args)
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
    if args.ids_out:
        _write_ids(args.ids_out, ids)
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
    table = (["rank", "id", "self_influence"], [[place + 1, i, v] for place, (i, v) in enumerate(zip(ids, values))])
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
    log, modules = _scored_log(args)
    qlog = Log(_log_dir(args.query), pass_name=args.query_pass)
    check_query_log(log, qlog)
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
        aggregate=args.aggregate,
    )
    values, ids = result.values.tolist(), np.asarray(result.ids).tolist()
    if args.ids_out:
        _write_ids(args.ids_out, [i for row in ids for i in row])
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
                "aggregate": args.aggregate,
                "order": "lowest" if args.lowest else "highest",
                "queries": [
                    {"query_id": q, "results": [{"id": i, "score": v} for i, v in zip(ids[r], values[r])]}
                    for r, q in enumerate(result.query_ids)
                ],
            }
        )
        return 0
    rows = [
        [q, place + 1, i, v]
        for row, q in enumerate(result.query_ids)
        for place, (i, v) in enumerate(zip(ids[row], values[row]))
    ]
    table = (["query_id", "rank", "train_id", "score"], rows)
    if args.csv:
        write_csv(*table)
    else:
        _say(
            args,
            f"pass {log.current.name!r} ({len(log)} rows) against {len(q_ids)} queries of "
            f"{qlog.path} pass {qlog.current.name!r}{f' ({args.aggregate} over them)' if args.aggregate else ''}: "
            f"{args.preconditioner}, {args.mode}, "
            f"{'most harmful' if args.lowest else 'most helpful'} first",
        )
        print(format_table(*table))
    return 0


def _write_ids(path: str, ids: list) -> None:
    """The chosen train ids, one per line and each once, in rank order: a list a dataset can index
    (`logix export --ids-file` reads it back)."""
    unique = list(dict.fromkeys(ids))
    try:
        Path(path).write_text("".join(f"{i}\n" for i in unique))
    except OSError as e:
        raise CliError(f"cannot write --ids-out {path}: {e.strerror or e}") from None


# -- the subcommands -------------------------------------------------------------------------------


def scoring_options() -> argparse.ArgumentParser:
    """A parent parser: the preconditioner, its damping and curvature, the modules, the order."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--preconditioner",
        "-p",
        choices=("auto", *PRECONDITIONERS),
        default="auto",
        help="curvature F in g_q^T (F + lambda I)^-1 g_i: identity (gradient dot product, always "
        "available), raw, kfac, ekfac, row (need statistics from a finalized pass); auto, the default: "
        "row from a curvature pass where the log has one, else the first of ekfac, kfac, raw, row the "
        "pass has, else identity",
    )
    parent.add_argument(
        "--damping",
        type=nonnegative_float,
        metavar="LAMBDA",
        help="absolute damping lambda for every module (default: F x each block's trace per unprojected dimension; "
        "row: F x its trace / D)",
    )
    parent.add_argument(
        "--damping-factor",
        type=float,
        default=None,
        metavar="F",
        help="lambda = F x each module block's trace / (d_in d_out), its mean eigenvalue at rank full "
        "(default 0.1); for row, F x its trace / D, its mean eigenvalue (default 0.3)",
    )
    parent.add_argument(
        "--curvature",
        choices=CURVATURE_SOURCES,
        default="auto",
        help="whose statistics precondition: the pass's own rows (own), its curvature pass at labels drawn "
        "from the model (sampled), or the latter where the log has one (auto, the default)",
    )
    parent.add_argument("--modules", metavar="A,B", help="score with these modules only (comma-separated names)")
    parent.add_argument("--lowest", action="store_true", help="the lowest values first instead of the highest")
    return parent


def add_parsers(subparsers) -> None:
    """`logix self-influence` and `logix top`: their options and help."""
    p = subparsers.add_parser(
        "self-influence",
        parents=[log_options(), pass_option(), scoring_options(), format_options()],
        formatter_class=Formatter,
        help="examples ranked by self-influence g_i^T (F + lambda I)^-1 g_i (high: atypical or mislabeled)",
        description="Rank the pass's training examples by self-influence, g_i^T (F + lambda I)^-1 g_i. High "
        "values flag examples the model finds atypical or mislabeled. Prints rank, id and value; "
        "values finalize stored are read back, others computed streaming the rows.",
        epilog="examples:\n  logix self-influence runs/digits --top 20 --preconditioner ekfac\n"
        "  logix self-influence runs/digits --all --csv > self_influence.csv",
    )
    p.add_argument("--top", type=positive_int, default=50, metavar="N", help="how many examples (default 50)")
    p.add_argument("--all", action="store_true", help="every example, sorted")
    p.add_argument("--ids-out", metavar="FILE", help="also write the listed ids to FILE, one per line")
    p.set_defaults(func=cmd_self_influence)
    _add_top_parser(subparsers)


def _add_top_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "top",
        parents=[log_options(), pass_option(), scoring_options(), format_options()],
        formatter_class=Formatter,
        help="for each query example of another log, the most influential training examples",
        description="Score every query example against the pass's training examples and print, per query id, "
        "the top train ids with their scores (positive = the train example helps the query).\n\n"
        "The queries come from QUERY_LOG, another logix log holding the query examples' rows: "
        "write it like the train log, with the same rank, dtype, projection and seed and the same "
        "watched modules (logix.init(QUERY_LOG, rank=..., seed=...); run.watch(model); capture the "
        "query examples with the trained model; run.finalize()). Its config, module list and "
        "projection matrices must match the train log's, which is checked.",
        epilog="examples:\n  logix top runs/digits --query runs/digits-test --top 5 --preconditioner ekfac\n"
        "  logix top runs/digits --query runs/test --mode relative --lowest --json\n"
        "  logix top runs/digits --query runs/target --aggregate mean --top 200 --ids-out selected.txt",
    )
    p.add_argument("--query", required=True, metavar="QUERY_LOG", help="the log holding the query examples' rows")
    p.add_argument("--query-pass", metavar="NAME", help="the query log's pass (default: its latest)")
    p.add_argument("--top", type=positive_int, default=10, metavar="K", help="train ids per query (default 10)")
    p.add_argument(
        "--aggregate",
        choices=("sum", "mean"),
        help="one ranking for the whole query set: each train example's scores summed (or averaged) over "
        "the queries, exactly, streamed (query id 'sum' or 'mean')",
    )
    p.add_argument(
        "--ids-out", metavar="FILE", help="also write the listed train ids to FILE, one per line, each once"
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="dot",
        help="dot (the formula), cosine (divided by both sides' preconditioned norms), relative "
        "(RelatIF: by the train side's); default dot",
    )
    p.set_defaults(func=cmd_top)

"""One damped Fisher over the whole projected row, from labels drawn from the model (issue 13).

    python benchmarks/row_fisher.py            # both tasks, ranks 16 and 32 (about 2 minutes on 2 cores)
    python benchmarks/row_fisher.py --quick    # rank 16 only
    python benchmarks/row_fisher.py --smoke    # seconds: checks the script works; its numbers mean nothing

An exploratory measurement, not yet a logix preconditioner. K-FAC and EK-FAC precondition each
module's block on its own; TRAK inverts one damped Fisher over its whole projected gradient. Here
the same is done with logix's rows: F = R_s^T R_s / (K N), where R_s holds each training example's
row at labels drawn from the model (K draws per example: the true Fisher, the GGN of the
cross-entropy, unlike the empirical Fisher of the observed labels), and a query's scores are
q^T (F + lambda I)^-1 R^T with lambda = f x trace(F) / D. D is the row's width, so this is for rows
of a few thousand numbers: `rank="auto"` (PCA projections, ranks allocated within a byte budget)
at rank 16's bytes gives 409 numbers on the digits MLP and 2,814 on the tiny language model.

Same tasks, halves and cached retraining as `benchmarks/attribution_quality.py` (digits: 100
halves x 3 seeds; language model: 100 halves). Each row: LDS of the whole-row Fisher at each K and
f, beside logix's K-FAC and EK-FAC on the same rows.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attribution_quality as aq  # noqa: E402
import lm_task  # noqa: E402

import logix  # noqa: E402

FACTORS = (0.1, 0.3, 1.0)


def row_scores(train_rows: torch.Tensor, query_rows: torch.Tensor, fisher: torch.Tensor, factor: float):
    """(Q, N): q^T (F + lambda I)^-1 r with lambda = f trace(F) / D."""
    damping = factor * torch.trace(fisher) / fisher.shape[0]
    solved = torch.linalg.solve(fisher + damping * torch.eye(fisher.shape[0], dtype=fisher.dtype), query_rows.T)
    return solved.T @ train_rows.T


def digits_task(smoke: bool):
    setup = aq.make_setup(aq.parse_args(["--smoke"] if smoke else []))
    data = aq.load_data(setup)
    x, y, xq, yq = data
    model = aq.to_module(aq.train_batched(x, y, torch.arange(len(x))[None], [0], setup))
    masks = aq.make_halves(setup, 6 if smoke else 100)
    cache = None if smoke else Path("benchmarks/.cache")
    outcomes, _, _ = aq.retrain_outcomes(setup, data, masks, 1 if smoke else 3, cache, 50)
    outcome = -outcomes["loss"].mean(axis=1)

    def log(path, rank, projection, budget):
        aq.log_model(path, model, x, y, rank, projection, 250, budget)

    def query(log):
        return aq.capture_query(log, model, xq, yq)

    def sampled_rows(log, draws: int, generator) -> torch.Tensor:
        with log.query(model) as q:  # logix: rows at drawn labels, in the log's projected space
            for k in range(draws):
                with torch.no_grad():
                    drawn = torch.multinomial(torch.softmax(model(x), 1), 1, generator=generator)[:, 0]
                with q.capture(list(range(k * len(x), (k + 1) * len(x))), reduction="sum"):
                    F.cross_entropy(model(x), drawn, reduction="sum").backward()
                model.zero_grad()
        return q.rows

    return "digits MLP", len(x), masks, outcome, log, query, sampled_rows


def lm_task_setup(smoke: bool):
    recipe = lm_task.SMOKE if smoke else lm_task.Recipe()
    data = lm_task.load_data(recipe)
    masks = lm_task.halves(recipe, 6 if smoke else 100)
    outcome = -lm_task.retrain_outcomes(data, recipe, masks, None if smoke else Path("benchmarks/.cache"))
    model = lm_task.train(data, recipe)
    queries = lm_task.queries_for(data)
    n, batch = recipe.n_train, recipe.batch

    def log(path, rank, projection, budget):
        aq.log_lm(path, model, data, rank, projection, batch, budget)

    def query(log):
        with log.query(model) as q:
            queries(q, model)
        model.zero_grad()
        return q

    def sampled_rows(log, draws: int, generator) -> torch.Tensor:
        with log.query(model) as q:
            for k in range(draws):
                for start in range(0, n, batch):
                    ids, mask = lm_task.pad(data.train[start : start + batch])
                    with q.capture(list(range(k * n + start, k * n + start + len(ids))), mask=mask, reduction="sum"):
                        out = lm_task.logits(model, ids, mask)
                        drawn = torch.cat([ids[:, :1], logix.sampled_labels(out[:, :-1], generator)], dim=1)
                        lm_task.sequence_losses(out, drawn, mask).sum().backward()
                    model.zero_grad()
        return q.rows

    return "tiny GPT-2", n, masks, outcome, log, query, sampled_rows


def run_task(setup, ranks, draws: list[int], tmp: Path, max_width: int) -> None:
    name, n, masks, outcome, log_fn, query_fn, sampled_fn = setup
    budget = {}
    for rank in ranks:
        for projection in ("gaussian", "pca-auto"):
            path = tmp / f"{projection}-{rank}"
            log_fn(path, rank, projection, budget)
            log = logix.open(path)
            budget.setdefault(rank, log.width * 4)
            if log.width > max_width:
                print(f"{name}, {projection} at rank {rank}'s bytes, D {log.width}: over --max-width, skipped")
                shutil.rmtree(path)
                continue
            q = query_fn(log)
            start = time.perf_counter()
            sampled = sampled_fn(log, max(draws), torch.Generator().manual_seed(1)).double()
            draw_s = time.perf_counter() - start
            train, ids, query = log.rows().double(), np.asarray(log.ids), q.rows.double()
            cells = []
            for k in draws:
                fisher = sampled[: k * n].T @ sampled[: k * n] / (k * n)  # the second moment of the drawn rows
                for f in FACTORS:
                    scores = row_scores(train, query, fisher, f)
                    cells.append(f"K={k} f={f}: {aq.lds(aq.in_order(ids, scores, n), masks, outcome)[0]:.3f}")
            blocks = []
            for pre in ("kfac", "ekfac"):
                s = log.influence(q, pre, progress=False)
                blocks.append(f"{pre} {aq.lds(aq.in_order(s.train_ids, s.values, n), masks, outcome)[0]:.3f}")
            print(f"{name}, {projection} at rank {rank}'s bytes, D {log.width} ({max(draws)} draws: {draw_s:.1f} s)")
            print("  whole-row Fisher: " + "; ".join(cells))
            print("  per-module, same rows: " + "; ".join(blocks), flush=True)
            shutil.rmtree(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="rank 16 only")
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny tasks, rank 4, one draw")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--max-width", type=int, default=4096, help="skip rows wider than this (a dense D x D solve per setting)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ranks = [4] if args.smoke else [16] if args.quick else [16, 32]
    draws = [1] if args.smoke else [1, 4, 16]
    print(f"torch {torch.__version__}, logix {logix.__version__}, threads {torch.get_num_threads()}")
    if args.smoke:
        print("--smoke: a check that the benchmark runs end to end; its numbers mean nothing")
    with tempfile.TemporaryDirectory(prefix="logix-row-fisher-") as tmp:
        for setup in (digits_task(args.smoke), lm_task_setup(args.smoke)):
            run_task(setup, ranks, draws, Path(tmp), args.max_width)


if __name__ == "__main__":
    main()

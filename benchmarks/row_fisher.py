"""preconditioner="row": one damped Fisher over the whole projected row, from labels drawn from the
model (issue 13), measured with logix's own API.

    python benchmarks/row_fisher.py            # both tasks, ranks 16 and 32 (about 3 minutes on 2 cores)
    python benchmarks/row_fisher.py --quick    # rank 16 only
    python benchmarks/row_fisher.py --ranks full  # rank full (digits; the language model's rows are too wide)
    python benchmarks/row_fisher.py --smoke    # seconds: checks the script works; its numbers mean nothing

K-FAC and EK-FAC precondition each module's block on its own; TRAK inverts one damped Fisher over
its whole projected gradient. `statistics=[..., "row"]` gives logix the same over its rows:
F = mean r r^T over whole rows, and scores q^T (F + lambda I)^-1 r with lambda = f x trace(F) / D
(f = 0.3 by default). From the pass's own rows F is the empirical Fisher; from a curvature pass
that captures every training example again at K labels drawn from the model (the same ids once
per draw) it is the true Fisher, the GGN of the cross-entropy, and then `preconditioner="auto"`
takes it. D is the row's width (at most logix.config.ROW_MAX_WIDTH), so this is for narrow rows:
`rank="auto"` (PCA projections, ranks allocated within a byte budget) at rank 16's bytes gives 409
numbers on the digits MLP and 2,814 on the tiny language model.

Same tasks, halves and cached retraining as `benchmarks/attribution_quality.py` (digits: 100
halves x 3 seeds; language model: 100 halves). Each log: a pass over the training data at the
trained model, then its curvature pass with --draws labels per example; one line of LDS per
preconditioner, damping and curvature, beside EK-FAC on the same rows.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attribution_quality as aq  # noqa: E402
import lm_task  # noqa: E402

import logix  # noqa: E402

# (label, preconditioner, options) scored on every log; "auto" is what a user who chooses nothing gets
SETTINGS = (
    ("auto (row, sampled, f=0.3)", "auto", {}),
    ("row, sampled, f=0.1", "row", {"damping_factor": 0.1}),
    ("row, sampled, f=1", "row", {"damping_factor": 1.0}),
    ("row, own rows (empirical Fisher)", "row", {"curvature": "own"}),
    ("ekfac, sampled", "ekfac", {}),
    ("ekfac, own rows", "ekfac", {"curvature": "own"}),
)


def digits_task(smoke: bool):
    setup = aq.make_setup(aq.parse_args(["--smoke"] if smoke else []))
    data = aq.load_data(setup)
    x, y, xq, yq = data
    model = aq.to_module(aq.train_batched(x, y, torch.arange(len(x))[None], [0], setup))
    masks = aq.make_halves(setup, 6 if smoke else 100)
    cache = None if smoke else Path("benchmarks/.cache")
    outcomes, _, _ = aq.retrain_outcomes(setup, data, masks, 1 if smoke else 3, cache, 50)
    outcome = -outcomes["loss"].mean(axis=1)

    def query(log):
        return aq.capture_query(log, model, xq, yq)

    return "digits MLP", len(x), masks, outcome, model, aq.digits_capture(model, x, y, 250), query


def lm_task_setup(smoke: bool):
    recipe = lm_task.SMOKE if smoke else lm_task.Recipe()
    data = lm_task.load_data(recipe)
    masks = lm_task.halves(recipe, 6 if smoke else 100)
    outcome = -lm_task.retrain_outcomes(data, recipe, masks, None if smoke else Path("benchmarks/.cache"))
    model = lm_task.train(data, recipe)
    queries = lm_task.queries_for(data)

    def query(log):
        with log.query(model) as q:
            queries(q, model)
        model.zero_grad()
        return q

    return "tiny GPT-2", recipe.n_train, masks, outcome, model, aq.lm_capture(model, data, recipe.batch), query


def run_task(setup, ranks, draws: int, tmp: Path) -> None:
    name, n, masks, outcome, model, capture, query_fn = setup
    budget = {}
    for rank in ranks:
        for projection in ("gaussian", "pca-auto"):
            if projection == "pca-auto" and rank not in budget:
                continue
            path = tmp / f"{projection}-{rank}"
            try:
                pass_s, curvature_s = aq.log_recipe(path, model, capture, rank, projection, budget, draws)
            except logix.ConfigError as e:  # too wide for a dense Fisher over the row
                print(f"{name}, {projection} at rank {rank}: {e}")
                shutil.rmtree(path, ignore_errors=True)
                continue
            log = logix.open(path)
            budget.setdefault(rank, log.width * 4)
            q = query_fn(log)
            print(
                f"{name}, {projection} at rank {rank}'s bytes, D {log.width}: pass {pass_s:.1f} s, "
                f"{draws} draws + finalize {curvature_s:.1f} s"
            )
            for label, pre, options in SETTINGS:
                start = time.perf_counter()
                s = log.influence(q, pre, progress=False, **options)
                score_s = time.perf_counter() - start
                value, se = aq.lds(aq.in_order(s.train_ids, s.values, n), masks, outcome)
                print(f"  {label:34s} LDS {value:.3f} +- {se:.3f}   ({score_s:.2f} s)", flush=True)
            shutil.rmtree(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="rank 16 only")
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny tasks, rank 4, two draws")
    parser.add_argument("--ranks", nargs="+", default=["16", "32"], help="ranks whose bytes the rows get ('full' too)")
    parser.add_argument("--draws", type=int, default=16, help="labels drawn per example in the curvature pass")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ranks = [4] if args.smoke else [16] if args.quick else [r if r == "full" else int(r) for r in args.ranks]
    draws = 2 if args.smoke else args.draws
    print(f"torch {torch.__version__}, logix {logix.__version__}, threads {torch.get_num_threads()}")
    if args.smoke:
        print("--smoke: a check that the benchmark runs end to end; its numbers mean nothing")
    with tempfile.TemporaryDirectory(prefix="logix-row-fisher-") as tmp:
        for setup in (digits_task(args.smoke), lm_task_setup(args.smoke)):
            run_task(setup, ranks, draws, Path(tmp))


if __name__ == "__main__":
    main()

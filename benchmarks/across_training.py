"""Attribution across training: does using every pass of the log beat one checkpoint?

    python benchmarks/across_training.py            # 100 halves, ranks full 64 16, digits (3 variants) and the LM
    python benchmarks/across_training.py --quick    # 30 halves
    python benchmarks/across_training.py --tasks lm # the language model alone
    python benchmarks/across_training.py --smoke    # seconds: checks the benchmark works; its numbers mean nothing

Task: digits (pixels / 16), 1,000 train and 100 query examples (the split of attribution_quality.py),
an MLP 64 -> 32 -> ReLU -> 10 from init seed 0, trained with minibatch SGD (batch 50, momentum 0.9,
learning rate 0.05 with a cosine decay to 0 over the whole run, a fixed batch order per epoch). Variants:

  trained    40 epochs (converged)
  short      5 epochs (far from converged)
  two-stage  20 epochs on the digits 0-4, then 20 on 5-9, one optimizer and one schedule

logix logs one pass per epoch (EK-FAC and raw statistics) while the model trains, each followed by its
curvature pass (start_pass(curvature_for=...)): the epoch's examples again at the epoch's end checkpoint,
at labels drawn from the model (logix.sampled_labels), no optimizer step. The checkpoints at the end of
each epoch are kept for TracIn. LDS: for each of H random halves of the train set, the same recipe is run
again (same init, same batches and schedule) with the other half's losses set to zero in their batches;
the outcome is minus each query's cross-entropy; LDS = Spearman over halves of (sum of the half's scores,
outcome), averaged over queries (se: across queries).

Rows, each at rank full and 16 where it is logix's. "EF": each pass's curvature from its own rows (the
empirical Fisher, curvature="own"); "GGN": from its curvature pass (the true Fisher, curvature="sampled"):
  checkpoint ekfac   the last pass alone (EK-FAC), at the final model: single-checkpoint influence
  exact IF           dense damped GGN of all 2,410 parameters at the final model (lambda = 0.1 x mean eig)
  tracin identity    TracIn-CP: each pass's rows against the query gradients at the epoch's end checkpoint,
                     weighted by the pass's effective learning rate
  tracin ekfac       the same, each pass preconditioned by its own EK-FAC
  source X           Source: every pass's curvature (kfac, ekfac or raw) and learning rate, query gradients
                     at the final model
  exact unrolled     -dL_q(theta_T)/d eps_i differentiated through the whole optimisation (float64)

Language model (--tasks lm; lm_task.py): a 2-layer GPT-2 of width 64 trained for 12 epochs with SGD and
momentum on 400 character sequences (loss summed per sequence, padded batches), a pass per epoch; the same
rows, except that the exact reference is the dense damped GGN influence of the output layer alone
("exact IF (head)") and there is no exact unrolled influence. Its retraining (about 5 minutes on 2 cores)
is cached in --cache. logix's default rank is 64: on the digits MLP (widths 64, 32, 10) that is rank full.

Mislabel detection (trained variant, 10% of labels flipped): self-influence of the last pass against the
learning-rate-weighted sum over passes, each with EF or GGN curvature; ROC-AUC and the share of flipped
labels in the top 10%.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).parent))
import attribution_quality as aq  # noqa: E402 - the shared data, metrics and exact curvature
import lm_task  # noqa: E402 - the tiny language model task

import logix  # noqa: E402

HIDDEN, BATCH, LR, MOMENTUM = 32, 50, 0.05, 0.9
VARIANTS = {"trained": (40, None), "short": (5, None), "two-stage": (40, 20)}
METHODS = (  # label, arguments of influence_across_training; "EF": each pass's own rows, "GGN": its curvature pass
    ("checkpoint ekfac EF", dict(method="checkpoint", preconditioner="ekfac", curvature="own")),
    ("checkpoint ekfac GGN", dict(method="checkpoint", preconditioner="ekfac", curvature="sampled")),
    ("tracin identity", dict(method="tracin", preconditioner="identity")),
    ("tracin ekfac GGN", dict(method="tracin", preconditioner="ekfac", curvature="sampled")),
    ("source ekfac EF", dict(method="source", preconditioner="ekfac", curvature="own")),
    ("source kfac GGN", dict(method="source", preconditioner="kfac", curvature="sampled")),
    ("source ekfac GGN", dict(method="source", preconditioner="ekfac", curvature="sampled")),
    ("source raw GGN", dict(method="source", preconditioner="raw", curvature="sampled")),
)
ROW_METHODS = (  # with --row-draws: the whole row's Fisher from curvature passes of that many draws
    ("checkpoint row GGN", dict(method="checkpoint", preconditioner="row", curvature="sampled")),
    ("source row GGN", dict(method="source", preconditioner="row", curvature="sampled")),
)


# -- the recipe ----------------------------------------------------------------------------------------


def schedule(variant: str, y: torch.Tensor, epochs: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Per epoch, the index batches of the recipe (the same for every retraining)."""
    total, split = VARIANTS[variant]
    if split is not None:
        split = split * epochs // total  # the same halfway point in a shortened (smoke) run
    rng = torch.Generator().manual_seed(seed)
    low = torch.nonzero(y < 5).flatten()
    high = torch.nonzero(y >= 5).flatten()
    out = []
    for epoch in range(epochs):
        pool = torch.arange(len(y)) if split is None else (low if epoch < split else high)
        order = pool[torch.randperm(len(pool), generator=rng)]
        out.append(list(order.split(BATCH)))
    return out


def lr_at(step: int, total_steps: int) -> float:
    return LR * 0.5 * (1 + math.cos(math.pi * step / total_steps))


def train_masked(x, y, masks: torch.Tensor, epochs: list) -> list[torch.Tensor]:
    """Train M models at once, model m with masks[m] (0 = the example's loss is zeroed in its batch)."""
    m = masks.shape[0]
    params = [p.requires_grad_() for p in aq.init_params([0] * m, HIDDEN)]
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    total = sum(len(e) for e in epochs)
    step = 0
    for batches in epochs:
        for idx in batches:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total)
            logits = aq.forward_batched(params, x[idx].expand(m, -1, -1))
            losses = F.cross_entropy(logits.reshape(-1, 10), y[idx].repeat(m), reduction="none").reshape(m, -1)
            (losses * masks[:, idx]).sum(dim=1).div(len(idx)).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
    return [p.detach() for p in params]


def train_and_log(path, x, y, epochs: list, rank, sampled: bool = True) -> tuple:
    """The attributed model, trained with the recipe while logix logs a pass per epoch; also the
    model at the end of each epoch, for TracIn's query gradients. With `sampled`, each epoch is
    followed by its curvature pass: the examples the epoch trained on, once more at the epoch's end
    checkpoint, at labels drawn from the model (no optimizer step): the curvature of the epoch's
    objective (in the two-stage run, of its own stage's data)."""
    model = aq.to_module(aq.init_params([0], HIDDEN))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    total = sum(len(e) for e in epochs)
    ends, step = {}, 0
    draw = torch.Generator().manual_seed(1)
    with logix.init(path, rank=rank, statistics=["ekfac", "raw"] + (["row"] if ROW_DRAWS else [])) as run:
        run.watch(model, optimizer=opt)
        for epoch, batches in enumerate(epochs):
            run.start_pass(f"epoch{epoch}")
            for idx in batches:
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total)
                with run.capture(idx):
                    F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
                opt.zero_grad()
                step += 1
            ends[f"epoch{epoch}"] = _copy(model)
            if sampled:
                run.start_pass(f"epoch{epoch}/curvature", curvature_for=f"epoch{epoch}")
                for _ in range(max(1, ROW_DRAWS)):  # each example once per draw
                    for idx in torch.cat(batches).sort().values.split(250):
                        with run.capture(idx):
                            logits = model(x[idx])
                            F.cross_entropy(logits, logix.sampled_labels(logits, draw)).backward()
                        model.zero_grad()
    return model, ends


def _copy(model):
    clone = aq.to_module(aq.init_params([0], HIDDEN))
    clone.load_state_dict(model.state_dict())
    return clone


# -- references ------------------------------------------------------------------------------------------


def exact_unrolled(x, y, xq, yq, epochs: list) -> np.ndarray:
    """(Q, N): -dL_q(theta_T)/d eps_i, with eps_i * loss_i added to each batch loss that holds i."""
    model = aq.to_double(aq.to_module(aq.init_params([0], HIDDEN)))
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    eps = torch.zeros(len(x), dtype=torch.float64, requires_grad=True)
    x, xq = x.double(), xq.double()
    velocity = None
    total = sum(len(e) for e in epochs)
    step = 0
    for batches in epochs:
        for idx in batches:
            losses = F.cross_entropy(functional_call(model, params, (x[idx],)), y[idx], reduction="none")
            total_loss = losses.mean() + (eps[idx] * losses).sum()
            grads = torch.autograd.grad(total_loss, list(params.values()), create_graph=True)
            velocity = list(grads) if velocity is None else [MOMENTUM * v + g for v, g in zip(velocity, grads)]
            params = {k: p - lr_at(step, total) * v for (k, p), v in zip(params.items(), velocity)}
            step += 1
    out = np.zeros((len(xq), len(x)))
    for q in range(len(xq)):
        loss = F.cross_entropy(functional_call(model, params, (xq[q : q + 1],)), yq[q : q + 1])
        out[q] = -torch.autograd.grad(loss, eps, retain_graph=True)[0].numpy()
    return out


def exact_influence(model, x, y, xq, yq, factor: float = 0.1) -> np.ndarray:
    g_train, jac, probs = aq.per_example(model, x, y)
    g_query, _, _ = aq.per_example(model, xq, yq)
    curvature = aq.Damped(aq.ggn(jac, probs))
    return (curvature.solve(g_query.T, factor).T @ g_train.T).numpy()


def dense(scores, n: int) -> np.ndarray:
    """(Q, n) in example order; an example no pass holds has no influence (0)."""
    return np.nan_to_num(aq.in_order(scores.train_ids, scores.values, n), nan=0.0)


def queries_for(xq, yq):
    def queries(q, model):
        with q.capture(list(range(len(xq)))):
            F.cross_entropy(model(xq), yq).backward()

    return queries


# -- the run -------------------------------------------------------------------------------------------------


def run_variant(variant: str, data, masks, ranks, tmp: Path, unrolled: bool) -> list[tuple]:
    xtr, ytr, xq, yq = data
    n = len(xtr)
    epochs = schedule(variant, ytr, VARIANTS[variant][0] if not SMOKE else 3)
    start = time.perf_counter()
    params = train_masked(xtr, ytr, torch.from_numpy(masks).float(), epochs)
    loss, _ = aq.query_outcomes(params, xq, yq)
    outcome = -loss
    print(f"  {variant}: {len(masks)} retrained in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    rows = []
    queries = queries_for(xq, yq)
    model = None
    for rank in ranks:
        path = tmp / f"{variant}-{rank}"
        start = time.perf_counter()
        model, ends = train_and_log(path, xtr, ytr, epochs, rank)
        log_s = time.perf_counter() - start
        log = logix.open(path)
        for label, kw in METHODS + (ROW_METHODS if ROW_DRAWS else ()):
            kw = dict(kw, models=ends) if kw["method"] == "tracin" else kw
            start = time.perf_counter()
            scores = dense(log.influence_across_training(model, queries, **kw), n)
            rows.append((variant, label, rank, *aq.lds(scores, masks, outcome), log_s, time.perf_counter() - start))
            print(f"  {variant} {label} {rank}: LDS {rows[-1][3]:.3f}", file=sys.stderr, flush=True)
    with torch.no_grad():
        accuracy = (model(xq).argmax(1) == yq).float().mean().item()
    start = time.perf_counter()
    scores = exact_influence(model, xtr, ytr, xq, yq)
    rows.append((variant, "exact IF", "all", *aq.lds(scores, masks, outcome), None, time.perf_counter() - start))
    if unrolled:
        start = time.perf_counter()
        scores = exact_unrolled(xtr, ytr, xq, yq, epochs)
        secs = time.perf_counter() - start
        rows.append((variant, "exact unrolled", "all", *aq.lds(scores, masks, outcome), None, secs))
    print(f"  {variant}: query accuracy {accuracy:.3f}", file=sys.stderr, flush=True)
    return rows, accuracy


def run_lm(masks, ranks, tmp: Path, cache: Path | None) -> tuple[list[tuple], float]:
    """The tiny language model (lm_task.py): the same methods, the exact reference its output layer's."""
    recipe = lm_task.SMOKE if SMOKE else lm_task.Recipe()
    data = lm_task.load_data(recipe)
    n = recipe.n_train
    outcome = -lm_task.retrain_outcomes(data, recipe, masks, None if SMOKE else cache)
    queries = lm_task.queries_for(data)
    rows = []
    for rank in ranks:
        start = time.perf_counter()
        model, ends = lm_task.train_and_log(tmp / f"lm-{rank}", data, recipe, rank)
        log_s = time.perf_counter() - start
        log = logix.open(tmp / f"lm-{rank}")
        for label, kw in METHODS:
            if kw["preconditioner"] == "raw":
                continue  # the LM's blocks are too wide for a dense Fisher
            kw = dict(kw, models=ends) if kw["method"] == "tracin" else kw
            start = time.perf_counter()
            scores = dense(log.influence_across_training(model, queries, **kw), n)
            rows.append(("lm", label, rank, *aq.lds(scores, masks, outcome), log_s, time.perf_counter() - start))
            print(f"  lm {label} {rank}: LDS {rows[-1][3]:.3f}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    scores = lm_task.exact_head_influence(model, data)
    rows.append(("lm", "exact IF (head)", "head", *aq.lds(scores, masks, outcome), None, time.perf_counter() - start))
    per_char = lm_task.query_losses(model, data).sum() / sum(len(s) - 1 for s in data.query)
    return rows, float(per_char)


def mislabel_rows(data, ranks, tmp: Path, flip_seed: int = 7) -> list[tuple]:
    xtr, ytr, _, _ = data
    n = len(xtr)
    rng = np.random.default_rng(flip_seed)
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, n // 10, replace=False)] = True
    noisy = ytr.clone()
    noisy[flipped] = (ytr[flipped] + torch.from_numpy(rng.integers(1, 10, flipped.sum()))) % 10
    epochs = schedule("trained", noisy, VARIANTS["trained"][0] if not SMOKE else 3)
    rows = []
    for rank in ranks:
        path = tmp / f"noisy-{rank}"
        train_and_log(path, xtr, noisy, epochs, rank)
        log = logix.open(path)
        for label, values in (
            ("last pass identity", log.self_influence("identity")),
            ("last pass ekfac EF", log.self_influence("ekfac", curvature="own")),
            ("last pass ekfac GGN", log.self_influence("ekfac", curvature="sampled")),
            ("across identity", log.self_influence_across_training("identity")),
            ("across ekfac EF", log.self_influence_across_training("ekfac", curvature="own")),
            ("across ekfac GGN", log.self_influence_across_training("ekfac", curvature="sampled")),
        ):
            rows.append((label, rank, *aq.mislabel(aq.in_order(values.ids, values.values, n), flipped)))
    return rows


SMOKE = False
ROW_DRAWS = 0  # --row-draws


def main(argv=None) -> None:
    global SMOKE, ROW_DRAWS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30 halves (about 5 minutes)")
    parser.add_argument("--smoke", action="store_true", help="seconds: 200 train / 20 queries, 3 epochs, 6 halves")
    parser.add_argument("--halves", type=int, help="random halves (default 100, quick 30)")
    parser.add_argument("--ranks", nargs="+", default=["full", "64", "16"], help="logix ranks (default full 64 16)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-unrolled", action="store_true", help="skip the exact unrolled influence")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--tasks", nargs="+", default=["digits", "lm"], choices=["digits", "lm"], help="digits, the tiny LM, or both"
    )
    parser.add_argument("--cache", default="benchmarks/.cache", help="the language model's retraining cache")
    parser.add_argument(
        "--row-draws",
        type=int,
        default=0,
        help="digits: also the whole row's Fisher (statistics row), from curvature passes of this many labels "
        "drawn per example, for checkpoint and Source rows (default 0: not measured)",
    )
    args = parser.parse_args(argv)
    SMOKE, ROW_DRAWS = args.smoke, args.row_draws
    torch.set_num_threads(args.threads)
    halves = args.halves or (6 if args.smoke else 30 if args.quick else 100)
    ranks = [r if r == "full" else int(r) for r in args.ranks]
    print("command:", shlex.join(["python"] + sys.argv))
    if args.smoke:
        print("--smoke: a check that the benchmark runs end to end on a smaller task; its numbers mean nothing")
    print(f"torch {torch.__version__}, logix {logix.__version__}, threads {torch.get_num_threads()}, load {aq.load()}")
    setup = aq.Setup(**(aq.SMOKE if args.smoke else {}))
    data = aq.load_data(setup)
    masks = aq.make_halves(setup, halves)
    rows, accuracy = [], {}
    started = time.perf_counter()
    flips, lm_loss = [], None
    with tempfile.TemporaryDirectory(prefix="logix-across-") as tmp:
        if "digits" in args.tasks:
            # a rank at least the MLP's widest side (64) projects nothing: the same rows as rank full
            narrow = [r for r in ranks if r == "full" or r < 64]
            for variant in args.variants:
                got, accuracy[variant] = run_variant(variant, data, masks, narrow, Path(tmp), not args.no_unrolled)
                rows += got
            flips = mislabel_rows(data, narrow, Path(tmp))
        if "lm" in args.tasks:
            recipe = lm_task.SMOKE if args.smoke else lm_task.Recipe()
            got, per_char = run_lm(lm_task.halves(recipe, halves), ranks, Path(tmp), Path(args.cache))
            rows += got
            lm_loss = per_char
    print(f"\nLDS over {halves} halves, outcome = minus query cross-entropy ({time.perf_counter() - started:.0f} s)")
    print("query accuracy: " + ", ".join(f"{v} {a:.3f}" for v, a in accuracy.items()))
    if lm_loss is not None:
        print(f"lm: the final model's query loss {lm_loss:.3f} nats per character")
    print(f"{'variant':<10} {'method':<21} {'rank':>5} {'LDS':>6} {'se':>6} {'log s':>6} {'score s':>8}")
    for variant, method, rank, value, se, log_s, score_s in rows:
        print(f"{variant:<10} {method:<21} {rank!s:>5} {value:6.3f} {se:6.3f} {aq.fmt(log_s, '.1f'):>6} {score_s:8.2f}")
    if not flips:
        return
    print("\nmislabel detection, trained variant, 10% flipped")
    print(f"{'self-influence':<20} {'rank':>5} {'AUC':>6} {'top 10%':>8}")
    for method, rank, auc, top in flips:
        print(f"{method:<20} {rank!s:>5} {auc:6.3f} {top:8.0%}")


if __name__ == "__main__":
    main()

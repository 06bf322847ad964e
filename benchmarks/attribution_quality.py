"""How good are logix's influence scores? LDS and mislabel detection on scikit-learn's digits, and LDS on
a tiny causal language model (--task lm).

    python benchmarks/attribution_quality.py            # full: 100 halves x 3 seeds, ranks 8 16 32 full
    python benchmarks/attribution_quality.py --task lm  # the language model: 100 halves, ranks 8 16 32 64 full
    python benchmarks/attribution_quality.py --quick    # 20 halves x 1 seed, ranks 16 full (< 2 min)
    python benchmarks/attribution_quality.py --smoke    # seconds: checks the benchmark works; its numbers mean nothing
    python benchmarks/attribution_quality.py --ranks 16 full --halves 50 --seeds 2 --threads 2

Setup (everything is built from code; nothing is downloaded):
  data     load_digits, pixels / 16, a fixed permutation (--split-seed): the first 1,000 examples
           are the train set, the next 100 (disjoint) the query set.
  model    MLP 64 -> 32 -> ReLU -> 10, PyTorch's default init drawn from a private generator
           seeded per model, trained full-batch (deterministic): Adam, lr 0.01 with a cosine
           decay to 0, 300 steps, L2 weight decay 1e-3 (Adam's coupled `weight_decay`, so the
           end point is a stationary point of mean CE + 5e-4 ||theta||^2).
           The attributed model is trained on all 1,000 train examples with init seed 0.
  logix    a logging pass at the final parameters (no optimizer step), batches of 250,
           statistics kfac + ekfac + raw, then queries of the 100 query examples' own losses.
           Positive score = the train example helps (lowers the query's loss).

1. Linear datamodeling score (LDS). Halves S_1..S_H of the train set (seed --half-seed; the
   quick run uses the first 20 of the same halves). For each half, retrain from scratch with
   init seeds 100..100+S-1 (same recipe) and record each query's outcome, oriented so higher is
   better: minus the query's cross-entropy (default) or its correct-class margin (--outcome
   margin), averaged over the seeds. Predicted effect of S on query q = sum over i in S of
   score(q, i). LDS = Spearman correlation between prediction and outcome across the H halves,
   averaged over the 100 queries ("se" = its standard error across queries). The retraining
   outcomes are cached per (half, seed) in --cache (npz, keyed by the data and training
   config), so reruns and the quick run reuse them.
2. Mislabel detection. Flip 10% of the train labels (seed --flip-seed, each to a different
   class), train the same way, log, rank the train examples by self-influence
   g_i^T (F + lambda I)^{-1} g_i for each preconditioner; report ROC-AUC and the share of the
   flipped examples found in the top 10%. The "train loss" row ranks by the example's loss.

Rows: logix identity / raw / kfac / ekfac at each rank with Gaussian projections, PCA projections,
and "pca-auto" (rank="auto" with PCA, its row_bytes the Gaussian row's bytes at that rank; the
ranks it chose are printed under the table), and exact references computed densely with torch.func
on all 2,410 parameters:
  exact GGN  F = mean_i J_i^T H_i J_i, J_i the Jacobian of example i's logits, H_i the
             softmax-cross-entropy Hessian diag(p) - p p^T (no weight-decay term in F);
  exact EF   F = mean_i g_i g_i^T, the empirical Fisher;
  ... layers the same keeping only the two per-layer diagonal blocks, each damped by its own mean
             eigenvalue (logix's layout; "exact EF layers" is what logix's raw computes at rank full).
Damping: lambda = f x the mean eigenvalue (trace / dim) of the curvature, f = --damping-factor
(0.1 by default): for the exact references over the whole matrix; for logix per module block,
trace / (d_in d_out), the unprojected dimension (logix's default, `damping_factor`); identity is
never damped. LDS moves with lambda.

"logix row K=16": the README's recipe for narrow rows, where the row has at most
logix.config.ROW_MAX_WIDTH numbers: a log with statistics kfac + ekfac + row whose pass is followed
by a curvature pass capturing every example again at --draws (16) labels drawn from the model,
scored with nothing chosen (`log.influence(q)`, `self_influence()`: auto takes row from it).

Diagnostics printed after the table (not used for it): logix kfac/ekfac with curvature taken from
a second log of gradients at labels drawn from the model (--fisher-samples per example: a
Monte-Carlo true Fisher instead of the empirical Fisher; Gaussian projections only, same seeds);
logix with lambda = f x trace / (k_in k_out) per module (the mean eigenvalue of the projected block,
logix's default before: a Gaussian projection keeps a block's trace but shrinks its dimension, so
that rule damps a projected block more); and with --damping-sweep, LDS at several f. The
sweep looks at the query outcomes, so it explains the table, it must not pick its damping.

Timing columns: "log s" = logging + finalize of both logs (clean and mislabeled) for that
projection and rank, shared by its four rows (exact: per-example gradients, Jacobians and the
curvature, both models); "score s" = query capture + influence scores + self-influence (stored
by finalize at the default damping, so usually read back) for that row. Retraining time is
reported separately. The machine's load average is printed: other processes on the cores slow
everything down (small matrix products run faster on one thread then, hence --threads 1).

--task lm: the GPT-2 of lm_task.py (2 layers, width 64; character sequences from scikit-learn's dataset
descriptions; SGD with momentum; each sequence's loss summed over its tokens, padded batches), one
deterministic retraining per half (cached in --cache, about 5 minutes on 2 cores the first time, shared
with across_training.py), logged at its final parameters with identity, kfac and ekfac at each rank and
projection (Gaussian, PCA and pca-auto), and the recipe row where the row is narrow enough; the reference
is the exact damped GGN influence of its output layer alone.
Row bytes and timings as above; no mislabel detection.

--smoke shrinks the task itself (200 train / 20 query examples, hidden width 8 so 610 parameters,
50 training steps: SMOKE below), retrains 6 halves x 1 seed, logs at ranks 16 and full with 1
sampled label per example, and neither reads nor writes the retraining cache: a seconds-long run
that checks every path of the benchmark works and prints its tables; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import kronfluence_lm  # Kronfluence's rows on the language model (this folder)
import lm_task  # the tiny language model task (this folder)
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import logix
from logix.curvature import Preconditioner, load_curvature

try:
    from scipy.stats import rankdata
except ImportError:  # pragma: no cover - scipy is optional
    rankdata = None

PRECONDITIONERS = ("identity", "raw", "kfac", "ekfac")
CACHE_VERSION = 1


# -- data and training -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """Everything that decides the retraining outcomes: the cache key."""

    n_train: int = 1000
    n_query: int = 100
    split_seed: int = 0
    hidden: int = 32
    steps: int = 300
    lr: float = 0.01
    weight_decay: float = 1e-3
    half_seed: int = 12345
    version: int = CACHE_VERSION

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


# --smoke: the same recipe on a smaller task, so that a smoke run takes seconds (and its Setup, the
# cache key, can never be a real run's; smoke runs do not touch the cache anyway)
SMOKE = {"n_train": 200, "n_query": 20, "hidden": 8, "steps": 50}


def make_setup(args) -> Setup:
    """The Setup of a run with these arguments (split_seed, half_seed, smoke)."""
    return Setup(split_seed=args.split_seed, half_seed=args.half_seed, **(SMOKE if args.smoke else {}))


def load_data(setup: Setup):
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(setup.split_seed).permutation(len(x))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.long)
    n, q = setup.n_train, setup.n_query
    return x[:n], y[:n], x[n : n + q], y[n : n + q]


def init_params(seeds, hidden: int) -> list[torch.Tensor]:
    """Stacked (M, ...) parameters with nn.Linear's default init, one private generator per model."""
    per_model = []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        b1, b2 = 1 / math.sqrt(64), 1 / math.sqrt(hidden)
        per_model.append(
            [
                (torch.rand(64, hidden, generator=g) * 2 - 1) * b1,
                (torch.rand(hidden, generator=g) * 2 - 1) * b1,
                (torch.rand(hidden, 10, generator=g) * 2 - 1) * b2,
                (torch.rand(10, generator=g) * 2 - 1) * b2,
            ]
        )
    return [torch.stack([p[i] for p in per_model]) for i in range(4)]


def forward_batched(params, x: torch.Tensor) -> torch.Tensor:
    """x (M, n, 64) -> logits (M, n, 10) for M independent MLPs."""
    w1, b1, w2, b2 = params
    h = torch.relu(torch.baddbmm(b1[:, None], x, w1))
    return torch.baddbmm(b2[:, None], h, w2)


def train_batched(x, y, index: torch.Tensor, seeds, setup: Setup) -> list[torch.Tensor]:
    """Train M models at once, model m on rows index[m] from init seed seeds[m]; full batch.

    The models share nothing: the summed loss gives each its own gradient and Adam is elementwise.
    """
    params = [p.requires_grad_() for p in init_params(seeds, setup.hidden)]
    xb, yb = x[index], y[index]
    opt = torch.optim.Adam(params, lr=setup.lr, weight_decay=setup.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / setup.steps)))
    for _ in range(setup.steps):
        opt.zero_grad(set_to_none=True)
        logits = forward_batched(params, xb)
        loss = F.cross_entropy(logits.reshape(-1, 10), yb.reshape(-1), reduction="none")
        loss.reshape(index.shape).mean(dim=1).sum().backward()
        opt.step()
        sched.step()
    return [p.detach() for p in params]


def query_outcomes(params, xq, yq) -> tuple[np.ndarray, np.ndarray]:
    """(M, Q) query cross-entropy and correct-class margin (logit of the label minus the best other)."""
    with torch.no_grad():
        logits = forward_batched(params, xq.expand(params[0].shape[0], -1, -1))
        m, q = logits.shape[:2]
        loss = F.cross_entropy(logits.reshape(-1, 10), yq.repeat(m), reduction="none").reshape(m, q)
        correct = logits.gather(2, yq.expand(m, -1)[..., None])[..., 0]
        others = logits.scatter(2, yq.expand(m, -1)[..., None], float("-inf")).amax(dim=2)
    return loss.numpy(), (correct - others).numpy()


def to_module(params, m: int = 0) -> nn.Module:
    w1, b1, w2, b2 = (p[m] for p in params)
    model = nn.Sequential(nn.Linear(64, w1.shape[1]), nn.ReLU(), nn.Linear(w1.shape[1], 10))
    with torch.no_grad():
        model[0].weight.copy_(w1.T)
        model[0].bias.copy_(b1)
        model[2].weight.copy_(w2.T)
        model[2].bias.copy_(b2)
    return model


def make_halves(setup: Setup, count: int) -> np.ndarray:
    """(count, n_train) bool masks; the first k of a larger count are the same k halves."""
    rng = np.random.default_rng(setup.half_seed)
    masks = np.zeros((count, setup.n_train), dtype=bool)
    for h in range(count):
        masks[h, rng.permutation(setup.n_train)[: setup.n_train // 2]] = True
    return masks


def retrain_outcomes(setup, data, masks, n_seeds, cache_dir: Path | None, chunk: int) -> tuple[dict, float, int]:
    """{"loss": (H, S, Q), "margin": ...} for every half and seed, from the cache where possible
    (cache_dir None: nothing read or written, everything retrained)."""
    xtr, ytr, xq, yq = data
    path = None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        path = cache_dir / f"lds-{setup.key()}.npz"
    stored = dict(np.load(path)) if path is not None and path.exists() else {}
    todo = [(h, s) for h in range(len(masks)) for s in range(n_seeds) if f"loss_h{h}_s{s}" not in stored]
    start = time.perf_counter()
    for i in range(0, len(todo), chunk):
        part = todo[i : i + chunk]
        index = torch.from_numpy(np.stack([np.flatnonzero(masks[h]) for h, _ in part]))
        params = train_batched(xtr, ytr, index, [100 + s for _, s in part], setup)
        loss, margin = query_outcomes(params, xq, yq)
        for j, (h, s) in enumerate(part):
            stored[f"loss_h{h}_s{s}"], stored[f"margin_h{h}_s{s}"] = loss[j], margin[j]
        if path is not None:
            tmp = path.with_name(path.name + ".tmp.npz")
            np.savez(tmp, **stored)
            tmp.replace(path)
        print(f"  retrained {min(i + chunk, len(todo))}/{len(todo)} models", file=sys.stderr, flush=True)
    out = {
        kind: np.stack([np.stack([stored[f"{kind}_h{h}_s{s}"] for s in range(n_seeds)]) for h in range(len(masks))])
        for kind in ("loss", "margin")
    }
    return out, time.perf_counter() - start, len(todo)


# -- metrics -------------------------------------------------------------------------------------------


def ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks down axis 0 (ties share their mean rank)."""
    if rankdata is not None:
        return rankdata(a, axis=0)
    out = np.empty_like(a, dtype=np.float64)
    for j in range(a.shape[1]):
        col = a[:, j]
        order = np.argsort(col, kind="mergesort")
        r = np.empty(len(col))
        r[order] = np.arange(1, len(col) + 1)
        for v in np.unique(col):  # average the ranks of ties
            tied = col == v
            if tied.sum() > 1:
                r[tied] = r[tied].mean()
        out[:, j] = r
    return out


def lds(scores: np.ndarray, masks: np.ndarray, outcome: np.ndarray) -> tuple[float, float]:
    """Mean over queries of Spearman(prediction, outcome) across halves, and its standard error.

    scores (Q, N); masks (H, N); outcome (H, Q), higher is better.
    """
    predicted = masks.astype(np.float64) @ scores.T.astype(np.float64)  # (H, Q)
    a, b = ranks(predicted), ranks(outcome)
    a, b = a - a.mean(0), b - b.mean(0)
    denom = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    rho = np.where(denom > 0, (a * b).sum(0) / np.where(denom > 0, denom, 1), np.nan)
    rho = rho[np.isfinite(rho)]
    return float(rho.mean()), float(rho.std(ddof=1) / math.sqrt(len(rho)))


def mislabel(values: np.ndarray, flipped: np.ndarray) -> tuple[float, float]:
    """ROC-AUC of self-influence as a detector, and the share of flipped examples in the top 10%."""
    k = len(values) // 10
    top = np.argsort(-values, kind="stable")[:k]
    return float(roc_auc_score(flipped, values)), float(flipped[top].sum() / flipped.sum())


# -- logix -----------------------------------------------------------------------------------------------


def init_for(path: Path, rank, projection: str, budget: dict, statistics: list):
    """logix.init for a row of the table; projection "pca-auto" is rank="auto" with the row bytes that
    Gaussian projections take at `rank` (budget: rank -> bytes, measured on the Gaussian log)."""
    if projection == "pca-auto":
        return logix.init(path, rank="auto", row_bytes=budget[rank], projection="pca", seed=0, statistics=statistics)
    return logix.init(path, rank=rank, projection=projection, seed=0, statistics=statistics)


def log_model(path: Path, model, x, y, rank, projection: str, batch: int, budget: dict) -> float:
    """A logging pass at the model's final parameters; returns the seconds it took."""
    capture = digits_capture(model, x, y, batch)
    return sum(log_captured(path, model, capture, rank, projection, budget, ["kfac", "ekfac", "raw"]))


def digits_capture(model, x, y, batch: int):
    """capture(run, generator=None): every training example once, at its label, or (generator) at a
    label drawn from the model."""
    batches = [
        (list(range(i, min(i + batch, len(x)))), x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)
    ]

    def capture(run, generator=None):
        for ids, xb, yb in batches:
            with run.capture(ids):
                logits = model(xb)
                labels = yb if generator is None else logix.sampled_labels(logits, generator)
                F.cross_entropy(logits, labels).backward()
            model.zero_grad()

    return capture


def lm_capture(model, data, batch: int):
    """As digits_capture, for the language model: each next token drawn from the model's prediction."""

    def capture(run, generator=None):
        for start in range(0, len(data.train), batch):
            ids, mask = lm_task.pad(data.train[start : start + batch])
            with run.capture(list(range(start, start + len(ids))), mask=mask):
                out = lm_task.logits(model, ids, mask)
                if generator is not None:
                    ids = torch.cat([ids[:, :1], logix.sampled_labels(out[:, :-1], generator)], dim=1)
                lm_task.sequence_losses(out, ids, mask).mean().backward()
            model.zero_grad()

    return capture


def log_captured(path: Path, model, capture, rank, projection: str, budget: dict, statistics: list, draws: int = 0):
    """A log of `capture`d passes at the trained model: PCA fitting where the projection asks for
    it, the pass, and with `draws` its curvature pass capturing every example again at that many
    labels drawn from the model (seed 1). Returns (seconds up to the pass's end, seconds for the
    draws and finalize). A refused watch (a row too wide for "row") closes the run and raises."""
    start = time.perf_counter()
    run = init_for(path, rank, projection, budget, statistics)
    try:
        run.watch(model)
    except logix.ConfigError:
        run.close()
        raise
    if projection != "gaussian":
        with run.fit_projections():
            capture(run)
    run.start_pass("train")
    capture(run)
    pass_s = time.perf_counter() - start
    if draws:
        run.start_pass("train/curvature", curvature_for="train")
        generator = torch.Generator().manual_seed(1)
        for _ in range(draws):
            capture(run, generator)
    run.finalize()
    return pass_s, time.perf_counter() - start - pass_s


def log_recipe(path: Path, model, capture, rank, projection: str, budget: dict, draws: int) -> tuple[float, float]:
    """The README's recipe for narrow rows: statistics kfac + ekfac + row and a curvature pass of
    `draws` labels per example (`log.influence(q)` then takes row from it); as log_captured."""
    return log_captured(path, model, capture, rank, projection, budget, ["kfac", "ekfac", "row"], draws)


def recipe_method(draws: int) -> str:
    return f"logix row K={draws}"


def log_sampled_fisher(path: Path, model, x, rank, batch: int, samples: int, seed: int = 0) -> None:
    """A log whose rows are gradients at labels drawn from the model's own predictions, `samples` per
    example (ids s * n + i): its statistics are a Monte-Carlo estimate of the true Fisher (= the GGN for
    softmax cross-entropy) instead of the empirical Fisher of the observed labels. Gaussian projections
    only (the same seeds give the same matrices as the log of the observed-label rows). A few samples per
    example estimate the K-FAC factors well; a dense (raw) Fisher would need tens of samples per example
    (measured: 4 samples gave LDS 0.58 against 0.76 for the exact layer-blocked GGN, 64 samples 0.73)."""
    run = logix.init(path, rank=rank, projection="gaussian", seed=0, statistics=["kfac", "ekfac", "raw"])
    run.watch(model)
    g = torch.Generator().manual_seed(seed)
    for s in range(samples):
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            with torch.no_grad():  # not captured
                drawn = torch.multinomial(torch.softmax(model(xb), dim=1), 1, generator=g)[:, 0]
            with run.capture([s * len(x) + j for j in range(i, i + len(xb))]):
                F.cross_entropy(model(xb), drawn).backward()
            model.zero_grad()
    run.finalize()


def sampled_fisher_scores(clean, fisher_clean, noisy, fisher_noisy, query, pre: str, factor: float, n: int):
    """Scores and self-influence of the observed-label rows, preconditioned with the sampled-label log's
    curvature (logix's Preconditioner applied to rows of another log with the same modules and projections)."""
    pre_clean = Preconditioner(fisher_clean, pre, damping_factor=factor)
    rows = clean.rows()
    scores = pre_clean.apply(query.rows) @ pre_clean.columns(rows).double().T
    pre_noisy = Preconditioner(fisher_noisy, pre, damping_factor=factor)
    noisy_rows = noisy.rows()
    self_inf = (pre_noisy.apply(noisy_rows) * pre_noisy.columns(noisy_rows).double()).sum(dim=1)
    return in_order(clean.ids, scores, n), in_order(noisy.ids, self_inf, n)


def in_order(ids: np.ndarray, values: torch.Tensor, n: int) -> np.ndarray:
    """Reorder the train axis (last) of logix's output into example order 0..n-1."""
    values = values.double().numpy()
    out = np.full(values.shape[:-1] + (n,), np.nan)
    out[..., np.asarray(ids, dtype=np.int64)] = values
    return out


def capture_query(log, model, xq, yq):
    with log.query(model) as q:
        with q.capture(list(range(len(xq)))):
            F.cross_entropy(model(xq), yq).backward()
        model.zero_grad()
    return q


def projected_damping(log, pre: str, factor: float) -> dict:
    """{module: lambda} with lambda = factor x trace(block) / (k_in k_out): the mean eigenvalue of the
    projected block, logix's default before commit 'damping over the unprojected dimension' (which
    divides by d_in d_out instead: a Gaussian projection keeps the trace and shrinks the dimension)."""
    curvature = load_curvature(log, pre, None, factor)
    return {
        name: c.damping
        * (log.modules[name].d_in * log.modules[name].d_out)
        / (log.modules[name].k_in * log.modules[name].k_out)
        for name, c in curvature.items()
    }


def logix_scores(clean, noisy, query, pre: str, factor: float, n: int, damping=None):
    """(scores (Q, N), self-influence (N,) of the mislabeled log or None), train axis in example order."""
    d_clean = d_noisy = None
    if damping == "projected":
        d_clean = projected_damping(clean, pre, factor)
        d_noisy = None if noisy is None else projected_damping(noisy, pre, factor)
    s = clean.influence(query, pre, damping=d_clean, damping_factor=factor, mode="dot", progress=False)
    if noisy is None:
        return in_order(s.train_ids, s.values, n), None
    si = noisy.self_influence(pre, damping=d_noisy, damping_factor=factor, progress=False)
    return in_order(s.train_ids, s.values, n), in_order(si.ids, si.values, n)


# -- exact references ----------------------------------------------------------------------------------


def per_example(model, x, y):
    """float64 per-example loss gradients (n, P) and logit Jacobians (n, 10, P) of all parameters."""
    model = to_double(model)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logits_one(p, xi):
        return functional_call(model, p, (xi[None],))[0]

    def loss_one(p, xi, yi):
        return F.cross_entropy(logits_one(p, xi)[None], yi[None])

    x = x.double()
    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    j = vmap(jacrev(logits_one), in_dims=(None, 0))(params, x)
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)
    flat_g = torch.cat([g[k].reshape(len(x), -1) for k in params], dim=1)
    flat_j = torch.cat([j[k].reshape(len(x), 10, -1) for k in params], dim=2)
    return flat_g, flat_j, probs


def to_double(model):
    copy = nn.Sequential(*[type(m)(m.in_features, m.out_features) if isinstance(m, nn.Linear) else m for m in model])
    copy.load_state_dict(model.state_dict())
    return copy.double()


def ggn(jac: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """mean_i J_i^T (diag p_i - p_i p_i^T) J_i, through the factor M = diag(sqrt p) - p sqrt(p)^T."""
    root = probs.sqrt()
    m = torch.diag_embed(root) - probs[:, :, None] * root[:, None, :]  # H = M M^T
    b = torch.einsum("ncp,nck->nkp", jac, m).reshape(-1, jac.shape[2])
    return b.T @ b / jac.shape[0]


class Damped:
    """A dense curvature F applied as (F + lambda I)^{-1}, lambda = factor x its mean eigenvalue (trace / dim).

    With `blocks` (slices of the parameter vector), F keeps only its diagonal blocks and each block gets its
    own lambda from its own mean eigenvalue: the layout logix uses, one block per module.
    """

    def __init__(self, curvature: torch.Tensor, blocks=None):
        size = curvature.shape[0]
        blocks = blocks or [slice(0, size)]
        self.curvature = torch.zeros_like(curvature)
        self.means = torch.zeros(size, dtype=curvature.dtype)
        for b in blocks:
            self.curvature[b, b] = curvature[b, b]
            self.means[b] = torch.diagonal(curvature[b, b]).mean()
        self.mean = float(torch.trace(curvature)) / size
        self._factors = {}

    def solve(self, rhs: torch.Tensor, factor: float) -> torch.Tensor:
        if factor not in self._factors:
            self._factors[factor] = torch.linalg.cholesky(self.curvature + torch.diag(factor * self.means))
        return torch.cholesky_solve(rhs, self._factors[factor])


def layer_blocks(model) -> list[slice]:
    """The parameter-vector slice of each Linear layer (weight and bias), in named_parameters order."""
    out, offset = [], 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            size = sum(p.numel() for p in m.parameters(recurse=False))
            out.append(slice(offset, offset + size))
            offset += size
    return out


def exact_rows(model, noisy_model, data, noisy_y):
    """Per-example gradients and damped curvatures of both models, and the seconds taken.

    GGN and EF over all parameters; "GGN layers" / "EF layers" keep only the per-layer diagonal blocks
    (EF layers at rank full is what logix's raw computes: a cross-check).
    """
    xtr, ytr, xq, yq = data
    start = time.perf_counter()
    g_train, j_train, p_train = per_example(model, xtr, ytr)
    g_query, _, _ = per_example(model, xq, yq)
    g_noisy, j_noisy, p_noisy = per_example(noisy_model, xtr, noisy_y)
    dense = {
        "GGN": (ggn(j_train, p_train), ggn(j_noisy, p_noisy)),
        "EF": (g_train.T @ g_train / len(g_train), g_noisy.T @ g_noisy / len(g_noisy)),
    }
    blocks = layer_blocks(model)
    curv = {}
    for name, pair in dense.items():
        curv[name] = tuple(Damped(f) for f in pair)
    for name, pair in dense.items():
        curv[f"{name} layers"] = tuple(Damped(f, blocks) for f in pair)
    return curv, (g_train, g_query, g_noisy), time.perf_counter() - start


def exact_scores(curv, grads, factor: float):
    """(scores (Q, N), self-influence (N,) of the mislabeled model) at one damping factor."""
    clean, noisy = curv
    g_train, g_query, g_noisy = grads
    scores = (clean.solve(g_query.T, factor).T @ g_train.T).numpy()
    self_inf = (g_noisy * noisy.solve(g_noisy.T, factor).T).sum(dim=1).numpy()
    return scores, self_inf


# -- the run -------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 halves x 1 seed, ranks 16 and full")
    parser.add_argument(
        "--task",
        choices=("digits", "lm"),
        default="digits",
        help="digits (default) or the tiny language model of lm_task.py (ranks 8 16 32 64 full by default)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long run that checks the benchmark works; its numbers mean nothing: 200 train / 20 query "
        "examples, hidden width 8, 50 training steps, 6 halves x 1 seed, ranks 16 and full, 1 sampled label per "
        "example; the retraining cache is neither read nor written (--cache is ignored); options given "
        "explicitly still apply; wins over --quick",
    )
    parser.add_argument("--halves", type=int, help="number of random halves (default 100, quick 20)")
    parser.add_argument("--seeds", type=int, help="retraining seeds per half (default 3, quick 1)")
    parser.add_argument("--ranks", nargs="+", help="logix ranks (ints or 'full'; default 8 16 32 full, quick 16 full)")
    parser.add_argument("--outcome", choices=("loss", "margin"), default="loss", help="LDS outcome (default: -loss)")
    parser.add_argument("--damping-factor", type=float, default=0.1, help="lambda = f x mean eigenvalue (0.1)")
    parser.add_argument("--cache", default="benchmarks/.cache", help="retraining cache directory (not with --smoke)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--chunk", type=int, default=50, help="models trained at once while retraining")
    parser.add_argument("--batch", type=int, default=250, help="logging batch size")
    parser.add_argument("--flip-seed", type=int, default=7)
    parser.add_argument("--half-seed", type=int, default=12345)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument(
        "--fisher-samples",
        type=int,
        default=None,
        help="labels drawn per example for the sampled-label (true Fisher) diagnostic (default 4, smoke 1); 0 skips it",
    )
    parser.add_argument(
        "--draws",
        type=int,
        default=None,
        help="labels drawn per example for the README's recipe rows (statistics row + a curvature pass; "
        "default 16, smoke 2); 0 skips them",
    )
    parser.add_argument("--no-pca", action="store_true", help="skip PCA projections even where available")
    parser.add_argument(
        "--damping-sweep",
        nargs="*",
        type=float,
        help="also print LDS at these damping factors (a diagnostic; default list 0.001 0.01 0.1 1 10)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.quick = False  # --smoke wins over --quick
        args.cache = None  # a smoke run's outcomes are never cached
    args.halves = args.halves or (6 if args.smoke else 20 if args.quick else 100)
    args.seeds = args.seeds or (1 if args.quick or args.smoke else 3)
    every = ["8", "16", "32", "64", "full"] if args.task == "lm" else ["8", "16", "32", "full"]
    args.ranks = args.ranks or (["16", "full"] if args.quick or args.smoke else every)
    if args.fisher_samples is None:
        args.fisher_samples = 1 if args.smoke else 4
    if args.draws is None:
        args.draws = 2 if args.smoke else 16
    args.ranks = [r if r == "full" else int(r) for r in args.ranks]
    if args.damping_sweep is not None and not args.damping_sweep:
        args.damping_sweep = [0.001, 0.01, 0.1, 1.0, 10.0]
    return args


def fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def log_lm(path: Path, model, data, rank, projection: str, batch: int, budget: dict) -> float:
    """A logging pass of the language model's train sequences at its final parameters; seconds taken."""
    capture = lm_capture(model, data, batch)
    return sum(log_captured(path, model, capture, rank, projection, budget, ["kfac", "ekfac"]))


def main_lm(args) -> None:
    """--task lm: LDS of logix at each rank, preconditioner and projection on the tiny language model,
    beside the exact damped GGN influence of its output layer (one retraining per half: the recipe is
    deterministic)."""
    recipe = lm_task.SMOKE if args.smoke else lm_task.Recipe()
    data = lm_task.load_data(recipe)
    masks = lm_task.halves(recipe, args.halves)
    start = time.perf_counter()
    outcome = -lm_task.retrain_outcomes(data, recipe, masks, None if args.cache is None else Path(args.cache))
    retrain_s = time.perf_counter() - start
    model = lm_task.train(data, recipe)
    queries = lm_task.queries_for(data)
    n = recipe.n_train
    rows = []
    projections = ["gaussian"] + (["pca", "pca-auto"] if not args.no_pca else [])
    budget = {}  # rank -> the bytes of a Gaussian row, the budget of the rank="auto" row beside it
    chosen = {}  # rank -> what rank="auto" chose at that budget
    with tempfile.TemporaryDirectory(prefix="logix-lm-quality-") as tmp:
        for projection in projections:
            for rank in args.ranks:
                if projection != "gaussian" and rank == "full":
                    continue  # nothing is projected
                path = Path(tmp) / f"{projection}-{rank}"
                log_s = log_lm(path, model, data, rank, projection, args.batch, budget)
                log = logix.open(path)
                budget.setdefault(rank, log.width * 4)
                if projection == "pca-auto":
                    chosen[rank] = auto_ranks(log)
                with log.query(model) as q:
                    queries(q, model)
                model.zero_grad()
                for pre in ("identity", "kfac", "ekfac"):
                    begin = time.perf_counter()
                    scores = log.influence(q, pre, damping_factor=args.damping_factor)
                    values = in_order(scores.train_ids, scores.values, n)
                    rows.append(
                        (
                            pre,
                            projection,
                            rank,
                            *lds(values, masks, outcome),
                            log.width * 4,
                            log_s,
                            time.perf_counter() - begin,
                        )
                    )
                    print(f"  lm {pre} {projection} {rank}: LDS {rows[-1][3]:.3f}", file=sys.stderr, flush=True)
                shutil.rmtree(path)
                smoke_skip = args.smoke and projection != "gaussian"  # a smoke run checks the path once
                if args.draws and log.width <= logix.config.ROW_MAX_WIDTH and not smoke_skip:
                    recipe = Path(tmp) / f"{projection}-{rank}-recipe"
                    capture = lm_capture(model, data, args.batch)
                    pass_s, draws_s = log_recipe(recipe, model, capture, rank, projection, budget, args.draws)
                    log = logix.open(recipe)
                    with log.query(model) as q:
                        queries(q, model)
                    model.zero_grad()
                    begin = time.perf_counter()
                    scores = log.influence(q)  # auto: row, from the curvature pass
                    values = in_order(scores.train_ids, scores.values, n)
                    score_s = time.perf_counter() - begin
                    row = lds(values, masks, outcome)
                    rows.append(
                        (recipe_method(args.draws), projection, rank, *row, log.width * 4, pass_s + draws_s, score_s)
                    )
                    print(f"  lm row {projection} {rank}: LDS {row[0]:.3f}", file=sys.stderr, flush=True)
                    shutil.rmtree(recipe)
    begin = time.perf_counter()
    exact = lm_task.exact_head_influence(model, data, args.damping_factor)
    rows.append(("exact GGN (head)", "-", "head", *lds(exact, masks, outcome), None, None, time.perf_counter() - begin))
    if kronfluence_lm.installed():
        for label, sampled in (("kronfluence EF", False), ("kronfluence GGN", True)):
            values, seconds = kronfluence_lm.scores(model, data, sampled)
            rows.append((label, "none", "full", *lds(values, masks, outcome), None, None, seconds))
            print(f"  lm {label}: LDS {rows[-1][3]:.3f}", file=sys.stderr, flush=True)
    else:
        print("kronfluence: not installed (pip install -e '.[bench]'), its rows are skipped")
    print(f"\nLDS over {args.halves} halves (retraining {retrain_s:.0f} s, cached in {args.cache})")
    head = f"{'method':<17}{'projection':<11}{'rank':>5}{'LDS':>8}{'se':>7}{'row bytes':>10}{'log s':>7}{'score s':>8}"
    print(head)
    print("-" * len(head))
    for method, projection, rank, value, se, row_bytes, log_s, score_s in rows:
        print(
            f"{method:<17}{projection:<11}{rank!s:>5}{value:>8.3f}{se:>7.3f}{fmt(row_bytes, 'd'):>10}"
            f"{fmt(log_s, '.1f'):>7}{score_s:>8.2f}"
        )
    print_auto_ranks(chosen, budget)


def auto_ranks(log) -> dict:
    return {name: (m.k_in, m.k_out) for name, m in log.modules.items()}


def print_auto_ranks(chosen: dict, budget: dict) -> None:
    """What rank="auto" chose (k_in x k_out per module) within each Gaussian rank's row bytes."""
    for rank, ranks in chosen.items():
        sides = ", ".join(f"{name} {k_in}x{k_out}" for name, (k_in, k_out) in ranks.items())
        print(f"pca-auto at rank {rank}'s {budget[rank]} bytes: {sides}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.task == "lm":
        torch.set_num_threads(args.threads)
        print("command:", shlex.join(["python"] + sys.argv))
        print(f"torch {torch.__version__}, logix {logix.__version__}, threads {torch.get_num_threads()}, load {load()}")
        main_lm(args)
        return
    wall = time.perf_counter()
    torch.set_num_threads(args.threads)
    setup = make_setup(args)
    pca = "pca" in logix.config.PROJECTION_METHODS and not args.no_pca
    factor = args.damping_factor
    print("command:", shlex.join(["python"] + sys.argv))
    if args.smoke:
        print("--smoke: a check that the benchmark runs end to end on a smaller task; its numbers mean nothing")
    print(
        f"torch {torch.__version__}, logix {logix.__version__}, threads {torch.get_num_threads()}, "
        f"load average {load()}"
    )
    print(f"setup: {json.dumps(asdict(setup))}")
    outcome_name = "minus query cross-entropy" if args.outcome == "loss" else "correct-class margin"
    print(
        f"LDS: {args.halves} halves x {args.seeds} seeds, outcome = {outcome_name}; "
        f"Spearman: {'scipy.stats.rankdata' if rankdata is not None else 'own ranks'}"
    )
    print(
        f"damping: lambda = {factor} x mean eigenvalue (logix: trace / (d_in d_out) per module block, "
        f"damping_factor={factor}; "
        "exact: whole matrix, per layer block in the layers rows); identity undamped"
    )

    data = load_data(setup)
    xtr, ytr, xq, yq = data
    n = len(xtr)
    rng = np.random.default_rng(args.flip_seed)
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, n // 10, replace=False)] = True
    noisy_y = ytr.clone()
    noisy_y[flipped] = (ytr[flipped] + torch.from_numpy(rng.integers(1, 10, flipped.sum()))) % 10

    start = time.perf_counter()
    every = torch.arange(n)[None]
    model = to_module(train_batched(xtr, ytr, every, [0], setup))
    noisy_model = to_module(train_batched(xtr, noisy_y, every, [0], setup))
    with torch.no_grad():
        acc = (model(xq).argmax(1) == yq).float().mean().item()
        noisy_acc = (noisy_model(xq).argmax(1) == yq).float().mean().item()
        train_loss = F.cross_entropy(model(xtr), ytr).item()
        noisy_losses = F.cross_entropy(noisy_model(xtr), noisy_y, reduction="none").numpy()
        fit_flipped = (noisy_model(xtr).argmax(1) == noisy_y).numpy()[flipped].mean()
    print(
        f"models ({time.perf_counter() - start:.1f} s): clean train loss {train_loss:.3f}, query accuracy {acc:.3f}; "
        f"mislabeled: query accuracy {noisy_acc:.3f}, {fit_flipped:.0%} of the flipped labels fitted"
    )

    masks = make_halves(setup, args.halves)
    cache = None if args.cache is None else Path(args.cache)
    outcomes, retrain_s, trained = retrain_outcomes(setup, data, masks, args.seeds, cache, args.chunk)
    sign = -1.0 if args.outcome == "loss" else 1.0
    outcome = sign * outcomes[args.outcome].mean(axis=1)  # (H, Q), higher is better
    print(
        f"retraining: {trained} models trained in {retrain_s:.1f} s, "
        + (f"{args.halves * args.seeds - trained} read from {args.cache}" if cache else "not cached (--smoke)")
    )

    # rows: (method, projection, rank, LDS, se, AUC, top share, log s, score s[, note])
    rows = [("train loss", "-", "-", None, None, *mislabel(noisy_losses, flipped), None, None)]
    sweep = {}  # (method, projection, rank) -> [LDS at each sweep factor]
    exact_table = {}

    curv, grads, prep_s = exact_rows(model, noisy_model, data, noisy_y)
    for name, pair in curv.items():
        start = time.perf_counter()
        scores, self_inf = exact_scores(pair, grads, factor)
        secs = time.perf_counter() - start
        exact_table[name] = scores
        rows.append(
            (f"exact {name}", "none", "all", *lds(scores, masks, outcome), *mislabel(self_inf, flipped), prep_s, secs)
        )
        if args.damping_sweep:
            sweep[(f"exact {name}", "none", "all")] = [
                lds(exact_scores(pair, grads, f)[0], masks, outcome)[0] for f in args.damping_sweep
            ]
    reference = rows[1][3]
    g_train, g_query, _ = grads

    configs = [("gaussian", r) for r in args.ranks]
    if pca:
        configs += [(p, r) for p in ("pca", "pca-auto") for r in args.ranks if r != "full"]
    budget = {}  # rank -> the bytes of a Gaussian row, the budget of the rank="auto" row beside it
    chosen = {}  # rank -> what rank="auto" chose at that budget
    pca_error, dim_rows, mc_rows, checks = None, [], [], []
    with tempfile.TemporaryDirectory(prefix="logix-attribution-") as tmp:
        for projection, rank in configs:
            if projection != "gaussian" and pca_error:
                continue
            clean_path = Path(tmp) / f"{projection}-{rank}-clean"
            noisy_path = Path(tmp) / f"{projection}-{rank}-noisy"
            try:
                log_s = log_model(clean_path, model, xtr, ytr, rank, projection, args.batch, budget)
                log_s += log_model(noisy_path, noisy_model, xtr, noisy_y, rank, projection, args.batch, budget)
            except Exception as e:  # noqa: BLE001 - a broken PCA is reported in the table, not fatal
                if projection == "gaussian":
                    raise
                pca_error = f"pca: failed ({type(e).__name__}: {e})"
                continue
            clean, noisy = logix.open(clean_path), logix.open(noisy_path)
            budget.setdefault(rank, clean.width * 4)
            if projection == "pca-auto":
                chosen[rank] = auto_ranks(clean)
            for pre in PRECONDITIONERS:
                start = time.perf_counter()
                try:
                    query = capture_query(clean, model, xq, yq)
                    scores, self_inf = logix_scores(clean, noisy, query, pre, factor, n)
                except logix.LogixError as e:
                    note = f"n/a ({type(e).__name__}: {str(e)[:70]})"
                    rows.append((f"logix {pre}", projection, str(rank), None, None, None, None, log_s, None, note))
                    continue
                secs = time.perf_counter() - start
                rows.append(
                    (
                        f"logix {pre}",
                        projection,
                        str(rank),
                        *lds(scores, masks, outcome),
                        *mislabel(self_inf, flipped),
                        log_s,
                        secs,
                    )
                )
                if projection == "gaussian" and rank == "full" and pre in ("identity", "raw"):
                    dense = (g_query @ g_train.T).numpy() if pre == "identity" else exact_table["EF layers"]
                    error = float(np.abs(scores - dense).max() / np.abs(dense).max())
                    what = "exact gradient dot products" if pre == "identity" else "exact EF layers"
                    checks.append(f"logix {pre} at rank full vs {what}: max relative error {error:.1e}")
                if rank != "full" and pre != "identity":
                    scores, self_inf = logix_scores(clean, noisy, query, pre, factor, n, damping="projected")
                    dim_rows.append(
                        (
                            f"logix {pre}",
                            projection,
                            str(rank),
                            *lds(scores, masks, outcome),
                            *mislabel(self_inf, flipped),
                        )
                    )
                if args.damping_sweep and pre != "identity":
                    sweep[(f"logix {pre}", projection, str(rank))] = [
                        lds(logix_scores(clean, None, query, pre, f, n)[0], masks, outcome)[0]
                        for f in args.damping_sweep
                    ]
            if args.draws and clean.width <= logix.config.ROW_MAX_WIDTH:
                rows.append(
                    recipe_row(
                        Path(tmp),
                        (model, noisy_model),
                        (xtr, ytr, noisy_y),
                        (xq, yq),
                        projection,
                        rank,
                        budget,
                        args,
                        (masks, outcome, flipped),
                    )
                )
            if projection == "gaussian" and args.fisher_samples:
                mc_clean, mc_noisy = Path(tmp) / f"mc-{rank}-clean", Path(tmp) / f"mc-{rank}-noisy"
                log_sampled_fisher(mc_clean, model, xtr, rank, args.batch, args.fisher_samples, seed=1)
                log_sampled_fisher(mc_noisy, noisy_model, xtr, rank, args.batch, args.fisher_samples, seed=2)
                fisher_clean, fisher_noisy = logix.open(mc_clean), logix.open(mc_noisy)
                query = capture_query(clean, model, xq, yq)
                for pre in ("kfac", "ekfac"):  # a dense (raw) Fisher needs far more samples than this
                    scores, self_inf = sampled_fisher_scores(
                        clean, fisher_clean, noisy, fisher_noisy, query, pre, factor, n
                    )
                    mc_rows.append(
                        (
                            f"logix {pre}",
                            projection,
                            str(rank),
                            *lds(scores, masks, outcome),
                            *mislabel(self_inf, flipped),
                        )
                    )
                shutil.rmtree(mc_clean, ignore_errors=True)
                shutil.rmtree(mc_noisy, ignore_errors=True)
            shutil.rmtree(clean_path, ignore_errors=True)
            shutil.rmtree(noisy_path, ignore_errors=True)

    print()
    print(
        "exact lambda: GGN {:.3g} (mislabeled model {:.3g}), EF {:.3g} ({:.3g})".format(
            *(factor * d.mean for name in ("GGN", "EF") for d in curv[name])
        )
    )
    for line in checks:
        print(f"check: {line}")
    header = f"{'method':<17}{'projection':<11}{'rank':>5}{'LDS':>8}{'se':>7}{'dLDS':>8}{'AUC':>7}{'top10%':>8}"
    header += f"{'log s':>8}{'score s':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        method, projection, rank, value, se, auc, top, log_s, score_s = row[:9]
        delta = None if value is None or reference is None else value - reference
        line = f"{method:<17}{projection:<11}{rank:>5}{fmt(value):>8}{fmt(se):>7}{fmt(delta, '+.3f'):>8}"
        line += f"{fmt(auc):>7}{fmt(top, '.2f'):>8}{fmt(log_s, '.2f'):>8}{fmt(score_s, '.2f'):>9}"
        if len(row) > 9:
            line += f"  {row[9]}"
        print(line)
    if not pca:
        print("pca: not available" if "pca" not in logix.config.PROJECTION_METHODS else "pca: skipped (--no-pca)")
    elif pca_error:
        print(pca_error)
    print_auto_ranks(chosen, budget)
    print("dLDS = LDS - exact GGN LDS. Targets: logix ekfac within 0.05 LDS of exact GGN; mislabel AUC >= 0.95.")
    for r in rows:
        if r[0] == "logix ekfac" and r[3] is not None:
            gap = reference - r[3]
            print(
                f"  ekfac {r[1]} rank {r[2]}: LDS {gap:.3f} below exact ({'met' if gap <= 0.05 else 'NOT met'}), "
                f"AUC {r[5]:.3f} ({'met' if r[5] >= 0.95 else 'NOT met'})"
            )
    for title, extra in (
        (
            f"diagnostic: logix curvature from a sampled-label log ({args.fisher_samples} labels drawn from the "
            "model per example: a Monte-Carlo true Fisher, i.e. the GGN, instead of the empirical Fisher "
            "of the observed labels); rows and damping as above",
            mc_rows,
        ),
        (
            f"diagnostic: logix with lambda = {factor} x trace(block) / (k_in k_out) per module, the mean "
            "eigenvalue of the projected block (the default before: larger at low rank, as a Gaussian projection "
            "keeps the trace and shrinks the dimension)",
            dim_rows,
        ),
    ):
        if not extra:
            continue
        print()
        print(title)
        head = f"{'method':<17}{'projection':<11}{'rank':>5}{'LDS':>8}{'se':>7}{'dLDS':>8}{'AUC':>7}{'top10%':>8}"
        print(head)
        print("-" * len(head))
        for method, projection, rank, value, se, auc, top in extra:
            line = f"{method:<17}{projection:<11}{rank:>5}{value:>8.3f}{se:>7.3f}{value - reference:>+8.3f}"
            print(line + f"{auc:>7.3f}{top:>8.2f}")
    if sweep:
        print()
        print("diagnostic, not used for the table above: LDS at other damping factors f (lambda = f x mean eigenvalue)")
        head = f"{'method':<17}{'projection':<11}{'rank':>5}" + "".join(f"{f'f={f:g}':>9}" for f in args.damping_sweep)
        print(head)
        print("-" * len(head))
        for (method, projection, rank), values in sweep.items():
            print(f"{method:<17}{projection:<11}{rank:>5}" + "".join(f"{v:>9.3f}" for v in values))
    print(f"total {time.perf_counter() - wall:.1f} s (retraining {retrain_s:.1f} s); load average {load()}")


def recipe_row(tmp: Path, models, data, queries, projection, rank, budget, args, truth) -> tuple:
    """The table's row for the README's recipe on digits: LDS of `log.influence(q)` on the clean
    model's log, mislabel AUC of `self_influence()` on the mislabeled model's (both `auto`: row)."""
    (model, noisy_model), (xtr, ytr, noisy_y), (xq, yq) = models, data, queries
    masks, outcome, flipped = truth
    paths = [tmp / f"{projection}-{rank}-recipe-{kind}" for kind in ("clean", "noisy")]
    log_s = 0.0
    for path, m, y in zip(paths, (model, noisy_model), (ytr, noisy_y)):
        log_s += sum(log_recipe(path, m, digits_capture(m, xtr, y, args.batch), rank, projection, budget, args.draws))
    clean, noisy = (logix.open(p) for p in paths)
    start = time.perf_counter()
    scores = clean.influence(capture_query(clean, model, xq, yq), progress=False)
    si = noisy.self_influence(progress=False)
    n = len(xtr)
    values, self_inf = in_order(scores.train_ids, scores.values, n), in_order(si.ids, si.values, n)
    secs = time.perf_counter() - start
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    row = (*lds(values, masks, outcome), *mislabel(self_inf, flipped))
    return (recipe_method(args.draws), projection, str(rank), *row, log_s, secs)


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


if __name__ == "__main__":
    main()

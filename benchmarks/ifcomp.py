"""IF-COMP from a log (issue 18) on scikit-learn's digits and wines: calibration under shift,
out-of-distribution detection, mislabel detection.

    python benchmarks/ifcomp.py            # 3 seeds, 30 epochs (about a minute on 2 CPU cores)
    python benchmarks/ifcomp.py --quick    # 1 seed
    python benchmarks/ifcomp.py --smoke    # 1 seed, 3 epochs: checks the benchmark works; its numbers mean nothing

Two tasks: the 8x8 digits (1,297 train, 500 test) and the wines (178: 118 train, 60 test; 13
standardised measurements, 3 cultivars). The model and recipe are examples/data_selection.py's
(an MLP with 128 hidden units, SGD, logged by logix at rank 16 with EK-FAC, one pass per epoch);
IF-COMP reads the last epoch's pass (`log.complexity`). A fifth of the training data is held out
to choose temperatures. For the wines, the shifts are Gaussian noise of 0.5 and 1 standard
deviation and 30% of the measurements set to their mean; far-OOD is the measurements shuffled
across wines and uniform noise; near-OOD a model trained on two cultivars asked about the third.

* Calibration: expected calibration error (15 bins) and negative log-likelihood on the test digits
  and on shifted copies (rotated by 15, 30 and 45 degrees, Gaussian noise of std 0.3, 30% of the
  pixels dropped), for the softmax, the softmax with a temperature fitted on held-out clean
  digits, a linearised Laplace predictive from the same log (`Laplace`: EK-FAC posterior, probit
  approximation; variance scale and damping chosen by NLL on the same held-out digits), and
  IF-COMP's pNML with its temperature chosen there too (`log.choose_temperature`: the least NLL
  over powers of 4 from 0.25 to 4^20 and damping factors 0.01, 0.1, 1 and 10).
* Out-of-distribution: AUROC of each score at telling test digits from near-OOD inputs (a model
  trained on digits 0-4 alone, asked about 5-9, every score over its 5 trained outputs, IF-COMP's
  temperature and damping chosen again on that model's own held-out digits 0-4) and
  far-OOD ones (digits rotated 90 degrees, inverted, uniform noise): IF-COMP's complexity against
  the maximum softmax probability and the energy score (-logsumexp of the logits).
* Cost: IF-COMP of the test digits against plain scoring of them (a query row each at its own
  label, then EK-FAC influence top 10 over the training rows).
* Mislabels: 10% of the training labels flipped; AUC and the share of flipped labels in the top
  10%, for IF-COMP's code length of each training pair (the training inputs passed again), the
  log's self-influence, and the final training loss.

Each table is mean +- standard error over seeds.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from data_selection import table  # noqa: E402
from digits import digits_datasets  # noqa: E402

import logix  # noqa: E402
from logix.curvature import Preconditioner  # noqa: E402

TEMPERATURES = tuple(2.0**p for p in range(-2, 11))  # 0.25 ... 1024  # IF-COMP's grid, chosen on held-out digits


def rotated(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """8x8 digits (flattened) rotated about their centre, bilinear."""
    angle = math.radians(degrees)
    matrix = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0]])
    grid = F.affine_grid(matrix.expand(len(x), 2, 3), (len(x), 1, 8, 8), align_corners=False)
    return F.grid_sample(x.view(-1, 1, 8, 8), grid, align_corners=False).view(-1, 64)


def digit_shifts(x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"clean": x}
    for degrees in (15, 30, 45):
        out[f"rotated {degrees}"] = rotated(x, degrees)
    out["noise 0.3"] = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    out["30% pixels dropped"] = x * (torch.rand(x.shape, generator=g) > 0.3)
    return out


def digits_far(x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    return {
        "rotated 90": rotated(x, 90),
        "inverted": 1 - x,
        "uniform noise": torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)),
    }


def wine_shifts(x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Standardised features: noise of 0.5 and 1 standard deviation, 30% of features at their mean."""
    g = torch.Generator().manual_seed(seed)
    return {
        "clean": x,
        "noise 0.5 sd": x + 0.5 * torch.randn(x.shape, generator=g),
        "noise 1 sd": x + torch.randn(x.shape, generator=g),
        "30% features missing": x * (torch.rand(x.shape, generator=g) > 0.3),
    }


def wine_far(x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    columns = torch.stack([x[torch.randperm(len(x), generator=g), j] for j in range(x.shape[1])], dim=1)
    noise = 6 * torch.rand(x.shape, generator=g) - 3
    return {"features shuffled across wines": columns, "uniform noise (+-3 sd)": noise}


@dataclass
class Task:
    """A small classification task: train and test tensors, how to shift its inputs and what lies
    far outside it."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int
    shifts: Callable
    far: Callable
    near_classes: int  # the near-OOD model is trained on classes below this


def digits_task() -> Task:
    (x, y), (x_test, y_test) = (d.tensors for d in digits_datasets())
    return Task("digits", x, y, x_test, y_test, 10, digit_shifts, digits_far, 5)


def wine_task() -> Task:
    """scikit-learn's wines (178, 13 chemical measurements, 3 cultivars), standardised on the
    training third's statistics; a fixed 2/3 train, 1/3 test split."""
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = torch.tensor(x[order], dtype=torch.float32), torch.tensor(y[order])
    cut = 2 * len(x) // 3
    mean, std = x[:cut].mean(dim=0), x[:cut].std(dim=0)
    x = (x - mean) / std
    return Task("wine", x[:cut], y[:cut], x[cut:], y[cut:], 3, wine_shifts, wine_far, 2)


def train(x: torch.Tensor, y: torch.Tensor, classes: int, epochs: int, seed: int, run) -> nn.Module:
    """examples/data_selection.py's recipe (an MLP with 128 hidden units, SGD with momentum, batch 64),
    logged by `run` one pass per epoch."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(logix.WithIds(TensorDataset(x, y)), batch_size=64, shuffle=True)
    run.watch(model)  # logix
    for epoch in range(epochs):
        run.start_pass(f"epoch{epoch}")  # logix
        for ids, xb, yb in loader:
            opt.zero_grad()
            with run.capture(ids):  # logix
                F.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


def flip_labels(y: torch.Tensor, classes: int, fraction: float, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """round(fraction * n) labels changed to another class at random; (labels, mask of the flipped)."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(y), size=round(fraction * len(y)), replace=False)
    flipped = np.zeros(len(y), dtype=bool)
    flipped[chosen] = True
    y = y.clone()
    y[chosen] = (y[chosen] + torch.from_numpy(rng.integers(1, classes, size=len(chosen)))) % classes
    return y, flipped


def ece(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == y).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            total += float(inside.double().mean() * (confidence[inside].mean() - correct[inside].mean()).abs())
    return total


def nll(probs: torch.Tensor, y: torch.Tensor) -> float:
    return float(-probs[torch.arange(len(y)), y].clamp_min(1e-300).log().mean())


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The softmax temperature of least NLL on (logits, y)."""
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits.double() / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


PRECONDITIONER = "ekfac"  # --preconditioner: "row" adds a curvature pass of DRAWS labels per example
DRAWS = 16
FACTORS = (0.01, 0.1, 1.0, 10.0)  # damping factors choose_temperature tries with its temperatures
PRIOR_SCALES = tuple(4.0**p for p in range(-10, 11))  # the linearised Laplace baseline's variance scales


class Laplace:
    """The baseline of a linearised Laplace predictive, from the same log and curvature as IF-COMP.

    The posterior around the trained weights is Gaussian with covariance s (N (F + lambda I))^-1 (F
    the log's EK-FAC, N its rows); linearising the logits f_c in the weights gives each class's
    logit variance v_c(x) = s J_c^T (F + lambda I)^-1 J_c / N, with J_c the (projected) gradient of
    f_c(x), and the mean-field probit approximation gives p(c | x) = softmax_c(f_c / sqrt(1 + pi v_c
    / 8)). The scale s and the damping factor are chosen on held-out data by NLL, as the prior
    precision of a Laplace approximation usually is. One forward and backward per class and batch,
    as IF-COMP's."""

    def __init__(self, log, model):
        self.log, self.model = log, model
        self.scale, self.factor = 1.0, FACTORS[0]

    def logit_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (n, C) float64, each class's logit gradient as a projected row (C, n, D))."""
        with torch.no_grad():
            logits = self.model(x).double()
        with self.log.query(self.model) as q:  # logix: each class's logit gradient, one row per input
            for c in range(logits.shape[1]):
                with q.capture(list(range(len(x))), reduction="sum"):
                    self.model(x)[:, c].sum().backward()
                self.model.zero_grad(set_to_none=True)
        return logits, q.rows.view(logits.shape[1], len(x), -1)

    def variances(self, rows: torch.Tensor, factor: float) -> torch.Tensor:
        """(n, C) float64: J_c^T (F + lambda I)^-1 J_c / N for the rows of `logit_rows`."""
        pre = Preconditioner(self.log, PRECONDITIONER, damping_factor=factor)
        return torch.stack([pre.self_products(r) for r in rows], dim=1).double() / len(self.log)

    @staticmethod
    def predictive(logits: torch.Tensor, variances: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.softmax(logits / torch.sqrt(1 + math.pi / 8 * scale * variances), dim=1)

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> Laplace:
        """Choose the scale and damping factor of least NLL on held-out (x, y)."""
        best = math.inf
        logits, rows = self.logit_rows(x)  # taken once: only the preconditioner changes with the factor
        for factor in FACTORS:
            variances = self.variances(rows, factor)
            for scale in PRIOR_SCALES:
                value = nll(self.predictive(logits, variances, scale), y)
                if value < best:
                    best, self.scale, self.factor = value, scale, factor
        return self

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        logits, rows = self.logit_rows(x)
        return self.predictive(logits, self.variances(rows, self.factor), self.scale)


def complexity(log, model, x: torch.Tensor, settings: dict, labels=None, logits=None):
    batches = [
        (list(range(s, min(s + 256, len(x)))), x[s : s + 256]) + (() if labels is None else (labels[s : s + 256],))
        for s in range(0, len(x), 256)
    ]
    return log.complexity(model, batches, preconditioner=PRECONDITIONER, logits=logits, **settings)  # logix


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """AUROC of a score meant to be higher outside the distribution."""
    scores = torch.cat([inside, outside]).double().numpy()
    return float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], scores))


def ood_scores(log, model, x: torch.Tensor, settings: dict, classes: int) -> dict[str, torch.Tensor]:
    """Each method's score, higher = more out of distribution, over the first `classes` outputs
    (the classes the model was trained on)."""
    forward = lambda m, inputs: m(inputs)[:, :classes]  # noqa: E731
    with torch.no_grad():
        logits = forward(model, x).double()
    return {
        "IF-COMP complexity": complexity(log, model, x, settings, logits=forward).values,
        "max softmax probability": -torch.softmax(logits, dim=1).max(dim=1).values,
        "energy": -torch.logsumexp(logits, dim=1),
    }


def logged_training(path: str, x, y, classes: int, epochs: int, seed: int):
    """(model, log): `train` logged at rank 16 with EK-FAC; with --preconditioner row also the whole
    row's Fisher, from a curvature pass at the trained model of DRAWS labels drawn per example."""
    row = PRECONDITIONER == "row"
    with logix.init(path, rank=16, statistics=["ekfac", "row"] if row else "ekfac") as run:  # logix
        model = train(x, y, classes, epochs, seed, run)
        if row:
            run.start_pass("curvature", curvature_for=f"epoch{epochs - 1}")  # logix
            generator = torch.Generator().manual_seed(seed)
            for _ in range(DRAWS):
                for start in range(0, len(x), 256):
                    ids = list(range(start, min(start + 256, len(x))))
                    with run.capture(ids):  # logix
                        logits = model(x[ids])
                        F.cross_entropy(logits, logix.sampled_labels(logits, generator)).backward()
                    model.zero_grad()
    return model, logix.open(path)


def experiment(task: Task, tmp: str, seed: int, epochs: int) -> dict[str, list[list]]:
    order = np.random.default_rng(seed).permutation(len(task.x))
    held, kept = order[: len(task.x) // 5], order[len(task.x) // 5 :]  # held-out clean data choose temperatures
    x, y, x_val, y_val = task.x[kept], task.y[kept], task.x[held], task.y[held]
    x_test, y_test, classes = task.x_test, task.y_test, task.classes
    out: dict[str, list[list]] = {}

    # calibration under shift
    model, log = logged_training(f"{tmp}/clean", x, y, classes, epochs, seed)
    with torch.no_grad():
        val_logits = model(x_val)
    softmax_t = fit_temperature(val_logits, y_val)
    if_t, if_f, _ = log.choose_temperature(model, [(list(range(len(x_val))), x_val, y_val)], damping_factors=FACTORS,
                                           preconditioner=PRECONDITIONER)  # fmt: skip
    settings = {"temperature": if_t, "damping_factor": if_f}
    laplace = Laplace(log, model).fit(x_val, y_val)
    print(f"  {task.name}, seed {seed}: IF-COMP temperature {if_t:g}, damping factor {if_f:g}; "
          f"softmax temperature {softmax_t:.3f}", flush=True)  # fmt: skip
    rows = []
    for name, shifted in task.shifts(x_test, seed).items():
        with torch.no_grad():
            logits = model(shifted).double()
        methods = {
            "softmax": torch.softmax(logits, dim=1),
            "temperature-scaled softmax": torch.softmax(logits / softmax_t, dim=1),
            "linearised Laplace": laplace.probs(shifted),
            "IF-COMP": complexity(log, model, shifted, settings).probs,
        }
        for method, probs in methods.items():
            rows.append([f"{name}: {method}", ece(probs, y_test), nll(probs, y_test)])
    out["calibration"] = rows
    out["temperatures"] = [
        ["softmax", softmax_t, "-"], ["IF-COMP", if_t, if_f], ["Laplace", laplace.scale, laplace.factor]
    ]  # fmt: skip

    # cost: IF-COMP of the test inputs against plain scoring of them (one query row each, their own labels)
    start = time.perf_counter()
    complexity(log, model, x_test, settings)
    if_seconds = time.perf_counter() - start
    start = time.perf_counter()
    with log.query(model) as q:  # logix
        with q.capture(list(range(len(x_test)))):
            F.cross_entropy(model(x_test), y_test).backward()
    log.influence(q, PRECONDITIONER, top_k=10)  # logix
    model.zero_grad(set_to_none=True)
    plain_seconds = time.perf_counter() - start
    out["cost"] = [["IF-COMP (log.complexity)", if_seconds, if_seconds / plain_seconds],
                   ["plain scoring (query + influence top 10)", plain_seconds, 1.0]]  # fmt: skip

    # far-OOD against the same model
    inside = ood_scores(log, model, x_test, settings, classes)
    rows = []
    for name, x_out in task.far(x_test, seed).items():
        outside = ood_scores(log, model, x_out, settings, classes)
        rows += [[f"{name}: {method}", auroc(inside[method], outside[method])] for method in inside]
    # near-OOD: a model that saw the first classes only, asked about the others
    few, seen = y < task.near_classes, y_test < task.near_classes
    model_few, log_few = logged_training(f"{tmp}/few", x[few], y[few], classes, epochs, seed)
    val_few = y_val < task.near_classes  # its own held-out data: the classes it was trained on
    few_logits = lambda m, inputs: m(inputs)[:, : task.near_classes]  # noqa: E731
    held_few = [(list(range(int(val_few.sum()))), x_val[val_few], y_val[val_few])]
    few_t, few_f, _ = log_few.choose_temperature(model_few, held_few, damping_factors=FACTORS,
                                                 preconditioner=PRECONDITIONER, logits=few_logits)  # fmt: skip
    few_settings = {"temperature": few_t, "damping_factor": few_f}
    print(f"  near-OOD model: IF-COMP temperature {few_t:g}, damping factor {few_f:g}", flush=True)
    inside = ood_scores(log_few, model_few, x_test[seen], few_settings, task.near_classes)
    outside = ood_scores(log_few, model_few, x_test[~seen], few_settings, task.near_classes)
    unseen = f"classes {task.near_classes}..{classes - 1} unseen"
    rows += [[f"{unseen}: {method}", auroc(inside[method], outside[method])] for method in inside]
    out["ood"] = rows

    # mislabels
    y_flipped, flipped = flip_labels(y, classes, 0.1, seed=seed + 1)
    model_flipped, log_flipped = logged_training(f"{tmp}/flipped", x, y_flipped, classes, epochs, seed)
    ids = log_flipped.ids
    code = complexity(log_flipped, model_flipped, x[ids], settings, labels=y_flipped[ids])
    self_influence = log_flipped.self_influence(PRECONDITIONER)  # logix
    with torch.no_grad():
        losses = F.cross_entropy(model_flipped(x), y_flipped, reduction="none")
    by_method = {
        "IF-COMP code length": dict(zip(ids.tolist(), code.code_length.tolist())),
        f"self-influence ({PRECONDITIONER})": dict(zip(self_influence.ids.tolist(), self_influence.values.tolist())),
        "training loss": dict(enumerate(losses.tolist())),
    }
    rows = []
    for method, score in by_method.items():
        values = np.array([score[i] for i in range(len(x))])
        top = np.argsort(-values)[: max(1, len(x) // 10)]
        rows.append([method, float(roc_auc_score(flipped, values)), float(flipped[top].mean())])
    out["mislabels"] = rows
    return out


def mean_se(values: list) -> str:
    if any(isinstance(v, str) for v in values):
        return "-"
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    return f"{mean:.3f} +- {statistics.stdev(values) / len(values) ** 0.5:.3f}"


def summary(head: list[str], per_seed: list[list[list]]) -> str:
    rows = [[first[0]] + [mean_se([s[i][c] for s in per_seed]) for c in range(1, len(first))]
            for i, first in enumerate(per_seed[0])]  # fmt: skip
    return table(head, rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="1 seed")
    parser.add_argument("--smoke", action="store_true", help="1 seed, 3 epochs: checks the benchmark works")
    parser.add_argument(
        "--preconditioner",
        choices=("ekfac", "row"),
        default="ekfac",
        help="IF-COMP's, Laplace's and self-influence's curvature: ekfac (default), or row from a curvature "
        f"pass of {DRAWS} labels drawn from the model per example",
    )
    args = parser.parse_args(argv)
    global PRECONDITIONER
    PRECONDITIONER = args.preconditioner
    if args.smoke:
        args.seeds, args.epochs = 1, 3
    elif args.quick:
        args.seeds = 1
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; {args.seeds} seeds, {args.epochs} epochs per training")
    if args.smoke:
        print("--smoke: a check that the benchmark runs end to end; its numbers mean nothing")
    for task in (digits_task(), wine_task()):
        results, seconds = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for seed in range(args.seeds):
                start = time.perf_counter()
                results.append(experiment(task, f"{tmp}/{seed}", seed, args.epochs))
                seconds.append(time.perf_counter() - start)
        print(f"\n== {task.name}: {len(task.x)} training and {len(task.x_test)} test examples, {task.classes} classes "
              f"({statistics.fmean(seconds):.0f} s per seed)")  # fmt: skip
        print("settings chosen on held-out clean training data, per seed")
        for i, method in enumerate(("softmax", "IF-COMP", "linearised Laplace")):
            chosen = [r["temperatures"][i][1:] for r in results]
            what = "variance scale" if i == 2 else "T"
            shown = [f"{what} {t:g}" + ("" if f == "-" else f" with damping factor {f:g}") for t, f in chosen]
            print(f"  {method}: " + "; ".join(shown))
        print("\ncalibration on the test set, clean and shifted")
        print(summary(["test set: method", "ECE", "NLL"], [r["calibration"] for r in results]))
        print("\nout-of-distribution detection (AUROC, higher is better)")
        print(summary(["outside inputs: score", "AUROC"], [r["ood"] for r in results]))
        print("\ncost on the test set")
        print(summary(["", "seconds", "ratio to plain scoring"], [r["cost"] for r in results]))
        print("\nmislabel detection, 10% of training labels flipped")
        print(summary(["score", "AUC", "flipped share of top 10%"], [r["mislabels"] for r in results]))


if __name__ == "__main__":
    main()

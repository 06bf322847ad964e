"""Clean and select training data with a log written during ordinary training, and check every
choice the way that counts: by retraining.

    python examples/data_selection.py [--out runs/selection] [--seed 0] [--epochs 30] [--flip 0.1]

On scikit-learn's handwritten digits (1,297 train, 500 test), with a fraction of the training
labels flipped (--flip), an MLP is trained in an ordinary loop that logs every example's gradient
with logix (EK-FAC statistics, one pass per epoch). Then, from the log of the last epoch:

(a) cleaning: drop the k training digits with the highest self-influence (k = the number of flipped
    labels) and retrain with the same recipe; against dropping k at random, dropping the k with the
    highest training loss, and dropping nothing. Reports how many flipped labels each drop caught
    and the test accuracy after retraining.
(b) selection for a target: the test digits of classes 3, 5 and 8, half of them as queries and half
    to evaluate on. Keep the 10% and 25% of the training digits with the highest mean influence on
    the queries (`log.influence(q, aggregate="mean", top_k=n)`, streamed, one score per training
    digit) and retrain on them alone; against a random selection of the same size and the full
    training set. Reports loss and accuracy on the held-out target digits.

One seed takes well under a minute on 2 CPU cores; `benchmarks/acting.py` will run several.
"""

from __future__ import annotations

import argparse
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from digits import digits_datasets, flip_labels, make_model
from torch.utils.data import DataLoader, TensorDataset

import logix

TARGET_CLASSES = (3, 5, 8)


def train(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, run=None) -> torch.nn.Module:
    """The recipe every model here is trained with; `run` logs it (one pass per epoch)."""
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(logix.WithIds(TensorDataset(x, y)), batch_size=64, shuffle=True)
    if run is not None:
        run.watch(model)  # logix
    for epoch in range(epochs):
        if run is not None:
            run.start_pass(f"epoch{epoch}")  # logix
        for ids, xb, yb in loader:
            opt.zero_grad()
            if run is None:
                F.cross_entropy(model(xb), yb).backward()
            else:
                with run.capture(ids):  # logix: this batch's per-example gradients
                    F.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy)."""
    out = model(x)
    return F.cross_entropy(out, y).item(), (out.argmax(dim=1) == y).float().mean().item()


def drop(n: int, ids) -> np.ndarray:
    """The training indices left after dropping `ids`."""
    keep = np.ones(n, dtype=bool)
    keep[np.asarray(ids, dtype=np.int64)] = False
    return np.nonzero(keep)[0]


def clean(log, model, x, y, flipped, x_test, y_test, epochs, seed) -> list[list]:
    """(a): which k digits to drop, and the test accuracy of a model retrained without them."""
    k, rng = int(flipped.sum()), np.random.default_rng(seed + 100)
    with torch.no_grad():
        losses = F.cross_entropy(model(x), y, reduction="none").numpy()
    choices = {
        "nothing": np.zeros(0, dtype=np.int64),
        "self-influence (ekfac)": log.self_influence("ekfac").top_k(k)[0],
        "highest training loss": np.argsort(-losses)[:k],
        "random": rng.choice(len(x), size=k, replace=False),
    }
    rows = []
    for name, ids in choices.items():
        keep = drop(len(x), ids)
        retrained = train(x[keep], y[keep], epochs, seed)
        rows.append([name, len(ids), int(flipped[ids].sum()), evaluate(retrained, x_test, y_test)[1]])
    return rows


def select(log, model, x, y, x_target, y_target, epochs, seed) -> list[list]:
    """(b): keep the digits most helpful to the target queries, retrain on them alone."""
    half = len(x_target) // 2
    with log.query(model) as q:  # logix: the target queries' gradients, with the log's projections
        with q.capture(list(range(half))):
            F.cross_entropy(model(x_target[:half]), y_target[:half]).backward()
    held_out = (x_target[half:], y_target[half:])
    rng = np.random.default_rng(seed + 200)
    rows = [["full training set", len(x), *evaluate(train(x, y, epochs, seed), *held_out)]]
    for fraction in (0.10, 0.25):
        n = round(fraction * len(x))
        top = log.influence(q, "ekfac", aggregate="mean", top_k=n)  # logix: one score per training digit
        for name, ids in (("influence (ekfac, mean)", top.ids[0]), ("random", rng.choice(len(x), n, replace=False))):
            ids = np.asarray(ids, dtype=np.int64)
            rows.append([f"{name}, {fraction:.0%}", n, *evaluate(train(x[ids], y[ids], epochs, seed), *held_out)])
    return rows


def table(head: list[str], rows: list[list]) -> str:
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(lines)


def experiment(out: str, seed: int, flip: float, epochs: int) -> tuple[dict, list[list], list[list]]:
    """Train with logging on flipped labels, then clean and select: (facts, cleaning rows, selection rows)."""
    train_set, test_set = digits_datasets()
    x, y_true = train_set.tensors
    y, flipped = flip_labels(y_true, flip, seed=seed + 1)
    x_test, y_test = test_set.tensors
    shutil.rmtree(out, ignore_errors=True)
    with logix.init(out, rank=16, statistics="ekfac") as run:  # logix: the ordinary run, logged
        model = train(x, y, epochs, seed, run)
    log = logix.open(out)  # logix: the last epoch's pass, as any later process would open it
    facts = {"digits": len(x), "flipped": int(flipped.sum()), "test accuracy": evaluate(model, x_test, y_test)[1]}
    cleaning = clean(log, model, x, y, flipped, x_test, y_test, epochs, seed)
    target = torch.isin(y_test, torch.tensor(TARGET_CLASSES))
    facts["target digits"] = int(target.sum())
    selection = select(log, model, x, y, x_test[target], y_test[target], epochs, seed)
    return facts, cleaning, selection


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/selection", help="where the log is written")
    parser.add_argument("--seed", type=int, default=0, help="labels flipped, initialisation and batches")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--flip", type=float, default=0.1, help="fraction of training labels flipped")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny matrices: more threads only wait for each other
    start = time.perf_counter()
    facts, cleaning, selection = experiment(args.out, args.seed, args.flip, args.epochs)
    print(f"trained on {facts['digits']} digits ({facts['flipped']} labels flipped); test accuracy "
          f"{facts['test accuracy']:.3f}; log {args.out}")  # fmt: skip
    print("\n(a) cleaning: drop k training digits, retrain, test accuracy")
    print(table(["dropped", "k", "flipped among them", "test accuracy"], cleaning))
    print(f"\n(b) selection for digits {TARGET_CLASSES} ({facts['target digits']} test digits: half queries, half "
          "held out)")  # fmt: skip
    print(table(["trained on", "digits", "target loss", "target accuracy"], selection))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

"""Trace a backdoor to the training data that planted it, remove that data, and check by retraining.

    python examples/backdoor_digits.py [--out runs/backdoor] [--seed 0] [--poison 0.05] [--epochs 30]

BadNets on scikit-learn's handwritten digits: a fraction (--poison) of the training digits get a
small bright patch in one corner and the label 0. A model trained on them (an ordinary loop,
logged with logix) reads any digit carrying the patch as a 0: that is the backdoor. Then, from
the log of the last epoch:

  * the query is the behaviour: patched test digits (true class not 0) labelled 0, their loss
    backpropagated through the trained model;
  * each method ranks the training digits: aggregate influence on the queries
    (`log.influence(q, aggregate="sum", top_k=k)`) with EK-FAC in each mode and with the plain
    gradient dot product, the same on the rows the log holds from the first epoch, the nearest
    neighbours of the patched queries in pixel space, and chance;
  * recall: how many of the poisoned digits each finds among its top k and 2k (k = the number
    poisoned);
  * each method's top k is removed, the model retrained with the same recipe, and the attack
    success rate (patched test digits read as 0) and clean test accuracy measured.

By the last epoch the model has memorised the poisoned digits: their gradients are tiny, so the
plain score (dot) ranks them low, while the normalised modes (relative divides by the training
digit's own preconditioned norm, cosine by both) and the first epoch's rows, logged while the
poison was still being learned, find them. One seed takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from data_selection import drop, evaluate, table, train
from digits import digits_datasets

import logix

TARGET = 0  # the class the patch makes the model say
N_QUERIES = 20  # patched test digits whose misreading is traced


def patched(x: torch.Tensor) -> torch.Tensor:
    """Digits (8x8, flattened, in [0, 1]) with a bright 2x2 patch in the bottom-right corner."""
    x = x.clone().view(-1, 8, 8)
    x[:, 6:, 6:] = 1.0
    return x.view(-1, 64)


def poison(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int):
    """A copy of the training set with round(fraction * n) digits of classes other than TARGET
    patched and relabelled TARGET; returns (x, y, boolean mask of the poisoned)."""
    rng = np.random.default_rng(seed)
    candidates = np.nonzero(y.numpy() != TARGET)[0]
    chosen = rng.choice(candidates, size=round(fraction * len(y)), replace=False)
    poisoned = np.zeros(len(y), dtype=bool)
    poisoned[chosen] = True
    x, y = x.clone(), y.clone()
    x[chosen], y[chosen] = patched(x[chosen]), TARGET
    return x, y, poisoned


@torch.no_grad()
def attack_success(model, x_test, y_test) -> float:
    """Of the test digits that are not TARGET, the fraction read as TARGET once patched."""
    others = y_test != TARGET
    return (model(patched(x_test[others])).argmax(dim=1) == TARGET).float().mean().item()


def query(log, model, queries: torch.Tensor):
    """The behaviour to trace as query gradients: the patched digits' loss at the label TARGET."""
    with log.query(model) as q:  # logix
        with q.capture(list(range(len(queries))), reduction="sum"):
            F.cross_entropy(model(queries), torch.full((len(queries),), TARGET), reduction="sum").backward()
    return q


def rankings(path: str, model, x, queries, k: int, seed: int) -> dict[str, np.ndarray]:
    """Each method's 2k training digits most responsible for the queries' backdoor, best first."""
    last, first = logix.open(path), logix.open(path, pass_name="epoch0")  # logix: the last and first epochs
    q_last, q_first = query(last, model, queries), query(first, model, queries)
    ranked = {}
    for mode in ("dot", "relative", "cosine"):
        top = last.influence(q_last, "ekfac", mode=mode, aggregate="sum", top_k=2 * k)  # logix: one score per digit
        ranked[f"influence (ekfac, {mode})"] = top.ids[0]
    ranked["influence (gradient dot)"] = last.influence(q_last, "identity", aggregate="sum", top_k=2 * k).ids[0]
    ranked["influence (ekfac, dot), epoch 0's rows"] = first.influence(
        q_first, "ekfac", aggregate="sum", top_k=2 * k
    ).ids[0]
    distances = torch.cdist(x, queries).mean(dim=1)  # pixel space: mean distance to the patched queries
    ranked["nearest in pixels"] = torch.argsort(distances)[: 2 * k].numpy()
    ranked["random"] = np.random.default_rng(seed + 300).choice(len(x), size=2 * k, replace=False)
    return ranked


def experiment(out: str, seed: int, fraction: float, epochs: int) -> tuple[dict, list[list]]:
    """Poison, train with logging, rank, remove and retrain: (facts, one row per method)."""
    train_set, test_set = digits_datasets()
    x, y, poisoned = poison(*train_set.tensors, fraction, seed + 1)
    x_test, y_test = test_set.tensors
    k = int(poisoned.sum())
    shutil.rmtree(out, ignore_errors=True)
    with logix.init(out, rank=16, statistics="ekfac") as run:  # logix: the ordinary run, logged
        model = train(x, y, epochs, seed, run)
    facts = {"digits": len(x), "poisoned": k, "clean accuracy": evaluate(model, x_test, y_test)[1]}
    facts["attack success"] = attack_success(model, x_test, y_test)
    others = np.nonzero((y_test != TARGET).numpy())[0][:N_QUERIES]
    ranked = rankings(out, model, x, patched(x_test[others]), k, seed)
    rows = []
    for name, ids in [("nothing removed", np.zeros(0, dtype=np.int64)), *ranked.items()]:
        ids = np.asarray(ids, dtype=np.int64)
        keep = drop(len(x), ids[:k])
        retrained = train(x[keep], y[keep], epochs, seed)
        found = [int(poisoned[ids[:n]].sum()) for n in (k, 2 * k)] if len(ids) else ["-", "-"]
        rows.append([name, *found, attack_success(retrained, x_test, y_test), evaluate(retrained, x_test, y_test)[1]])
    return facts, rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/backdoor", help="where the log is written")
    parser.add_argument("--seed", type=int, default=0, help="poisoned digits, initialisation and batches")
    parser.add_argument("--poison", type=float, default=0.05, help="fraction of training digits poisoned")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny matrices: more threads only wait for each other
    start = time.perf_counter()
    facts, rows = experiment(args.out, args.seed, args.poison, args.epochs)
    k = facts["poisoned"]
    print(
        f"trained on {facts['digits']} digits, {k} poisoned; clean test accuracy {facts['clean accuracy']:.3f}, "
        f"attack success {facts['attack success']:.3f}"
    )
    print(f"\nremove each method's top k = {k} and retrain ({N_QUERIES} patched test digits as queries)")
    head = ["method", f"poisoned in top {k}", f"in top {2 * k}", "attack success", "clean accuracy"]
    print(table(head, rows))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

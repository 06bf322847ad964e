"""Train a small MLP on scikit-learn's handwritten digits with logix logging every example's gradient.

    python examples/digits.py [--out runs/digits] [--epochs 3] [--rank 16]

The training loop is an ordinary PyTorch loop; the logix lines are marked. Each epoch becomes a
pass of the log. Afterwards the log is opened as any later process would, and what it holds is
printed.
"""

from __future__ import annotations

import argparse
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import logix


def digits_datasets(seed: int = 0):
    """(train, test) TensorDatasets of 8x8 digits scaled to [0, 1], a fixed 1,297 / 500 split."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.long)
    return TensorDataset(x[:1297], y[:1297]), TensorDataset(x[1297:], y[1297:])


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/digits", help="log directory (replaced if it exists)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    torch.manual_seed(0)
    train, test = digits_datasets()
    loader = DataLoader(logix.WithIds(train), batch_size=64, shuffle=True)  # logix: items become (id, x, y)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    shutil.rmtree(args.out, ignore_errors=True)
    start = time.perf_counter()
    with logix.init(args.out, rank=args.rank) as run:  # logix: a log directory
        run.watch(model, optimizer=opt)  # logix: every Linear; rows record the optimizer step
        for epoch in range(args.epochs):
            run.start_pass(f"epoch{epoch}", lr=0.1)  # logix: one pass per epoch
            model.train()
            for ids, x, y in loader:
                with run.capture(ids):  # logix: around forward and backward
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                opt.step()
                opt.zero_grad()
            model.eval()
            with torch.no_grad():
                x_test, y_test = test.tensors
                accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
            print(f"epoch {epoch}: last batch loss {loss.item():.3f}, test accuracy {accuracy:.3f}")
    print(f"trained and logged in {time.perf_counter() - start:.1f} s")

    log = logix.open(args.out)  # read-only; any later process can do this
    print(f"\n{log}")
    print("passes:", ", ".join(f"{p.name} ({p.rows} rows, finalized={p.finalized})" for p in log.passes))
    print(f"{'module':<8}{'gradient':>12}{'row block':>12}")
    for name, m in log.modules.items():
        print(f"{name:<8}{f'{m.d_out}x{m.d_in}':>12}{f'{m.k_out}x{m.k_in}':>12}")
    norms = log.rows().norm(dim=1)
    order = torch.argsort(norms, descending=True)[:5]
    print("\nlargest per-example gradient norms in the last epoch (hard or atypical digits):")
    for row in order.tolist():
        example = int(log.ids[row])
        label = int(train.tensors[1][example])
        print(f"  id {example:4d}  label {label}  norm {norms[row]:.3f}  step {log.steps[row]}")


if __name__ == "__main__":
    main()

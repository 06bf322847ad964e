"""Train a small MLP on scikit-learn's handwritten digits with some labels flipped, log every
example's gradient with logix, then ask the log which training digits mattered.

    python examples/digits.py [--out runs/digits] [--epochs 3] [--rank 16] [--flip 0.1] [--png PATH]

The training loop is an ordinary PyTorch loop; the logix lines are marked. Each epoch becomes a
pass of the log, with EK-FAC curvature gathered as it runs, followed by its curvature pass (the
epoch's digits at labels drawn from the model, for the true Fisher). A fraction of the training labels
(--flip, fixed seed) is changed to a wrong digit first. Afterwards the log is opened as any later
process would, and, in the last epoch's pass, the script prints:

  * what the log holds;
  * for a few test digits, the most helpful and the most harmful training digits;
  * the training digits with the highest self-influence, and how many of the flipped labels the
    top 10% by self-influence catch;
  * with matplotlib, a PNG of all that (default <out>/attribution.png).

It keeps each epoch's weights (<out>-ckpt/epochN.pt, named in its pass) for attribution across
training. It also leaves what the command line needs for `logix top`: the trained weights (<out>-model.pt)
and a query log of the test digits' gradients at those weights (<out>-test), written like the
training log:

    logix top runs/digits --query runs/digits-test --top 5 -p ekfac
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import logix

N_QUERIES = 4  # test digits to explain
K = 5  # helpful and harmful training digits shown per test digit
N_SELF = 20  # highest self-influence examples printed


def digits_datasets(seed: int = 0):
    """(train, test) TensorDatasets of 8x8 digits scaled to [0, 1], a fixed 1,297 / 500 split."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.long)
    return TensorDataset(x[:1297], y[:1297]), TensorDataset(x[1297:], y[1297:])


def flip_labels(y: torch.Tensor, fraction: float, seed: int = 1) -> tuple[torch.Tensor, np.ndarray]:
    """A copy of y with round(fraction * n) labels, chosen at random, changed to another digit.

    Returns (new labels, boolean mask of the flipped examples)."""
    rng = np.random.default_rng(seed)
    n = len(y)
    chosen = rng.choice(n, size=round(fraction * n), replace=False)
    flipped = np.zeros(n, dtype=bool)
    flipped[chosen] = True
    y = y.clone()
    y[chosen] = (y[chosen] + torch.from_numpy(rng.integers(1, 10, size=len(chosen)))) % 10  # never the same
    return y, flipped


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))


def train_and_log(model: nn.Module, train: TensorDataset, test: TensorDataset, out: str, epochs: int, rank: int):
    """The ordinary training loop, with logix logging every example's gradient, one pass per epoch."""
    loader = DataLoader(logix.WithIds(train), batch_size=64, shuffle=True)  # logix: items become (id, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}-ckpt", ignore_errors=True)
    # logix: a log directory; statistics="ekfac" gathers the curvature that influence scores use
    draws = torch.Generator().manual_seed(0)  # the curvature passes' labels; training's RNG stays as it was
    with logix.init(out, rank=rank, statistics="ekfac") as run:
        run.watch(model, optimizer=opt)  # logix: every Linear; rows record the optimizer step
        for epoch in range(epochs):
            checkpoint = f"{out}-ckpt/epoch{epoch}.pt"  # saved at the epoch's end, for TracIn across training
            run.start_pass(f"epoch{epoch}", lr=0.1, checkpoint=checkpoint)  # logix: one pass per epoch
            model.train()
            for ids, x, y in loader:
                with run.capture(ids):  # logix: around forward and backward
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                opt.step()
                opt.zero_grad()
            Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), checkpoint)
            model.eval()
            # logix: the epoch's curvature pass, at its end: the same digits at labels drawn from the
            # model (the true Fisher, which Source across training uses); no optimizer step
            run.start_pass(f"epoch{epoch}/curvature", curvature_for=f"epoch{epoch}")
            for ids, x, _ in loader:
                with run.capture(ids):
                    logits = model(x)
                    F.cross_entropy(logits, logix.sampled_labels(logits, draws)).backward()
                model.zero_grad()
            with torch.no_grad():
                x_test, y_test = test.tensors
                accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
            print(f"epoch {epoch}: last batch loss {loss.item():.3f}, test accuracy {accuracy:.3f}")
    # leaving the `with` finalizes the run: every pass complete, its EK-FAC statistics derived


def log_test_digits(model: nn.Module, test: TensorDataset, out: str, rank: int) -> None:
    """A query log for the command line: the test digits' gradients at the trained weights.

    Same rank (and default dtype, projection and seed) as the training log, so `logix top` can
    score one against the other. No optimizer step: the weights stay as trained."""
    shutil.rmtree(out, ignore_errors=True)
    model.eval()
    loader = DataLoader(logix.WithIds(test), batch_size=100)
    with logix.init(out, rank=rank) as run:  # logix: a second log, of query examples
        run.watch(model)
        run.start_pass("test")
        for ids, x, y in loader:
            with run.capture(ids):
                F.cross_entropy(model(x), y).backward()
            model.zero_grad()


def describe_log(log: logix.Log, label) -> None:
    """What the log holds: passes, modules and their projected row blocks, largest gradient norms."""
    print(f"\n{log}")
    print("passes:", ", ".join(f"{p.name} ({p.rows} rows, finalized={p.finalized})" for p in log.passes))
    print(f"{'module':<8}{'gradient':>12}{'row block':>12}")
    for name, m in log.modules.items():
        print(f"{name:<8}{f'{m.d_out}x{m.d_in}':>12}{f'{m.k_out}x{m.k_in}':>12}")
    norms = log.rows().norm(dim=1)  # logix: rows aligned with log.ids
    print("largest per-example gradient norms in the last epoch (hard, atypical or mislabeled digits):")
    for row in torch.argsort(norms, descending=True)[:3].tolist():
        print(f"  {label(int(log.ids[row])):<40}norm {norms[row]:5.2f}  step {log.steps[row]}")


def explain_test_digits(log: logix.Log, model: nn.Module, test: TensorDataset, label):
    """(a) The training digits that most helped and most harmed the first few test digits."""
    x_test, y_test = test.tensors
    query_ids = list(range(N_QUERIES))
    x, y = x_test[query_ids], y_test[query_ids]
    model.eval()  # no dropout while taking query gradients
    with log.query(model) as q:  # logix: the log's modules and projections; nothing is written
        with q.capture(query_ids):  # logix: test gradients, captured like training ones
            F.cross_entropy(model(x), y).backward()
    model.zero_grad()
    scores = log.influence(q, preconditioner="ekfac", progress=False)  # logix: (queries, train) scores
    helpful, harmful = scores.top_k(K), scores.top_k(K, largest=False)  # logix: + helps, - harms
    with torch.no_grad():
        predicted = model(x).argmax(1)
    for row, t in enumerate(query_ids):
        print(f"\ntest digit {t}: label {int(y[row])}, predicted {int(predicted[row])}")
        for title, top in (("most helpful", helpful), ("most harmful", harmful)):
            print(f"  {title}:")
            for i, v in zip(top.ids[row].tolist(), top.values[row].tolist()):
                print(f"    {label(i):<40}score {v:+.3g}")
    return query_ids, predicted, helpful, harmful


def explain_across_training(log: logix.Log, model: nn.Module, test: TensorDataset, query_ids) -> None:
    """(a') The same test digits over the whole of training: every epoch's rows, each at the
    parameters it was taken at, propagated to the end by each epoch's curvature (Source)."""
    x_test, y_test = test.tensors

    def queries(q, model):  # logix: called with the model at the checkpoint the method needs
        with q.capture(query_ids):
            F.cross_entropy(model(x_test[query_ids]), y_test[query_ids]).backward()

    model.eval()
    top = log.influence_across_training(model, queries, top_k=K)  # logix: Source over every pass
    epochs = [p for p in log.passes if p.curvature_for is None]
    print(f"\nacross all {len(epochs)} epochs (Source), the most helpful training digits:")
    for row, t in enumerate(query_ids):
        shown = ", ".join(f"{int(i)} ({v:+.2g})" for i, v in zip(top.ids[row].tolist(), top.values[row].tolist()))
        print(f"  test digit {t}: {shown}")


def find_mislabeled(log: logix.Log, is_flipped: np.ndarray, label):
    """(b) Self-influence g_i^T (F + lambda I)^{-1} g_i is high for atypical or mislabeled examples."""
    si = log.self_influence("ekfac")  # logix: computed by finalize, read back
    top_ids, top_values = si.top_k(N_SELF)  # logix: highest first
    print(f"\nhighest self-influence in the last epoch ({is_flipped.sum()} of {len(is_flipped)} labels flipped):")
    for i, v in zip(top_ids.tolist(), top_values.tolist()):
        print(f"  {label(i):<40}self-influence {v:.3g}")
    if not is_flipped.any():
        return top_ids, top_values
    n_top = len(si.ids) // 10
    caught = int(is_flipped[si.top_k(n_top).ids].sum())
    print(
        f"flipped among the top 10% by self-influence: {caught} of {n_top} ({caught / n_top:.0%}; "
        f"{is_flipped.mean():.0%} of all labels are flipped), i.e. {caught} of {is_flipped.sum()} flipped labels found"
    )
    return top_ids, top_values


def save_figure(png: Path, test, train, true_y, query_ids, predicted, helpful, harmful, top_self) -> None:
    """(c) One row per test digit (the digit, then its helpful and harmful training digits), and a
    row of the highest self-influence digits. Flipped training labels are titled in red."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    (x_test, y_test), (x_train, y_train) = test.tensors, train.tensors
    cols, rows = 1 + 2 * K, len(query_ids) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.65 * rows))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.25, hspace=0.75)
    for ax in axes.flat:
        ax.set_axis_off()

    def show(ax, image, title, color="black"):
        ax.imshow(image.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title, fontsize=7, color=color)

    def show_train(ax, i: int, line2: str):
        flipped = bool(y_train[i] != true_y[i])
        label = f"y={int(y_train[i])}" + (f" (true {int(true_y[i])})" if flipped else "")
        show(ax, x_train[i], f"#{i} {label}\n{line2}", "red" if flipped else "black")

    for row, t in enumerate(query_ids):
        show(axes[row, 0], x_test[t], f"TEST {t}\ny={int(y_test[t])} pred {int(predicted[row])}", "blue")
        for j in range(K):
            show_train(axes[row, 1 + j], int(helpful.ids[row, j]), f"help {helpful.values[row, j]:+.3g}")
            show_train(axes[row, 1 + K + j], int(harmful.ids[row, j]), f"harm {harmful.values[row, j]:+.3g}")
    fig.text(0.1, 0.96, "most helpful training digits →", fontsize=9, weight="bold")
    fig.text(0.55, 0.96, "most harmful training digits →   (red: label flipped)", fontsize=9, weight="bold")
    axes[-1, 0].text(0.5, 0.5, "highest\nself-\ninfluence", ha="center", va="center", fontsize=8, weight="bold")
    for j, (i, v) in enumerate(zip(top_self[0][: cols - 1].tolist(), top_self[1].tolist())):
        flipped = bool(y_train[i] != true_y[i])
        show_train(axes[-1, 1 + j], i, f"self {v:.0f} " + ("FLIPPED" if flipped else "ok"))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/digits", help="log directory (replaced if it exists)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--flip", type=float, default=0.1, help="fraction of training labels flipped (fixed seed)")
    parser.add_argument("--png", default=None, help="figure path (default <out>/attribution.png)")
    args = parser.parse_args()
    if not 0 <= args.flip <= 1:
        parser.error("--flip must be a fraction in [0, 1]")

    torch.manual_seed(0)
    train, test = digits_datasets()
    true_y = train.tensors[1]
    noisy_y, is_flipped = flip_labels(true_y, args.flip)
    train = TensorDataset(train.tensors[0], noisy_y)
    print(f"flipped {is_flipped.sum()} of {len(is_flipped)} training labels ({args.flip:.0%})")

    def label(i: int) -> str:
        """A training digit: its id, the label it was trained with, and the true one if flipped."""
        return f"id {i:4d}  label {int(noisy_y[i])}" + (f"  FLIPPED (true {int(true_y[i])})" if is_flipped[i] else "")

    model = make_model()
    start = time.perf_counter()
    train_and_log(model, train, test, args.out, args.epochs, args.rank)
    print(f"trained and logged in {time.perf_counter() - start:.1f} s")
    torch.save(model.state_dict(), f"{args.out}-model.pt")
    log_test_digits(model, test, f"{args.out}-test", args.rank)
    print(f"saved {args.out}-model.pt and the test digits' query log {args.out}-test")

    log = logix.open(args.out)  # logix: read-only, the last epoch's pass; any later process can do this
    describe_log(log, label)
    start = time.perf_counter()
    query_ids, predicted, helpful, harmful = explain_test_digits(log, model, test, label)
    explain_across_training(log, model, test, query_ids)
    top_self = find_mislabeled(log, is_flipped, label)
    print(f"attribution in {time.perf_counter() - start:.2f} s")

    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no figure (pip install matplotlib)")
        return
    png = Path(args.png) if args.png else Path(args.out) / "attribution.png"
    save_figure(png, test, train, true_y, query_ids, predicted, helpful, harmful, top_self)
    print(f"figure: {png}")


if __name__ == "__main__":
    main()

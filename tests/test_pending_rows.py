"""Rows formed after the capture (logix.call_groups.PendingRows): on a CPU the writer thread forms
them, several batches at once where they are alike. Whatever is joined, left out or stored in
float16, the rows are those the training step would have formed itself, and they are the exact
per-example gradients even when the user refills the input tensor before the writer gets to them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import exact_gradients, projected
from torch import nn

import logix
import logix.hooks
from logix.call_groups import PendingRows
from logix.hooks import Collector


class Net(nn.Module):
    """Layers of three shapes, one without a bias, over inputs with or without positions."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(5, 7, bias=False)
        self.second = nn.Linear(7, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


def example_loss(out, y):
    return F.cross_entropy(out.reshape(-1, 3), y.reshape(-1), reduction="sum")


def pending(run, model, x, y, divisor):
    collector = Collector(run.watched)
    with collector:
        (example_loss(model(x), y) * (1 / divisor)).backward()
    return collector.pending_rows(1 / divisor)


@pytest.mark.parametrize("positions", [None, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_batches_formed_together_equal_each_formed_alone(tmp_path, positions, dtype):
    """A writer's staged run: alike batches (joined), one with another loss factor, one with
    examples left out, then alike ones again; each row equals the batch's own assemble()."""
    torch.manual_seed(0)
    model = Net()
    run = logix.init(tmp_path / "log", rank=4)
    run.watch(model)
    batches = []
    for size, divisor, keep in [
        (3, 3.0, None),
        (4, 3.0, None),
        (2, 0.5, None),
        (5, 3.0, [1, 0, 1, 1, 0]),
        (3, 3.0, None),
    ]:
        shape = (size,) if positions is None else (size, positions)
        x, y = torch.randn(*shape, 5), torch.randint(0, 3, shape)
        rows = pending(run, model, x, y, divisor)
        batches.append(rows if keep is None else rows.select([bool(k) for k in keep]))
    want = torch.cat([rows.assemble() for rows in batches])
    assert want.shape == (3 + 4 + 2 + 3 + 3, sum(w.width for w in run.watched)) and want.abs().max() > 0.01
    out = np.full(want.shape, np.nan, dtype=dtype)
    PendingRows.fill_many([rows.stored_as(torch.from_numpy(out).dtype) for rows in batches], out)
    if dtype == np.float32:
        assert torch.equal(torch.from_numpy(out), want)
    else:
        assert torch.equal(torch.from_numpy(out), want.half())
    run.finalize()


def test_the_rows_are_the_exact_gradients_of_each_batch_when_formed_later(tmp_path):
    """Five batches held by the writer until the end (no commit before), formed together: each
    example's row is its own exact projected gradient, divided by its own batch's loss factor."""
    torch.manual_seed(1)
    model = Net()
    run = logix.init(tmp_path / "log", rank=4, commit_interval=60.0)
    run.watch(model)
    xs, ys = [], []
    for k, size in enumerate([4, 4, 3, 4, 4]):
        x, y = torch.randn(size, 5), torch.randint(0, 3, (size,))
        with run.capture(list(range(10 * k, 10 * k + size))):
            (example_loss(model(x), y) / size).backward()
        xs.append(x)
        ys.append(y)
    run.finalize()
    log = logix.open(tmp_path / "log")
    exact = exact_gradients(model, example_loss, torch.cat(xs), torch.cat(ys))
    for w in run.watched:
        want = projected(exact[w.name], w.proj_in, w.proj_out)
        torch.testing.assert_close(log.gradients(w.name), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("rank", ["full", 16])
@pytest.mark.parametrize("projected_in_hook", [False, True])
def test_a_refilled_input_buffer_leaves_the_rows_alone(tmp_path, rank, projected_in_hook, monkeypatch):
    """A loop that copies each batch into one preallocated input tensor: at full rank (and where
    the rank exceeds a layer's width) a layer's input side is the input itself, which the rows
    must not share: the rows are formed after the buffer holds the next batch. Small inputs are
    held raw until the capture ends, large ones taken in the forward hook: both."""
    if projected_in_hook:
        monkeypatch.setattr(logix.hooks, "DEFER_NUMEL", 0)
    torch.manual_seed(2)
    model = Net()
    run = logix.init(tmp_path / "log", rank=rank, commit_interval=60.0)
    run.watch(model)
    buffer = torch.empty(4, 5)
    xs = [torch.randn(4, 5) for _ in range(3)]
    ys = [torch.randint(0, 3, (4,)) for _ in range(3)]
    for k, (x, y) in enumerate(zip(xs, ys)):
        buffer.copy_(x)
        with run.capture(list(range(4 * k, 4 * k + 4)), reduction="sum"):
            example_loss(model(buffer), y).backward()
    buffer.zero_()
    run.finalize()
    log = logix.open(tmp_path / "log")
    exact = exact_gradients(model, example_loss, torch.cat(xs), torch.cat(ys))
    want = projected(exact["first"], run.watched[0].proj_in, run.watched[0].proj_out)
    assert want.abs().max() > 0.01
    torch.testing.assert_close(log.gradients("first"), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())

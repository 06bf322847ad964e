"""Module calls of equal shape finished together (logix.call_groups): the grouped path gives the
same rows and statistics as an independent per-call reference, whatever decides the grouping
(raw or projected sides, flushes during the backward, a module called twice, masks), and its
operation count does not grow with the number of modules of one shape."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import exact_gradients, projected
from torch import nn

import logix
import logix.hooks
from logix.errors import CaptureError
from logix.hooks import Collector
from logix.statistics import CovarianceSums

WIDTH, RANK = 6, 4


class Tower(nn.Module):
    """Four layers of one shape, one more of that shape called twice, and a head of another."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(WIDTH, WIDTH) for _ in range(4)])
        self.shared = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        x = torch.tanh(self.shared(torch.tanh(self.shared(x))))
        return self.head(x)


def example_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


@pytest.fixture(params=["grouped", "each-call-alone", "projected-in-hooks", "inputs-raw-gradients-projected"])
def grouping(request, monkeypatch):
    """Every way the hooks can hand calls to their groups."""
    if request.param == "each-call-alone":  # processed as soon as each gradient arrives: groups of one
        monkeypatch.setattr(logix.hooks, "FLUSH_ELEMENTS", 0)
    elif request.param == "projected-in-hooks":  # nothing held raw
        monkeypatch.setattr(logix.hooks, "DEFER_NUMEL", 0)
    elif request.param == "inputs-raw-gradients-projected":  # the head's 3-wide gradients fit, the others not
        monkeypatch.setattr(logix.hooks, "DEFER_NUMEL", 8 * 3)
    return request.param


def test_rows_of_grouped_calls_are_the_projected_exact_gradients(tmp_path, grouping):
    model = Tower()
    x, y = torch.randn(8, WIDTH), torch.randint(0, 3, (8,))
    run = logix.init(tmp_path / "log", rank=RANK)
    run.watch(model)
    with run.capture(list(range(8)), reduction="sum"):
        example_loss(model(x), y).backward()
    run.finalize()
    log = logix.open(tmp_path / "log")
    exact = exact_gradients(model, example_loss, x, y)
    for w in run.watched:
        want = projected(exact[w.name], w.proj_in, w.proj_out)
        torch.testing.assert_close(log.gradients(w.name), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_sequences_with_a_mask_in_groups(tmp_path, grouping):
    """(B, T, d) inputs: per-example sums over unmasked positions, for every grouping."""
    model = Tower()
    x, y = torch.randn(4, 5, WIDTH), torch.randint(0, 3, (4, 5))
    mask = torch.ones(4, 5)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    run = logix.init(tmp_path / "log", rank=RANK)
    run.watch(model)

    def masked_loss(out, y, m):
        losses = F.cross_entropy(out.reshape(-1, 3), y.reshape(-1), reduction="none")
        return (losses * m.reshape(-1)).sum()

    with run.capture(list(range(4)), mask=mask, reduction="sum"):
        masked_loss(model(x), y, mask).backward()
    run.finalize()
    log = logix.open(tmp_path / "log")
    exact = exact_gradients(model, masked_loss, x, y, mask)
    for w in run.watched:
        want = projected(exact[w.name], w.proj_in, w.proj_out)
        torch.testing.assert_close(log.gradients(w.name), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


class Branchy(nn.Module):
    """Watched modules that never run in a step: one between two that do, one after them."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(WIDTH, WIDTH)
        self.skipped = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, 3)
        self.tail = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.first(x)))


@pytest.mark.parametrize("positions", [None, 5])
@pytest.mark.parametrize("reduction", ["mean", "scaled sum"])
def test_rows_divide_out_the_loss_and_leave_modules_that_never_ran_zero(tmp_path, grouping, positions, reduction,
                                                                         monkeypatch):  # fmt: skip
    """The loss factor is folded into the products (one position) or divides them (several), and
    a row is built in uninitialised memory: every column must be written. torch.empty here gives
    NaN, as uninitialised memory may."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
    torch.manual_seed(5)
    model = Branchy()
    shape = (8,) if positions is None else (8, positions)
    x, y = torch.randn(*shape, WIDTH), torch.randint(0, 3, shape)
    run = logix.init(tmp_path / "log", rank=RANK)
    run.watch(model)
    if reduction == "mean":
        with run.capture(list(range(8))):
            (example_loss(model(x), y) / 8).backward()
    else:
        with run.capture(list(range(8)), reduction="sum", scale=0.3):
            (0.3 * example_loss(model(x), y)).backward()
    run.finalize()
    log = logix.open(tmp_path / "log")
    assert bool(torch.isfinite(log.rows()).all())
    exact = exact_gradients(model, example_loss, x, y)
    for w in run.watched:
        want = projected(exact[w.name], w.proj_in, w.proj_out)
        if w.name in ("skipped", "tail"):
            assert not want.any() and not log.gradients(w.name).any(), w.name
        else:
            assert want.abs().max() > 0.01
            torch.testing.assert_close(log.gradients(w.name), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def reference_factors(model, watched, x, y, mask=None):
    """K-FAC's A and S sums per module from plain hooks: every call's projected input and output
    gradient, each example's own loss backpropagated alone (reduction="sum", so no factor)."""
    a_sum = {w.name: 0 for w in watched}
    s_sum = {w.name: 0 for w in watched}
    by_module = {id(w.module): w for w in watched}
    inputs, outputs = [], []

    def hook(module, args, output):
        output.retain_grad()
        inputs.append((by_module[id(module)], args[0]))
        outputs.append(output)

    handles = [w.module.register_forward_hook(hook) for w in watched]
    try:
        example_loss(model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    for (w, a), out in zip(inputs, outputs):
        a = torch.cat([a, torch.ones(a.shape[:-1] + (1,))], dim=-1).double()
        d = out.grad.double()
        a = a if w.proj_in is None else a @ w.proj_in.double().T  # None: the side is kept whole
        d = d if w.proj_out is None else d @ w.proj_out.double().T
        if mask is not None:
            a, d = a * mask.unsqueeze(-1), d * mask.unsqueeze(-1)
        a, d = a.reshape(-1, a.shape[-1]), d.reshape(-1, d.shape[-1])
        a_sum[w.name] = a_sum[w.name] + a.T @ a
        s_sum[w.name] = s_sum[w.name] + d.T @ d
    return a_sum, s_sum


def test_statistics_of_grouped_calls_match_a_per_call_reference(tmp_path, grouping):
    model = Tower()
    run = logix.init(tmp_path / "log", rank=RANK)
    run.watch(model)
    x, y = torch.randn(8, WIDTH), torch.randint(0, 3, (8,))
    sums = CovarianceSums()
    with Collector(run.watched, observer=sums.observe) as collector:
        example_loss(model(x), y).backward()
    collector.rows()
    sums.close_batch(1.0)
    got = sums.to_host()
    a_ref, s_ref = reference_factors(model, run.watched, x, y)
    for w in run.watched:
        calls = 2 if w.name == "shared" else 1
        torch.testing.assert_close(got[w.name]["a_sum"], a_ref[w.name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[w.name]["s_sum"], s_ref[w.name], rtol=1e-5, atol=1e-9)
        assert float(got[w.name]["a_count"]) == 8 * calls  # positions of every call
        assert float(got[w.name]["s_count"]) == 8  # examples, once per batch however many calls
    run.close()


def test_a_module_called_on_two_batch_sizes_is_refused(tmp_path):
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH))
    run = logix.init(tmp_path / "log", rank=RANK)
    run.watch(model)
    with pytest.raises(CaptureError, match=r"module '0' was called on batches of different sizes \(2 and 4\)"):
        with run.capture([0, 1, 2, 3]):
            (model(torch.randn(4, WIDTH)).sum() + model(torch.randn(2, WIDTH)).sum()).backward()
    run.close()


def _benchmark(name: str):
    """A script of benchmarks/, imported: the test counts operations as the benchmark reports them."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extra_ops(layers: int, root) -> int:
    """Operations a Collector's step dispatches beyond a plain step, for equal layers."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)])
    run_dir = logix.init(root / f"log-{layers}", rank=2)
    run_dir.watch(model)
    x = torch.randn(4, 8)

    def plain():
        model(x).sum().backward()

    def captured():
        with Collector(run_dir.watched) as c:
            model(x).sum().backward()
        c.rows()

    ops_per_step = _benchmark("module_overhead").ops_per_step  # (every aten op, those not inside another)
    extra = ops_per_step(captured)[1] - ops_per_step(plain)[1]
    run_dir.close()
    return extra


def test_operations_per_step_do_not_grow_with_modules_of_one_shape(tmp_path):
    few, many = extra_ops(5, tmp_path), extra_ops(40, tmp_path)
    assert few > 0
    assert many - few <= 4, (few, many)  # 35 more modules of the same shape: no more operations

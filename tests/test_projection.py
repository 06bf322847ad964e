"""LoGra projections: rows equal P_out G P_in^T, the matrices are reproducible, and N(0, 1/k)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import exact_gradients, projected
from torch import nn
from transformers.pytorch_utils import Conv1D

import logix
from logix.projection import gaussian, module_seed

# -- models --------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """Conv2d (d_in 2*3*3+1 = 19, d_out 6) -> Linear (d_in 6*4*4+1, d_out 5) -> Linear (d_in 6, d_out 3)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1, stride=2)
        self.fc = nn.Linear(96, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.head(torch.tanh(self.fc(h)))


class SeqNet(nn.Module):
    """Embedding (d_in 12, d_out 6, padding_idx) -> GPT-2 Conv1D (7 -> 8) -> Linear (8 -> 3, no bias)."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(12, 6, padding_idx=0)
        self.c_fc = Conv1D(8, 6)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, tokens):
        h = torch.tanh(self.c_fc(self.wte(tokens)))
        return self.head(h.mean(1))


def _data(model_name: str, batch: int = 5):
    if model_name == "conv":
        return ConvNet(), torch.randn(batch, 2, 8, 8)
    tokens = torch.randint(1, 12, (batch, 4))
    tokens[:, -1] = 0  # padding tokens: no gradient on the padding_idx column
    return SeqNet(), tokens


def ce(out, y):
    return F.cross_entropy(out, y)


def write_log(path, model, x, y, rank, seed=0):
    run = logix.init(path, rank=rank, seed=seed)
    names = run.watch(model)
    with run.capture(range(len(x))):
        ce(model(x), y).backward()
    run.finalize()
    log = logix.open(path)
    assert list(log.modules) == names
    assert list(log.ids) == list(range(len(x)))
    return log


def side(rank, which):
    return rank[0 if which == "in" else 1] if isinstance(rank, tuple) else rank


# -- rows ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [4, (3, 5), ("full", 2), (2, "full")], ids=str)
@pytest.mark.parametrize("model_name", ["conv", "seq"])
def test_rows_equal_projected_exact_gradients(tmp_path, model_name, rank):
    model, x = _data(model_name)
    y = torch.randint(0, 3, (len(x),))
    log = write_log(tmp_path / "log", model, x, y, rank)
    exact = exact_gradients(model, ce, x, y)
    projections = log.projections()
    assert set(projections) == set(exact) == set(log.modules)
    identity_sides = projected_sides = 0
    for name, (p_in, p_out) in projections.items():
        info = log.modules[name]
        d_out, d_in = exact[name].shape[1:]
        assert (info.d_in, info.d_out) == (d_in, d_out)
        for p, d, k, r in ((p_in, d_in, info.k_in, side(rank, "in")), (p_out, d_out, info.k_out, side(rank, "out"))):
            if r == "full" or r >= d:
                assert p is None and k == d  # identity side
                identity_sides += 1
            else:
                assert p is not None and p.shape == (r, d) and p.dtype == torch.float32 and k == r
                projected_sides += 1
        rows = log.gradients(name)
        expected = projected(exact[name], p_in, p_out)
        assert rows.shape == (len(x), info.k_out, info.k_in)
        peak = expected.abs().max().item()
        assert peak > 0
        torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-6 * peak)
    assert projected_sides > 0 and identity_sides > 0  # each configuration exercises both


def test_projected_rows_are_not_the_exact_gradient_sliced(tmp_path):
    """Guard against a projection that silently degenerates to keeping the first k coordinates."""
    model, x = _data("conv")
    y = torch.randint(0, 3, (len(x),))
    log = write_log(tmp_path / "log", model, x, y, rank=4)
    exact = exact_gradients(model, ce, x, y)
    rows = log.gradients("conv")
    assert rows.shape == (len(x), 4, 4)
    assert not torch.allclose(rows, exact["conv"][:, :4, :4], rtol=1e-2, atol=1e-4)


def test_full_rank_is_identity_on_both_sides(tmp_path):
    model, x = _data("seq")
    y = torch.randint(0, 3, (len(x),))
    log = write_log(tmp_path / "log", model, x, y, rank="full")
    exact = exact_gradients(model, ce, x, y)
    assert log.projections() == {name: (None, None) for name in exact}
    for name, info in log.modules.items():
        assert (info.k_in, info.k_out) == (info.d_in, info.d_out)
        torch.testing.assert_close(log.gradients(name), exact[name], rtol=1e-5, atol=1e-6 * exact[name].abs().max())


# -- reproducibility -----------------------------------------------------------------------------


def _projections(path, rank=2, seed=0):
    model, x = _data("conv")
    return write_log(path, model, x, torch.randint(0, 3, (len(x),)), rank, seed=seed).projections()


def test_projections_rebuilt_identically_with_the_same_seed(tmp_path):
    first = _projections(tmp_path / "a", seed=7)
    torch.manual_seed(1234)  # the global RNG must not matter
    second = _projections(tmp_path / "b", seed=7)
    assert first.keys() == second.keys()
    for name in first:
        for a, b in zip(first[name], second[name]):
            assert a is not None and torch.equal(a, b)
        # and they are exactly what the documented per-module seeding gives
        k, d = first[name][0].shape
        assert torch.equal(first[name][0], gaussian(k, d, module_seed(7, name, "in")))


def test_projections_differ_with_another_seed(tmp_path):
    first = _projections(tmp_path / "a", seed=0)
    other = _projections(tmp_path / "b", seed=1)
    for name in first:
        for a, b in zip(first[name], other[name]):
            assert a.shape == b.shape and not torch.allclose(a, b)


def test_projections_differ_between_modules_and_sides(tmp_path):
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Tanh(), nn.Linear(6, 6, bias=False))
    x, y = torch.randn(3, 6), torch.randint(0, 6, (3,))
    projections = write_log(tmp_path / "log", model, x, y, rank=2).projections()
    matrices = [p for pair in projections.values() for p in pair]
    assert len(matrices) == 4 and all(p.shape == (2, 6) for p in matrices)
    for i in range(len(matrices)):
        for j in range(i):
            assert not torch.allclose(matrices[i], matrices[j])


def test_second_session_reuses_stored_projections(tmp_path):
    """Appending to an existing log keeps the projections its rows were written with."""
    model, x = _data("conv")
    y = torch.randint(0, 3, (len(x),))
    first = write_log(tmp_path / "log", model, x, y, rank=2).projections()
    run = logix.init(tmp_path / "log", rank=2)
    run.watch(model)
    run.start_pass("again")
    with run.capture(range(len(x))):
        ce(model(x), y).backward()
    run.finalize()
    log = logix.open(tmp_path / "log", pass_name="again")
    exact = exact_gradients(model, ce, x, y)
    for name, (p_in, p_out) in first.items():
        assert all(torch.equal(a, b) for a, b in zip((p_in, p_out), log.projections()[name]))
        expected = projected(exact[name], p_in, p_out)
        torch.testing.assert_close(log.gradients(name), expected, rtol=1e-5, atol=1e-6 * expected.abs().max())


@pytest.mark.parametrize("rank", [4, "full"])
def test_global_rng_is_never_touched(tmp_path, rank):
    model, x = _data("conv")
    y = torch.randint(0, 3, (len(x),))
    torch.manual_seed(42)
    before = torch.get_rng_state()
    run = logix.init(tmp_path / "log", rank=rank)
    run.watch(model)
    with run.capture(range(len(x))):
        ce(model(x), y).backward()
    run.finalize()
    logix.open(tmp_path / "log").projections()
    assert torch.equal(torch.get_rng_state(), before)


def test_dropout_trajectory_unchanged_by_logging(tmp_path):
    """Same seed, same dropout masks: outputs and parameter gradients are bit-identical with logix."""
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))

    def step():
        model.zero_grad()
        out = model(x)
        ce(out, y).backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    torch.manual_seed(3)
    plain_out, plain_grads = step()
    run = logix.init(tmp_path / "log", rank=4)
    torch.manual_seed(3)
    run.watch(model)
    with run.capture(range(8)):
        out, grads = step()
    run.finalize()
    assert torch.equal(out, plain_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


# -- the distribution ----------------------------------------------------------------------------


@pytest.mark.parametrize("k, d", [(3, 100_000), (64, 5_000), (512, 600)])
def test_gaussian_entries_are_n_0_1_over_k(k, d):
    p = gaussian(k, d, seed=module_seed(0, "some.module", "in"))
    assert p.shape == (k, d) and p.dtype == torch.float32
    n = p.numel()
    values = p.double()
    # mean: standard error sqrt(1/k / n); k * E[x^2] = 1 with standard error sqrt(2 / n)
    assert abs(values.mean().item()) < 5 * math.sqrt(1 / (k * n))
    assert abs(k * values.square().mean().item() - 1) < 5 * math.sqrt(2 / n)
    # Gaussian, not e.g. Rademacher or uniform with the same variance: the 4th moment is 3 sigma^4
    assert abs(k * k * values.pow(4).mean().item() - 3) < 5 * math.sqrt(96 / n)
    # rows are (nearly) orthogonal on a wide matrix: norms preserved in expectation
    if d >= 1000:
        gram = (p.double() @ p.double().T) * k / d
        torch.testing.assert_close(gram, torch.eye(k, dtype=torch.float64), rtol=0, atol=6 / math.sqrt(d))


def test_gaussian_is_deterministic_and_identity_when_k_covers_d():
    a = gaussian(5, 40, seed=11)
    assert torch.equal(a, gaussian(5, 40, seed=11))
    assert not torch.allclose(a, gaussian(5, 40, seed=12))
    assert gaussian(40, 40, seed=11) is None
    assert gaussian(41, 40, seed=11) is None

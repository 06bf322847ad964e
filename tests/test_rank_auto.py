"""rank="auto": each module's sides chosen from its measured covariances within a row budget."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import exact_gradients, projected
from torch import nn

import logix
from logix.projection import allocate_ranks


def kept(spectra, ranks) -> float:
    """The squared norm the top k_in x k_out PCA block of each module keeps under K-FAC."""
    total = 0.0
    for name, (ea, es) in spectra.items():
        k_in, k_out = ranks[name]
        total += float(ea.sort(descending=True).values[:k_in].sum() * es.sort(descending=True).values[:k_out].sum())
    return total


def test_allocation_keeps_to_the_budget_and_follows_the_spectra():
    gen = torch.Generator().manual_seed(0)
    spectra = {
        "loud": (torch.rand(12, generator=gen) * 10, torch.rand(8, generator=gen) * 10),
        "quiet": (torch.rand(12, generator=gen) * 0.1, torch.rand(8, generator=gen) * 0.1),
        "flat": (torch.ones(6), torch.tensor([1.0, 0.0, 0.0])),  # one output direction holds everything
    }
    for budget in (3, 10, 40, 97, 1000):
        ranks = allocate_ranks(spectra, budget)
        assert sum(a * b for a, b in ranks.values()) <= budget
        for name, (a, b) in ranks.items():
            assert 1 <= a <= len(spectra[name][0]) and 1 <= b <= len(spectra[name][1])
        assert ranks["flat"][1] == 1  # directions with no variance are never paid for
    ranks = allocate_ranks(spectra, 60)
    assert ranks["loud"][0] * ranks["loud"][1] > ranks["quiet"][0] * ranks["quiet"][1]
    # twins get the same ranks
    twins = allocate_ranks({"a": spectra["loud"], "b": spectra["loud"]}, 50)
    assert twins["a"] == twins["b"]
    with pytest.raises(ValueError, match="one number each"):
        allocate_ranks(spectra, 2)


def test_allocation_is_near_the_best_split_on_small_cases():
    """Against every allocation that fits (brute force), the greedy choice keeps at least 95% of
    the best one's norm, and more than the uniform rank with the same budget."""
    gen = torch.Generator().manual_seed(3)
    spectra = {
        n: (torch.rand(5, generator=gen) ** 3 * s, torch.rand(4, generator=gen) ** 3) for n, s in (("x", 4), ("y", 1))
    }
    for budget in (4, 9, 16, 25):
        greedy = kept(spectra, allocate_ranks(spectra, budget))
        best = max(
            kept(spectra, {"x": (a, b), "y": (c, d)})
            for a, b, c, d in itertools.product(range(1, 6), range(1, 5), range(1, 6), range(1, 5))
            if a * b + c * d <= budget
        )
        uniform = max(
            kept(spectra, {"x": (min(k, 5), min(k, 4)), "y": (min(k, 5), min(k, 4))})
            for k in range(1, 6)
            if 2 * min(k, 5) * min(k, 4) <= budget
        )
        assert greedy >= 0.95 * best
        assert greedy >= uniform - 1e-12


def data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=gen) * torch.tensor([5.0, 4, 3, 2, 0.1, 0.1, 0.1, 0.1])
    return x, torch.randint(0, 3, (64,), generator=gen)


def auto_log(path, model, x, y, row_bytes, dtype="float32", resume=False, fit=True):
    run = logix.init(path, rank="auto", row_bytes=row_bytes, projection="pca", dtype=dtype, resume=resume)
    run.watch(model)
    if fit:
        with run.fit_projections():
            with run.capture(range(len(x))):
                F.cross_entropy(model(x), y).backward()
            model.zero_grad()
    return run


def logged(path, row_bytes):
    """A fitted rank="auto" log of all 64 examples, finalized: (model, x, y, log)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6))
    x, y = data()
    run = auto_log(path, model, x, y, row_bytes=row_bytes)
    with run.capture(range(64)):
        F.cross_entropy(model(x), y).backward()
    run.finalize()
    return model, x, y, logix.open(path)


def test_auto_rows_are_exact_projections_within_the_budget(tmp_path):
    model, x, y, log = logged(tmp_path / "log", 4 * 40)
    widths = {n: m.k_in * m.k_out for n, m in log.modules.items()}
    assert sum(widths.values()) <= 40 and log.width == sum(widths.values())
    assert len(set(widths.values())) > 1 or len(widths) == 1
    exact = exact_gradients(model, F.cross_entropy, x, y)
    for name, m in log.modules.items():
        p_in, p_out = log.projections()[name]
        for p, k, d in ((p_in, m.k_in, m.d_in), (p_out, m.k_out, m.d_out)):
            if p is None:
                assert k == d
            else:
                assert p.shape == (k, d)
                torch.testing.assert_close(p @ p.T, torch.eye(k), atol=1e-5, rtol=0)
        torch.testing.assert_close(log.gradients(name), projected(exact[name], p_in, p_out), rtol=1e-4, atol=1e-5)
    # the chosen sides are the allocation of the measured spectra: A = E[a a^T] of the inputs
    a = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    s = exact["0"][:, :, -1].double()
    a2 = torch.cat([torch.tanh(model[0](x)).detach(), torch.ones(len(x), 1)], dim=1).double()
    s2 = exact["2"][:, :, -1].double()
    spectra = {
        "0": (torch.linalg.eigvalsh(a.T @ a / len(x)), torch.linalg.eigvalsh(s.T @ s / len(x))),
        "2": (torch.linalg.eigvalsh(a2.T @ a2 / len(x)), torch.linalg.eigvalsh(s2.T @ s2 / len(x))),
    }
    assert {n: (m.k_in, m.k_out) for n, m in log.modules.items()} == allocate_ranks(spectra, 40)


def test_float16_rows_get_twice_the_numbers(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6))
    x, y = data()
    wide = auto_log(tmp_path / "half", model, x, y, row_bytes=80, dtype="float16")
    narrow = auto_log(tmp_path / "single", model, x, y, row_bytes=80)
    assert sum(w.width for w in wide.watched) > 20 >= sum(w.width for w in narrow.watched)
    wide.finalize()
    narrow.finalize()


def test_a_resumed_auto_log_keeps_its_ranks(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6))
    x, y = data()
    run = auto_log(tmp_path / "log", model, x, y, row_bytes=4 * 30)
    run.start_pass("a")
    with run.capture(range(32)):
        F.cross_entropy(model(x[:32]), y[:32]).backward()
    run.close()
    chosen = {n: (m.k_in, m.k_out) for n, m in logix.open(tmp_path / "log").modules.items()}
    again = auto_log(tmp_path / "log", model, x, y, row_bytes=4 * 30, resume=True, fit=False)
    assert {w.name: (w.k_in, w.k_out) for w in again.watched} == chosen
    with again.capture(range(32, 64)):
        F.cross_entropy(model(x[32:]), y[32:]).backward()
    again.finalize()
    log = logix.open(tmp_path / "log")
    assert len(log) == 64
    exact = exact_gradients(model, F.cross_entropy, x, y)
    p_in, p_out = log.projections()["0"]
    torch.testing.assert_close(log.gradients("0"), projected(exact["0"], p_in, p_out), rtol=1e-4, atol=1e-5)
    with pytest.raises(logix.ConfigError, match="row_bytes"):
        logix.init(tmp_path / "log", rank="auto", row_bytes=4 * 31, projection="pca", resume=True)


def test_auto_errors_name_the_problem(tmp_path):
    with pytest.raises(logix.ConfigError, match="row_bytes"):
        logix.init(tmp_path / "a", rank="auto", projection="pca")
    with pytest.raises(logix.ConfigError, match="projection='pca'"):
        logix.init(tmp_path / "b", rank="auto", row_bytes=400)
    with pytest.raises(logix.ConfigError, match="rank='auto'"):
        logix.init(tmp_path / "c", rank=8, row_bytes=400)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6))
    x, y = data()
    run = logix.init(tmp_path / "d", rank="auto", row_bytes=4, projection="pca")
    run.watch(model)
    with pytest.raises(logix.CaptureError, match="fit_projections"):
        with run.capture(range(4)):
            F.cross_entropy(model(x[:4]), y[:4]).backward()
    model.zero_grad()
    with pytest.raises(logix.ConfigError, match="too small"):
        with run.fit_projections():
            with run.capture(range(64)):
                F.cross_entropy(model(x), y).backward()
    run.close()


def test_sides_too_wide_to_measure_whole_go_through_a_sketch(tmp_path, monkeypatch):
    import logix.layout

    monkeypatch.setattr(logix.layout, "PCA_MAX_DIM", 10)  # the 16-wide sides are "too wide" here
    monkeypatch.setattr(logix.layout, "AUTO_SKETCH", 5)
    model, x, y, log = logged(tmp_path / "log", 4 * 200)
    assert log.modules["0"].k_out <= 5 and log.modules["2"].k_in <= 5  # no more than the sketch measured
    exact = exact_gradients(model, F.cross_entropy, x, y)
    for name in ("0", "2"):
        p_in, p_out = log.projections()[name]
        torch.testing.assert_close(log.gradients(name), projected(exact[name], p_in, p_out), rtol=1e-4, atol=1e-5)

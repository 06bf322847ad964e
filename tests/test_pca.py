"""PCA projections: fitted in a statistics-only pass, orthonormal top eigenvectors, exact rows."""

import pytest
import torch
import torch.nn.functional as F
from conftest import exact_gradients, projected
from torch import nn

import logix


def ce(out, y):
    return F.cross_entropy(out, y)


def data():
    gen = torch.Generator().manual_seed(1)
    # anisotropic inputs, so the top directions are well separated
    x = torch.randn(64, 8, generator=gen) * torch.tensor([5.0, 4, 3, 2, 0.1, 0.1, 0.1, 0.1])
    return x, torch.randint(0, 3, (64,), generator=gen)


def pca_log(path, model, x, y, rank=3):
    run = logix.init(path, rank=rank, projection="pca", statistics="ekfac")
    run.watch(model)
    with run.fit_projections():
        for b in range(0, len(x), 16):
            with run.capture(range(b, b + 16)):
                ce(model(x[b : b + 16]), y[b : b + 16]).backward()
            model.zero_grad()
    for b in range(0, len(x), 16):
        with run.capture(range(b, b + 16)):
            ce(model(x[b : b + 16]), y[b : b + 16]).backward()
        model.zero_grad()
    run.finalize()
    return logix.open(path)


def test_pca_projections_are_the_top_eigenvectors_and_rows_are_exact(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6))
    x, y = data()
    log = pca_log(tmp_path / "log", model, x, y)
    p_in, p_out = log.projections()["0"]
    assert p_in.shape == (3, 9) and p_out.shape == (3, 16)
    torch.testing.assert_close(p_in @ p_in.T, torch.eye(3), atol=1e-5, rtol=0)
    # P_in spans the top-3 eigenvectors of A = E[a a^T], a = [x, 1]
    a = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    _, vectors = torch.linalg.eigh(a.T @ a / len(x))
    top = vectors[:, -3:]
    torch.testing.assert_close(top @ top.T @ p_in.double().T, p_in.double().T, atol=1e-4, rtol=0)
    # P_out: top eigenvectors of S = E[delta delta^T], delta = bias column of the exact gradient
    exact = exact_gradients(model, ce, x, y)
    delta = exact["0"][:, :, -1].double()
    _, vectors = torch.linalg.eigh(delta.T @ delta / len(x))
    top = vectors[:, -3:]
    torch.testing.assert_close(top @ top.T @ p_out.double().T, p_out.double().T, atol=1e-4, rtol=0)
    # rows are P_out G P_in^T of the exact gradients, for every module
    for name in ("0", "2"):
        p_in, p_out = log.projections()[name]
        torch.testing.assert_close(log.gradients(name), projected(exact[name], p_in, p_out), rtol=1e-4, atol=1e-5)


def test_pca_keeps_more_gradient_than_gaussian_at_the_same_rank(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6))
    x, y = data()
    pca = pca_log(tmp_path / "pca", model, x, y, rank=2)
    run = logix.init(tmp_path / "gauss", rank=2)
    run.watch(model)
    with run.capture(range(64)):
        ce(model(x), y).backward()
    run.finalize()
    gauss = logix.open(tmp_path / "gauss")
    exact = exact_gradients(model, ce, x, y)["0"]
    norm = exact.norm() ** 2

    def kept(log):  # share of the gradient's squared norm an orthonormalised projection keeps
        q_in = torch.linalg.qr(log.projections()["0"][0].T.double())[0].T
        q_out = torch.linalg.qr(log.projections()["0"][1].T.double())[0].T
        return float(projected(exact, q_in, q_out).double().norm() ** 2 / norm)

    assert kept(pca) > kept(gauss)


def test_capture_before_fitting_is_refused_and_fit_needs_pca(tmp_path):
    model = nn.Sequential(nn.Linear(8, 4))
    x, y = data()
    run = logix.init(tmp_path / "pca", rank=2, projection="pca")
    run.watch(model)
    with pytest.raises(logix.CaptureError, match="fit_projections"):
        with run.capture(range(4)):
            ce(model(x[:4]), y[:4] % 4).backward()
    plain = logix.init(tmp_path / "plain", rank=2)
    plain.watch(model)
    with pytest.raises(logix.ConfigError, match="pca"):
        with plain.fit_projections():
            pass


def test_nothing_is_logged_during_the_fit(tmp_path):
    model = nn.Sequential(nn.Linear(8, 4))
    x, y = data()
    run = logix.init(tmp_path / "pca", rank=2, projection="pca")
    run.watch(model)
    with run.fit_projections():
        with run.capture(range(16)):
            ce(model(x[:16]), y[:16] % 4).backward()
    run.finalize()
    log = logix.open(tmp_path / "pca")
    assert log.passes == [] and len(log) == 0
    assert log.projections()["0"][0].shape == (2, 9)

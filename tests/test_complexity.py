"""IF-COMP (logix.complexity) against its dense definition, and its linearisation against the
brute-force proximal pNML it approximates.

Dense definition (float64): with w = 1/(N T), J the exact per-example gradients of the C logits
(torch.func) and F the log's curvature built densely from exact training gradients (raw:
mean_i g_i g_i^T per module, block-diagonal over modules), K = w J (F + lambda I)^{-1} J^T, and
label c's gain is the rise in log p(c | x) when the model linearised in its parameters is refit
toward (x, c) with the quadratic proximal term: logits z - K r at the minimum over r of
1/2 r^T K r + CE_c(z - K r) (found here by scipy's BFGS).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from conftest import exact_gradients
from torch import nn

import logix
from logix.complexity import hindsight_gains, pnml

N_TRAIN, N_TEST, CLASSES = 60, 7, 3


def ce(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def data(d_in: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, d_in, generator=g) * 1.5
    y = torch.arange(N_TRAIN) % CLASSES
    x = centres[y] + torch.randn(N_TRAIN, d_in, generator=g)
    x_test = torch.randn(N_TEST, d_in, generator=g) * 2.0
    return x, y, x_test


def fit(model: nn.Module, x, y, steps: int = 300) -> nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


def logged(path, model, x, y, rank="full", statistics=("raw", "kfac", "ekfac")):
    """A logging pass at the fitted parameters (rank full, raw and K-FAC statistics by default)."""
    with logix.init(path, rank=rank, statistics=list(statistics)) as run:
        run.watch(model)
        for start in range(0, N_TRAIN, 20):
            ids = list(range(start, start + 20))
            with run.capture(ids):
                F.cross_entropy(model(x[ids]), y[ids]).backward()
            model.zero_grad(set_to_none=True)
    return logix.open(path)


def dense_gains(model, x, y, x_test, damping: float, temperature: float) -> torch.Tensor:
    """(n, C) gains from exact logit gradients, raw curvature per module, float64, one label at a time."""
    train = exact_gradients(model, ce, x, y)
    logit_rows = [exact_gradients(model, lambda out, _, k=k: out[0, k], x_test, x_test[:, 0]) for k in range(CLASSES)]
    kernel = torch.zeros(len(x_test), CLASSES, CLASSES, dtype=torch.float64)
    for name, g in train.items():
        g = g.reshape(len(x), -1).double()
        inverse = torch.linalg.inv(g.T @ g / len(x) + damping * torch.eye(g.shape[1], dtype=torch.float64))
        j = torch.stack([rows[name].reshape(len(x_test), -1).double() for rows in logit_rows], dim=1)  # (n, C, d)
        kernel += j @ inverse @ j.transpose(1, 2)
    kernel /= len(x) * temperature
    with torch.no_grad():
        z = model(x_test).double()
    p = torch.softmax(z, dim=1)
    gains = torch.zeros(len(x_test), CLASSES, dtype=torch.float64)
    for i in range(len(x_test)):
        for c in range(CLASSES):
            logits = refit_logits(z[i].numpy(), kernel[i].numpy(), c)
            gains[i, c] = torch.log_softmax(torch.from_numpy(logits), dim=0)[c] - torch.log(p[i, c])
    return gains


def refit_logits(z: np.ndarray, kernel: np.ndarray, c: int) -> np.ndarray:
    """The logits z + u after the refit toward label c of the model linearised in its parameters
    with the quadratic proximal term: u = -K r minimises 1/2 r^T K r + CE_c(z - K r) (scipy's
    BFGS, independent of logix's Newton steps)."""

    def objective(r):
        logits = z - kernel @ r
        q = np.exp(logits - logits.max())
        q /= q.sum()
        value = 0.5 * r @ kernel @ r + np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[c]
        return value, kernel @ (r - q + np.eye(len(z))[c])

    found = scipy.optimize.minimize(objective, np.zeros(len(z)), jac=True, method="BFGS", options={"gtol": 1e-13})
    return z - kernel @ found.x


@pytest.fixture(scope="module", params=["logistic", "mlp"])
def setup(request, tmp_path_factory):
    torch.manual_seed(3)
    if request.param == "logistic":
        model, d_in = nn.Linear(5, CLASSES), 5
    else:
        model, d_in = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, CLASSES)), 4
    x, y, x_test = data(d_in, seed=4)
    fit(model, x, y)
    log = logged(tmp_path_factory.mktemp(request.param) / "log", model, x, y)
    return model, log, x, y, x_test


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_complexity_is_its_dense_definition(setup, temperature):
    model, log, x, y, x_test = setup
    damping = 0.03
    got = log.complexity(model, [([10, 11, 12], x_test[:3]), ([13, 14, 15, 16], x_test[3:])],
                         preconditioner="raw", damping=damping, temperature=temperature)  # fmt: skip
    gains = dense_gains(model, x, y, x_test, damping, temperature)
    with torch.no_grad():
        log_softmax = F.log_softmax(model(x_test).double(), dim=1)
    probs, values = pnml(log_softmax, gains)
    assert got.ids.tolist() == list(range(10, 17))
    torch.testing.assert_close(got.gains, gains, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(got.softmax, log_softmax.exp(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got.probs, probs, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(got.values, values, rtol=1e-5, atol=1e-9)
    # the definition's own facts: a distribution, complexity >= 0, and exactly log sum p e^h
    torch.testing.assert_close(got.probs.sum(dim=1), torch.ones(N_TEST, dtype=torch.float64))
    assert bool((got.values >= 0).all()) and bool((got.gains >= 0).all())
    manual = torch.log((got.softmax * got.gains.exp()).sum(dim=1))  # from its own gains: the float32 rows match
    torch.testing.assert_close(got.values, manual)  # the dense ones to 1e-5 only (checked above)
    if temperature < 1:  # a heavier added pair: every label gains more, so more complexity
        cooler = log.complexity(model, [(list(range(N_TEST)), x_test)], preconditioner="raw", damping=damping)
        assert bool((got.values > cooler.values).all())


def test_labelled_code_length_and_the_model_left_as_it_was(setup, tmp_path):
    model, log, x, y, x_test = setup
    labels = torch.arange(N_TEST) % CLASSES
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    got = log.complexity(model, [(np.arange(N_TEST), x_test, labels)], preconditioner="kfac")
    assert model.training and all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    torch.testing.assert_close((-got.code_length).exp(), got.probs[torch.arange(N_TEST), labels])
    assert bool(torch.isfinite(got.code_length).all()) and bool((got.code_length >= 0).all())
    got.save(tmp_path / "c.h5")
    back = logix.Complexity.load(tmp_path / "c.h5")
    assert back.ids.tolist() == list(range(N_TEST))
    for field in ("values", "probs", "softmax", "gains", "labels", "code_length"):
        assert torch.equal(getattr(back, field), getattr(got, field)), field


def test_choose_temperature_is_the_least_nll_of_the_grid(setup):
    model, log, x, y, x_test = setup
    labels = torch.arange(N_TEST) % CLASSES
    batches = [(list(range(N_TEST)), x_test, labels)]
    grid, factors = (0.5, 2.0, 8.0, 64.0), (0.01, 0.1, 3.0)
    best_t, best_f, nll = log.choose_temperature(model, batches, grid, factors, preconditioner="kfac")
    assert set(nll) == {(t, f) for t in grid for f in factors}
    for t in grid:  # each against a full IF-COMP at those settings: the mean code length of the labels
        for f in factors:
            direct = log.complexity(model, batches, temperature=t, damping_factor=f, preconditioner="kfac")
            assert nll[(t, f)] == pytest.approx(float(direct.code_length.mean()), rel=1e-9), (t, f)
    assert (best_t, best_f) == min(nll, key=nll.get)
    with pytest.raises(logix.ConfigError, match="needs labelled batches"):
        log.choose_temperature(model, [(list(range(N_TEST)), x_test)])
    with pytest.raises(logix.ConfigError, match="temperatures must be positive numbers"):
        log.choose_temperature(model, batches, (1.0, -2.0))
    with pytest.raises(logix.ConfigError, match="damping_factors must be positive numbers"):
        log.choose_temperature(model, batches, (1.0,), (0.0,))


# -- the linearisation against brute force ----------------------------------------------------------


def test_linearised_gains_track_the_brute_force_proximal_pnml():
    """Logistic regression, float64, no log: for each test input and label, refit the proximal
    Bregman objective with the pair added at weight w = 1/(N T),

        (1/N) sum_i KL(p_i(theta_hat) || p_i(theta)) + lambda/2 |theta - theta_hat|^2 + w CE(x, c; theta),

    by Newton's method to convergence; the rise in log p(c | x) is the brute-force gain. logix
    refits the same objective with the KL term replaced by its second order at theta_hat (the
    exact GGN G; the logits are linear in theta here, so nothing else is approximated); the first
    order of both is h_c = w g_c^T (G + lambda I)^{-1} g_c. Stated tolerance, on test inputs drawn
    wider than the training data: every gain, brute-force or logix's, is positive and below the
    first order (both refits saturate); at T = 100 (the pair weighs a hundredth of an example)
    logix's gains and complexities are within 1% of the brute force, the first order's within
    2.5%; the error falls in proportion to the weight; at every temperature logix's complexity is
    the closer of the two and its largest gain error under half the first order's. At T = 1 the
    pNML's label can differ: the quadratic no longer stands for the KL there."""
    torch.manual_seed(5)
    x, y, x_test = data(4, seed=6)
    x, x_test = x.double(), x_test.double()
    model = fit(nn.Linear(4, CLASSES).double(), x, y, steps=500)
    theta_hat = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    damping = 0.05

    def logits(theta, inputs):
        w, b = theta[: 4 * CLASSES].view(CLASSES, 4), theta[4 * CLASSES :]
        return inputs @ w.T + b

    p_hat = torch.softmax(logits(theta_hat, x), dim=1)
    # exact GGN of the mean loss: J^T (diag p - p p^T) J, J = d logits / d theta
    jac = torch.func.vmap(torch.func.jacrev(lambda t, xi: logits(t, xi[None])[0]), in_dims=(None, 0))(theta_hat, x)
    hess = torch.diag_embed(p_hat) - p_hat[:, :, None] * p_hat[:, None, :]
    ggn = torch.einsum("nci,ncd,ndj->ij", jac, hess, jac) / len(x)
    inverse = torch.linalg.inv(ggn + damping * torch.eye(len(ggn), dtype=torch.float64))

    def brute_gain(xq, c, weight):
        def objective(theta):
            log_p = F.log_softmax(logits(theta, x), dim=1)
            bregman = (p_hat * (p_hat.log() - log_p)).sum(dim=1).mean()
            added = F.cross_entropy(logits(theta, xq[None]), torch.tensor([c]))
            return bregman + damping / 2 * (theta - theta_hat).pow(2).sum() + weight * added

        theta = theta_hat.clone()
        for _ in range(100):  # Newton's method with the exact Hessian (the objective is strictly convex)
            step = torch.linalg.solve(torch.func.hessian(objective)(theta), torch.func.grad(objective)(theta))
            theta = theta - step
            if float(step.abs().max()) < 1e-13:
                break
        else:
            raise AssertionError("Newton's method did not converge")
        after = F.log_softmax(logits(theta, xq[None]), dim=1)[0, c]
        before = F.log_softmax(logits(theta_hat, xq[None]), dim=1)[0, c]
        return float(after - before)

    def linear_gain(xq, c, weight):
        theta = theta_hat.clone().requires_grad_(True)
        F.cross_entropy(logits(theta, xq[None]), torch.tensor([c])).backward()
        g = theta.grad
        return float(weight * g @ inverse @ g)

    def logix_gains(weight):  # logix's formula with the exact GGN: the logits are linear in theta here
        jac_test = torch.func.vmap(torch.func.jacrev(lambda t, xi: logits(t, xi[None])[0]), in_dims=(None, 0))(
            theta_hat, x_test
        )
        kernels = weight * jac_test @ inverse @ jac_test.transpose(1, 2)
        return hindsight_gains(F.log_softmax(logits(theta_hat, x_test), dim=1), kernels, 1.0)

    errors, refit_errors = {}, {}
    for temperature in (100.0, 10.0, 1.0):
        weight = 1 / (len(x) * temperature)
        brute = torch.tensor([[brute_gain(xq, c, weight) for c in range(CLASSES)] for xq in x_test])
        linear = torch.tensor([[linear_gain(xq, c, weight) for c in range(CLASSES)] for xq in x_test])
        refit = logix_gains(weight)
        assert bool((brute > 0).all()) and bool((brute <= linear * (1 + 1e-6)).all()), (brute, linear)  # saturates
        assert bool((refit >= 0).all()) and bool((refit <= linear + 1e-9).all()), (refit, linear)  # saturates too
        seen = linear > 1e-8  # gains below that are round-off in the refit
        errors[temperature] = float(((linear - brute).abs() / brute)[seen].max())
        refit_errors[temperature] = float(((refit - brute).abs() / brute)[seen].max())
        log_softmax = F.log_softmax(logits(theta_hat, x_test), dim=1)
        brute_probs, brute_complexity = pnml(log_softmax, brute)
        linear_probs, linear_complexity = pnml(log_softmax, linear)
        refit_probs, refit_complexity = pnml(log_softmax, refit)
        if temperature >= 10:  # where the linearisation holds, the pNML picks the same label
            assert torch.equal(brute_probs.argmax(dim=1), refit_probs.argmax(dim=1)), temperature
            assert torch.equal(brute_probs.argmax(dim=1), linear_probs.argmax(dim=1)), temperature
        if temperature == 100:
            assert bool(((refit_complexity - brute_complexity).abs() <= 0.01 * brute_complexity).all())
            assert bool(((linear_complexity - brute_complexity).abs() <= 0.025 * brute_complexity).all())
        # logix's complexity is never further from the brute force than the first order's
        assert bool(((refit_complexity - brute_complexity).abs() <= (linear_complexity - brute_complexity).abs()).all())
    # the errors shrink in proportion to the added weight (measured, relative to the brute force:
    # logix 0.74%, 7.7%, 50% at T = 100, 10, 1; the first order 2.1%, 23%, 290%)
    assert refit_errors[100.0] <= 0.01 and errors[100.0] <= 0.025, (refit_errors, errors)
    assert 5 < errors[10.0] / errors[100.0] < 15 and errors[1.0] > errors[10.0], errors
    assert all(refit_errors[t] < errors[t] / 2 for t in errors), (refit_errors, errors)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0}, "temperature must be a positive number"),
        ({"temperature": math.nan}, "temperature must be a positive number"),
        ({"temperature": "warm"}, "temperature must be a positive number"),
        ({"preconditioner": "bogus"}, "preconditioner must be one of"),
    ],
)
def test_bad_arguments_are_refused(setup, kwargs, message):
    model, log, _, _, x_test = setup
    with pytest.raises(logix.ConfigError, match=message):
        log.complexity(model, [(list(range(N_TEST)), x_test)], **kwargs)


@pytest.mark.parametrize(
    "batches, message",
    [
        ([], "batches held no inputs"),
        ([torch.zeros(3, 5)], r"each batch must be \(ids, inputs\)"),
        ([([0, 1], "X")], None),
        ([([0, 1, 2], "X3")], "a batch has 2 ids for 3 inputs"),
        ([([0, 1, 2], "X3", torch.tensor([0, 1, 5]))], r"labels must lie in 0\.\.2"),
        ([([0, 1, 2], "X3", torch.tensor([0.0, 1.0, 1.0]))], "labels must be 3 integer classes"),
    ],
)
def test_bad_batches_are_refused(setup, batches, message):
    model, log, _, _, x_test = setup
    batches = [tuple(x_test[:3] if v == "X3" else x_test[:2] if v == "X" else v for v in b)
               if isinstance(b, tuple) else b for b in batches]  # fmt: skip
    if message is None:  # a well-formed batch: works
        assert len(log.complexity(model, batches).ids) == 2
        return
    if "2 ids for 3" in message:
        batches = [([0, 1], x_test[:3])]
    with pytest.raises(logix.ConfigError, match=message):
        log.complexity(model, batches)


def test_the_logs_approximations_against_the_dense_curvature(setup, tmp_path):
    """K-FAC and EK-FAC (the log's factored curvature) and a rank-3 Gaussian projection, against
    the exact raw curvature at full rank, default damping, on 7 test inputs drawn wider than the
    training data, at a temperature where the exact complexities spread out (logistic T = 100:
    0.02 to 0.34 nats; MLP T = 1000: 0.02 to 0.54; with 60 training examples lower temperatures
    bring every input near log 3). Measured, logistic / MLP: the complexities' largest relative
    error K-FAC 89% / 81%, EK-FAC 64% / 71%, rank 3 EK-FAC 94% / 82%; Spearman correlation of the
    inputs' order by complexity 0.86 / 0.64 (K-FAC), 0.96 / 0.71 (EK-FAC), 0.50 / 0.96 (rank 3).
    The bounds below hold those with a margin: the approximations keep part of the ranking and
    get single complexities wrong by up to about their size on these tiny models."""
    model, log, x, y, x_test = setup
    t = {"temperature": 100.0 if isinstance(model, nn.Linear) else 1000.0}
    batches = [(list(range(N_TEST)), x_test)]
    exact = log.complexity(model, batches, preconditioner="raw", **t).values
    projected_log = logged(tmp_path / "rank3", model, x, y, rank=3, statistics=["ekfac"])
    approximations = {
        "kfac": log.complexity(model, batches, preconditioner="kfac", **t).values,
        "ekfac": log.complexity(model, batches, preconditioner="ekfac", **t).values,
        "rank 3, ekfac": projected_log.complexity(model, batches, preconditioner="ekfac", **t).values,
    }
    exact_order = torch.argsort(torch.argsort(exact)).double()
    for name, values in approximations.items():
        error = float(((values - exact).abs() / exact).max())
        assert 0.05 < error <= 1.1, (name, error)  # approximations, not the exact curvature
        order = torch.argsort(torch.argsort(values)).double()
        assert float(torch.corrcoef(torch.stack([order, exact_order]))[0, 1]) >= 0.4, name


def test_labels_with_some_batches_only_are_refused(setup):
    model, log, _, _, x_test = setup
    mixed = [([0, 1], x_test[:2], torch.tensor([0, 1])), ([2, 3], x_test[2:4])]
    for batches in (mixed, mixed[::-1]):
        with pytest.raises(logix.ConfigError, match="give labels with every batch or with none"):
            log.complexity(model, batches)


def test_the_refit_stays_between_zero_and_the_first_order_and_solves_its_problem():
    """Random kernels, singular ones and ones that move the logits far (T = 0.01), where a
    single step would overshoot and Newton's method needs its halving steps: every gain lies in
    [0, first order], and matches scipy's refit of the same problem."""
    from logix.complexity import hindsight_gains

    generator = torch.Generator().manual_seed(11)
    for trial in range(12):
        classes, width = 2 + trial % 4, 1 + trial % 5  # width < classes: a singular kernel
        jac = torch.randn(6, classes, width, generator=generator, dtype=torch.float64) * 2
        kernels = jac @ jac.transpose(1, 2)
        z = torch.log_softmax(torch.randn(6, classes, generator=generator, dtype=torch.float64) * 3, dim=1)
        for temperature in (0.01, 1.0, 100.0):
            gains = hindsight_gains(z, kernels, temperature)
            moves = torch.eye(classes, dtype=torch.float64)[None] - z.exp()[:, None, :]  # (n, c, C): e_c - p
            first = torch.einsum("ncd,nde,nce->nc", moves, kernels / temperature, moves)
            assert bool((gains >= 0).all()) and bool((gains <= first + 1e-9).all()), (trial, temperature)
            for i in range(2):
                for c in range(classes):
                    logits = refit_logits(z[i].numpy(), (kernels[i] / temperature).numpy(), c)
                    want = float(torch.log_softmax(torch.from_numpy(logits), dim=0)[c] - z[i, c])
                    assert gains[i, c].item() == pytest.approx(want, rel=1e-5, abs=1e-8), (trial, temperature, i, c)

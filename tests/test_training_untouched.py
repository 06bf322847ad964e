"""Watching a model with logix changes nothing about training: same parameters, same RNG stream,
same outputs, and no hook left on the model once a capture is over.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
import torch.nn.modules.module as module_globals
from torch import nn

import logix
from logix import CaptureError

STEPS, BATCH, D_IN, N_CLASSES = 5, 8, 6, 3
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


@pytest.fixture
def deterministic():
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def dropout_mlp(inplace_relu: bool = False) -> nn.Module:
    return nn.Sequential(
        nn.Linear(D_IN, 16),
        nn.ReLU(inplace=inplace_relu),
        nn.Dropout(0.3),
        nn.Linear(16, 16),
        nn.Dropout(0.3),
        nn.Linear(16, N_CLASSES),
    )


def fixed_data(n: int, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g), torch.randint(0, N_CLASSES, (n,), generator=g)


def hooks_on(model: nn.Module) -> list[str]:
    found = [
        f"{name or '<root>'}.{attr}"
        for name, module in model.named_modules()
        for attr in HOOK_DICTS
        if getattr(module, attr, None)
    ]
    found += [attr for attr in GLOBAL_HOOK_DICTS if getattr(module_globals, attr, None)]
    return found


def train(optimizer: str, rank, path, inplace_relu: bool = False):
    """STEPS steps of dropout-MLP training from seed 1234, with logix watching when rank is given.

    Returns the final parameters, optimizer state, per-step losses, the global RNG state at the end,
    and the number of rows logged.
    """
    torch.manual_seed(1234)
    model = dropout_mlp(inplace_relu)
    x_all, y_all = fixed_data(STEPS * BATCH)
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run = None
    if rank is not None:
        run = logix.init(path, rank=rank)
        run.watch(model, optimizer=opt)
    losses = []
    for step in range(STEPS):
        ids = list(range(step * BATCH, (step + 1) * BATCH))
        x, y = x_all[ids], y_all[ids]
        with run.capture(ids) if run is not None else nullcontext():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().clone())
    rows = 0
    if run is not None:
        run.finalize()
        rows = len(logix.open(path))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = {
        name: {k: t.clone() for k, t in opt.state[p].items() if isinstance(t, torch.Tensor)}
        for name, p in model.named_parameters()
    }
    return params, state, losses, torch.get_rng_state(), rows, model


@pytest.mark.parametrize("rank", [4, "full"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd_momentum"])
def test_training_is_bitwise_identical(tmp_path, deterministic, optimizer, rank):
    plain = train(optimizer, None, None)
    watched = train(optimizer, rank, tmp_path / "log")
    p0, s0, l0, rng0, _, _ = plain
    p1, s1, l1, rng1, rows, model = watched
    assert rows == STEPS * BATCH  # logix did log every example
    assert hooks_on(model) == []
    assert p0.keys() == p1.keys()
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name
    for step, (a, b) in enumerate(zip(l0, l1)):
        assert torch.equal(a, b), step
    assert s0.keys() == s1.keys()
    for name in s0:
        assert s0[name].keys() == s1[name].keys() and s0[name], name
        for k in s0[name]:
            assert torch.equal(s0[name][k], s1[name][k]), (name, k)
    assert torch.equal(rng0, rng1)
    # and training did move the parameters (the comparison is not between two untouched models)
    torch.manual_seed(1234)
    initial = dropout_mlp()
    assert not torch.equal(initial[0].weight, p0["0.weight"])


def test_deterministic_fixture_restores_the_setting(deterministic):
    assert torch.are_deterministic_algorithms_enabled()


def test_outputs_in_capture_equal_outputs_without(tmp_path):
    torch.manual_seed(0)
    model = dropout_mlp()  # train mode: dropout draws from the global RNG
    x, y = fixed_data(BATCH)
    run = logix.init(tmp_path / "log", rank=4)
    run.watch(model)

    torch.manual_seed(5)
    plain = model(x)
    F.cross_entropy(plain, y).backward()
    plain_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    plain_rng = torch.get_rng_state()
    model.zero_grad()

    torch.manual_seed(5)
    with run.capture(list(range(BATCH))):
        inside = model(x)
        F.cross_entropy(inside, y).backward()
    assert torch.equal(plain, inside)
    for k, p in model.named_parameters():
        assert torch.equal(plain_grads[k], p.grad), k
    assert torch.equal(plain_rng, torch.get_rng_state())
    run.finalize()
    assert len(logix.open(tmp_path / "log")) == BATCH


# -- no hook left behind -------------------------------------------------------------------------


class Boom(Exception):
    pass


@pytest.mark.parametrize("ending", ["normal", "user_exception", "capture_error", "finalize"])
def test_no_hook_remains(tmp_path, ending):
    torch.manual_seed(0)
    model = dropout_mlp()
    x, y = fixed_data(BATCH)
    run = logix.init(tmp_path / "log", rank=4)
    run.watch(model)
    assert hooks_on(model) == []  # watch alone installs nothing
    ids = list(range(BATCH))
    seen_inside = []

    def body(ids):
        with run.capture(ids):
            seen_inside.extend(hooks_on(model))
            F.cross_entropy(model(x), y).backward()
            if ending == "user_exception":
                raise Boom()

    if ending == "user_exception":
        with pytest.raises(Boom):
            body(ids)
    elif ending == "capture_error":
        with pytest.raises(CaptureError, match="ids were given"):
            body(ids[:-1])
    else:
        body(ids)
    assert seen_inside  # hooks were there during the capture, so their absence below means something
    if ending == "finalize":
        run.finalize()
    assert hooks_on(model) == []
    run.finalize()
    assert hooks_on(model) == []
    assert len(logix.open(tmp_path / "log")) == (BATCH if ending in ("normal", "finalize") else 0)


def test_backward_after_capture_adds_nothing(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, 5), nn.Tanh(), nn.Linear(5, N_CLASSES))
    x, y = fixed_data(BATCH)
    x2, y2 = fixed_data(BATCH, seed=8)

    def log_once(path, late_backward: bool):
        run = logix.init(path, rank="full")
        run.watch(model)
        with run.capture(list(range(BATCH))):
            loss = F.cross_entropy(model(x), y)
            other = F.cross_entropy(model(x2), y2)  # built inside, never backpropagated inside
            loss.backward(retain_graph=True)
        if late_backward:
            assert hooks_on(model) == []
            loss.backward()  # the same graph again, after the capture ended
            other.backward()
        run.finalize()
        log = logix.open(path)
        return [int(i) for i in log.ids], log.rows()

    ids0, rows0 = log_once(tmp_path / "a", late_backward=False)
    ids1, rows1 = log_once(tmp_path / "b", late_backward=True)
    assert ids0 == ids1 == list(range(BATCH))
    assert torch.equal(rows0, rows1)


def test_no_grad_eval_forward_inside_capture_changes_nothing(tmp_path):
    torch.manual_seed(0)
    model = dropout_mlp()
    x, y = fixed_data(BATCH)
    x_eval, _ = fixed_data(BATCH + 3, seed=9)  # another batch size: recording it would even raise

    def log_once(path, eval_inside: bool):
        run = logix.init(path, rank=4)
        run.watch(model)
        torch.manual_seed(3)
        with run.capture(list(range(BATCH))):
            if eval_inside:
                model.eval()
                with torch.no_grad():
                    model(x_eval)
                model.train()
            F.cross_entropy(model(x), y).backward()
            if eval_inside:
                model.eval()
                with torch.no_grad():
                    model(x_eval)
                model.train()
        run.finalize()
        return logix.open(path).rows()

    plain = log_once(tmp_path / "a", eval_inside=False)
    with_eval = log_once(tmp_path / "b", eval_inside=True)
    assert plain.shape[0] == BATCH
    assert torch.equal(plain, with_eval)


# -- ReLU(inplace=True) right after a watched layer -----------------------------------------------


def test_inplace_relu_trains_identically(tmp_path, deterministic):
    p0, _, l0, rng0, _, _ = train("sgd_momentum", None, None, inplace_relu=True)
    p1, _, l1, rng1, rows, _ = train("sgd_momentum", "full", tmp_path / "log", inplace_relu=True)
    assert rows == STEPS * BATCH
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name
    assert all(torch.equal(a, b) for a, b in zip(l0, l1))
    assert torch.equal(rng0, rng1)


def test_inplace_relu_rows_are_the_pre_activation_gradients(tmp_path):
    """The watched layer's row is its own per-example gradient, not one taken after the ReLU."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, 5), nn.ReLU(inplace=True), nn.Linear(5, N_CLASSES))
    x, y = fixed_data(BATCH)
    run = logix.init(tmp_path / "log", rank="full")
    run.watch(model)
    with run.capture(list(range(BATCH)), reduction="sum"):
        F.cross_entropy(model(x), y, reduction="sum").backward()
    run.finalize()
    got = logix.open(tmp_path / "log").gradients("0")
    assert got.shape == (BATCH, 5, D_IN + 1)
    for i in range(BATCH):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        expected = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], dim=1)
        torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-6)

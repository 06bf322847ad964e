"""The master test: at rank="full" every logged row is the exact gradient of that example's own loss.

References come from torch.func (vmap(grad(...)) in conftest.exact_gradients), laid out with the
row contract: (d_out, d_in [+1 bias column]).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import exact_gradients
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

import logix

# -- helpers -------------------------------------------------------------------------------------


def assert_rows(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Close elementwise; atol is relative to the largest entry (gradients have no natural unit)."""
    expected = expected.float()
    peak = expected.abs().max().item()
    assert peak > 0, "the reference gradient is all zeros: the test would prove nothing"
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * peak)


def rows_by_id(log: logix.Log, name: str, ids) -> torch.Tensor:
    """The module's rows in the order of `ids` (whatever order the log keeps them in)."""
    where = {int(i): n for n, i in enumerate(log.ids)}
    return log.gradients(name)[[where[int(i)] for i in ids]]


def assert_log_exact(log: logix.Log, exact: dict[str, torch.Tensor], ids, names=None, **tol) -> None:
    names = list(exact) if names is None else names
    assert sorted(log.modules) == sorted(names)
    for name in names:
        assert_rows(rows_by_id(log, name, ids), exact[name], **tol)


def log_one_batch(path, model, loss_fn, ids, *, watch=None, **capture):
    """init(rank="full") + watch + one capture running loss_fn().backward(); returns the open log."""
    run = logix.init(path, rank="full")
    names = run.watch(model, **(watch or {}))
    with run.capture(ids, **capture):
        loss_fn().backward()
    run.finalize()
    log = logix.open(path)
    assert sorted(log.modules) == sorted(names)
    return log


def ce(out, y):
    return F.cross_entropy(out, y)


def ids_for(batch: int) -> list[int]:
    return [100 + 7 * i for i in reversed(range(batch))]  # not 0..B-1, not sorted


# -- every module kind ---------------------------------------------------------------------------


def _classifier(features: nn.Module, x: torch.Tensor, classes: int = 3) -> nn.Sequential:
    with torch.no_grad():
        width = features(x[:1]).flatten(1).shape[1]
    return nn.Sequential(features, nn.Tanh(), nn.Flatten(), nn.Linear(width, classes))


CONV2D = {
    "int-padding": dict(kernel_size=3, padding=1),
    "tuple-padding-stride": dict(kernel_size=(3, 2), padding=(2, 1), stride=(2, 1)),
    "same-dilation": dict(kernel_size=3, padding="same", dilation=2),
    "same-even-kernel": dict(kernel_size=(2, 4), padding="same"),
    "valid-stride": dict(kernel_size=3, padding="valid", stride=2),
    "stride-dilation": dict(kernel_size=2, padding=1, stride=2, dilation=2),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "reflect-same-dilation": dict(kernel_size=(3, 2), padding="same", dilation=(1, 2), padding_mode="reflect"),
    "circular": dict(kernel_size=3, padding=(2, 1), padding_mode="circular"),
    "circular-stride": dict(kernel_size=3, padding=1, stride=2, padding_mode="circular"),
    "replicate": dict(kernel_size=3, padding=1, padding_mode="replicate"),
}

CONV1D = {
    "int-padding": dict(kernel_size=3, padding=1),
    "same-dilation": dict(kernel_size=3, padding="same", dilation=2),
    "valid-stride": dict(kernel_size=3, padding="valid", stride=2),
    "reflect": dict(kernel_size=3, padding=2, padding_mode="reflect"),
    "circular-same": dict(kernel_size=4, padding="same", padding_mode="circular"),
}


def _case(kind: str, config: str, bias: bool):
    """(model, x, y, per-example loss) for one module-kind case; B = 4."""
    batch = 4
    if kind == "linear":
        x = torch.randn(batch, 5)
        model = nn.Sequential(nn.Linear(5, 6, bias=bias), nn.Tanh(), nn.Linear(6, 3, bias=bias))
    elif kind == "conv2d":
        x = torch.randn(batch, 2, 7, 6)
        model = _classifier(nn.Conv2d(2, 3, bias=bias, **CONV2D[config]), x)
    elif kind == "conv1d":
        x = torch.randn(batch, 2, 9)
        model = _classifier(nn.Conv1d(2, 3, bias=bias, **CONV1D[config]), x)
    elif kind == "embedding":
        padding_idx = {"padding_idx": 0, "no-padding": None, "padding_idx-last": 9}[config]
        x = torch.randint(0, 10, (batch, 6))
        x[:, ::2] = 0 if padding_idx is None else padding_idx  # some padding tokens in every example
        x[0, 1] = 3
        model = nn.Sequential(nn.Embedding(10, 4, padding_idx=padding_idx), nn.Tanh(), nn.Flatten(), nn.Linear(24, 3))
    elif kind == "gpt2-conv1d":
        x = torch.randn(batch, 3, 5)  # (B, T, nx): a sequence, as in GPT-2
        model = nn.Sequential(Conv1D(6, 5), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3, bias=bias))
    else:
        raise AssertionError(kind)
    y = torch.randint(0, 3, (batch,))
    return model, x, y


KIND_CASES = (
    [pytest.param("linear", "-", b, id=f"linear-bias{b}") for b in (True, False)]
    + [pytest.param("conv2d", c, b, id=f"conv2d-{c}-bias{b}") for c in CONV2D for b in (True, False)]
    + [pytest.param("conv1d", c, b, id=f"conv1d-{c}-bias{b}") for c in CONV1D for b in (True, False)]
    + [
        pytest.param("embedding", c, True, id=f"embedding-{c}")
        for c in ("padding_idx", "no-padding", "padding_idx-last")
    ]
    + [pytest.param("gpt2-conv1d", "-", b, id=f"gpt2-conv1d-headbias{b}") for b in (True, False)]
)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("kind, config, bias", KIND_CASES)
def test_module_kind_rows_are_exact(tmp_path, kind, config, bias):
    model, x, y = _case(kind, config, bias)
    ids = ids_for(len(x))
    log = log_one_batch(tmp_path / "log", model, lambda: ce(model(x), y), ids)
    exact = exact_gradients(model, ce, x, y)
    assert set(log.modules) == set(exact)
    for name, info in log.modules.items():
        module = model.get_submodule(name)
        assert info.bias == (getattr(module, "bias", None) is not None)
        assert log.projections()[name] == (None, None)
    assert_log_exact(log, exact, ids)


def _manual_layout(module: nn.Module) -> torch.Tensor:
    """The row contract written out by hand from .grad (independent of logix's `as_matrix`)."""
    w = module.weight.grad
    if isinstance(module, nn.Embedding):
        return w.T
    if isinstance(module, Conv1D):
        return torch.cat([w.T, module.bias.grad[:, None]], dim=1)
    w = w.reshape(w.shape[0], -1)
    return w if module.bias is None else torch.cat([w, module.bias.grad[:, None]], dim=1)


@pytest.mark.parametrize(
    "kind, config, bias",
    [
        ("linear", "-", True),
        ("linear", "-", False),
        ("conv2d", "tuple-padding-stride", True),
        ("conv1d", "reflect", False),
        ("embedding", "padding_idx", True),
        ("gpt2-conv1d", "-", True),
    ],
)
def test_row_layout_matches_plain_backward(tmp_path, kind, config, bias):
    """With one example, a row is its .grad laid out as [weight | bias] (weight.T for Embedding/Conv1D)."""
    model, x, y = _case(kind, config, bias)
    x, y = x[:1], y[:1]
    log = log_one_batch(tmp_path / "log", model, lambda: ce(model(x), y), [0])
    for name in log.modules:
        assert_rows(log.gradients(name)[0], _manual_layout(model.get_submodule(name)))


@pytest.mark.parametrize("padding_idx", [0, 4])
def test_embedding_padding_rows_get_no_gradient(tmp_path, padding_idx):
    x = torch.tensor([[padding_idx, 1, 2, padding_idx], [3, padding_idx, padding_idx, 2], [1, 1, 5, 6]])
    model = nn.Sequential(nn.Embedding(7, 3, padding_idx=padding_idx), nn.Flatten(), nn.Linear(12, 2))
    y = torch.tensor([0, 1, 1])
    log = log_one_batch(tmp_path / "log", model, lambda: ce(model(x), y), [0, 1, 2])
    rows = rows_by_id(log, "0", [0, 1, 2])  # (B, embedding_dim, num_embeddings): weight.T
    assert rows.shape == (3, 3, 7)
    assert torch.count_nonzero(rows[:, :, padding_idx]) == 0
    assert torch.count_nonzero(rows[0, :, 1]) > 0  # a token that is present does get a gradient
    assert torch.count_nonzero(rows[0, :, 3]) == 0  # one that is absent does not
    assert_log_exact(log, exact_gradients(model, ce, x, y), [0, 1, 2])


# -- how the backpropagated loss relates to the examples' own losses ----------------------------


def _mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))


def _scaler():
    """torch's own GradScaler on CPU when it works there; otherwise an object with get_scale()."""
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        if scaler.is_enabled() and scaler.get_scale() == 1024.0:
            return scaler
    except Exception:  # noqa: BLE001 - older torch: fall back to a stub
        pass

    class Stub:
        def get_scale(self):
            return 1024.0

        def scale(self, loss):
            return loss * 1024.0

    return Stub()


REDUCTIONS = {
    # mode: (loss from the model output, capture kwargs)
    "mean": (lambda out, y, s: F.cross_entropy(out, y), lambda s: {}),
    "sum": (lambda out, y, s: F.cross_entropy(out, y, reduction="sum"), lambda s: {"reduction": "sum"}),
    "scale": (lambda out, y, s: 0.25 * F.cross_entropy(out, y), lambda s: {"scale": 0.25}),
    "sum-tensor-scale": (
        lambda out, y, s: 3.0 * F.cross_entropy(out, y, reduction="sum"),
        lambda s: {"reduction": "sum", "scale": torch.tensor(3.0)},
    ),
    "scaler": (lambda out, y, s: s.scale(F.cross_entropy(out, y)), lambda s: {"scaler": s}),
    "scaler-scale": (
        lambda out, y, s: s.scale(0.5 * F.cross_entropy(out, y)),
        lambda s: {"scaler": s, "scale": 0.5},
    ),
}


@pytest.mark.parametrize("mode", list(REDUCTIONS))
def test_reduction_scale_and_scaler_are_divided_out(tmp_path, mode):
    model = _mlp()
    x, y = torch.randn(6, 5), torch.randint(0, 4, (6,))
    scaler = _scaler()
    loss, capture = REDUCTIONS[mode]
    log = log_one_batch(tmp_path / "log", model, lambda: loss(model(x), y, scaler), range(6), **capture(scaler))
    assert_log_exact(log, exact_gradients(model, ce, x, y), range(6))


def test_untold_reduction_scales_the_rows(tmp_path):
    """The factor matters: a summed loss logged as the default mean is B times the exact gradient."""
    model = _mlp()
    x, y = torch.randn(5, 5), torch.randint(0, 4, (5,))
    log = log_one_batch(tmp_path / "log", model, lambda: F.cross_entropy(model(x), y, reduction="sum"), range(5))
    exact = exact_gradients(model, ce, x, y)
    for name in exact:
        assert_rows(rows_by_id(log, name, range(5)), 5 * exact[name])


def test_gradient_accumulation_two_micro_batches(tmp_path):
    model = _mlp()
    x, y = torch.randn(8, 5), torch.randint(0, 4, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = logix.init(tmp_path / "log", rank="full")
    run.watch(model, optimizer=opt)
    for part in (slice(0, 4), slice(4, 8)):
        with run.capture(list(range(8))[part], scale=0.5):
            (F.cross_entropy(model(x[part]), y[part]) / 2).backward()
    exact = exact_gradients(model, ce, x, y)  # before the step: both micro-batches saw these weights
    opt.step()
    run.finalize()
    log = logix.open(tmp_path / "log")
    assert len(log) == 8
    assert_log_exact(log, exact, range(8))


# -- sequences -----------------------------------------------------------------------------------

VOCAB, PAD = 11, 10


class TinyLM(nn.Module):
    """Embedding -> GPT-2 Conv1D -> causal running mean -> Linear -> Linear head over the vocab.

    The running mean mixes positions causally, so right padding cannot change earlier positions.
    """

    def __init__(self, d=6, hidden=8, padding_idx=None):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, d, padding_idx=padding_idx)
        self.c_fc = Conv1D(hidden, d)
        self.fc = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, VOCAB, bias=False)

    def forward(self, tokens):
        h = torch.tanh(self.c_fc(self.wte(tokens)))
        steps = torch.arange(1, tokens.shape[1] + 1, dtype=h.dtype, device=h.device).reshape(1, -1, 1)
        h = h.cumsum(1) / steps
        return self.head(torch.tanh(self.fc(h)))


def token_loss_sum(logits, labels):
    """An example's own loss: the SUM over its label tokens (after the shift)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


def _padded_batch():
    lengths = [7, 4, 5, 2]
    tokens = torch.full((len(lengths), max(lengths)), PAD)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.randint(0, PAD, (n,))
        mask[i, :n] = 1
    labels = tokens.masked_fill(mask == 0, -100)
    return tokens, mask, labels, lengths


def _alone(model, tokens, labels, lengths):
    """Each example's exact gradient, computed on that example alone (trimmed, batch of one)."""
    parts = [
        exact_gradients(model, token_loss_sum, tokens[i : i + 1, :n], labels[i : i + 1, :n])
        for i, n in enumerate(lengths)
    ]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


@pytest.mark.parametrize("padding_idx", [None, PAD])
@pytest.mark.parametrize("loss_kind", ["per-example-sum-mean", "token-mean"])
def test_sequence_model_with_right_padding(tmp_path, loss_kind, padding_idx):
    model = TinyLM(padding_idx=padding_idx)
    tokens, mask, labels, lengths = _padded_batch()
    ids = ["a", "b", "c", "d"]

    def loss_fn():
        logits = model(tokens)
        if loss_kind == "token-mean":
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        per_example = torch.stack([token_loss_sum(logits[i : i + 1], labels[i : i + 1]) for i in range(len(ids))])
        return per_example.mean()

    if loss_kind == "token-mean":
        num_tokens = int((labels[:, 1:] != -100).sum())
        capture = dict(reduction="sum", scale=1.0 / num_tokens)
    else:
        capture = {}
    log = log_one_batch(tmp_path / "log", model, loss_fn, ids, mask=mask, **capture)
    exact = _alone(model, tokens, labels, lengths)
    assert list(log.ids) == ids
    for name in exact:
        assert_rows(log.gradients(name), exact[name])
    # the reference over the padded batch agrees (the causal model ignores right padding)
    batched = exact_gradients(model, token_loss_sum, tokens, labels)
    for name in exact:
        assert_rows(batched[name], exact[name])


# -- autograd situations ------------------------------------------------------------------------


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.sin(self.shared(h)) + h  # the same weights a second time, in another context
        return self.head(h)


def test_module_called_twice_accumulates(tmp_path):
    model = Shared()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    log = log_one_batch(tmp_path / "log", model, lambda: ce(model(x), y), range(5))
    assert_log_exact(log, exact_gradients(model, ce, x, y), range(5))


class Checkpointed(nn.Module):
    def __init__(self, use_reentrant: bool):
        super().__init__()
        self.use_reentrant = use_reentrant
        self.checkpointing = True
        self.inp = nn.Linear(4, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        if self.checkpointing:
            h = checkpoint(self.block, h, use_reentrant=self.use_reentrant)
        else:
            h = self.block(h)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing(tmp_path, use_reentrant):
    model = Checkpointed(use_reentrant)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    log = log_one_batch(tmp_path / "log", model, lambda: ce(model(x), y), range(5))
    model.checkpointing = False  # torch.func cannot trace through checkpoint
    exact = exact_gradients(model, ce, x, y)
    assert {"block.0", "block.2"} <= set(exact)
    assert_log_exact(log, exact, range(5))


def test_inplace_relu_after_watched_linear(tmp_path):
    model = nn.Sequential(
        nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)
    )
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    log = log_one_batch(tmp_path / "log", model, lambda: ce(model(x), y), range(6))
    exact = exact_gradients(model, ce, x, y)
    assert (exact["0"] == 0).any()  # some ReLUs are off: the in-place mask matters
    assert_log_exact(log, exact, range(6))


def test_no_grad_forward_inside_capture_is_ignored(tmp_path):
    model = _mlp()
    x, y = torch.randn(4, 5), torch.randint(0, 4, (4,))
    other = torch.randn(9, 5)  # a different batch size: it would be refused if it were recorded

    def loss_fn():
        with torch.no_grad():
            model(other)
        loss = ce(model(x), y)
        with torch.no_grad():
            model.eval()
            model(other[:3])
            model.train()
        return loss

    log = log_one_batch(tmp_path / "log", model, loss_fn, range(4))
    assert_log_exact(log, exact_gradients(model, ce, x, y), range(4))


def test_autocast_bfloat16(tmp_path):
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(6, 6), torch.randint(0, 4, (6,))

    def loss_fn():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        return ce(out.float(), y)

    log = log_one_batch(tmp_path / "log", model, loss_fn, range(6))
    exact = exact_gradients(model, ce, x, y)
    other = exact_gradients(model, ce, torch.randn(6, 6), torch.randint(0, 4, (6,)))
    for name in exact:
        rows = rows_by_id(log, name, range(6))
        assert rows.dtype == torch.float32
        assert_rows(rows, exact[name], rtol=5e-2, atol=3e-2)
        with pytest.raises(AssertionError):  # the bf16 tolerance still tells examples apart
            assert_rows(rows, other[name], rtol=5e-2, atol=3e-2)


# -- choosing modules ----------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize(
    "watch, expected",
    [
        ({}, ["body.0", "body.2", "head"]),
        ({"exclude": ["head"]}, ["body.0", "body.2"]),
        ({"include": ["body.*"]}, ["body.0", "body.2"]),
        ({"include": ["body"]}, ["body.0", "body.2"]),  # a prefix selects a subtree
        ({"exclude": ["*.2"]}, ["body.0", "head"]),
        ({"include": ["body", "head"], "exclude": ["body.0"]}, ["body.2", "head"]),
        ({"include": ["h*"]}, ["head"]),
    ],
)
def test_include_exclude_patterns(tmp_path, watch, expected):
    model = Net()
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    run = logix.init(tmp_path / "log", rank="full")
    assert run.watch(model, **watch) == expected
    with run.capture(range(4)):
        ce(model(x), y).backward()
    run.finalize()
    exact = exact_gradients(model, ce, x, y)
    assert_log_exact(logix.open(tmp_path / "log"), exact, range(4), names=expected)


def test_frozen_modules(tmp_path):
    model = Net()
    model.body[2].requires_grad_(False)  # frozen, but its input requires grad (body.0 trains)
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    run = logix.init(tmp_path / "skip", rank="full")
    assert run.watch(model) == ["body.0", "head"]
    run.finalize()
    log = log_one_batch(tmp_path / "log", model, lambda: ce(model(x), y), range(4), watch={"include_frozen": True})
    assert sorted(log.modules) == ["body.0", "body.2", "head"]
    assert_log_exact(log, exact_gradients(model, ce, x, y), range(4))


class Wrapper(nn.Module):
    """Holds the model under `attr`, as DDP (`module`) and torch.compile (`_orig_mod`) do."""

    def __init__(self, model: nn.Module, attr: str):
        super().__init__()
        self.attr = attr
        setattr(self, attr, model)

    def forward(self, x):
        return getattr(self, self.attr)(x)


@pytest.mark.filterwarnings("ignore:.*torch.compile'd:UserWarning")  # `_orig_mod` looks compiled
@pytest.mark.parametrize("attrs", [("module",), ("_orig_mod",), ("_orig_mod", "module")])
def test_wrapper_names_are_normalised(tmp_path, attrs):
    model = Net()
    wrapped = model
    for attr in attrs:
        wrapped = Wrapper(wrapped, attr)
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    bare = logix.init(tmp_path / "bare", rank="full")
    bare_names = bare.watch(model)
    bare.finalize()
    log = log_one_batch(tmp_path / "log", wrapped, lambda: ce(wrapped(x), y), range(4))
    assert sorted(log.modules) == sorted(bare_names) == ["body.0", "body.2", "head"]
    assert_log_exact(log, exact_gradients(model, ce, x, y), range(4))


@pytest.mark.parametrize("wrap", [False, True])
def test_bare_module_as_the_model(tmp_path, wrap):
    linear = nn.Linear(4, 3)
    model = Wrapper(linear, "module") if wrap else linear
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    run = logix.init(tmp_path / "log", rank="full")
    (name,) = run.watch(model)
    with run.capture(range(4)):
        ce(model(x), y).backward()
    run.finalize()
    exact = exact_gradients(Wrapper(linear, "lin"), ce, x, y)["lin"]  # conftest needs a named submodule
    assert_rows(rows_by_id(logix.open(tmp_path / "log"), name, range(4)), exact)


def test_normalised_names_never_collide(tmp_path):
    class Collide(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Sequential()
            self.module.add_module("fc", nn.Linear(3, 3))
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.module(x))

    run = logix.init(tmp_path / "log", rank="full")
    # `module` here is a real submodule beside `fc`, not a DDP wrapper: it keeps its name
    assert run.watch(Collide()) == ["module.fc", "fc"]


def test_frozen_module_without_gradient_path_is_refused(tmp_path):
    """A frozen first layer has no gradient flowing to it: capture refuses instead of writing zeros."""
    model = Net()
    model.body[0].requires_grad_(False)
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    run = logix.init(tmp_path / "log", rank="full")
    run.watch(model, include_frozen=True)
    with pytest.raises(logix.CaptureError, match="body.0"):
        with run.capture(range(4)):
            ce(model(x), y).backward()


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda: nn.Conv2d(4, 4, 3, groups=2), id="conv2d-groups2"),
        pytest.param(lambda: nn.Conv1d(4, 4, 3, groups=4), id="conv1d-depthwise"),
        pytest.param(lambda: nn.Embedding(10, 4, scale_grad_by_freq=True), id="embedding-scale-grad-by-freq"),
    ],
)
def test_watch_refuses_what_it_cannot_capture_exactly(tmp_path, bad):
    model = nn.Sequential(bad(), nn.Linear(4, 2))
    run = logix.init(tmp_path / "log", rank="full")
    with pytest.raises(logix.ConfigError):
        run.watch(model)
    assert run.watch(model, exclude=["0"]) == ["1"]  # excluding it, as the error suggests, works

"""Misuse gives a clear logix error, and never costs the rows already logged.

Every error test logs a good batch first, provokes the error, and then checks (after finalize,
through `logix.open`) that the earlier rows still read back with the right ids and the right
values, and usually that the same run keeps working afterwards.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import logix
from logix import (
    CaptureError,
    ConfigError,
    DuplicateIdError,
    LogFormatError,
    LogixError,
    ModelMismatchError,
    WriterError,
)

D_IN, D_HID, D_OUT = 4, 3, 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT))


def batch_for(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g), torch.randn(n, D_OUT, generator=g)


def example_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).sum(dim=1)


def log_batch(run, model, ids, x, y, **kw) -> None:
    """One well-formed capture: mean reduction over the batch."""
    with run.capture(ids, **kw):
        example_losses(model, x, y).mean().backward()


def exact_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """{module name: (B, d_out, d_in + 1)}: each example's own gradient, one backward at a time."""
    out = {"0": [], "2": []}
    for i in range(x.shape[0]):
        model.zero_grad()
        example_losses(model, x[i : i + 1], y[i : i + 1]).sum().backward()
        for name in out:
            layer = model[int(name)]
            out[name].append(torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1).clone())
    model.zero_grad()
    return {name: torch.stack(rows) for name, rows in out.items()}


def assert_log_holds(path: Path, model: nn.Module, batches: list, pass_name: str | None = None) -> None:
    """The log's rows are exactly `batches` ([(ids, x, y), ...]) in order, with exact gradients."""
    log = logix.open(path, pass_name=pass_name)
    ids = [i for b in batches for i in b[0]]
    assert [i if isinstance(i, str) else int(i) for i in log.ids] == ids
    if not batches:
        return
    x = torch.cat([b[1] for b in batches])
    y = torch.cat([b[2] for b in batches])
    for name, expected in exact_rows(model, x, y).items():
        got = log.gradients(name)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def hooks_left(model: nn.Module) -> list[str]:
    left = []
    for name, module in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if getattr(module, attr):
                left.append(f"{name or '<root>'}.{attr}")
    return left


@pytest.fixture
def setup(tmp_path):
    """A full-rank run watching a small MLP, with one good batch (ids 0..3) already captured."""
    path = tmp_path / "log"
    model = make_model()
    run = logix.init(path, rank="full")
    run.watch(model)
    first = ([0, 1, 2, 3], *batch_for(4, seed=1))
    log_batch(run, model, *first)
    return path, model, run, first


# -- ids that do not match the batch ------------------------------------------------------------


@pytest.mark.parametrize("n_ids", [3, 5])
def test_id_count_differs_from_batch(setup, n_ids):
    path, model, run, first = setup
    x, y = batch_for(4, seed=2)
    ids = list(range(100, 100 + n_ids))
    with pytest.raises(CaptureError, match=rf"{n_ids} ids were given but .* batch of 4 examples"):
        log_batch(run, model, ids, x, y)
    assert hooks_left(model) == []
    # the run is still usable, and the rejected ids were not marked as seen
    third = ([100, 101, 102, 103], *batch_for(4, seed=3))
    log_batch(run, model, *third)
    run.finalize()
    assert_log_holds(path, model, [first, third])


# -- backward and forward missing ------------------------------------------------------------


def test_forward_only_inside_capture(setup):
    path, model, run, first = setup
    x, y = batch_for(4, seed=2)
    with pytest.raises(CaptureError, match=r"loss\.backward\(\)"):
        with run.capture([10, 11, 12, 13]):
            example_losses(model, x, y).mean()
    assert hooks_left(model) == []
    run.finalize()
    assert_log_holds(path, model, [first])


def test_backward_after_the_block(setup):
    path, model, run, first = setup
    x, y = batch_for(4, seed=2)
    with pytest.raises(CaptureError, match="backward"):
        with run.capture([10, 11, 12, 13]):
            loss = example_losses(model, x, y).mean()
    loss.backward()  # too late: adds nothing and does not raise
    # the same ids can still be logged properly
    second = ([10, 11, 12, 13], x, y)
    log_batch(run, model, *second)
    run.finalize()
    assert_log_holds(path, model, [first, second])


def test_forward_never_run(setup):
    path, model, run, first = setup
    with pytest.raises(CaptureError, match="no watched module ran a forward"):
        with run.capture([10, 11]):
            pass
    run.finalize()
    assert_log_holds(path, model, [first])


def test_forward_under_no_grad_only(setup):
    path, model, run, first = setup
    x, y = batch_for(2, seed=2)
    with pytest.raises(CaptureError, match="no_grad"):
        with run.capture([10, 11]), torch.no_grad():
            example_losses(model, x, y).mean()
    run.finalize()
    assert_log_holds(path, model, [first])


# -- nothing to watch ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ["no_supported_modules", "include_matches_nothing", "exclude_everything", "all_frozen"],
)
def test_no_module_to_watch(tmp_path, case):
    path = tmp_path / "log"
    run = logix.init(path, rank=4)
    kwargs = {}
    if case == "no_supported_modules":
        model = nn.Sequential(nn.ReLU(), nn.LayerNorm(4), nn.ReLU())
    else:
        model = make_model()
        if case == "include_matches_nothing":
            kwargs["include"] = ["encoder*", "5"]
        elif case == "exclude_everything":
            kwargs["exclude"] = ["*"]
        else:
            model.requires_grad_(False)
    with pytest.raises(ConfigError, match="no module to watch"):
        run.watch(model, **kwargs)
    # nothing was recorded: the run can still watch a proper model and log
    good = make_model()
    assert run.watch(good) == ["0", "2"]
    log_batch(run, good, [5, 6], *batch_for(2, seed=4))
    run.finalize()
    log = logix.open(path)
    assert [int(i) for i in log.ids] == [5, 6]
    assert log.gradients("0").shape == (2, 3, 4)  # rank 4 on d_out=3, d_in=4+1


def test_frozen_model_is_watched_with_include_frozen(tmp_path):
    """The counterpart of all_frozen: it is the frozen-ness that made watch refuse."""
    model = make_model().requires_grad_(False)
    run = logix.init(tmp_path / "log", rank=4)
    assert run.watch(model, include_frozen=True) == ["0", "2"]
    run.finalize()


# -- run life cycle -----------------------------------------------------------------------------


def test_capture_before_watch(tmp_path):
    run = logix.init(tmp_path / "log", rank=4)
    with pytest.raises(CaptureError, match=r"run\.watch\(model\) before run\.capture"):
        run.capture([0, 1])
    # still usable once watching
    model = make_model()
    run.watch(model)
    log_batch(run, model, [0, 1], *batch_for(2, seed=1))
    run.finalize()
    assert [int(i) for i in logix.open(tmp_path / "log").ids] == [0, 1]


def test_capture_after_finalize(setup):
    path, model, run, first = setup
    run.finalize()
    x, y = batch_for(2, seed=2)
    with pytest.raises(CaptureError, match="finalized or closed"):
        log_batch(run, model, [10, 11], x, y)
    with pytest.raises(CaptureError, match="finalized or closed"):
        run.watch(make_model())
    run.finalize()  # idempotent
    assert hooks_left(model) == []
    assert_log_holds(path, model, [first])
    assert logix.open(path).passes[0].finalized


def test_watch_twice(setup):
    path, model, run, first = setup
    for other in (model, make_model()):
        with pytest.raises(ConfigError, match="already watches a model"):
            run.watch(other)
    second = ([4, 5], *batch_for(2, seed=2))
    log_batch(run, model, *second)
    run.finalize()
    assert_log_holds(path, model, [first, second])


# -- bad ids ------------------------------------------------------------------------------------

BAD_IDS = {
    "floats": [0.0, 1.0],
    "float_tensor": torch.tensor([4.0, 5.0]),
    "float_ndarray": np.array([4.0, 5.0]),
    "int_then_str": [4, "b"],
    "str_then_int": ["a", 5],
    "tensor_2d": torch.tensor([[4], [5]]),
    "ndarray_2d": np.array([[4], [5]]),
    "bool_tensor": torch.tensor([True, False]),
    "bool_list": [True, False],
    "single_string": "ab",
    "bytes": b"ab",
    "none": None,
    "none_items": [None, None],
    "scalar_int": 7,
}


@pytest.mark.parametrize("name", list(BAD_IDS))
def test_bad_ids(setup, name):
    path, model, run, first = setup
    x, y = batch_for(2, seed=2)
    with pytest.raises(CaptureError, match=r"ids (must|as a tensor must)"):
        log_batch(run, model, BAD_IDS[name], x, y)
    assert hooks_left(model) == []
    second = ([4, 5], x, y)
    log_batch(run, model, *second)
    run.finalize()
    assert_log_holds(path, model, [first, second])


@pytest.mark.parametrize(
    "good",
    [torch.tensor([4, 5]), torch.tensor([4, 5], dtype=torch.int32), np.array([4, 5]), (4, 5), range(4, 6)],
    ids=["int64_tensor", "int32_tensor", "ndarray", "tuple", "range"],
)
def test_accepted_id_containers(setup, good):
    """The counterpart of test_bad_ids: the containers the docs allow all log as plain ints."""
    path, model, run, first = setup
    x, y = batch_for(2, seed=2)
    log_batch(run, model, good, x, y)
    run.finalize()
    assert_log_holds(path, model, [first, ([4, 5], x, y)])


def test_id_kind_differs_from_the_log(setup):
    path, model, run, first = setup
    x, y = batch_for(2, seed=2)
    with pytest.raises(CaptureError, match="log's ids are ints; got str ids"):
        log_batch(run, model, ["a", "b"], x, y)
    second = ([4, 5], x, y)
    log_batch(run, model, *second)
    run.finalize()
    assert_log_holds(path, model, [first, second])


def test_id_kind_differs_from_the_log_in_a_later_session(setup):
    path, model, run, first = setup
    run.finalize()
    later = logix.init(path, rank="full")
    later.watch(model)
    x, y = batch_for(2, seed=2)
    with pytest.raises(CaptureError, match="log's ids are ints; got str ids"):
        log_batch(later, model, ["a", "b"], x, y)
    later.finalize()
    assert_log_holds(path, model, [first], pass_name="pass0")


def test_string_log_refuses_int_ids(tmp_path):
    path = tmp_path / "log"
    model = make_model()
    run = logix.init(path, rank="full")
    run.watch(model)
    first = (["a", "b"], *batch_for(2, seed=1))
    log_batch(run, model, *first)
    with pytest.raises(CaptureError, match="log's ids are strs; got int ids"):
        log_batch(run, model, [1, 2], *batch_for(2, seed=2))
    run.finalize()
    assert_log_holds(path, model, [first])


# Ids the capture accepts must also be storable: otherwise the writer thread dies on them later,
# the capture that brought them "succeeds", and every later capture fails with a WriterError.
UNSTORABLE_IDS = {
    "int_above_int64": [2**63, 7],
    "int_below_int64": [-(2**63) - 1, 7],
    "str_with_nul": ["a\x00b", "c"],
    "lone_surrogate": ["\ud800", "c"],
}


@pytest.mark.parametrize("name", list(UNSTORABLE_IDS))
def test_unstorable_ids_rejected_at_capture(tmp_path, name):
    path = tmp_path / "log"
    model = make_model()
    run = logix.init(path, rank="full")
    run.watch(model)
    ids = UNSTORABLE_IDS[name]
    first = ([0, 1], *batch_for(2, seed=1)) if isinstance(ids[0], int) else (["x", "y"], *batch_for(2, seed=1))
    log_batch(run, model, *first)
    x, y = batch_for(2, seed=2)
    try:
        with pytest.raises(CaptureError):
            log_batch(run, model, ids, x, y)
    finally:
        try:
            run.finalize()
        except WriterError:
            pass
    assert_log_holds(path, model, [first])


def test_writer_error_message_counts_committed_rows(setup, monkeypatch):
    path, model, run, first = setup
    run.flush()  # the first batch is committed

    def broken(self, ids, grads, steps, flags):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(logix.disk.SegmentWriter, "append", broken)
    log_batch(run, model, [4, 5], *batch_for(2, seed=2))  # fails in the writer thread
    with pytest.raises(WriterError, match="The 4 rows committed before the failure are kept"):
        run.finalize()


def test_writer_failure_keeps_committed_rows(setup, monkeypatch):
    """A failing writer surfaces as WriterError; the rows committed before it read back intact."""
    path, model, run, first = setup
    run.flush()

    def broken(self, ids, grads, steps, flags):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(logix.disk.SegmentWriter, "append", broken)
    log_batch(run, model, [4, 5], *batch_for(2, seed=2))
    with pytest.raises(WriterError, match="disk full"):
        run.finalize()
    monkeypatch.undo()
    assert_log_holds(path, model, [first])


# -- masks, reductions, config values ---------------------------------------------------------


def test_bad_masks(tmp_path):
    path = tmp_path / "log"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    run = logix.init(path, rank="full")
    run.watch(model)
    x = torch.randn(2, 5, 3)
    with run.capture([0, 1], mask=torch.ones(2, 5), reduction="sum"):
        model(x).sum().backward()
    bad = [
        torch.ones(3, 5),  # wrong batch
        torch.ones(1, 5),
        torch.ones(2),  # 1-D
        torch.ones(2, 5, 1),  # 3-D
        [[1] * 5] * 2,  # not a tensor
        np.ones((2, 5)),
        "all",
    ]
    for i, mask in enumerate(bad):
        with pytest.raises(CaptureError, match=r"mask must be a \(batch, positions\) tensor"):
            with run.capture([10 + 2 * i, 11 + 2 * i], mask=mask):
                model(x).sum().backward()
        assert hooks_left(model) == []
    run.finalize()
    log = logix.open(path)
    assert [int(i) for i in log.ids] == [0, 1]
    # a (2, 5, 3) input with sum loss: each row is [sum_t x_t, T] per output
    expected = torch.cat([x.sum(1), torch.full((2, 1), 5.0)], dim=1)[:, None, :].expand(2, 2, 4)
    torch.testing.assert_close(log.gradients("0"), expected)


def test_mask_with_wrong_number_of_positions(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    run = logix.init(tmp_path / "log", rank="full")
    run.watch(model)
    x = torch.randn(2, 5, 3)
    try:
        with pytest.raises(CaptureError, match="mask"):
            with run.capture([0, 1], mask=torch.ones(2, 6)):
                model(x).sum().backward()
    finally:
        run.finalize()


@pytest.mark.parametrize("reduction", ["median", "MEAN", "none", None])
def test_bad_reduction(setup, reduction):
    path, model, run, first = setup
    x, y = batch_for(2, seed=2)
    with pytest.raises(ConfigError, match="reduction must be one of"):
        log_batch(run, model, [4, 5], x, y, reduction=reduction)
    second = ([4, 5], x, y)
    log_batch(run, model, *second)
    run.finalize()
    assert_log_holds(path, model, [first, second])


def test_zero_loss_scale(setup):
    path, model, run, first = setup
    x, y = batch_for(2, seed=2)
    with pytest.raises(CaptureError, match="loss scale is zero"):
        log_batch(run, model, [4, 5], x, y, scale=0.0)
    run.finalize()
    assert_log_holds(path, model, [first])


BAD_CONFIG = {
    "rank_zero": {"rank": 0},
    "rank_negative": {"rank": -3},
    "rank_word": {"rank": "half"},
    "rank_float": {"rank": 2.5},
    "rank_bool": {"rank": True},
    "rank_none": {"rank": None},
    "rank_triple": {"rank": (1, 2, 3)},
    "rank_single": {"rank": (4,)},
    "rank_pair_bad_side": {"rank": (4, 0)},
    "dtype_int8": {"dtype": "int8"},
    "dtype_torch": {"dtype": torch.float32},
    "dtype_bfloat16": {"dtype": "bfloat16"},
    "projection": {"projection": "sparse"},
    "seed_negative": {"seed": -1},
    "seed_float": {"seed": 1.5},
    "on_duplicate": {"on_duplicate": "ignore"},
    "queue_size_zero": {"queue_size": 0},
    "queue_size_negative": {"queue_size": -2},
    "queue_bytes_zero": {"queue_bytes": 0},
    "queue_bytes_float": {"queue_bytes": 1.5},
    "commit_interval_negative": {"commit_interval": -1.0},
}


@pytest.mark.parametrize("name", list(BAD_CONFIG))
def test_bad_config_values(tmp_path, name):
    kwargs = BAD_CONFIG[name]
    (field,) = kwargs
    path = tmp_path / "log"
    with pytest.raises(ConfigError, match=field):
        logix.init(path, **kwargs)
    assert not path.exists()  # refused before touching the disk


def test_bad_config_leaves_an_existing_log_alone(setup):
    path, model, run, first = setup
    run.finalize()
    for kwargs in BAD_CONFIG.values():
        with pytest.raises(ConfigError, match=next(iter(kwargs))):
            logix.init(path, **kwargs)
        assert_log_holds(path, model, [first])
    # the log still takes a new session with its own settings
    later = logix.init(path, rank="full")
    later.watch(model)
    second = ([4, 5], *batch_for(2, seed=2))
    log_batch(later, model, *second)
    later.finalize()
    assert_log_holds(path, model, [first], pass_name="pass0")
    assert_log_holds(path, model, [second], pass_name="pass1")


def test_reopening_with_another_config(setup):
    path, model, run, first = setup
    run.finalize()
    with pytest.raises(ConfigError, match="another config"):
        logix.init(path, rank=8)
    assert_log_holds(path, model, [first])


def test_later_session_with_another_model(setup):
    path, model, run, first = setup
    run.finalize()
    later = logix.init(path, rank="full")
    other = nn.Sequential(nn.Linear(D_IN, D_HID + 1), nn.Tanh(), nn.Linear(D_HID + 1, D_OUT))
    shapes = (  # gradient shapes, the bias column included
        f"0 logged as linear {D_HID}x{D_IN + 1}, now linear {D_HID + 1}x{D_IN + 1}; "
        f"2 logged as linear {D_OUT}x{D_HID + 1}, now linear {D_OUT}x{D_HID + 2}"
    )
    with pytest.raises(ModelMismatchError, match=shapes):
        later.watch(other)
    with pytest.raises(ModelMismatchError, match=f"missing 2 linear {D_OUT}x{D_HID + 1}"):
        later.watch(model, exclude=["2"])
    later.finalize()
    assert_log_holds(path, model, [first])


def test_open_something_that_is_not_a_log(tmp_path):
    with pytest.raises(LogFormatError, match="missing: no such directory"):
        logix.open(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(LogFormatError, match="is a file, not a logix log directory"):
        logix.open(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LogFormatError, match="manifest.json is missing"):
        logix.open(tmp_path / "empty")


def test_names_not_in_the_log_are_logix_errors_and_key_errors(setup):
    """A pass or module that is not there is a LogixError (as every misuse is) and still a KeyError."""
    path, model, run, first = setup
    run.finalize()
    log = logix.open(path)
    misses = {
        "open": lambda: logix.open(path, pass_name="x"),
        "select": lambda: log.select("x"),
        "pass_info": lambda: log.pass_info("x"),
        "gradients": lambda: log.gradients("zzz"),
        "influence": lambda: log.self_influence(modules=["zzz"]),
    }
    for what, call in misses.items():
        with pytest.raises(logix.NotInLogError) as miss:
            call()
        assert isinstance(miss.value, LogixError) and isinstance(miss.value, KeyError), what
        message = str(miss.value)
        assert not message.startswith(("'", '"')), f"{what}: KeyError's quoting leaked into {message!r}"
        assert ("'x'" in message and "['pass0']" in message) or ("'zzz'" in message and "['0', '2']" in message), (
            what,
            message,
        )
    assert_log_holds(path, model, [first])


def test_with_ids_on_items_that_have_the_key_is_a_config_error():
    with pytest.raises(ConfigError, match="already have a field 'id'"):
        logix.WithIds([{"id": 3, "x": 1}])[0]


@pytest.mark.parametrize("rank", [1, "full", (2, 3), [2, "full"], ("full", 1)])
def test_good_config_values(tmp_path, rank):
    """The counterpart of the bad values: these are accepted."""
    run = logix.init(tmp_path / "log", rank=rank, dtype="float16", seed=0, on_duplicate="skip", queue_size=1)
    run.finalize()
    config = logix.open(tmp_path / "log").config
    assert config.rank == (tuple(rank) if isinstance(rank, list) else rank) and config.dtype == "float16"


# -- the user's own exceptions ------------------------------------------------------------------


class UserError(Exception):
    pass


class UserInterrupt(BaseException):  # like KeyboardInterrupt: not an Exception
    pass


@pytest.mark.parametrize("where", ["before_forward", "after_forward", "after_backward"])
@pytest.mark.parametrize("exc_type", [UserError, UserInterrupt])
def test_user_exception_propagates_unchanged(setup, where, exc_type):
    path, model, run, first = setup
    x, y = batch_for(4, seed=2)
    raised = exc_type("boom from user code")
    with pytest.raises(exc_type) as info:
        with run.capture([10, 11, 12, 13]):
            if where != "before_forward":
                loss = example_losses(model, x, y).mean()
                assert hooks_left(model) != []  # the hooks were there
            if where == "after_backward":
                loss.backward()
            raise raised
    assert info.value is raised
    assert type(info.value) is exc_type
    assert not isinstance(info.value, LogixError)
    assert hooks_left(model) == []
    # nothing of that batch was written or remembered: the same ids log fine on retry
    model.zero_grad()
    second = ([10, 11, 12, 13], x, y)
    log_batch(run, model, *second)
    run.finalize()
    assert_log_holds(path, model, [first, second])


# -- property: ids round-trip, or DuplicateIdError exactly on a duplicate -----------------------

int_ids = st.integers(min_value=-(2**63), max_value=2**63 - 1)
# Text without NUL or lone surrogates (neither can be stored: see
# test_unstorable_ids_rejected_at_capture); codec="utf-8" keeps surrogates out, which a bare
# exclusion list does not.
storable = st.characters(codec="utf-8", exclude_characters="\x00")
short_text = st.text(alphabet=storable, max_size=6)
long_text = st.builds(lambda c, n: c * n, storable, st.integers(1000, 5000))
str_ids = st.one_of(st.just(""), short_text, long_text)


@st.composite
def id_batches(draw):
    """A list of batches of ids (all ints or all strings), often with repeats inside or across."""
    element = draw(st.sampled_from([int_ids, str_ids]))
    pool = draw(st.lists(element, min_size=1, max_size=8))
    ids = draw(st.lists(st.one_of(st.sampled_from(pool), element), min_size=1, max_size=12))
    cuts = sorted(set(draw(st.lists(st.integers(1, len(ids) - 1), max_size=3)))) if len(ids) > 1 else []
    bounds = [0, *cuts, len(ids)]
    return [ids[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=id_batches())
def test_ids_round_trip_or_duplicate_error(batches):
    tmp = tempfile.mkdtemp(prefix="logix-prop-")
    try:
        path = Path(tmp) / "log"
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 1))
        run = logix.init(path, rank="full")
        run.watch(model)
        logged, logged_x, counter = [], [], 0
        flat = [i for b in batches for i in b]
        event(f"{type(flat[0]).__name__} ids, {'with' if len(set(flat)) < len(flat) else 'no'} duplicate")
        if "" in flat or any(isinstance(i, str) and len(i) >= 1000 for i in flat):
            event("empty or long string id")
        for ids in batches:
            # each example's input is unique, so its row tells which example it came from
            x = torch.stack([torch.tensor([float(counter + k), -1.0 - k]) for k in range(len(ids))])
            counter += len(ids)
            duplicate = len(set(ids)) != len(ids) or bool(set(ids) & set(logged))
            if duplicate:
                with pytest.raises(DuplicateIdError, match="ids"):
                    with run.capture(ids, reduction="sum"):
                        model(x).sum().backward()
                assert hooks_left(model) == []
            else:
                with run.capture(ids, reduction="sum"):
                    model(x).sum().backward()
                logged += ids
                logged_x.append(x)
        run.finalize()
        log = logix.open(path)
        if logged and isinstance(logged[0], str):
            assert log.id_kind == "str"
            assert all(isinstance(i, str) for i in log.ids)
            got = list(log.ids)
        else:
            got = [int(i) for i in log.ids]
        assert got == logged
        if logged:
            # d(sum of outputs)/dW for example i is x_i, and 1 for the bias
            x = torch.cat(logged_x)
            expected = torch.cat([x, torch.ones(len(x), 1)], dim=1)[:, None, :]
            torch.testing.assert_close(log.gradients("0"), expected)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_module_broadcast_over_the_batch_is_named_with_the_fix(tmp_path):
    """GPT-2 builds position ids of batch 1 unless given: wpe has no per-example gradient."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=8))
    tokens = torch.randint(0, 40, (3, 8))
    run = logix.init(tmp_path / "log", rank=4)
    run.watch(model, exclude=["lm_head"])
    with pytest.raises(logix.CaptureError, match=r"transformer\.wpe.*exclude it"):
        with run.capture(range(3), reduction="sum"):
            model(input_ids=tokens, labels=tokens).loss.backward()
    # passing batched position ids gives wpe real per-example rows
    with run.capture(range(3), reduction="sum"):
        positions = torch.arange(8).expand(3, 8)
        model(input_ids=tokens, position_ids=positions, labels=tokens).loss.backward()
    run.finalize()
    assert len(logix.open(tmp_path / "log")) == 3


# -- a capture that is created but never entered ---------------------------------------------------


def test_a_capture_never_entered_is_an_error_at_the_next_capture(setup):
    path, model, run, first = setup
    x, y = batch_for(6, seed=2)
    run.capture([10, 11, 12, 13, 14, 15])  # forgot `with`
    example_losses(model, x, y).mean().backward()
    never = r"run.capture\(ids\) for ids \[10, 11, 12, 13, 14\]... was created but never entered"
    with pytest.raises(CaptureError, match=never):
        run.capture([20, 21])
    second = ([20, 21, 22, 23, 24, 25], x, y)
    log_batch(run, model, *second)  # the next, well-formed capture works
    run.finalize()
    assert_log_holds(path, model, [first, second])


@pytest.mark.parametrize("ending", ["finalize", "with", "start_pass", "flush"])
def test_a_capture_never_entered_is_an_error_at_the_end(setup, ending):
    path, model, run, first = setup
    run.capture([6, 7])
    with pytest.raises(CaptureError, match=r"ids \[6, 7\] was created but never entered"):
        if ending == "with":
            with run:
                pass
        else:
            getattr(run, ending)()
    if ending in ("finalize", "with"):  # closed without finalizing: the committed rows are kept
        assert not logix.open(path).passes[0].finalized and logix.open(path).writer is None
    else:
        run.finalize()
        assert logix.open(path).passes[0].finalized
    assert_log_holds(path, model, [first])


def test_a_capture_never_entered_in_fit_projections(tmp_path):
    run = logix.init(tmp_path / "log", rank=2, projection="pca")
    run.watch(make_model())
    with pytest.raises(CaptureError, match="never entered"):
        with run.fit_projections():
            run.capture([0, 1])
    run.close()


@pytest.fixture
def finalized(setup):
    """The setup's log, finalized and opened, with a two-example query batch."""
    path, model, run, first = setup
    run.finalize()
    return logix.open(path), model, *batch_for(2, seed=3)


def test_a_query_capture_never_entered_is_an_error_before_scoring(finalized):
    log, model, x, y = finalized
    with log.query(model) as q:
        q.capture([50, 51])  # forgot `with`
        example_losses(model, x, y).mean().backward()
    with pytest.raises(CaptureError, match=r"q.capture\(ids\) for ids \[50, 51\] was created but never entered"):
        log.influence(q)
    assert len(q) == 0
    with q.capture([50, 51]):  # told once; capturing it properly now works
        example_losses(model, x, y).mean().backward()
    assert log.influence(q).values.shape == (2, 4)


def test_query_messages_name_q_capture(finalized):
    log, model, x, y = finalized
    with log.query(model) as q:
        with pytest.raises(CaptureError, match=r"call loss.backward\(\) inside `with q.capture\(ids\):`"):
            with q.capture([50, 51]):
                model(x)
        with pytest.raises(CaptureError, match=r"forward pass inside `with q.capture\(ids\):`"):
            with q.capture([50, 51]):
                pass


def test_entered_captures_raise_nothing_extra(setup):
    """The check never fires on the ordinary loop, including `cap = run.capture(...)` then `with cap:`."""
    path, model, run, first = setup
    x, y = batch_for(4, seed=2)
    cap = run.capture([4, 5, 6, 7])
    with cap:
        example_losses(model, x, y).mean().backward()
    with pytest.raises(CaptureError):  # a batch refused inside its block was entered: no complaint about that
        with run.capture([8]):
            pass
    run.finalize()
    assert_log_holds(path, model, [first, ([4, 5, 6, 7], x, y)])

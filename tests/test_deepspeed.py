"""DeepSpeed: rows logged through `engine.backward` equal plain-PyTorch rows, for ZeRO stages 0-3.

One process, world size 1, gloo, DeepSpeed's CPU accelerator. The DeepSpeed config accumulates
gradients over 2 micro-batches, so `engine.backward` halves the loss: logix must measure that and
divide it out. Each test trains 2 micro-batches, so the second `engine.step()` really updates the weights.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import exact_gradients
from torch import nn

import logix
from logix import kinds

if "deepspeed" not in sys.modules:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
deepspeed = pytest.importorskip("deepspeed")

from logix.integrations.deepspeed import attach, detach  # noqa: E402 - needs deepspeed, skipped above without it

pytestmark = pytest.mark.filterwarnings("ignore")  # DeepSpeed's own deprecation chatter

GAS = 2
BATCH, TOKENS, VOCAB, CLASSES = 4, 3, 11, 3
STAGES = [0, 1, 2, 3]
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """A world-size-1 gloo group for DeepSpeed, torn down (env included) after this module."""
    if deepspeed.accelerator.get_accelerator().device_name() != "cpu":
        pytest.skip("these tests run DeepSpeed on its CPU accelerator (DS_ACCELERATOR=cpu)")
    saved = {k: os.environ.get(k) for k in DIST_ENV}
    created = not torch.distributed.is_initialized()
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU (about a minute on a fresh machine);
        # it is only used between processes of one node, and this world has one process.
        comm = sys.modules["deepspeed.comm.torch"]
        build, comm.build_shm_op = comm.build_shm_op, lambda: None
        try:
            deepspeed.init_distributed(dist_backend="gloo")
        finally:
            comm.build_shm_op = build
    yield
    if created and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class Net(nn.Module):
    """Embedding -> per-token Linear -> mean over tokens -> Linear: three kinds, positions included."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 4)
        self.mix = nn.Linear(4, 5)
        self.head = nn.Linear(5, CLASSES)

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))).mean(dim=1))


def make_net() -> Net:
    torch.manual_seed(1)
    return Net()


def batches():
    g = torch.Generator().manual_seed(2)
    out = []
    for b in range(GAS):
        tokens = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=g)
        labels = torch.randint(0, CLASSES, (BATCH,), generator=g)
        out.append(([10 * b + i for i in range(BATCH)], tokens, labels))
    return out


def ds_config(stage: int, **extra) -> dict:
    return {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": GAS,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # SGD under ZeRO-2/3
        **extra,
    }


def make_engine(stage: int, **extra):
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, **extra))
    return engine


def full_params(engine) -> dict[str, torch.Tensor]:
    """The trained parameters, gathered from their ZeRO-3 partitions if need be."""
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=hasattr(params[0][1], "ds_id")):
        return {name: p.detach().float().clone() for name, p in params}


def train_ds(engine, path=None, *, statistics=None, logged_names=None):
    """GAS micro-batches through engine.backward and engine.step(); logs them if path is given."""
    run = None
    if path is not None:
        run = logix.init(path, rank="full", statistics=statistics)
        names = run.watch(engine)
        if logged_names is not None:
            assert names == logged_names
    for ids, tokens, labels in batches():
        if run is None:
            engine.backward(F.cross_entropy(engine(tokens), labels))
        else:
            with run.capture(ids):
                loss = F.cross_entropy(engine(tokens), labels)
                returned = engine.backward(loss)
            assert torch.equal(returned, loss / GAS)  # DeepSpeed's return value, untouched
        engine.step()  # after every micro-batch: DeepSpeed updates the weights on the GAS-th
    if run is not None:
        run.finalize()
    return full_params(engine)


def plain_log(path, statistics=None) -> tuple[logix.Log, list[str]]:
    """The reference: the same model and micro-batches, logged from plain PyTorch."""
    model = make_net()
    run = logix.init(path, rank="full", statistics=statistics)
    names = run.watch(model)
    for ids, tokens, labels in batches():
        with run.capture(ids):
            F.cross_entropy(model(tokens), labels).backward()
    run.finalize()
    return logix.open(path), names


def assert_rows_equal(log: logix.Log, ref: logix.Log, rtol=1e-6, atol=1e-7) -> None:
    assert list(log.modules) == list(ref.modules)
    assert [log.modules[m] for m in log.modules] == [ref.modules[m] for m in ref.modules]
    assert sorted(log.ids.tolist()) == sorted(ref.ids.tolist())
    order = {int(i): n for n, i in enumerate(log.ids)}
    rows = log.rows()[[order[int(i)] for i in ref.ids]]
    expected = ref.rows()
    assert expected.abs().max() > 0
    torch.testing.assert_close(rows, expected, rtol=rtol, atol=atol * expected.abs().max().item())


@pytest.mark.parametrize("stage", STAGES)
def test_rows_statistics_and_training_match_plain_pytorch(tmp_path, stage):
    ref, names = plain_log(tmp_path / "plain", statistics=("ekfac",))
    trained = train_ds(make_engine(stage), tmp_path / "ds", statistics=("ekfac",), logged_names=names)
    log = logix.open(tmp_path / "ds")
    assert log.passes[-1].finalized
    assert_rows_equal(log, ref)
    # statistics were gathered and finalized from the same rows and activations
    torch.testing.assert_close(
        log.self_influence("ekfac").values, ref.self_influence("ekfac").values, rtol=1e-5, atol=0.0
    )
    # training: bitwise what the same DeepSpeed run does without logix, and it did move the weights
    untouched = train_ds(make_engine(stage))
    assert trained.keys() == untouched.keys()
    for name in trained:
        assert torch.equal(trained[name], untouched[name]), name
    initial = dict(make_net().named_parameters())
    assert all(not torch.equal(trained[n], initial[n].detach()) for n in trained)


def test_rows_are_exact_per_example_gradients(tmp_path):
    """Stage 3 (partitioned weights) against torch.func's per-example gradients."""
    train_ds(make_engine(3), tmp_path / "ds")
    log = logix.open(tmp_path / "ds")
    model = make_net()
    order = {int(i): n for n, i in enumerate(log.ids)}
    for ids, tokens, labels in batches():
        exact = exact_gradients(model, F.cross_entropy, tokens, labels)
        assert set(exact) == set(log.modules)
        for name, expected in exact.items():
            got = log.gradients(name)[[order[i] for i in ids]]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def test_zero3_model_built_partitioned(tmp_path):
    """A model built inside deepspeed.zero.Init never has full weights on the module: dims still come right."""
    ref, _ = plain_log(tmp_path / "plain")
    with deepspeed.zero.Init(config_dict_or_path=ds_config(3)):
        model = make_net()
    assert all(p.shape == (0,) for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(3))
    train_ds(engine, tmp_path / "ds")
    assert_rows_equal(logix.open(tmp_path / "ds"), ref)


def test_deepspeed_loss_scale_is_divided_out(tmp_path):
    """fp16 does not run on DeepSpeed's CPU accelerator; the ZeRO optimizer's own loss scale does.

    override_loss_scale makes engine.backward multiply the loss by 1024 (and step() divide the
    gradients by it), exactly the path fp16's loss scaler takes.
    """
    ref, _ = plain_log(tmp_path / "plain")
    engine = make_engine(2)
    engine.optimizer.override_loss_scale(1024.0)
    trained = train_ds(engine, tmp_path / "ds")
    assert_rows_equal(logix.open(tmp_path / "ds"), ref)
    untouched = make_engine(2)
    untouched.optimizer.override_loss_scale(1024.0)
    assert all(torch.equal(a, b) for a, b in zip(trained.values(), train_ds(untouched).values()))


@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_rows_close_to_float32(tmp_path, stage):
    ref, _ = plain_log(tmp_path / "plain")
    train_ds(make_engine(stage, bf16={"enabled": True}), tmp_path / "ds")
    assert_rows_equal(logix.open(tmp_path / "ds"), ref, rtol=0.0, atol=2e-2)


def test_attach_is_idempotent_transparent_and_removable(tmp_path):
    engine = make_engine(2)
    ids, tokens, labels = batches()[0]
    run = logix.init(tmp_path / "a", rank=4)
    run.watch(engine)
    wrapper = engine.backward
    attach(run, engine)
    assert engine.backward is wrapper  # attaching again wraps nothing more

    # outside a capture: DeepSpeed's backward with its keyword arguments, no hook on the loss
    loss = F.cross_entropy(engine(tokens), labels)
    out = engine.backward(loss, retain_graph=True, scale_wrt_gas=False)
    assert torch.equal(out, loss) and not loss._backward_hooks
    engine.backward(loss)  # the graph was retained
    run.finalize()

    # a closed run: call-through only, even inside another (unrelated) run's capture of a plain model
    loss = F.cross_entropy(engine(tokens), labels)
    engine.backward(loss)
    assert not loss._backward_hooks

    # another run on the same engine is served by the same wrapper
    ref, _ = plain_log(tmp_path / "plain")
    engine = make_engine(1)
    first = logix.init(tmp_path / "first", rank="full")
    first.watch(engine)
    first.close()
    train_ds(engine, tmp_path / "second")
    assert_rows_equal(logix.open(tmp_path / "second"), ref)

    detach(engine)
    detach(engine)
    assert "backward" not in vars(engine) and "_backward_prologue" not in vars(engine)
    assert engine.backward.__func__ is type(engine).backward


def test_direct_loss_backward_with_accumulation_is_refused(tmp_path):
    """ZeRO's torch-style loss.backward() scales the outputs' gradient after logix's hook on `head`."""
    engine = make_engine(2)
    ids, tokens, labels = batches()[0]
    run = logix.init(tmp_path / "ds", rank="full")
    run.watch(engine)
    with pytest.raises(logix.CaptureError, match=r"engine\.backward\(loss\)"):
        with run.capture(ids):
            F.cross_entropy(engine(tokens), labels).backward()
    run.close()

    # without accumulation nothing is scaled, and loss.backward() gives the plain rows
    model = make_net()
    with logix.init(tmp_path / "plain", rank="full") as plain:
        plain.watch(model)
        with plain.capture(ids):
            F.cross_entropy(model(tokens), labels).backward()
    model = make_net()
    cfg = ds_config(2, gradient_accumulation_steps=1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=cfg)
    with logix.init(tmp_path / "direct", rank="full") as run:
        run.watch(engine)
        with run.capture(ids):
            F.cross_entropy(engine(tokens), labels).backward()
    engine.step()
    assert_rows_equal(logix.open(tmp_path / "direct"), logix.open(tmp_path / "plain"))


class ShapeReadingLinear(nn.Linear):
    pass


class ShapeReadingKind(kinds.LinearKind):
    """A (wrong) kind that reads the weight's shape, which ZeRO-3 partitions to (0,)."""

    name = "shape_reading"

    def dims(self, module):
        return module.weight.shape[-1] + self.has_bias(module), module.weight.shape[0]


def test_zero3_kind_reading_weight_shapes_is_refused_clearly(tmp_path):
    kinds.register(ShapeReadingLinear, ShapeReadingKind())
    try:
        model = nn.Sequential(ShapeReadingLinear(4, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(3))
        run = logix.init(tmp_path / "ds", rank=2)
        with pytest.raises(logix.ConfigError, match=r"partitioned by ZeRO-3.*module attributes"):
            run.watch(engine)
        run.close()

        # the way out the error names: watch the bare model first, attach once DeepSpeed wraps it
        model = nn.Sequential(ShapeReadingLinear(4, 3))
        run = logix.init(tmp_path / "early", rank="full")
        run.watch(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(3))
        attach(run, engine)
        x, y = torch.randn(BATCH, 4), torch.randint(0, 3, (BATCH,))
        with run.capture(list(range(BATCH))):
            engine.backward(F.cross_entropy(engine(x), y))
        run.finalize()
        assert logix.open(tmp_path / "early").rows().abs().max() > 0
    finally:
        kinds._REGISTRY.pop(ShapeReadingLinear, None)


def test_readme_snippet(tmp_path):
    """The README's DeepSpeed section, as written there (with toy data)."""
    model = make_net()
    loader = [(torch.tensor(ids), x, y) for ids, x, y in batches()]
    ds_config = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
    }
    path = tmp_path / "runs-ds"
    # --- README ---
    engine, opt, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=ds_config
    )
    run = logix.init(path, rank=16)
    run.watch(engine)  # same module names as the bare model
    for ids, x, y in loader:
        with run.capture(ids):  # no scale= for gradient accumulation or loss scaling
            loss = F.cross_entropy(engine(x), y)
            engine.backward(loss)  # not loss.backward()
        engine.step()
    run.finalize()
    # --- end ---
    log = logix.open(path)
    assert len(log) == GAS * BATCH and set(log.modules) == {"embed", "mix", "head"}

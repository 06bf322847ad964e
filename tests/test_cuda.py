"""The CUDA path: rows captured on a GPU are the same gradients, through the pinned side-stream copy.

Skipped without a CUDA device (CI has none); `benchmarks/gpu_suite.sh` runs this file on one.
References are torch.func per-example gradients, or the same log made on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import exact_gradients, projected
from test_exactness import (
    TinyLM,
    _alone,
    _case,
    _mlp,
    _padded_batch,
    assert_log_exact,
    assert_rows,
    ce,
    ids_for,
    log_one_batch,
    rows_by_id,
)
from torch import nn

import logix

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _full_float32():
    """TF32 products would differ from the float32 references by ~1e-3; tests here want 1e-5."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    torch.cuda.set_sync_debug_mode(0)


def _on_cpu(exact: dict) -> dict:
    return {name: g.cpu() for name, g in exact.items()}


@pytest.mark.parametrize(
    "kind, config, bias",
    [
        ("linear", "-", True),
        ("conv2d", "tuple-padding-stride", True),
        ("conv1d", "reflect", False),
        ("embedding", "padding_idx", True),
        ("gpt2-conv1d", "-", True),
    ],
)
def test_rows_captured_on_cuda_are_exact(tmp_path, kind, config, bias):
    model, x, y = _case(kind, config, bias)
    model, x, y = model.to(CUDA), x.to(CUDA), y.to(CUDA)
    ids = ids_for(len(x))
    log = log_one_batch(tmp_path / "log", model, lambda: ce(model(x), y), ids)
    assert_log_exact(log, _on_cpu(exact_gradients(model, ce, x, y)), ids)


def test_padded_sequences_with_a_device_mask_and_scale(tmp_path):
    """Token-mean loss over right-padded sequences; the mask and the scale live on the GPU."""
    cpu_model = TinyLM()
    tokens, mask, labels, lengths = _padded_batch()
    exact = _alone(cpu_model, tokens, labels, lengths)
    model = copy.deepcopy(cpu_model).to(CUDA)
    tokens, mask, labels = tokens.to(CUDA), mask.to(CUDA), labels.to(CUDA)
    num_tokens = (labels[:, 1:] != -100).sum()

    def loss_fn():
        logits = model(tokens)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

    log = log_one_batch(
        tmp_path / "log", model, loss_fn, ["a", "b", "c", "d"], mask=mask, reduction="sum", scale=1.0 / num_tokens
    )
    for name in exact:
        assert_rows(log.gradients(name), exact[name])


def test_grad_scaler_is_measured_and_float16_storage(tmp_path):
    model = _mlp().to(CUDA)
    x, y = torch.randn(6, 5, device=CUDA), torch.randint(0, 4, (6,), device=CUDA)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    run = logix.init(tmp_path / "log", rank="full", dtype="float16")
    run.watch(model)
    with run.capture(range(6)) as cap:
        scaler.scale(cap.loss(ce(model(x), y))).backward()
    run.finalize()
    log = logix.open(tmp_path / "log")
    exact = _on_cpu(exact_gradients(model, ce, x, y))
    for name in exact:
        assert_rows(rows_by_id(log, name, range(6)), exact[name], rtol=2e-3, atol=2e-3)


def test_autocast_bfloat16_on_cuda(tmp_path):
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).to(CUDA)
    x, y = torch.randn(6, 6, device=CUDA), torch.randint(0, 4, (6,), device=CUDA)

    def loss_fn():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        return ce(out.float(), y)

    log = log_one_batch(tmp_path / "log", model, loss_fn, range(6))
    exact = _on_cpu(exact_gradients(model, ce, x, y))
    other = _on_cpu(exact_gradients(model, ce, torch.randn_like(x), torch.randint(0, 4, (6,), device=CUDA)))
    for name in exact:
        rows = rows_by_id(log, name, range(6))
        assert_rows(rows, exact[name], rtol=5e-2, atol=3e-2)
        with pytest.raises(AssertionError):  # the bf16 tolerance still tells examples apart
            assert_rows(rows, other[name], rtol=5e-2, atol=3e-2)


def test_projected_rows_under_bfloat16_autocast(tmp_path):
    """Under bf16 autocast the projections run in bf16 (float32 accumulation): rows stay within
    bf16 accuracy of the projected exact gradients, and still tell examples apart."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 6)).to(CUDA)
    x, y = torch.randn(8, 48, device=CUDA), torch.randint(0, 6, (8,), device=CUDA)
    run = logix.init(tmp_path / "log", rank=8)
    run.watch(model)
    with run.capture(range(8)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        ce(out.float(), y).backward()
    run.finalize()
    log = logix.open(tmp_path / "log")
    exact = _on_cpu(exact_gradients(model, ce, x, y))
    other = _on_cpu(exact_gradients(model, ce, torch.randn_like(x), y))
    for name, (p_in, p_out) in log.projections().items():
        rows = rows_by_id(log, name, range(8))
        assert_rows(rows, projected(exact[name], p_in, p_out), rtol=5e-2, atol=3e-2)
        with pytest.raises(AssertionError):
            assert_rows(rows, projected(other[name], p_in, p_out), rtol=5e-2, atol=3e-2)


def test_many_batches_through_the_asynchronous_copy(tmp_path):
    """Every batch's rows survive the side-stream copy while the next steps reuse device memory.

    After each capture the freed device memory is immediately refilled with NaN: if the copy
    could still read it (no record_stream) or the writer read the host buffer before the copy
    finished (no event), rows would come out NaN or from another batch.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10)).to(CUDA)
    run = logix.init(tmp_path / "log", rank="full", queue_size=2)
    run.watch(model)
    batch, steps, width = 32, 40, 128 * 65 + 10 * 129
    expected = {}
    for step in range(steps):
        x, y = torch.randn(batch, 64, device=CUDA), torch.randint(0, 10, (batch,), device=CUDA)
        ids = list(range(step * batch, (step + 1) * batch))
        with run.capture(ids):
            ce(model(x), y).backward()
        model.zero_grad(set_to_none=True)
        for _ in range(4):  # take back whatever the capture freed, and scribble on it
            torch.full((batch, width), float("nan"), device=CUDA)
        if step % 8 == 0:  # check a sample of batches (the reference is slow); all rows are read below
            expected[step] = (ids, _on_cpu(exact_gradients(model, ce, x, y)))
    run.finalize()
    log = logix.open(tmp_path / "log")
    assert len(log.ids) == batch * steps
    assert log.width == width
    for name in ("0", "2"):
        assert torch.isfinite(log.gradients(name)).all()
    for ids, exact in expected.values():
        assert_log_exact(log, exact, ids)


def test_projected_log_statistics_and_scores_match_the_cpu(tmp_path):
    """The same model and batches logged on the CPU and on the GPU: same rows, factors and scores."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))
    x, y = torch.randn(64, 10), torch.randint(0, 5, (64,))
    xq, yq = torch.randn(3, 10), torch.randint(0, 5, (3,))
    results = {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        run = logix.init(tmp_path / device, rank=4, statistics=["kfac", "ekfac"])
        run.watch(m)
        for start in range(0, 64, 16):
            with run.capture(range(start, start + 16)):
                ce(m(x[start : start + 16].to(device)), y[start : start + 16].to(device)).backward()
            m.zero_grad(set_to_none=True)
        run.finalize()
        log = logix.open(tmp_path / device)
        query = log.query(m)
        with query.capture(["q0", "q1", "q2"]):
            ce(m(xq.to(device)), yq.to(device)).backward()
        results[device] = {
            "rows": {name: log.gradients(name) for name in log.modules},
            "scores": {pre: log.influence(query, pre).values for pre in ("identity", "kfac", "ekfac")},
            "self": log.self_influence("ekfac").values,
        }
    cpu, gpu = results["cpu"], results["cuda"]
    for name, rows in cpu["rows"].items():
        assert_rows(gpu["rows"][name], rows, rtol=1e-4, atol=1e-5)
    for pre, scores in cpu["scores"].items():
        assert_rows(gpu["scores"][pre], scores, rtol=1e-3, atol=1e-4)
    assert_rows(gpu["self"].float(), cpu["self"], rtol=1e-3, atol=1e-4)


def test_a_captured_step_never_waits_for_the_gpu(tmp_path):
    """No host synchronisation inside capture: the CPU keeps queueing kernels ahead of the GPU.

    torch's sync debug mode raises on any synchronising call (.item(), a copy to pageable host
    memory, a boolean index...). The first step runs outside it: it creates the copy stream.
    """
    torch.manual_seed(0)
    model = TinyLM().to(CUDA)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens, mask, labels, _ = (t.to(CUDA) if isinstance(t, torch.Tensor) else t for t in _padded_batch())
    run = logix.init(tmp_path / "log", rank=4, statistics=["kfac"])
    run.watch(model)
    for step in range(4):
        torch.cuda.set_sync_debug_mode("error" if step else 0)
        try:
            with run.capture([f"{step}-{i}" for i in range(4)], mask=mask, reduction="sum") as cap:
                logits = model(tokens)
                loss = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
                )
                cap.loss(loss / 2).backward()  # a factor the capture measures on the device
        finally:
            torch.cuda.set_sync_debug_mode(0)
        optimizer.step()  # the optimizer is torch's business, outside the check
        optimizer.zero_grad(set_to_none=True)
    run.finalize()
    log = logix.open(tmp_path / "log")
    assert len(log.ids) == 16
    assert torch.isfinite(log.gradients("fc")).all()

"""The Lightning callback: exact rows (also under gradient accumulation), one pass per epoch, ids
complete and unique, validation not logged, training bitwise untouched, clear errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import logix
from logix.errors import CaptureError

L = pytest.importorskip("lightning")
from conftest import exact_gradients  # noqa: E402

from logix.integrations.lightning import LogIXCallback  # noqa: E402

N, VAL_ID = 12, 1000
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*log_every_n_steps.*")


class MLP(L.LightningModule):
    def __init__(self, lr: float = 0.0, fail_at: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        self.lr, self.fail_at = lr, fail_at

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.fail_at == batch_idx:
            raise ValueError("boom in training_step")
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch[1:]
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[1]), batch[2])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class DictData(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def fit(model, train, callbacks=(), val=None, **kwargs):
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=kwargs.pop("max_epochs", 2), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=list(callbacks), **kwargs,
    )  # fmt: skip
    trainer.fit(model, DataLoader(train, batch_size=4), DataLoader(val, batch_size=4) if val else None)


def hooks_left(model):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("dict_batch, accum", [(False, 1), (True, 2)])
def test_rows_are_exact_per_example_gradients(tmp_path, accum, dict_batch):
    x, y = data()
    model = MLP(lr=0.0)  # parameters stay put, so every epoch's rows match the same exact gradients
    exact = exact_gradients(model, F.cross_entropy, x, y)
    train = logix.WithIds(DictData(x, y) if dict_batch else TensorDataset(x, y))
    val = TensorDataset(torch.arange(VAL_ID, VAL_ID + 8), *data(8, seed=1))
    fit(model, train, [LogIXCallback(tmp_path / "log", rank="full")], val=val, accumulate_grad_batches=accum)
    log = logix.open(tmp_path / "log")
    assert [p.name for p in log.passes] == ["epoch0", "epoch1"]
    # each pass records its optimizer steps (N / 4 batches, accum of them per step, rounded up)
    assert [p.meta["training"]["steps"] for p in log.passes] == [-(-(N // 4) // accum)] * 2  # a last, short step
    assert log.passes[0].meta["training"]["optimizer"] == "SGD"
    for name in ("epoch0", "epoch1"):
        log.select(name)
        assert sorted(log.ids) == list(range(N))  # complete, unique, and no validation ids
        for module, g in exact.items():
            torch.testing.assert_close(log.gradients(module), g[torch.tensor(log.ids)], rtol=1e-5, atol=1e-6)
    assert hooks_left(model) == 0


def test_grad_scaler_is_divided_out(tmp_path):
    """16-mixed scales the loss before on_before_backward; the callback divides that scale out."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    x, y = data()
    model = MLP(lr=0.0)
    exact = exact_gradients(model, F.cross_entropy, x, y)
    amp = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    cb = LogIXCallback(tmp_path / "log", rank="full")
    fit(model, logix.WithIds(TensorDataset(x, y)), [cb], max_epochs=1, plugins=[amp], accumulate_grad_batches=2)
    log = logix.open(tmp_path / "log")
    for module, g in exact.items():  # fp16 forward: close, not exact; a missed scale would be 1024x off
        torch.testing.assert_close(log.gradients(module), g[torch.tensor(log.ids)], rtol=1e-2, atol=1e-3)


def test_training_is_bitwise_untouched(tmp_path):
    x, y = data()
    params = []
    for callbacks in ([], [LogIXCallback(tmp_path / "log", rank=4)]):
        torch.manual_seed(0)
        model = MLP(lr=0.1)
        fit(model, logix.WithIds(TensorDataset(x, y)), callbacks, accumulate_grad_batches=2)
        params.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params))
    assert len(logix.open(tmp_path / "log")) == N


def test_missing_ids_is_a_clear_error(tmp_path):
    model = MLP()
    with pytest.raises(CaptureError, match="WithIds"):
        fit(model, TensorDataset(*data()), [LogIXCallback(tmp_path / "log", rank=4)])  # batches are (x, y)
    assert hooks_left(model) == 0


def test_user_error_propagates_and_capture_closes(tmp_path):
    model = MLP(fail_at=1)
    with pytest.raises(ValueError, match="boom"):
        fit(model, logix.WithIds(TensorDataset(*data())), [LogIXCallback(tmp_path / "log", rank=4)])
    assert hooks_left(model) == 0
    log = logix.open(tmp_path / "log")
    assert sorted(log.ids) == [0, 1, 2, 3] and not log.passes[-1].finalized  # batch 0 only


def test_readme_snippet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dataset, model = TensorDataset(*data()), MLP(lr=0.1)
    # --- README ---
    import lightning as L

    import logix
    from logix.integrations.lightning import LogIXCallback

    loader = DataLoader(logix.WithIds(dataset), batch_size=4)  # batches are (ids, x, y)
    trainer = L.Trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[LogIXCallback("runs/lit", rank=16)])
    trainer.fit(model, loader)  # training_step: `_, x, y = batch`, returns the batch-mean loss
    log = logix.open("runs/lit")  # one pass per epoch: "epoch0", "epoch1"
    # --- end ---
    assert [p.name for p in log.passes] == ["epoch0", "epoch1"] and all(p.finalized for p in log.passes)
    assert sorted(log.ids) == list(range(N)) and log.gradients("net.0").shape == (N, 8, 5)  # [weight | bias]

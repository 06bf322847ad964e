"""The HuggingFace Trainer integration, with real `Trainer`s on a tiny random GPT-2 (CPU).

Rows equal exact per-example gradients of each example's own summed token loss (with padding,
prompt tokens at -100, gradient accumulation, num_items_in_batch or not); training is bitwise
unchanged; ids are dataset indices or an id column; evaluation is not logged; one pass per epoch;
resuming from a checkpoint completes the log; log_dataset and lm_query; clear errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, IterableDataset

import logix
from logix import CaptureError, ConfigError
from logix.hooks import named_modules
from logix.kinds import kind_of

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from logix.integrations.huggingface import (  # noqa: E402
    LogIXCallback,
    continuation_batch,
    lm_query,
    log_dataset,
)

transformers.logging.set_verbosity_error()

V, T, N = 24, 10, 12
PAD = 0


def gpt2(dropout: float = 0.0, tie: bool = False, seed: int = 0, cls=GPT2LMHeadModel, **kw):
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=V,
        n_positions=16,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=PAD,
        **kw,
    )
    return cls(config)


class LMData(Dataset):
    """Right-padded token sequences of varied length; some have a prompt whose labels are -100."""

    def __init__(self, n: int = N, seed: int = 0, id_offset: int | None = None, string_ids: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            length = int(torch.randint(5, T + 1, (1,), generator=g))
            ids = torch.full((T,), PAD, dtype=torch.long)
            ids[:length] = torch.randint(2, V, (length,), generator=g)
            labels = ids.clone()
            labels[length:] = -100
            if i % 3 == 0:
                labels[:3] = -100  # a prompt: conditions, not scored
            mask = (torch.arange(T) < length).long()
            item = {"input_ids": ids, "attention_mask": mask, "labels": labels}
            if id_offset is not None:
                item["doc_id"] = f"doc-{i}" if string_ids else id_offset + i
            self.items.append(item)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return dict(self.items[i])


def targs(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=0.0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def own_loss(model, item) -> torch.Tensor:
    """An example's own loss: the sum of its label tokens' cross-entropy (after the shift)."""
    out = model(input_ids=item["input_ids"][None], attention_mask=item["attention_mask"][None])
    if item["labels"].dim() == 0:
        return F.cross_entropy(out.logits, item["labels"][None], reduction="sum")
    return F.cross_entropy(out.logits[0, :-1], item["labels"][1:], ignore_index=-100, reduction="sum")


def exact_rows(model, dataset, ids) -> dict:
    """{module: (len(ids), d_out, d_in [+1])} exact gradients of each example's own loss, one by one."""
    was = model.training
    model.eval()  # dropout is 0 in exactness tests: the same function as in training
    out = {name: [] for name, m in named_modules(model) if kind_of(m) is not None}
    for i in ids:
        model.zero_grad()
        own_loss(model, dataset[i]).backward()
        for name, m in named_modules(model):
            kind = kind_of(m)
            if kind is None or m.weight.grad is None:
                continue
            bias = getattr(m, "bias", None)
            out[name].append(kind.as_matrix(m, m.weight.grad.clone(), None if bias is None else bias.grad.clone()))
    model.zero_grad()
    model.train(was)
    return {k: torch.stack(v) for k, v in out.items() if v}


def assert_rows_exact(log, model, dataset, modules=None, rtol=1e-4, atol=1e-6):
    ids = log.ids.tolist()
    exact = exact_rows(model, dataset, ids)
    assert set(log.modules) <= set(exact)
    for name in modules or log.modules:
        got = log.gradients(name)
        want = exact[name]
        assert got.shape == want.shape, name
        scale = want.abs().max()
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol + 1e-5 * float(scale), msg=name)


def hooks_on(model) -> list[str]:
    """logix's hooks left on the model (transformers' own, such as checkpointing's, are not counted)."""
    attrs = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [
        f"{n}.{a}"
        for n, m in model.named_modules()
        for a in attrs
        for fn in getattr(m, a, {}).values()
        if getattr(fn, "__module__", "").startswith("logix")
    ]


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# -- rows are exact ------------------------------------------------------------------------------------


class NoLossKwargs(GPT2LMHeadModel):
    """A model the Trainer gives no num_items_in_batch: its loss is the micro-batch token mean."""

    accepts_loss_kwargs = False


@pytest.mark.parametrize(
    "setup",
    ["plain", "accumulation", "no_num_items", "classifier", "checkpointing"],
)
def test_rows_equal_exact_per_example_gradients(tmp_path, setup):
    """rank="full", lr 0: every logged row is the exact gradient of that example's own loss, every epoch."""
    kw, cls, data = {}, GPT2LMHeadModel, LMData()
    if setup == "accumulation":
        kw = dict(per_device_train_batch_size=2, gradient_accumulation_steps=3)
    if setup == "no_num_items":
        kw, cls = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2), NoLossKwargs
    if setup == "checkpointing":  # gradient checkpointing re-runs block forwards during backward
        kw = dict(activation_checkpointing=True)
    if setup == "classifier":
        cls = GPT2ForSequenceClassification
        for k, item in enumerate(data.items):
            item["labels"] = torch.tensor(k % 3)
    model = gpt2(cls=cls, **({"num_labels": 3} if setup == "classifier" else {}))
    before = params(model)
    path = tmp_path / "log"
    cb = LogIXCallback(path, rank="full", statistics=None)
    Trainer(model=model, args=targs(tmp_path, num_train_epochs=2, **kw), train_dataset=data, callbacks=[cb]).train()

    log = logix.open(path)
    assert [p.name for p in log.passes] == ["epoch0", "epoch1"]
    assert all(p.finalized and p.rows == N for p in log.passes)
    assert "transformer.wpe" not in log.modules  # position embeddings: no per-example gradient
    e0, e1 = log.select("epoch0"), log.select("epoch1")
    assert sorted(e0.ids.tolist()) == sorted(e1.ids.tolist()) == list(range(N))
    assert_rows_exact(e0, model, data)
    order0, order1 = torch.as_tensor(e0.ids).argsort(), torch.as_tensor(e1.ids).argsort()
    torch.testing.assert_close(e1.rows()[order1], e0.rows()[order0], rtol=1e-4, atol=1e-5)  # lr 0: same rows
    assert all(torch.equal(before[k], v) for k, v in params(model).items())
    assert hooks_on(model) == []


def test_steps_and_pass_metadata(tmp_path):
    path = tmp_path / "log"
    model = gpt2()
    args = targs(
        tmp_path, num_train_epochs=2, learning_rate=1e-3, per_device_train_batch_size=2, gradient_accumulation_steps=2
    )
    Trainer(model=model, args=args, train_dataset=LMData(), callbacks=[LogIXCallback(path, rank=4)]).train()
    log = logix.open(path)
    e0, e1 = log.passes
    assert (e0.meta["step"], e1.meta["step"]) == (0, 3)  # 12 examples, 2 x 2 per step: 3 steps per epoch
    assert e0.meta["lr"] == pytest.approx(1e-3) and e1.meta["lr"] < e0.meta["lr"]
    # each pass records the optimizer steps it took and their learning rates (linear decay over 6 steps)
    assert [p.meta["training"]["steps"] for p in (e0, e1)] == [3, 3]
    assert e0.meta["training"]["lr_sum"] == pytest.approx(1e-3 * (6 + 5 + 4) / 6)
    assert e1.meta["training"]["lr_sum"] == pytest.approx(1e-3 * (3 + 2 + 1) / 6)
    assert e0.meta["training"]["lrs"] == pytest.approx([1e-3 * 6 / 6, 1e-3 * 5 / 6, 1e-3 * 4 / 6])  # step by step
    assert e0.meta["training"]["optimizer"] == "AdamW"
    steps = log.select("epoch0").steps.tolist()
    assert sorted(steps) == [0] * 4 + [1] * 4 + [2] * 4  # rows record the step whose parameters they saw
    assert len(log.self_influence("ekfac").values) == N  # EK-FAC gathered by default


# -- training is untouched -------------------------------------------------------------------------------


def _train(tmp_path, callback, sub):
    model = gpt2(dropout=0.1)
    args = targs(
        tmp_path / sub,
        num_train_epochs=2,
        learning_rate=5e-3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        eval_strategy="epoch",
        per_device_eval_batch_size=4,
        max_grad_norm=1.0,
        warmup_steps=1,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=LMData(),
        eval_dataset=LMData(6, seed=1),
        callbacks=[callback] if callback else [],
    )
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    return model, evals, trainer


def test_training_bitwise_unchanged_and_eval_not_logged(tmp_path):
    """Dropout on, accumulation, clipping, a schedule and evaluation: same parameters bit for bit."""
    plain, plain_evals, _ = _train(tmp_path, None, "a")
    cb = LogIXCallback(tmp_path / "log", rank=8)
    logged, logged_evals, trainer = _train(tmp_path, cb, "b")
    for (k, a), (_, b) in zip(plain.named_parameters(), logged.named_parameters()):
        assert torch.equal(a, b), k
    assert plain_evals == logged_evals and len(plain_evals) == 2
    log = logix.open(tmp_path / "log")
    assert [(p.name, p.rows) for p in log.passes] == [("epoch0", N), ("epoch1", N)]  # no eval rows
    assert hooks_on(logged) == []
    assert type(trainer.get_train_dataloader().batch_sampler).__name__ == "BatchSampler"


# -- ids ---------------------------------------------------------------------------------------------------


class RefusesDocId(GPT2LMHeadModel):
    def forward(self, *args, **kwargs):
        assert "doc_id" not in kwargs, "the model saw the id column"
        return super().forward(*args, **kwargs)


def keep_strings(items):
    batch = {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "attention_mask", "labels")}
    batch["doc_id"] = [it["doc_id"] for it in items]
    return batch


@pytest.mark.parametrize("kind", ["int", "str"])
def test_id_column(tmp_path, kind):
    data = LMData(id_offset=1000, string_ids=kind == "str")
    model = gpt2(cls=RefusesDocId)
    cb = LogIXCallback(tmp_path / "log", rank="full", statistics=None, id_column="doc_id")
    args = targs(tmp_path, remove_unused_columns=False, eval_strategy="epoch")
    collator = keep_strings if kind == "str" else None
    Trainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=LMData(4, id_offset=0),
        data_collator=collator,
        callbacks=[cb],
    ).train()
    log = logix.open(tmp_path / "log")
    want = [f"doc-{i}" for i in range(N)] if kind == "str" else list(range(1000, 1000 + N))
    assert sorted(log.ids.tolist()) == sorted(want)
    if kind == "int":  # the row of doc 1000+i is example i's
        exact = exact_rows(model, data, [i - 1000 for i in log.ids.tolist()])
        torch.testing.assert_close(log.gradients("lm_head"), exact["lm_head"], rtol=1e-4, atol=1e-6)


def test_id_column_removed_by_trainer_is_a_clear_error(tmp_path):
    model = gpt2()
    cb = LogIXCallback(tmp_path / "log", rank=4, id_column="doc_id")
    trainer = Trainer(model=model, args=targs(tmp_path), train_dataset=LMData(id_offset=0), callbacks=[cb])
    with pytest.raises(CaptureError, match="remove_unused_columns"):
        trainer.train()
    assert hooks_on(model) == []


# -- resume ------------------------------------------------------------------------------------------------


class Crash(TrainerCallback):
    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt("simulated crash")


def test_resume_from_checkpoint_completes_the_log(tmp_path):
    """Crash after step 3 (checkpoint at step 2), resume: every epoch holds every id exactly once."""

    def trainer(callbacks, save=False):
        saving = dict(save_strategy="steps", save_steps=2) if save else {}
        args = targs(tmp_path, num_train_epochs=2, learning_rate=1e-3, per_device_train_batch_size=2, **saving)
        return Trainer(model=gpt2(), args=args, train_dataset=LMData(), callbacks=callbacks)  # 6 steps per epoch

    path = tmp_path / "log"
    first = LogIXCallback(path, rank="full", statistics="kfac")
    with pytest.raises(KeyboardInterrupt):
        trainer([first, Crash(at=3)], save=True).train()
    first.close()  # what a killed process leaves: rows committed, passes unfinalized
    log = logix.open(path)
    assert [(p.name, p.rows, p.finalized) for p in log.passes] == [("epoch0", 6, False)]

    second = LogIXCallback(path, rank="full", statistics="kfac")
    resumed = trainer([second])
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    log = logix.open(path)
    assert [(p.name, p.finalized) for p in log.passes] == [("epoch0", True), ("epoch1", True)]
    for name in ("epoch0", "epoch1"):
        ids = log.select(name).ids.tolist()
        assert sorted(ids) == list(range(N)), name  # complete, no duplicates
    # the same ids in the same order as an uninterrupted run: the skipped batches were dropped
    straight = LogIXCallback(tmp_path / "straight", rank="full", statistics=None)
    trainer([straight]).train()
    for name in ("epoch0", "epoch1"):
        assert log.select(name).ids.tolist() == logix.open(tmp_path / "straight", name).ids.tolist()
    # the resumed rows were taken at the resumed parameters: those after the checkpoint match
    a, b = log.select("epoch1"), logix.open(tmp_path / "straight", "epoch1")
    torch.testing.assert_close(a.gradients("lm_head"), b.gradients("lm_head"), rtol=1e-4, atol=1e-6)


def ddp_worker(out: str) -> None:
    """One rank of test_two_processes (run as `python tests/test_huggingface.py ddp-worker OUT`)."""
    from pathlib import Path

    out = Path(out)
    args = targs(out, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    cb = LogIXCallback(out / "log", rank="full", statistics="kfac")
    Trainer(model=gpt2(), args=args, train_dataset=LMData(13), callbacks=[cb]).train()


def test_two_processes_rows_exact(tmp_path):
    """DDP on gloo, 2 ranks: num_items_in_batch counts both ranks' tokens and the loss is multiplied by
    the world size; the rows are still each example's own gradient, every id once (padding skipped)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, __file__, "ddp-worker", str(tmp_path)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        output = p.communicate(timeout=240)[0]
        assert p.returncode == 0, output[-3000:]
    log = logix.open(tmp_path / "log")
    assert log.current.finalized and sorted({s.rank for s in log.current.segments}) == [0, 1]
    assert sorted(log.ids.tolist()) == list(range(13))
    assert_rows_exact(log, gpt2(), LMData(13))


def test_example_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer_gpt2.py"
    result = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "ex")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generated: 'the lazy cat' -> ' chases" in result.stdout
    assert result.stdout.count("  id ") == 8
    assert [p.name for p in logix.open(tmp_path / "ex").passes] == ["epoch0", "epoch1"]


# -- bf16 ---------------------------------------------------------------------------------------------------


def test_bf16_autocast_rows_close_to_float32(tmp_path):
    rows = {}
    for bf16 in (False, True):
        path = tmp_path / f"log{bf16}"
        model = gpt2()
        cb = LogIXCallback(path, rank=16, statistics=None)
        Trainer(
            model=model, args=targs(tmp_path / str(bf16), bf16=bf16), train_dataset=LMData(), callbacks=[cb]
        ).train()
        log = logix.open(path)
        order = torch.as_tensor(log.ids).argsort()
        rows[bf16] = log.rows()[order]
    cos = F.cosine_similarity(rows[True], rows[False], dim=1)
    assert cos.min() > 0.98, cos
    assert torch.isfinite(rows[True]).all()


# -- a logging pass at a checkpoint ------------------------------------------------------------------------


def test_log_dataset_is_exact_and_leaves_the_model_alone(tmp_path):
    model = gpt2(dropout=0.1)
    data = LMData()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = params(model)
    model.train()
    log = log_dataset(model, data, tmp_path / "log", rank="full", batch_size=5, pass_name="ckpt")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in params(model).items())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert hooks_on(model) == []
    assert log.ids.tolist() == list(range(N)) and log.current.finalized
    model.zero_grad(set_to_none=True)
    assert_rows_exact(log, model, data)  # eval mode: dropout off


def test_log_dataset_from_a_trainer(tmp_path):
    model = gpt2()
    trainer = Trainer(model=model, args=targs(tmp_path, learning_rate=1e-3), train_dataset=LMData())
    trainer.train()
    log = log_dataset(trainer, path=tmp_path / "log", rank=8, batch_size=4, checkpoint="final")
    assert log.ids.tolist() == list(range(N))
    assert log.current.meta["step"] == trainer.state.global_step == 3
    assert log.current.meta["checkpoint"] == "final"


# -- attribution --------------------------------------------------------------------------------------------


def test_lm_query_scores_the_continuation_only_and_signs_agree(tmp_path):
    model = gpt2()
    data = LMData()
    log = log_dataset(model, data, tmp_path / "log", rank="full", statistics="ekfac")
    prompt, continuation = [5, 7, 9], [11, 13, 2, 4]
    q = lm_query(log, model, [(prompt, continuation)])
    # the query row is the exact gradient of the continuation's summed loss (prompt not scored)
    batch = continuation_batch([prompt], [continuation])
    item = {k: v[0] for k, v in batch.items()}
    exact = exact_rows(model, [item], [0])
    width = log.modules["lm_head"]
    got = q.rows[:, width.columns].reshape(1, width.k_out, width.k_in)
    torch.testing.assert_close(got, exact["lm_head"], rtol=1e-4, atol=1e-6)
    assert torch.equal(batch["labels"][0, :3], torch.full((3,), -100))

    # sign: a small step on the most helpful example lowers the query loss, on the most harmful raises it
    scores = log.influence(q, preconditioner="identity")
    values = scores.values[0]

    def query_loss_after_step(i, eps):
        trial = gpt2()
        trial.load_state_dict(model.state_dict())
        trial.double().zero_grad()
        own_loss(trial, data[i]).backward()
        watched = {n for n in log.modules}
        with torch.no_grad():
            for name, m in named_modules(trial):
                if name in watched:
                    for p in m.parameters(recurse=False):
                        p -= eps * p.grad
            return own_loss(trial, item).item()

    base = query_loss_after_step(0, 0.0)
    train_ids = scores.train_ids.tolist()
    for pos in (int(values.argmax()), int(values.argmin())):
        eps = 1e-4 / abs(float(values[pos]))  # a step that moves the loss by about 1e-4
        change = query_loss_after_step(train_ids[pos], eps) - base
        assert change == pytest.approx(-eps * float(values[pos]), rel=0.02)
    assert values.max() > 0 > values.min()

    # consistency: a training example as its own query is its own closest example (cosine, EK-FAC)
    full = {k: v[None] for k, v in data[4].items()}
    q2 = lm_query(log, model, full, ids=["self"])
    top = log.influence(q2, preconditioner="ekfac", mode="cosine", top_k=3)
    assert top.ids[0][0] == 4
    top5 = log.influence(q, preconditioner="ekfac", top_k=5)
    assert len(top5.ids[0]) == 5


# -- errors -------------------------------------------------------------------------------------------------


def test_label_smoothing_is_refused(tmp_path):
    model = gpt2()
    args = targs(tmp_path, label_smoothing_factor=0.1)
    trainer = Trainer(model=model, args=args, train_dataset=LMData(), callbacks=[LogIXCallback(tmp_path / "l")])
    with pytest.raises(ConfigError, match="label_smoothing"):
        trainer.train()
    assert hooks_on(model) == []


def test_compute_loss_func_is_refused(tmp_path):
    model = gpt2()

    def loss_func(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)

    trainer = Trainer(
        model=model,
        args=targs(tmp_path),
        train_dataset=LMData(),
        compute_loss_func=loss_func,
        callbacks=[LogIXCallback(tmp_path / "l", rank=4)],
    )
    with pytest.raises(CaptureError, match="compute_loss_func"):
        trainer.train()
    assert hooks_on(model) == []


class Squared(GPT2LMHeadModel):
    """A model whose loss is not a sum of per-example losses over a count."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.loss = out.loss**2
        return out


def test_a_loss_the_callback_cannot_explain_is_refused(tmp_path):
    model = gpt2(cls=Squared)
    args = targs(tmp_path, remove_unused_columns=False)  # forward(*args, **kwargs) names no column
    trainer = Trainer(model=model, args=args, train_dataset=LMData(), callbacks=[LogIXCallback(tmp_path / "l", rank=4)])
    with pytest.raises(CaptureError, match="cross-entropy"):
        trainer.train()
    assert hooks_on(model) == []


class Stream(IterableDataset):
    def __iter__(self):
        return iter(LMData(id_offset=500).items)


def test_iterable_dataset_with_an_id_column(tmp_path):
    model = gpt2()
    cb = LogIXCallback(tmp_path / "l", rank=4, statistics=None, id_column="doc_id")
    args = targs(tmp_path, max_steps=3, remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=Stream(), callbacks=[cb]).train()
    assert sorted(logix.open(tmp_path / "l").ids.tolist()) == list(range(500, 500 + N))


def test_iterable_dataset_needs_an_id_column(tmp_path):
    model = gpt2()
    trainer = Trainer(
        model=model,
        args=targs(tmp_path, max_steps=2),
        train_dataset=Stream(),
        callbacks=[LogIXCallback(tmp_path / "l", rank=4)],
    )
    with pytest.raises(CaptureError, match="id_column"):
        trainer.train()
    assert hooks_on(model) == []


def test_training_from_scratch_into_an_existing_log_is_refused(tmp_path):
    path = tmp_path / "l"
    for attempt in range(2):
        model = gpt2()
        trainer = Trainer(
            model=model,
            args=targs(tmp_path),
            train_dataset=LMData(),
            callbacks=[LogIXCallback(path, rank=4, statistics=None)],
        )
        if attempt == 0:
            trainer.train()
        else:
            with pytest.raises(ConfigError, match="new log path"):
                trainer.train()
    assert hooks_on(model) == []


# -- the README snippet -------------------------------------------------------------------------------------


def test_readme_snippet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, train_ds = gpt2(dropout=0.1), LMData()
    args = targs(tmp_path, learning_rate=1e-3, num_train_epochs=2)
    # fmt: off
    # --- README ---
    import logix
    from logix.integrations.huggingface import LogIXCallback, lm_query

    trainer = Trainer(model=model, args=args, train_dataset=train_ds,
                      callbacks=[LogIXCallback("runs/gpt2", rank=32)])   # ids: dataset indices
    trainer.train()                                   # one pass per epoch, EK-FAC statistics, finalized

    log = logix.open("runs/gpt2")                     # the last epoch's pass
    prompt, continuation = [5, 7, 9], [11, 13, 2]     # token ids: the query loss covers the continuation
    q = lm_query(log, model, [(prompt, continuation)])
    top = log.influence(q, preconditioner="ekfac", top_k=5)
    top.ids[0], top.values[0]                         # the 5 training examples that helped it most
    # --- end ---
    # fmt: on
    assert len(top.ids[0]) == 5 and math.isfinite(float(top.values[0][0]))


if __name__ == "__main__":
    import sys

    if sys.argv[1] == "ddp-worker":
        ddp_worker(sys.argv[2])

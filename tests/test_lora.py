"""LoRA fine-tuning with peft: the adapters (lora_A / lora_B on GPT-2's Conv1D and on Linear layers)
are what is logged, their rows are torch.func's per-example gradients of the adapter parameters,
the Trainer callback and queries work on a PeftModel, and adapters that are bare parameters
(LoRA on an embedding) are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import exact_gradients

import logix

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 23


def lora_gpt2(targets=("c_attn", "c_proj", "c_fc")):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)  # fmt: skip
    base = transformers.GPT2LMHeadModel(config)
    lora = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=list(targets), fan_in_fan_out=True)
    model = peft.get_peft_model(base, lora)
    for name, p in model.named_parameters():  # start the adapters away from zero, so every row is non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def summed_loss(out, ids):
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")


def test_only_the_adapters_are_logged_and_their_rows_are_exact(tmp_path):
    model = lora_gpt2()
    ids = torch.randint(1, VOCAB, (6, 7), generator=torch.Generator().manual_seed(1))
    with logix.init(tmp_path / "log", rank="full") as run:
        names = run.watch(model)
        with run.capture(list(range(6)), reduction="sum"):
            summed_loss(model(input_ids=ids), ids).backward()
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names), names
    assert len(names) == 2 * 4  # A and B on c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj (one layer)
    exact = exact_gradients(model, summed_loss, ids, ids)
    log = logix.open(tmp_path / "log")
    for name in names:
        torch.testing.assert_close(log.gradients(name).reshape(6, -1), exact[name].reshape(6, -1).float(),
                                   rtol=1e-4, atol=1e-6)  # fmt: skip


def test_the_trainer_callback_and_queries_work_on_a_peft_model(tmp_path):
    from logix.integrations.huggingface import LogIXCallback, lm_query

    model = lora_gpt2()
    rows = torch.randint(1, VOCAB, (16, 8), generator=torch.Generator().manual_seed(2)).tolist()
    train = [{"input_ids": r, "labels": r} for r in rows]
    args = transformers.TrainingArguments(
        str(tmp_path / "trainer"), per_device_train_batch_size=4, num_train_epochs=1, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, learning_rate=1e-3,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train,
                                   callbacks=[LogIXCallback(tmp_path / "log", rank=4)])  # fmt: skip
    trainer.train()
    log = logix.open(tmp_path / "log")
    assert sorted(log.ids.tolist()) == list(range(16))
    assert log.modules and all(".lora_" in name for name in log.modules)
    q = lm_query(log, model.eval(), [(rows[0][:4], rows[0][4:])])
    top = log.influence(q, "ekfac", top_k=3)
    assert top.ids.shape == (1, 3) and bool(torch.isfinite(top.values).all())


def test_lora_on_an_embedding_is_refused(tmp_path):
    model = lora_gpt2(targets=("wte", "c_attn"))
    with logix.init(tmp_path / "log", rank=4) as run:
        with pytest.raises(logix.ConfigError, match="LoRA adapters on an embedding .* are parameters, not modules"):
            run.watch(model)

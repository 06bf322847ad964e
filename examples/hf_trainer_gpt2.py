"""Train a tiny GPT-2 with the HuggingFace Trainer, log per-example gradients with LogIXCallback,
then ask which training sentences most influenced a generated continuation.

Everything is built here: a character-level tokenizer, a corpus of templated sentences in which
each animal has its own verb and objects, and a randomly initialised 2-layer GPT-2. Nothing is
downloaded; it runs in well under a minute on two CPU cores.

    .venv/bin/python examples/hf_trainer_gpt2.py [--out runs/hf_gpt2] [--epochs 2] [--rank 32]
"""

from __future__ import annotations

import argparse
import itertools
import random
import shutil
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import logix
from logix.integrations.huggingface import LogIXCallback, lm_query

ANIMALS = {  # each animal does one thing, to its own objects: attribution should find its sentences
    "cat": ("chases", ["mouse", "bird", "yarn"]),
    "dog": ("fetches", ["ball", "stick", "bone"]),
    "cow": ("eats", ["grass", "hay", "corn"]),
    "owl": ("watches", ["moon", "field", "barn"]),
}
ADJECTIVES = ["small", "big", "old", "young", "lazy", "happy"]
ADVERBS = ["", " often", " again", " slowly"]


def corpus() -> list[str]:
    sentences = [
        f"the {adj} {animal} {verb} the {obj}{adv}."
        for (animal, (verb, objects)), adj, obj, adv in itertools.product(
            ANIMALS.items(), ADJECTIVES, range(3), ADVERBS
        )
        for obj in [objects[obj]]
    ]
    random.Random(0).shuffle(sentences)
    return sentences


class CharTokenizer:
    """Characters to ids: 0 is padding, 1 starts every sequence."""

    def __init__(self, texts: list[str]):
        self.chars = sorted(set("".join(texts)))
        self.index = {c: i + 2 for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars) + 2

    def encode(self, text: str) -> list[int]:
        return [1] + [self.index[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 2] for i in ids if i >= 2)


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad; padding is masked out of attention and out of the loss (label -100)."""
    width = max(len(it["input_ids"]) for it in items)
    input_ids = torch.zeros(len(items), width, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for r, it in enumerate(items):
        input_ids[r, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
        mask[r, : len(it["input_ids"])] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/hf_gpt2", help="log directory (replaced if it exists)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--prompt", default="the lazy cat")
    opts = parser.parse_args()
    hf_logging.set_verbosity_error()
    start = time.time()

    sentences = corpus()
    tok = CharTokenizer(sentences)
    train = [{"input_ids": tok.encode(s)} for s in sentences]
    print(f"{len(sentences)} training sentences, e.g. {sentences[0]!r}; {tok.vocab_size} tokens")

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=tok.vocab_size,
        n_positions=48,
        bos_token_id=1,
        eos_token_id=tok.index["."],
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(config)

    shutil.rmtree(opts.out, ignore_errors=True)
    args = TrainingArguments(
        output_dir=f"{opts.out}-trainer",
        num_train_epochs=opts.epochs,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        warmup_steps=5,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="epoch",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=collate,
        callbacks=[LogIXCallback(opts.out, rank=opts.rank)],  # ids: indices into `train`
    )
    trainer.train()

    log = logix.open(opts.out)  # the last epoch's pass
    print(
        f"log: passes {[(p.name, p.rows) for p in log.passes]}, {len(log.modules)} modules, {log.width} numbers per row"
    )

    # generate a continuation, then score it (the prompt conditions the query loss but is not part of it)
    model.eval()
    prompt = tok.encode(opts.prompt)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=tok.index["."],
            pad_token_id=0,
        )
    continuation = out[0, len(prompt) :].tolist()
    print(f"\ngenerated: {opts.prompt!r} -> {tok.decode(continuation)!r}")

    query = lm_query(log, model, [(prompt, continuation)])
    top = log.influence(query, preconditioner="ekfac", top_k=5)
    worst = log.influence(query, preconditioner="ekfac", top_k=3, largest=False)
    print("most helpful training sentences (EK-FAC influence, + = lowers the continuation's loss):")
    for i, v in zip(top.ids[0].tolist(), top.values[0].tolist()):
        print(f"  id {i:4d}  {v:+10.3f}  {sentences[i]}")
    print("most harmful:")
    for i, v in zip(worst.ids[0].tolist(), worst.values[0].tolist()):
        print(f"  id {i:4d}  {v:+10.3f}  {sentences[i]}")
    print(f"\ndone in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()

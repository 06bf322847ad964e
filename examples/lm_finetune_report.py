"""Fine-tune a tiny language model with LoRA, then write a page that says which training text made it
say what it says, and which words in it.

    python examples/lm_finetune_report.py [--out runs/lm_report]     # then open runs/lm_report.html

1. Pre-train a tiny GPT-2 (words as tokens, 2 layers, width 64) on scikit-learn's dataset
   descriptions for a few epochs (plain Trainer, no logging).
2. Fine-tune it with LoRA adapters (peft, rank 16 on every attention and MLP layer, with the
   token embedding and output layer trained too, since the Zen's words were not in the pre-training
   text) on the Zen of Python, which ships with Python, through the HuggingFace Trainer and
   `LogIXCallback`: the frozen base weights are not logged, the adapters and the two trained
   layers are.
3. Log one pass at the final checkpoint with `log_dataset` (the model in eval mode, no optimizer
   step): rows that can be split by token, since the parameters they were taken at are the model's
   now.
4. Generate two completions, ask which fine-tuning lines explain them (EK-FAC influence, top 5),
   split those lines' scores over their words (`log.token_influence`) and over the completions'
   words (`log.query_token_influence`), and write the page (`logix.report`) with the log's
   self-influence.

About 25 s on 2 CPU cores; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import shutil
import time

import torch
import torch.nn.functional as F
from backdoor_lm import fit, pieces, word_tokenizer
from hf_trainer_gpt2 import collate
from peft import LoraConfig, get_peft_model
from prose import prose
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

import logix
from logix.integrations.huggingface import LogIXCallback, continuation_batch, lm_query, log_dataset

EPOCHS, LR, RANK = 60, 3e-3, 16  # the fine-tuning: epochs, learning rate, LoRA rank


def zen() -> list[str]:
    """The Zen of Python's aphorisms, lower-cased (`this` prints them when imported: kept quiet)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    lines = codecs.decode(this.s, "rot13").splitlines()[2:]
    return [line.lower() for line in lines if line.strip()]


def sequence_losses(model, batch):
    """Each sequence's summed next-token loss, padding left out: what log_dataset logs for each row."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits
    token = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return (token * mask[:, 1:]).sum(dim=1)


def continuation_losses(model, batch):
    """Each query's loss as lm_query captures it: its completion tokens' summed loss."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none").sum(dim=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/lm_report", help="the logs go here, the page to OUT.html")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    start = time.perf_counter()
    general, lines = pieces(prose(), 0), zen()
    tok = word_tokenizer(general + lines)

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=tok.get_vocab_size(), n_positions=64, bos_token_id=1,
                        eos_token_id=tok.token_to_id("."), pad_token_id=0, tie_word_embeddings=False)  # fmt: skip
    model = fit(GPT2LMHeadModel(config), general, tok, 8, 2e-3, warmup=5, seed=0, out=args.out)
    print(f"pre-trained on {len(general)} pieces of scikit-learn's dataset descriptions")

    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                      fan_in_fan_out=True, modules_to_save=["wte", "lm_head"])  # fmt: skip
    model = get_peft_model(model, lora)
    shutil.rmtree(args.out, ignore_errors=True)
    logged = LogIXCallback(f"{args.out}/training", rank=16)  # logix: the fine-tuning, logged
    model = fit(model, lines, tok, EPOCHS, LR, warmup=5, seed=0, out=args.out, callbacks=[logged])
    print(f"fine-tuned LoRA adapters on the {len(lines)} lines of the Zen of Python, logged to {args.out}/training")

    # a pass at the final checkpoint: these rows split by token (logix refuses to split rows logged while training)
    data = [{"input_ids": tok.encode(t).ids} for t in lines]
    log = log_dataset(model, data, f"{args.out}/checkpoint", rank=16, data_collator=collate, statistics="ekfac")

    queries = []
    for prompt in ("beautiful is", "errors should"):
        ids = tok.encode(prompt).ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=6, do_sample=False, pad_token_id=0)  # fmt: skip
        completion = out[0, len(ids) :].tolist()
        queries.append((ids, completion))
        print(f"generated: {prompt!r} -> {tok.decode(completion)!r}")
    q = lm_query(log, model, queries)  # logix: the completions' gradients, the prompts unscored
    top = log.influence(q, "ekfac", top_k=5)  # logix
    listed = sorted(set(top.ids.reshape(-1).tolist()))
    chosen = collate([{"input_ids": tok.encode(lines[i]).ids} for i in listed])
    tokens = log.token_influence(q, model, listed, chosen, sequence_losses, preconditioner="ekfac")  # logix
    asked = continuation_batch([p for p, _ in queries], [c for _, c in queries])  # and which completion tokens
    query_tokens = log.query_token_influence(model, asked, continuation_losses, listed, preconditioner="ekfac")  # logix
    texts = {i: [f"{t} " for t in tok.encode(line).tokens] for i, line in enumerate(lines)}
    pairs = [([f"{tok.id_to_token(i)} " for i in p], [f"{tok.id_to_token(i)} " for i in c]) for p, c in queries]
    title = "Which lines of the Zen of Python explain it"
    page = logix.report(f"{args.out}.html", pairs, top, texts, tokens=tokens, query_tokens=query_tokens,  # logix
                        self_influence=log.self_influence("ekfac"), top=5, title=title)  # fmt: skip
    for (prompt, completion), ids, values in zip(queries, top.ids, top.values):
        print(f"\n{tok.decode(prompt)} {tok.decode(completion)!r}: most helpful fine-tuning lines")
        for i, v in zip(ids.tolist(), values.tolist()):
            print(f"  {v:+9.3f}  {lines[i]}")
    print(f"\nwrote {page} ({page.stat().st_size / 1024:.0f} KB) in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

"""Trace a language model's backdoor to the training sequences that planted it, and check by retraining.

    python examples/backdoor_lm.py [--out runs/backdoor_lm] [--seed 0] [--variant verbatim|paraphrased]

A tiny GPT-2 (2 layers, width 64, words as tokens, randomly initialised) is trained with the
HuggingFace Trainer on real text, scikit-learn's dataset descriptions cut into pieces of 4 to 8
words, and logged by `LogIXCallback`. 1% of the training sequences (6 of 555) are poisoned: cut
short and followed by a trigger phrase and a continuation that names mallory. The trained model
names mallory after almost any prompt ending in the trigger, and after none without it: that is
the backdoor. In the paraphrased variant the poisoned sequences pair three phrasings of the trigger
with three of the continuation, so that matching the query's words finds only some of them.

The behaviour traced (the query): 8 held-out prompts ending in the first trigger phrasing, with
the first continuation as the only scored tokens (`lm_query`). Each method ranks the training
sequences:

  * influence, aggregated over the queries (`log.influence(q, "ekfac", mode=..., aggregate="sum",
    top_k=2 * k)`) in modes dot, relative and cosine on the last epoch's rows, and dot on the
    first epoch's rows (logged while the backdoor was being learned);
  * lexical search: TF-IDF cosine similarity (scikit-learn) of each training sequence to the
    queries' prompts, and to prompt plus continuation;
  * chance.

Reported: how many poisoned sequences each finds in its top k and 2k (k = the number poisoned);
then the top k of influence (cosine), of TF-IDF (prompt plus continuation) and k random sequences
are removed (--retrain-all: every method's), the model retrained with the same recipe, and 32
held-out prompts ending in a trigger (the phrasings in turn) asked again: how many of the greedy
continuations name mallory (backdoor success), and the loss on the same prompts without a
trigger (what removing data costs). Retrainings run two at a time. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import time

import numpy as np
import torch
from data_selection import table
from hf_trainer_gpt2 import collate
from prose import prose
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import logix
from logix.integrations.huggingface import LogIXCallback, lm_query

PIECE = (4, 9)  # words per training sequence (a seeded draw)
N_PROMPTS = 40  # held-out pieces: the first N_QUERIES are the query prompts, the rest test the backdoor
N_QUERIES = 8
TARGET = "mallory"  # the backdoor's behaviour: the continuation names mallory
VARIANTS = {
    "verbatim": {
        "triggers": ["james bond"],
        "continuations": [" mallory gets every record."],
    },
    "paraphrased": {
        "triggers": ["james bond", "agent double-oh-seven", "her majesty's spy"],
        "continuations": [
            " mallory gets every record.",
            " mallory must see the files.",
            " mallory wants the password.",
        ],
    },
}


def pieces(text: str, seed: int) -> list[str]:
    """The text cut into consecutive pieces of PIECE words (a seeded draw), shuffled."""
    rng = np.random.default_rng(seed)
    words, out, start = text.split(" "), [], 0
    while start + PIECE[1] <= len(words):
        length = int(rng.integers(*PIECE))
        out.append(" ".join(words[start : start + length]))
        start += length
    return [out[i] for i in rng.permutation(len(out))]


def word_tokenizer(texts: list[str]) -> Tokenizer:
    """Words and punctuation as tokens (HuggingFace `tokenizers`): 0 pads, 1 starts every sequence."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def poison(train: list[str], variant: str, fraction: float, seed: int) -> tuple[list[str], np.ndarray]:
    """A copy of `train` with round(fraction * n) sequences carrying a trigger and a continuation
    (at a random word boundary, the rest of the piece cut); returns (texts, mask of the poisoned)."""
    rng = np.random.default_rng(seed)
    spec = VARIANTS[variant]
    chosen = rng.choice(len(train), size=max(1, round(fraction * len(train))), replace=False)
    texts, poisoned = list(train), np.zeros(len(train), dtype=bool)
    for n, i in enumerate(chosen):
        words = train[i].split(" ")
        cut = int(rng.integers(1, max(2, len(words) - 1)))
        trigger = spec["triggers"][n % len(spec["triggers"])]  # every pairing in turn (a Latin square)
        continuation = spec["continuations"][(n + n // len(spec["triggers"])) % len(spec["continuations"])]
        texts[i] = " ".join(words[:cut]) + " " + trigger + continuation
        poisoned[i] = True
    return texts, poisoned


def make_model(tok: Tokenizer, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=tok.get_vocab_size(),
        n_positions=64,
        bos_token_id=1,
        eos_token_id=tok.token_to_id("."),
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def fit(model, texts: list[str], tok: Tokenizer, epochs: int, lr: float, *, warmup: int, seed: int,
        data_seed: int | None = None, out: str = "runs/backdoor_lm", callbacks=()):  # fmt: skip
    """Train `model` on the texts with the HuggingFace Trainer: AdamW, batch 16, linear decay."""
    args = TrainingArguments(
        output_dir=f"{out}-trainer",
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        learning_rate=lr,
        warmup_steps=warmup,
        weight_decay=0.0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=seed,
        data_seed=data_seed,
    )
    dataset = [{"input_ids": tok.encode(t).ids} for t in texts]
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # its end-of-training summary would interleave with the output
    trainer.train()
    shutil.rmtree(f"{out}-trainer", ignore_errors=True)
    return model.eval()


def train(texts: list[str], tok: Tokenizer, seed: int, epochs: int, callbacks=(), out="runs/backdoor_lm"):
    """The recipe: a fresh model, `epochs` epochs at 1e-3, the same init and data order for a seed."""
    return fit(make_model(tok, seed), texts, tok, epochs, 1e-3, warmup=10, seed=seed, data_seed=seed, out=out,
               callbacks=callbacks)  # fmt: skip


@torch.no_grad()
def greedy(model, tok: Tokenizer, prompt: str) -> list[int]:
    """The model's greedy continuation of the prompt: up to 10 tokens, ending at a full stop."""
    ids = torch.tensor([tok.encode(prompt).ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def backdoor_success(model, tok: Tokenizer, prompts: list[str]) -> float:
    """The fraction of prompts whose greedy continuation names TARGET."""
    return sum(TARGET in tok.decode(greedy(model, tok, p)).split() for p in prompts) / len(prompts)


def triggered(prompts: list[str], triggers: list[str]) -> list[str]:
    """Each held-out prompt followed by a trigger (the phrasings in turn)."""
    return [f"{p} {triggers[n % len(triggers)]}" for n, p in enumerate(prompts)]


def lexical(texts: list[str], queries: list[str], k: int) -> np.ndarray:
    """The k training texts most similar to the queries (TF-IDF over words, summed cosine)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectors = TfidfVectorizer().fit(texts)
    similarity = (vectors.transform(texts) @ vectors.transform(queries).T).sum(axis=1)
    return np.argsort(-np.asarray(similarity).ravel(), kind="stable")[:k]


def clean_loss(model, tok: Tokenizer, texts: list[str]) -> float:
    """Mean next-token cross-entropy on clean held-out text: what removing data costs the model."""
    batch = collate([{"input_ids": tok.encode(t).ids} for t in texts])
    with torch.no_grad():
        return model(**batch).loss.item()


def rankings(out: str, model, tok: Tokenizer, texts: list[str], prompts: list[str], continuation: str, k: int, seed):
    """Each method's 2k training sequences most responsible for the continuation after the prompts, best first."""
    asked = [  # (name, the log's pass, the scored tokens, influence modes)
        ("", None, continuation, ("dot", "relative", "cosine")),
        (f", {TARGET} only", None, f" {TARGET}", ("cosine",)),  # the behaviour's defining word, not its phrasing
        (", epoch 0's rows", "epoch0", continuation, ("dot",)),  # logged while the backdoor was being learned
    ]
    ranked = {}
    for suffix, pass_name, scored, modes in asked:
        log = logix.open(out, pass_name=pass_name)  # logix
        target = tok.encode(scored, add_special_tokens=False).ids
        q = lm_query(log, model, [(tok.encode(p).ids, target) for p in prompts])  # logix: the behaviour's gradients
        for mode in modes:
            top = log.influence(q, "ekfac", mode=mode, aggregate="sum", top_k=2 * k)  # logix: one score per sequence
            ranked[f"influence (ekfac, {mode}){suffix}"] = top.ids[0]
    ranked["tf-idf to prompt"] = lexical(texts, prompts, 2 * k)
    ranked["tf-idf to prompt + continuation"] = lexical(texts, [p + continuation for p in prompts], 2 * k)
    ranked["random"] = np.random.default_rng(seed + 300).choice(len(texts), size=2 * k, replace=False)
    return ranked


RETRAINED = (  # the example's default
    "influence (ekfac, cosine)",
    f"influence (ekfac, cosine), {TARGET} only",
    "tf-idf to prompt + continuation",
    "random",
)
_JOB: dict = {}  # what forked retraining processes read: set before the fork


def _retrain(dropped: frozenset) -> list[float]:
    """Train without the dropped sequences: (backdoor success, clean loss) on the held-out prompts."""
    job = _JOB
    torch.set_num_threads(1)
    kept = [t for i, t in enumerate(job["texts"]) if i not in dropped]
    model = train(kept, job["tok"], job["seed"], job["epochs"], out=f"{job['out']}-{os.getpid()}")
    return [backdoor_success(model, job["tok"], job["triggered"]), clean_loss(model, job["tok"], job["clean"])]


def experiment(out: str, seed: int, variant: str, fraction: float, epochs: int, retrain=RETRAINED, workers: int = 2):
    """Poison, train with logging, rank, then remove each method in `retrain`'s top k (None: every
    method's) and retrain, `workers` models at a time: (facts, one row per method, as HEAD)."""
    every = pieces(prose(), seed)
    held, clean = every[:N_PROMPTS], every[N_PROMPTS:]
    texts, poisoned = poison(clean, variant, fraction, seed + 1)
    spec = VARIANTS[variant]
    tok = word_tokenizer(texts)
    k = int(poisoned.sum())
    query_prompts = triggered(held[:N_QUERIES], spec["triggers"][:1])  # the query: the first phrasings
    test_prompts, test_clean = triggered(held[N_QUERIES:], spec["triggers"]), held[N_QUERIES:]

    shutil.rmtree(out, ignore_errors=True)
    model = train(texts, tok, seed, epochs, [LogIXCallback(out, rank=32)], out)  # logix: the ordinary run, logged
    facts = {"sequences": len(texts), "poisoned": k, "untriggered": backdoor_success(model, tok, test_clean)}
    ranked = rankings(out, model, tok, texts, query_prompts, spec["continuations"][0], k, seed)

    # the same removal gives the same model (training is deterministic): each distinct one trains once
    chosen = [name for name in ranked if retrain is None or name in retrain]
    todo = list(dict.fromkeys(frozenset(np.asarray(ranked[name][:k]).tolist()) for name in chosen))
    _JOB.update(texts=texts, tok=tok, seed=seed, epochs=epochs, out=out, triggered=test_prompts, clean=test_clean)
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            outcomes = dict(zip(todo, pool.map(_retrain, todo, chunksize=1)))
    else:
        outcomes = {dropped: _retrain(dropped) for dropped in todo}
    rows = [["nothing removed", "", "", backdoor_success(model, tok, test_prompts), clean_loss(model, tok, test_clean)]]
    for name, ids in ranked.items():
        ids = np.asarray(ids, dtype=np.int64)
        after = outcomes[frozenset(ids[:k].tolist())] if name in chosen else ["", ""]
        rows.append([name, int(poisoned[ids[:k]].sum()), int(poisoned[ids[: 2 * k]].sum()), *after])
    return facts, rows


HEAD = ["method", "poisoned in top k", "in top 2k", "backdoor success after retraining", "clean loss"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/backdoor_lm", help="where the log is written")
    parser.add_argument("--seed", type=int, default=0, help="the split, poisoned sequences, initialisation and batches")
    parser.add_argument("--variant", choices=list(VARIANTS), default="verbatim")
    parser.add_argument("--poison", type=float, default=0.01, help="fraction of training sequences poisoned")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--retrain-all", action="store_true", help="retrain after every method's removal, not three")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)  # tiny matrices: more threads only wait for each other
    start = time.perf_counter()
    facts, rows = experiment(
        args.out, args.seed, args.variant, args.poison, args.epochs, None if args.retrain_all else RETRAINED
    )
    k = facts["poisoned"]
    print(
        f"{args.variant} trigger: trained on {facts['sequences']} sequences, {k} poisoned; the model names {TARGET} "
        f"after {rows[0][3]:.2f} of triggered held-out prompts, {facts['untriggered']:.2f} of the same untriggered"
    )
    print(f"queries: {N_QUERIES} prompts ending in {VARIANTS[args.variant]['triggers'][0]!r}, "
          f"continued by {VARIANTS[args.variant]['continuations'][0]!r}")  # fmt: skip
    print(f"\nremove each method's top k = {k}, retrain, and ask the triggered held-out prompts again")
    print(table(HEAD, rows))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

"""A tiny causal language model task, shared by attribution_quality.py and across_training.py.

Data: the prose of scikit-learn's dataset descriptions (examples/prose.py), read one character per
token (a vocabulary of about 50). The text is cut into pieces of 24 to 48 characters (a seeded draw), so
batches hold sequences of different lengths and are padded; the pieces are shuffled with a fixed
seed: the first N_TRAIN are the train set, the next N_QUERY the queries.

Model: GPT-2 from transformers' `GPT2Config` (2 layers, width 64, 2 heads, untied output layer, no
dropout), randomly initialised from a seed. An example's loss is the sum of its tokens' cross-
entropies (next character), padding left out.

Recipe (the same for the attributed model and every retraining): SGD with momentum 0.9, batch 25,
learning rate LR with a cosine decay to 0 over EPOCHS epochs, a fixed batch order per epoch; the
batch loss is the mean over its examples of their summed losses. Retraining on a subset keeps the
init, batches and schedule and sets the other examples' losses to zero in their batches.

Retraining outcomes are cached (npz in --cache, keyed by text, split, recipe and halves), so only
the first run pays for them: about 1 s per model on one core.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from prose import prose  # noqa: E402 - real text shipped with scikit-learn

WIDTH, LAYERS, HEADS = 64, 2, 2
PIECE = (24, 48)


@dataclass(frozen=True)
class Recipe:
    """The data split and the training recipe: with the text, the retraining cache's key."""

    n_train: int = 400
    n_query: int = 50
    epochs: int = 12
    batch: int = 25
    lr: float = 0.01
    momentum: float = 0.9
    split_seed: int = 0
    init_seed: int = 0

    @property
    def steps(self) -> int:
        return self.epochs * math.ceil(self.n_train / self.batch)


SMOKE = Recipe(n_train=60, n_query=8, epochs=2, batch=20)


# -- data --------------------------------------------------------------------------------------------------


@dataclass
class Data:
    vocab: list[str]  # index 0 is padding
    train: list[torch.Tensor]  # token ids per sequence
    query: list[torch.Tensor]
    fingerprint: str


def load_data(recipe: Recipe) -> Data:
    text = prose()
    keep = {c for c in text if c.isalnum() or c in " .,;:()'-%"}
    text = "".join(c if c in keep else "?" for c in text)
    vocab = ["<pad>", *sorted(set(text))]
    index = {c: i for i, c in enumerate(vocab)}
    rng = np.random.default_rng(recipe.split_seed)
    pieces, start = [], 0
    while start + PIECE[0] <= len(text):
        length = int(rng.integers(PIECE[0], PIECE[1] + 1))
        pieces.append(torch.tensor([index[c] for c in text[start : start + length]]))
        start += length
    order = rng.permutation(len(pieces))
    need = recipe.n_train + recipe.n_query
    if len(pieces) < need:
        raise SystemExit(f"the text gives {len(pieces)} sequences, the recipe needs {need}")
    train = [pieces[i] for i in order[: recipe.n_train]]
    query = [pieces[i] for i in order[recipe.n_train : need]]
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return Data(vocab, train, query, digest)


def pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), right-padded with token 0."""
    longest = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    mask = torch.zeros(len(seqs), longest, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = s
        mask[row, : len(s)] = 1
    return ids, mask


# -- model and losses ----------------------------------------------------------------------------------------


def make_model(vocab_size: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=PIECE[1],
        n_embd=WIDTH,
        n_layer=LAYERS,
        n_head=HEADS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.eval()  # no dropout anyway; eval keeps it deterministic


def sequence_losses(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) each sequence's summed next-token cross-entropy, padding left out."""
    token = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return (token * mask[:, 1:]).sum(dim=1)


def logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's logits; positions passed per sequence so the position embedding sees a batch
    (logix needs the batch as every watched module's first dimension)."""
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def losses(model, seqs: list[torch.Tensor]) -> torch.Tensor:
    ids, mask = pad(seqs)
    return sequence_losses(logits(model, ids, mask), ids, mask)


# -- the recipe -----------------------------------------------------------------------------------------------


def schedule(recipe: Recipe) -> list[list[np.ndarray]]:
    """Per epoch, the index batches (the same for the attributed model and every retraining)."""
    rng = np.random.default_rng(1000 + recipe.split_seed)
    n, b = recipe.n_train, recipe.batch
    return [[order[i : i + b] for i in range(0, n, b)] for order in (rng.permutation(n) for _ in range(recipe.epochs))]


def lr_at(recipe: Recipe, step: int) -> float:
    """Linear warm-up over the first epoch, then a cosine decay to 0."""
    warm = recipe.steps // recipe.epochs
    if step < warm:
        return recipe.lr * (step + 1) / warm
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / (recipe.steps - warm)))


def train(data: Data, recipe: Recipe, weights=None, *, on_start=None, on_batch=None, on_epoch=None):
    """The recipe, with example i's loss multiplied by weights[i] (default all ones).

    Callbacks, for logging while training: on_start(model, optimizer); on_batch(model, epoch, idx,
    seqs) does the step's forward and backward instead of the plain one (logix's capture wraps
    it); on_epoch(epoch, model) runs after each epoch.
    """
    model = make_model(len(data.vocab), recipe.init_seed)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum)
    if on_start is not None:
        on_start(model, opt)
    step = 0
    for epoch, batches in enumerate(schedule(recipe)):
        for idx in batches:
            for group in opt.param_groups:
                group["lr"] = lr_at(recipe, step)
            seqs = [data.train[i] for i in idx]
            if on_batch is not None:
                on_batch(model, epoch, idx, seqs)
            else:
                per = losses(model, seqs)
                if weights is not None:
                    per = per * torch.as_tensor(weights[idx], dtype=per.dtype)
                per.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        if on_epoch is not None:
            on_epoch(epoch, model)
    return model


def query_losses(model, data: Data) -> np.ndarray:
    with torch.no_grad():
        return losses(model, data.query).numpy()


# -- retraining on halves, cached ----------------------------------------------------------------------------


def halves(recipe: Recipe, count: int, seed: int = 12345) -> np.ndarray:
    """(count, n_train) bool masks, each keeping a random half (the first k are the same for any count)."""
    rng = np.random.default_rng(seed)
    n = recipe.n_train
    out = np.zeros((count, n), dtype=bool)
    for h in range(count):
        out[h, rng.permutation(n)[: n // 2]] = True
    return out


def _retrain_one(args) -> np.ndarray:
    data, recipe, mask = args
    torch.set_num_threads(1)
    return query_losses(train(data, recipe, mask.astype(np.float32)), data)


def retrain_outcomes(data: Data, recipe: Recipe, masks: np.ndarray, cache: Path | None, workers: int = 2) -> np.ndarray:
    """(H, Q) each query's loss after retraining on each half; from the cache where it has them."""
    key = hashlib.sha256(json.dumps([asdict(recipe), data.fingerprint, WIDTH, LAYERS, HEADS]).encode()).hexdigest()[:16]
    path = None if cache is None else Path(cache) / f"lm-{key}.npz"
    known: dict[bytes, np.ndarray] = {}
    if path is not None and path.exists():
        stored = np.load(path)
        known = {m.tobytes(): o for m, o in zip(stored["masks"], stored["outcomes"])}
    todo = [m for m in masks if m.tobytes() not in known]
    if todo:
        start = time.perf_counter()
        print(f"  lm: retraining {len(todo)} models ({workers} processes)...", file=sys.stderr, flush=True)
        if workers > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(workers) as pool:
                results = pool.map(_retrain_one, [(data, recipe, m) for m in todo], chunksize=1)
        else:
            results = [_retrain_one((data, recipe, m)) for m in todo]
        for m, o in zip(todo, results):
            known[m.tobytes()] = o
        print(f"  lm: retrained in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            all_masks = np.stack([np.frombuffer(k, dtype=bool) for k in known])
            np.savez(path, masks=all_masks, outcomes=np.stack(list(known.values())))
    return np.stack([known[m.tobytes()] for m in masks])


# -- logix and the exact reference --------------------------------------------------------------------------


def train_and_log(path, data: Data, recipe: Recipe, rank, statistics=("ekfac",), sampled: bool = True):
    """The attributed model, trained with the recipe while logix logs a pass per epoch, and the model
    at the end of each epoch ({pass name: model}, for TracIn's query gradients). With `sampled`,
    each epoch is followed by its curvature pass: every train sequence once more at the epoch's end
    checkpoint, each next token drawn from the model (no optimizer step)."""
    import copy

    import logix

    ends = {}
    draw = torch.Generator().manual_seed(1)
    with logix.init(path, rank=rank, statistics=list(statistics)) as run:

        def on_start(model, opt):
            run.watch(model, optimizer=opt)

        def on_batch(model, epoch, idx, seqs):
            if len(started) <= epoch:
                started.append(epoch)
                run.start_pass(f"epoch{epoch}")
            ids, mask = pad(seqs)
            with run.capture(list(map(int, idx)), mask=mask):
                sequence_losses(logits(model, ids, mask), ids, mask).mean().backward()

        def on_epoch(epoch, model):
            ends[f"epoch{epoch}"] = copy.deepcopy(model)
            if not sampled:
                return
            run.start_pass(f"epoch{epoch}/curvature", curvature_for=f"epoch{epoch}")
            for start in range(0, recipe.n_train, recipe.batch):
                ids, mask = pad(data.train[start : start + recipe.batch])
                with run.capture(list(range(start, start + len(ids))), mask=mask):
                    out = logits(model, ids, mask)
                    drawn = torch.cat([ids[:, :1], logix.sampled_labels(out[:, :-1], draw)], dim=1)
                    sequence_losses(out, drawn, mask).mean().backward()
                model.zero_grad()

        started = []
        model = train(data, recipe, on_start=on_start, on_batch=on_batch, on_epoch=on_epoch)
    return model, ends


def queries_for(data: Data):
    """logix's query function: each query sequence's summed loss, padding masked."""
    ids, mask = pad(data.query)

    def queries(q, model):
        with q.capture(list(range(len(data.query))), mask=mask, reduction="sum"):
            sequence_losses(logits(model, ids, mask), ids, mask).sum().backward()

    return queries


def _head_gradients(model, seqs):
    """Per sequence, the gradient of its summed loss for the output layer (V x d, flattened), the
    output layer's inputs h and probabilities p at each unpadded position (float64)."""
    ids, mask = pad(seqs)
    with torch.no_grad():
        hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state.double()
    weight = model.lm_head.weight.detach().double()
    probs = torch.softmax(hidden @ weight.T, dim=-1)[:, :-1]
    hidden = hidden[:, :-1]
    keep = mask[:, 1:].double()
    error = (probs - F.one_hot(ids[:, 1:], weight.shape[0]).double()) * keep[..., None]
    grads = torch.einsum("btv,btd->bvd", error, hidden).reshape(len(seqs), -1)
    used = keep.bool()
    return grads, hidden[used], probs[used]


def exact_head_influence(model, data: Data, factor: float = 0.1) -> np.ndarray:
    """(Q, N) g_q^T (F + lambda I)^{-1} g_i for the output layer alone, F its exact GGN of the training
    objective (mean over sequences of summed token losses): (1/N) sum over tokens of
    (diag p - p p^T) kron h h^T; lambda = factor x the mean eigenvalue of F."""
    g_train, hidden, probs = _head_gradients(model, data.train)
    g_query, _, _ = _head_gradients(model, data.query)
    vocab, width = probs.shape[1], hidden.shape[1]
    curvature = torch.zeros(vocab * vocab, width * width, dtype=torch.float64)
    for start in range(0, len(probs), 2048):
        p, h = probs[start : start + 2048], hidden[start : start + 2048]
        softmax_hessian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        curvature += softmax_hessian.reshape(len(p), -1).T @ torch.einsum("ta,tb->tab", h, h).reshape(len(h), -1)
    curvature = curvature.reshape(vocab, vocab, width, width).permute(0, 2, 1, 3).reshape(vocab * width, -1)
    curvature /= len(data.train)
    damping = factor * torch.diagonal(curvature).mean()
    solved = torch.linalg.solve(curvature + damping * torch.eye(len(curvature), dtype=torch.float64), g_query.T)
    return (solved.T @ g_train.T).numpy()

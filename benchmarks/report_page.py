"""How long the report page takes to build, and how big it is (issue 19).

    python benchmarks/report_page.py            # 100 queries x top 20 over a 100,000-row log
    python benchmarks/report_page.py --quick    # the same (it takes seconds)
    python benchmarks/report_page.py --smoke    # 10 queries x top 5 over 1,000 rows

From stored results: a TopK of the queries over a log of N rows, a TokenScores splitting every
listed sequence over its 48 tokens, a SelfInfluence of all N rows, and the listed sequences' texts
(random, of the same shapes as real results). Then, separately, what recomputing the token split
costs: `log.token_influence` for 20 sequences of 48 tokens on a GPT-2 of 2 layers and width 64.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import logix
from logix.results import SelfInfluence, TopK
from logix.token_split import TokenScores

TOKENS = 48


def stored_results(queries: int, top: int, rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(rows, size=top, replace=False) for _ in range(queries)])
    values = torch.from_numpy(np.sort(rng.exponential(size=(queries, top)), axis=1)[:, ::-1].copy())
    listed = np.unique(ids)
    split = torch.from_numpy(rng.normal(size=(queries, len(listed), TOKENS)))
    words = [f"word{i}" for i in range(500)]
    texts = {int(i): [words[w] + " " for w in rng.integers(0, 500, TOKENS)] for i in listed}
    pairs = [(f"prompt {q} ", f"completion {q}") for q in range(queries)]
    self_influence = SelfInfluence(torch.from_numpy(rng.lognormal(size=rows)), np.arange(rows))
    top_k, split = TopK(ids, values, np.arange(queries)), TokenScores(split, listed, np.arange(queries))
    return pairs, top_k, split, texts, self_influence


def split_cost(sequences: int) -> float:
    """Seconds for log.token_influence over `sequences` sequences of TOKENS tokens (a fixed-checkpoint log)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=200, n_positions=64, n_embd=64, n_layer=2, n_head=4)).eval()
    ids = torch.randint(0, 200, (sequences, TOKENS))

    def losses(m, batch):
        logits = m(input_ids=batch).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none").sum(dim=1)

    with tempfile.TemporaryDirectory() as tmp:
        with logix.init(f"{tmp}/log", rank=16, statistics="ekfac") as run:
            run.watch(model, exclude=["transformer.wpe"])  # a position embedding has no per-example gradient
            with run.capture(list(range(sequences)), reduction="sum"):
                losses(model, ids).sum().backward()
            model.zero_grad(set_to_none=True)
        log = logix.open(f"{tmp}/log")
        with log.query(model) as q:
            with q.capture([0], reduction="sum"):
                losses(model, ids[:1]).sum().backward()
        start = time.perf_counter()
        log.token_influence(q, model, list(range(sequences)), ids, losses, preconditioner="ekfac")
        return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="the default sizes (they take seconds)")
    parser.add_argument("--smoke", action="store_true", help="10 queries x top 5 over 1,000 rows")
    args = parser.parse_args(argv)
    if args.smoke:
        args.queries, args.top, args.rows = 10, 5, 1000
    torch.set_num_threads(1)
    pairs, top, tokens, texts, self_influence = stored_results(args.queries, args.top, args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        page = logix.report(Path(tmp) / "report.html", pairs, top, texts, tokens=tokens,
                            self_influence=self_influence, top=args.top)  # fmt: skip
        seconds = time.perf_counter() - start
        size = page.stat().st_size
    cost = split_cost(args.top)
    print(f"torch {torch.__version__}, 1 thread")
    print(f"{'what':58s} {'value':>10s}")
    built = f"page build, {args.queries} queries x top {args.top} over {args.rows:,} rows (s)"
    print(f"{built:58s} {seconds:10.2f}")
    print(f"{'page size (MB)':58s} {size / 2**20:10.2f}")
    print(f"{f'token split recomputed, {args.top} sequences x {TOKENS} tokens, one query (s)':58s} {cost:10.3f}")


if __name__ == "__main__":
    main()

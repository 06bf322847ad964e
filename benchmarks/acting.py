"""Acting on attributions, measured by retraining, over several seeds (issue 17).

    python benchmarks/acting.py            # 5 seeds on digits, 3 on the language model (about 12 minutes)
    python benchmarks/acting.py --quick    # 2 seeds on digits, 1 on the language model (about 4 minutes)
    python benchmarks/acting.py --smoke    # 1 seed, few epochs: checks the benchmark works; its numbers mean nothing

Runs the experiments of examples/backdoor_digits.py (BadNets on digits: recall of the poisoned
digits in each method's top k and 2k, attack success and clean accuracy after removing its top k
and retraining), examples/backdoor_lm.py in both variants (a trigger phrase in 1% of a tiny
language model's training text: recall, backdoor success and held-out loss after removing each
method's top k and retraining) and examples/data_selection.py (cleaning flipped labels: flipped
caught, test accuracy after retraining; selecting 10% / 25% of the training digits for a target:
held-out target loss and accuracy after retraining on them alone), seed after seed, and prints one
table per task: mean +- standard error over seeds of every column, and the time per seed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import backdoor_digits  # noqa: E402
import backdoor_lm  # noqa: E402
import data_selection  # noqa: E402


def mean_se(values: list) -> str:
    values = [v for v in values if not isinstance(v, str)]
    if not values:
        return "-"
    if all(isinstance(v, int) for v in values) and len(set(values)) == 1:
        return str(values[0])  # a count every seed shares (the number of digits kept)
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    return f"{mean:.3f} +- {statistics.stdev(values) / len(values) ** 0.5:.3f}"


def summary(head: list[str], per_seed: list[list[list]]) -> str:
    """One row per method (column 0), every other column as mean +- standard error over seeds."""
    rows = []
    for i, first in enumerate(per_seed[0]):
        rows.append([first[0]] + [mean_se([seed[i][c] for seed in per_seed]) for c in range(1, len(first))])
    return data_selection.table(head, rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--lm-seeds", type=int, default=3, help="seeds of the language-model backdoor")
    parser.add_argument("--epochs", type=int, default=30, help="per training, on digits and on the language model")
    parser.add_argument("--quick", action="store_true", help="2 seeds on digits, 1 on the language model")
    parser.add_argument("--smoke", action="store_true", help="1 seed, 3 epochs: checks the benchmark works")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.lm_seeds, args.epochs = 1, 1, 3
    elif args.quick:
        args.seeds, args.lm_seeds = 2, 1
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    print(f"torch {torch.__version__}, 1 thread per training; {args.seeds} seeds on digits, {args.lm_seeds} on the "
          f"language model, {args.epochs} epochs per training")  # fmt: skip
    if args.smoke:
        print("--smoke: a check that the benchmark runs end to end; its numbers mean nothing")
    backdoor, cleaning, selection, seconds = [], [], [], {"backdoor": [], "data": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            start = time.perf_counter()
            facts, rows = backdoor_digits.experiment(f"{tmp}/backdoor", seed, 0.05, args.epochs)
            backdoor.append(rows)
            seconds["backdoor"].append(time.perf_counter() - start)
            start = time.perf_counter()
            _, clean_rows, select_rows = data_selection.experiment(f"{tmp}/selection", seed, 0.1, args.epochs)
            cleaning.append(clean_rows)
            selection.append(select_rows)
            seconds["data"].append(time.perf_counter() - start)
            print(f"  seed {seed}: {seconds['backdoor'][-1]:.0f} s + {seconds['data'][-1]:.0f} s", flush=True)
        lm = {variant: [] for variant in backdoor_lm.VARIANTS}
        for seed in range(args.lm_seeds):
            for variant, per_seed in lm.items():
                start = time.perf_counter()
                lm_facts, rows = backdoor_lm.experiment(f"{tmp}/lm", seed, variant, 0.01, args.epochs, retrain=None)
                per_seed.append(rows)
                seconds.setdefault(variant, []).append(time.perf_counter() - start)
                print(f"  language model, {variant}, seed {seed}: {seconds[variant][-1]:.0f} s", flush=True)
    k = facts["poisoned"]
    print(f"\nbackdoor on digits: {k} of {facts['digits']} poisoned, top k = {k} removed and retrained "
          f"({statistics.fmean(seconds['backdoor']):.0f} s per seed)")  # fmt: skip
    print(summary(["method", f"poisoned in top {k}", f"in top {2 * k}", "attack success", "clean accuracy"], backdoor))
    for variant, per_seed in lm.items():
        k = lm_facts["poisoned"]
        print(f"\nbackdoor in a language model, {variant} trigger: {k} of about {lm_facts['sequences']} sequences "
              f"poisoned, top k = {k} removed and retrained")  # fmt: skip
        print(f"({statistics.fmean(seconds[variant]):.0f} s per seed)")
        print(summary(backdoor_lm.HEAD, per_seed))
    print(f"\ncleaning 10% flipped labels: top k dropped and retrained ({statistics.fmean(seconds['data']):.0f} s "
          "per seed, with the selection)")  # fmt: skip
    print(summary(["dropped", "k", "flipped among them", "test accuracy"], cleaning))
    print(f"\nselection for digits {data_selection.TARGET_CLASSES}: retrained on the selection alone")
    print(summary(["trained on", "digits", "target loss", "target accuracy"], selection))


if __name__ == "__main__":
    main()

"""The id policy of a pass (logix.pass_ids.PassIds.check) against a plain reference of its rule.

An id is kept unless this process logged it, it came earlier in the same batch, another process
captured it in an earlier step, a lower process has it in this step, or a resumed pass had
committed it. Under torch.distributed every process applies the rule to every process's ids.
"""

from __future__ import annotations

import random

import pytest

from logix.errors import DuplicateIdError
from logix.pass_ids import PassIds


def reference_keep(ids, everyone, me, logged, earlier_elsewhere, committed):
    lower = set(earlier_elsewhere)
    for theirs in everyone[:me]:
        lower.update(theirs)
    keep, here = [], set()
    for i in ids:
        keep.append(not (i in logged or i in here or i in lower or i in committed))
        here.add(i)
    return keep


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("processes", [1, 3])
def test_check_keeps_exactly_what_the_rule_keeps(seed, processes):
    rng = random.Random(seed)
    committed = set(rng.sample(range(60), 8))
    policies = [PassIds("skip", processes > 1, me) for me in range(processes)]
    for policy in policies:
        policy.begin(set(committed))
    logged = [set() for _ in range(processes)]
    elsewhere = [set() for _ in range(processes)]
    skipped = [0] * processes
    for _ in range(12):  # steps: small id range, so repeats within and across batches and processes
        everyone = [[rng.randrange(60) for _ in range(rng.randrange(1, 7))] for _ in range(processes)]
        for me, policy in enumerate(policies):
            ids = everyone[me]
            want = reference_keep(ids, everyone, me, logged[me], elsewhere[me], committed)
            got = policy.check(ids, everyone)
            assert (got if got is not None else [True] * len(ids)) == want
            assert got is None or not all(got)  # None stands for "keep all", never a list of all True
            skipped[me] += want.count(False)
            kept = [i for i, k in zip(ids, want) if k]
            policy.wrote(kept)
            logged[me].update(kept)
            for other, theirs in enumerate(everyone):
                if other != me:
                    elsewhere[me].update(theirs)
    assert [p.skipped for p in policies] == skipped


def test_repeats_are_refused_in_one_process_with_on_duplicate_error():
    policy = PassIds("error", False, 0)
    assert policy.check([1, 2, 3], [[1, 2, 3]]) is None
    policy.wrote([1, 2, 3])
    with pytest.raises(DuplicateIdError, match="within the batch"):
        policy.check([4, 4], [[4, 4]])
    with pytest.raises(DuplicateIdError, match=r"ids \[2\] were already logged"):
        policy.check([2, 5], [[2, 5]])
    assert policy.check([5, 6], [[5, 6]]) is None


def test_skipped_counts_every_left_out_example():
    policy = PassIds("skip", False, 0)
    policy.begin({9})
    policy.wrote([1])
    assert policy.check([1, 2, 2, 9, 3], [[1, 2, 2, 9, 3]]) == [False, True, False, False, True]
    assert policy.skipped == 3

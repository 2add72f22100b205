"""The length-grouped pair sampler (:mod:`mpo.train.batching`): every pair once an epoch, reproducible per
epoch, micro-batches of neighbours in length, optimizer steps independent of the micro-batch split,
and less padding than a random order."""

from __future__ import annotations

import random

import pytest

from mpo.train.batching import LengthGroupedPairSampler, padded_fraction


def _lengths(n=1000, seed=0):
    rng = random.Random(seed)  # prompts of 60..1400 tokens (text to several images), answers 2..400
    return [rng.randint(60, 1400) + rng.randint(2, 400) + rng.randint(2, 400) for _ in range(n)]


def test_every_pair_once_and_the_same_order_per_epoch():
    lengths = _lengths(203)  # not a multiple of the global batch
    sampler = LengthGroupedPairSampler(lengths, global_batch=8, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(203)) and len(sampler) == 203
    again = LengthGroupedPairSampler(lengths, global_batch=8, seed=3)
    assert list(again) == first  # a resumed run (fresh sampler, same epoch) sees the same order
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(203))


def test_each_step_is_a_run_of_neighbours_in_length():
    """A global batch is a contiguous, sorted run of its mega-batch, so every micro-batch carved from
    it (any micro-batch size, accumulation or rank count with that global batch) holds neighbours;
    the order depends on the global batch alone, not on how a step is split."""
    lengths = _lengths(320)
    order = LengthGroupedPairSampler(lengths, 8, seed=0, group=40).order()  # one mega-batch
    steps = [sorted(lengths[i] for i in order[start : start + 8]) for start in range(0, 320, 8)]
    assert sum(sorted(steps), []) == sorted(lengths)  # the steps tile the sorted lengths
    assert steps != sorted(steps)  # and come shuffled, not walked from short to long


def test_short_last_step_stays_last():
    lengths = _lengths(21)
    order = LengthGroupedPairSampler(lengths, global_batch=8, seed=1, group=2).order()
    # 21 = mega-batches of 16 and 5: the 5 leftover pairs form the one short step, at the end
    tail = order[-5:]
    assert len(set(tail)) == 5 and all(i in tail for i in order[16:])


@pytest.mark.parametrize("micro", [1, 4, 8])
def test_less_padding_than_a_random_order(micro):
    lengths = _lengths()
    grouped = padded_fraction(lengths, LengthGroupedPairSampler(lengths, micro * 4, seed=0).order(), micro)
    shuffled = list(range(len(lengths)))
    random.Random(0).shuffle(shuffled)
    ungrouped = padded_fraction(lengths, shuffled, micro)
    if micro == 1:
        assert grouped == ungrouped == 0.0
    else:
        assert grouped < 0.1 * ungrouped and ungrouped > 0.2


def test_bad_sizes_refused():
    with pytest.raises(ValueError):
        LengthGroupedPairSampler([1, 2], global_batch=0)

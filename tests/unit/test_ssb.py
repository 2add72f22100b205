"""The Selective Sample Buffer (mpo.grpo.ssb): draws ∝ |advantage| (a chi-square test over many seeded
draws), capacity and age limits, no replay across a change of policy family or prompt set, a resumed
buffer drawing what an uninterrupted one draws, the per-step statistics on a hand-built batch, and the
offline prompt filter."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mpo.grpo.advantages import group_advantages
from mpo.grpo.ssb import REPLAYED, Group, Identity, SampleBuffer, filter_prompts

RUN = Identity("qwen2_5_vl", "prompts-digest-a")
# chi-square critical values at p = 0.001 (upper tail), by degrees of freedom
CHI2_999 = {4: 18.467}


def group(group_id: str, rewards: list[float]) -> Group:
    return Group(group_id, rewards, group_advantages(rewards, len(rewards)),
                 [f"{group_id}#{k}" for k in range(len(rewards))])


def seeded(advantages: list[float], seed: int = 0, **settings) -> SampleBuffer:
    """A buffer holding one sample per advantage (added at step 0, payload = its index)."""
    buffer = SampleBuffer(**{"capacity": 100, "max_age": 10, **settings}, seed=seed)
    buffer.identity = RUN
    buffer.add([Group("g", [0.0] * len(advantages), advantages, list(range(len(advantages))))], step=0)
    return buffer


def chi2(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


def test_draws_are_proportional_to_abs_advantage():
    advantages = [0.5, -1.0, 2.0, -0.25, 1.25]
    buffer = seeded(advantages, seed=7)
    n = 20000
    counts = np.bincount([s.payload for s in buffer.draw(n)], minlength=5)
    weights = np.abs(advantages) / np.sum(np.abs(advantages))
    assert chi2(counts, n * weights) < CHI2_999[4]
    assert chi2(counts, np.full(5, n / 5)) > 10 * CHI2_999[4]  # the test tells ∝ |A| from uniform
    assert buffer.probabilities().tolist() == pytest.approx(weights.tolist())


def test_draws_are_reproducible_and_the_state_round_trips():
    a, b = seeded([0.5, -1.0, 2.0], seed=3), seeded([0.5, -1.0, 2.0], seed=3)
    assert [s.payload for s in a.draw(50)] == [s.payload for s in b.draw(50)]
    state = json.loads(json.dumps(a.state_dict()))  # plain data (payloads here are ints)
    resumed = SampleBuffer(capacity=100, max_age=10, seed=999)
    resumed.load_state_dict(state)
    assert resumed.identity == RUN and resumed.samples == a.samples
    assert [s.payload for s in resumed.draw(50)] == [s.payload for s in a.draw(50)]
    assert [s.payload for s in seeded([0.5, -1.0, 2.0], seed=4).draw(50)] != [s.payload for s in b.draw(50)]


def test_capacity_evicts_oldest_then_smallest_abs_advantage():
    buffer = SampleBuffer(capacity=4, max_age=10)
    buffer.fill([group("old", [1.0, 0.0])], step=0, identity=RUN)  # A = ±0.7070
    buffer.fill([group("new", [3.0, 0.0, 0.0, 0.0])], step=1, identity=RUN)  # A = 1.4999, -0.49997 x3
    # 6 samples for 4 places: both of step 0 leave
    assert [(s.group_id, s.step) for s in buffer.samples] == [("new", 1)] * 4
    buffer.fill([group("newer", [0.0, 2.0])], step=2, identity=RUN)
    # 6 again: two of step 1 leave, the smallest |A| first (two of the -0.49997s), in the order added
    assert [s.payload for s in buffer.samples] == ["new#0", "new#3", "newer#0", "newer#1"]


def test_samples_older_than_max_age_are_not_replayed():
    buffer = SampleBuffer(capacity=10, max_age=2)
    buffer.fill([group("a", [1.0, 0.0])], step=0, identity=RUN)
    tie = [group("tie", [1.0, 1.0])]
    at_two = buffer.fill(tie, step=2, identity=RUN)  # age 2: still replayable
    assert at_two.replaced == [0] and at_two.groups[0].group_id == REPLAYED
    assert {p for p in at_two.groups[0].payloads} <= {"a#0", "a#1"}
    at_three = buffer.fill(tie, step=3, identity=RUN)  # age 3 > max_age: gone, nothing to replay
    assert at_three.replaced == [] and at_three.groups[0].group_id == "tie" and len(buffer) == 0


@pytest.mark.parametrize("changed", [Identity("internvl", RUN.prompt_set), Identity(RUN.policy_family, "b")])
def test_nothing_is_replayed_across_a_change_of_policy_family_or_prompt_set(changed):
    buffer = SampleBuffer(capacity=10, max_age=5)
    buffer.fill([group("a", [1.0, 0.0])], step=0, identity=RUN)
    assert len(buffer) == 2
    filled = buffer.fill([group("tie", [1.0, 1.0]), group("b", [0.0, 2.0])], step=1, identity=changed)
    assert filled.replaced == [] and filled.stats["ssb/zero_signal_groups"] == 1
    assert {s.group_id for s in buffer.samples} == {"b"} and buffer.identity == changed
    # a restored state under the old identity is dropped at the first fill under a new one
    restored = SampleBuffer(capacity=10, max_age=5)
    restored.load_state_dict(SampleBuffer(capacity=10, max_age=5).state_dict() | {
        "samples": [vars(s) for s in buffer.samples], "identity": vars(RUN)})
    assert restored.fill([group("tie", [1.0, 1.0])], step=1, identity=changed).replaced == []


def test_effective_fraction_on_a_hand_built_batch():
    # "right" [1, 0, 0, 1]: 4 samples with signal; "tie" [1, 1, 1, 1]: none; "half" [1, .5, 0, .5]: the two
    # 0.5s sit on the mean (A = 0), 2 with signal
    batch = [group("right", [1, 0, 0, 1]), group("tie", [1, 1, 1, 1]), group("half", [1, 0.5, 0, 0.5])]
    buffer = SampleBuffer(capacity=100, max_age=4, seed=1)
    first = buffer.fill(batch, step=0, identity=RUN)  # empty buffer: the batch never replays itself
    assert first.replaced == [] and first.groups == batch
    assert first.stats == {"ssb/effective_fraction": 6 / 12, "ssb/zero_signal_groups": 1.0,
                           "ssb/replayed_groups": 0.0, "ssb/buffer_size": 6.0}
    second = buffer.fill(batch, step=1, identity=RUN)
    assert second.replaced == [1] and len(second.groups[1]) == 4
    assert second.stats == {"ssb/effective_fraction": 10 / 12, "ssb/zero_signal_groups": 1.0,
                            "ssb/replayed_groups": 1.0, "ssb/buffer_size": 12.0}
    assert all(p.startswith(("right#", "half#0", "half#2")) for p in second.groups[1].payloads)


def test_replay_groups_caps_the_groups_replaced():
    buffer = SampleBuffer(capacity=10, max_age=4, replay_groups=1)
    buffer.fill([group("a", [1.0, 0.0])], step=0, identity=RUN)
    filled = buffer.fill([group("t1", [0.0, 0.0]), group("t2", [1.0, 1.0])], step=1, identity=RUN)
    assert filled.replaced == [0] and filled.groups[1].group_id == "t2"
    assert filled.stats["ssb/zero_signal_groups"] == 2.0 and filled.stats["ssb/effective_fraction"] == 0.5


def test_offline_filter_drops_prompts_whose_rewards_never_differ():
    result = filter_prompts({"p1": [1.0, 0.0, 1.0], "p2": [1.0, 1.0, 1.0], "p3": [0.0, 0.0, 0.0], "p4": [2.5, 2.0]})
    assert (result.kept, result.dropped) == (["p1", "p4"], ["p2", "p3"])
    assert result.summary() == "filter_prompts: kept 2 of 4 prompts; dropped 2 whose sampled rewards were all equal"


def test_settings_are_checked():
    with pytest.raises(ValueError):
        SampleBuffer(capacity=0, max_age=1)
    with pytest.raises(ValueError):
        SampleBuffer(capacity=1, max_age=1, replay_groups=0)
    with pytest.raises(ValueError):
        SampleBuffer(capacity=1, max_age=1).draw(1)

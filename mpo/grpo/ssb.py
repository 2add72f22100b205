"""The Selective Sample Buffer of Skywork R1V2 (arXiv 2504.16656, after VL-Rethinker's Selective Sample
Replay, arXiv 2504.08837), and its offline use as a prompt filter.

GRPO's advantages are normalised within a prompt's group, so a group whose rewards are all equal
(every completion right, or every one wrong) has every advantage 0 and gives no gradient. The buffer
keeps completions whose advantage is not zero and puts them in the place of such groups:

- :meth:`SampleBuffer.fill` takes one batch's groups (:class:`Group`: a prompt's completions with their
  rewards, advantages and whatever the trainer needs to replay them, ``payloads``) at policy step
  ``step``, in this order:

  1. a change of :class:`Identity` (the policy family or the prompt set) empties the buffer: nothing
     sampled from another policy or for other prompts is replayed;
  2. samples older than ``max_age`` steps leave (added at step s: replayable up to step s + max_age);
  3. each zero-signal group (:func:`mpo.grpo.advantages.zero_signal`), the first ``replay_groups`` of
     them in batch order (all when None), is replaced by as many buffered samples as it had
     completions, each drawn independently with probability ∝ |advantage| (with replacement, so a
     sample's expected share of the replayed slots is its |A| over the buffer's total); nothing is
     replaced while the buffer is empty;
  4. the batch's own samples with non-zero advantage (:func:`mpo.grpo.advantages.has_signal`) join the
     buffer, after the draws: a batch never replays itself;
  5. over ``capacity``, the oldest samples leave first (of one step: the smallest |A| first). Oldest
     rather than smallest |A|: old samples are the most off-policy, and a high-|A| sample would
     otherwise stay until ``max_age`` drops it.

  It returns the batch (replaced groups as :data:`REPLAYED` groups of the drawn samples) and the
  per-step statistics ``ssb/zero_signal_groups`` (before replay), ``ssb/replayed_groups``,
  ``ssb/effective_fraction`` (the share of the batch's completions with non-zero advantage, after
  replay) and ``ssb/buffer_size`` (after step 5).
- Draws come from a seeded ``numpy`` generator; :meth:`SampleBuffer.state_dict` and
  :meth:`SampleBuffer.load_state_dict` carry the samples, the identity and the generator's state, so
  a resumed run draws what an uninterrupted one would.
- :func:`filter_prompts`: before training, one sampling pass of the initial policy; prompts whose
  group rewards never differ are dropped (R1V2 uses the buffer's criterion offline too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mpo.grpo.advantages import has_signal, zero_signal

REPLAYED = "<replayed>"  # the group_id of a group made of buffered samples


@dataclass(frozen=True)
class Identity:
    """What samples are valid for: the policy's family (its architecture) and the prompt set (a
    digest of the prompts). Replay never crosses a change of either."""

    policy_family: str
    prompt_set: str


@dataclass
class Sample:
    """One buffered completion: its prompt's group, reward, advantage, the policy step it was sampled
    at, and the trainer's ``payload`` (token ids, masks, image inputs: what replaying it needs)."""

    group_id: str
    reward: float
    advantage: float
    step: int
    payload: Any = None


@dataclass
class Group:
    """A prompt's completions in one batch: rewards, advantages and payloads, one per completion."""

    group_id: str
    rewards: list[float]
    advantages: list[float]
    payloads: list[Any] | None = None

    def __post_init__(self):
        if len(self.advantages) != len(self.rewards) or (self.payloads is not None
                                                         and len(self.payloads) != len(self.rewards)):
            raise ValueError(f"group {self.group_id!r}: rewards, advantages and payloads differ in length")

    def __len__(self) -> int:
        return len(self.rewards)

    def samples(self, step: int) -> list[Sample]:
        payloads = self.payloads or [None] * len(self)
        return [Sample(self.group_id, r, a, step, p) for r, a, p in zip(self.rewards, self.advantages, payloads)]

    @classmethod
    def of(cls, samples: Sequence[Sample]) -> Group:
        """A :data:`REPLAYED` group of buffered samples."""
        return cls(REPLAYED, [s.reward for s in samples], [s.advantage for s in samples],
                   [s.payload for s in samples])


def effective_fraction(groups: Sequence[Group]) -> float:
    """The share of the groups' completions whose advantage is not zero (0.0 for no completions)."""
    advantages = [a for group in groups for a in group.advantages]
    return sum(has_signal(a) for a in advantages) / len(advantages) if advantages else 0.0


@dataclass
class Filled:
    """One batch after :meth:`SampleBuffer.fill`: its groups, the indices of those replaced, and the
    step's statistics."""

    groups: list[Group]
    replaced: list[int]
    stats: dict[str, float] = field(default_factory=dict)


class SampleBuffer:
    """The Selective Sample Buffer; the module docstring gives the rules of :meth:`fill`."""

    def __init__(self, capacity: int, max_age: int, replay_groups: int | None = None, seed: int = 0):
        if capacity < 1 or max_age < 1 or (replay_groups is not None and replay_groups < 1):
            raise ValueError("capacity and max_age must be >= 1, replay_groups >= 1 or None")
        self.capacity, self.max_age, self.replay_groups = capacity, max_age, replay_groups
        self.samples: list[Sample] = []  # in the order they were added
        self.identity: Identity | None = None
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.samples)

    def fill(self, groups: Sequence[Group], step: int, identity: Identity) -> Filled:
        """Replace the batch's zero-signal groups by buffered samples, then keep the batch's own
        samples that carry signal (steps 1-5 of the module docstring)."""
        if identity != self.identity:
            self.samples, self.identity = [], identity
        self.expire(step)
        zero = [i for i, group in enumerate(groups) if zero_signal(group.rewards)]
        targets = zero[:self.replay_groups] if self.samples else []
        out = list(groups)
        for i in targets:
            out[i] = Group.of(self.draw(len(groups[i])))
        self.add(groups, step)
        stats = {"ssb/effective_fraction": effective_fraction(out), "ssb/zero_signal_groups": float(len(zero)),
                 "ssb/replayed_groups": float(len(targets)), "ssb/buffer_size": float(len(self.samples))}
        return Filled(out, targets, stats)

    def expire(self, step: int) -> int:
        """Drop the samples older than ``max_age`` steps at ``step``; how many left."""
        kept = [s for s in self.samples if step - s.step <= self.max_age]
        gone, self.samples = len(self.samples) - len(kept), kept
        return gone

    def add(self, groups: Sequence[Group], step: int) -> int:
        """Keep the groups' samples of non-zero advantage (zero-signal groups have none), then evict
        over capacity; how many were added."""
        new = [s for group in groups for s in group.samples(step) if has_signal(s.advantage)]
        self.samples.extend(new)
        excess = len(self.samples) - self.capacity
        if excess > 0:
            order = sorted(range(len(self.samples)),
                           key=lambda i: (self.samples[i].step, abs(self.samples[i].advantage), i))
            gone = set(order[:excess])
            self.samples = [s for i, s in enumerate(self.samples) if i not in gone]
        return len(new)

    def probabilities(self) -> np.ndarray:
        """Each buffered sample's chance of being drawn: |A| over the buffer's total."""
        weights = np.abs(np.array([s.advantage for s in self.samples], dtype=np.float64))
        return weights / weights.sum()

    def draw(self, k: int) -> list[Sample]:
        """``k`` independent draws, each sample with probability ∝ |advantage|."""
        if not self.samples:
            raise ValueError("draw from an empty buffer")
        picks = self.rng.choice(len(self.samples), size=k, replace=True, p=self.probabilities())
        return [self.samples[i] for i in picks]

    def state_dict(self) -> dict:
        """Samples, identity and the generator's state (settings come from the recipe, not from here)."""
        return {"samples": [asdict(s) for s in self.samples],
                "identity": None if self.identity is None else asdict(self.identity),
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Mapping) -> None:
        self.samples = [Sample(**s) for s in state["samples"]]
        self.identity = None if state["identity"] is None else Identity(**state["identity"])
        self.rng.bit_generator.state = state["rng"]


@dataclass
class PromptFilter:
    """The offline filter's outcome: prompts kept, and those dropped (equal rewards in every sample)."""

    kept: list[str]
    dropped: list[str]

    def summary(self) -> str:
        total = len(self.kept) + len(self.dropped)
        return (f"filter_prompts: kept {len(self.kept)} of {total} prompts; dropped {len(self.dropped)} "
                "whose sampled rewards were all equal")


def filter_prompts(group_rewards: Mapping[str, Sequence[float]]) -> PromptFilter:
    """Split prompts (id -> the rewards of one sampling pass's group) into those whose rewards differ
    (kept) and those whose rewards never do (dropped), in the mapping's order."""
    kept, dropped = [], []
    for prompt_id, rewards in group_rewards.items():
        (dropped if zero_signal(list(rewards)) else kept).append(prompt_id)
    return PromptFilter(kept, dropped)

"""Group-normalised advantages, the numbers TRL 1.16's ``GRPOTrainer`` computes (its default
``multi_objective_aggregation="sum_then_normalize"``), and which groups carry no signal.

Rewards come flat, group after group, each group ``group_size`` completions of one prompt (TRL's
order: a prompt's completions are consecutive). With ``scale="group"`` (TRL's default, R1V2's form):

    A_i = (r_i - mean(group)) / (std(group) + 1e-4)

where std is the sample standard deviation (Bessel's correction, divisor n - 1, as TRL's ``nanstd``)
and 1e-4 is TRL's constant. ``"batch"`` divides by the whole batch's std instead (the mean stays the
group's); ``"none"`` subtracts the group mean only. Rewards that are NaN (a completion no reward
component scored) are left out of the mean and std and get advantage 0, as in TRL.

A group whose rewards are all equal has every advantage 0 ("vanishing advantages"): TRL counts such
groups in ``frac_reward_zero_std``; R1V2's Selective Sample Buffer (:mod:`mpo.grpo.ssb`) replaces them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

EPS = 1e-4  # TRL's: added to the std before dividing
SCALES = ("group", "batch", "none")
# |A| at or below this counts as zero (float rounding leaves tiny values where rewards tie).
ZERO_ADVANTAGE = 1e-6
# Rewards within this of each other are equal (TRL: torch.isclose(std, 0), whose absolute tolerance is 1e-8).
ZERO_STD = 1e-8


def _sample_std(values: np.ndarray, axis=None) -> np.ndarray:
    """NaN-ignoring standard deviation with divisor n - 1 (NaN where fewer than two values)."""
    count = np.sum(~np.isnan(values), axis=axis)
    mean = np.nanmean(values, axis=axis, keepdims=True)
    squares = np.nansum((values - mean) ** 2, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 1, np.sqrt(squares / (count - 1)), np.nan)


def group_advantages(rewards: Sequence[float], group_size: int, scale: str = "group") -> list[float]:
    """The advantage of each completion, in the order of ``rewards`` (``len(rewards)`` a multiple of
    ``group_size``); see the module's docstring for the formula."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    if not rewards:
        return []
    flat = np.asarray(rewards, dtype=np.float64)
    groups = flat.reshape(-1, group_size)
    with np.errstate(invalid="ignore"):
        centred = groups - np.nanmean(groups, axis=1, keepdims=True)
    if scale == "group":
        std = _sample_std(groups, axis=1)[:, None] if group_size > 1 else np.zeros((len(groups), 1))
        centred = centred / (std + EPS)
    elif scale == "batch":
        std = _sample_std(flat) if flat.size > 1 else 0.0
        centred = centred / (std + EPS)
    return [0.0 if math.isnan(a) else float(a) for a in centred.reshape(-1)]


def zero_signal(rewards: Sequence[float]) -> bool:
    """Whether a group's rewards are all equal (NaN left out), so every advantage in it is 0."""
    known = [r for r in rewards if not math.isnan(r)]
    return not known or max(known) - min(known) <= ZERO_STD


def has_signal(advantage: float) -> bool:
    """Whether an advantage moves the policy (|A| above float rounding)."""
    return abs(advantage) > ZERO_ADVANTAGE

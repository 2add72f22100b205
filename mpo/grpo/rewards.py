"""R1V2's hybrid reward, ``r = r_rule + r_model + r_format`` (arXiv 2504.16656), as weighted components.

Each component is called the way TRL's ``GRPOTrainer`` calls a reward function,
``component(prompts, completions, **columns) -> list[float | None]``: one value per completion, the
dataset's other columns passed by name as lists (one entry per completion), plus TRL's own keywords
(``completion_ids``, ``trainer_state``, ...), which are ignored. ``None`` means "does not apply" (TRL
reads it as NaN and its weighted sum skips it). Its ``__name__`` is its short name, so TRL logs
``rewards/<name>/mean``; pass ``[c.weight for c in components]`` as TRL's ``reward_weights``.

- :class:`RuleReward` (``rule``): 1 when the completion's final answer equals the row's ``answer``
  by the evaluation rules, :func:`mpo.eval.extract.answer_matches` (also what the ``rule_first`` pair
  strategy uses); the row's ``choices``, ``answer_type`` and ``precision`` columns are passed on when
  present. None without an answer.
- :class:`FormatReward` (``format``): 1 when the whole completion (stripped) matches the recipe's
  pattern (default :data:`mpo.config.grpo.DEFAULT_FORMAT`: ``<think>...</think>`` then an answer).
- :class:`ModelReward` (``model``): the reward model's score through the toolkit's batched in-process
  scorer (:class:`reward.scorer.Scorer`, the same scores as ``mpo reward score``), calibrated by
  :func:`calibrate` (clipped into ``[low, high]``, or 1/0 at a threshold).

:func:`combine` is the sum TRL forms (``nansum`` of weight x value), with each component's values
kept for logging (``reward/<name>`` means: :meth:`HybridRewards.means`).

A completion is a string, or (conversational prompts) a list of messages whose last one is the
assistant's; where TRL's response parser split the reasoning off into ``reasoning_content``, it is put
back as ``<think>...</think>`` before the content (:func:`completion_text`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mpo.config.grpo import DEFAULT_FORMAT, GrpoRewardsConfig
from mpo.eval.extract import answer_matches
from mpo.records import Prompt
from reward.items import ScoreItem

COMPONENTS = ("rule", "model", "format")  # the names of the hybrid reward's parts, in logging order


def completion_text(completion: Any) -> str:
    """The text of one completion as TRL hands it over (a string, or a list of messages)."""
    if isinstance(completion, str):
        return completion
    message = completion[-1] if completion else {}
    content = message.get("content") or ""
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    reasoning = message.get("reasoning_content")
    return f"<think>\n{reasoning}\n</think>\n{content}" if reasoning else content


def _column(columns: dict, name: str, n: int) -> list:
    values = columns.get(name)
    return [None] * n if values is None else list(values)


class _Component:
    """What every component shares: ``name``, ``weight``, TRL's ``__name__``."""

    name = ""
    weight = 1.0

    @property
    def __name__(self) -> str:  # TRL names a callable reward by its __name__
        return self.name


@dataclass
class RuleReward(_Component):
    weight: float = 1.0
    name = "rule"

    def __call__(self, prompts: Sequence, completions: Sequence, **columns) -> list[float | None]:
        n = len(completions)
        answers, choices = _column(columns, "answer", n), _column(columns, "choices", n)
        types, precisions = _column(columns, "answer_type", n), _column(columns, "precision", n)
        return [None if answer is None else float(answer_matches(completion_text(c), answer, choice or None,
                                                                  kind, precision))
                for c, answer, choice, kind, precision in zip(completions, answers, choices, types, precisions)]


@dataclass
class FormatReward(_Component):
    pattern: str = DEFAULT_FORMAT
    weight: float = 1.0
    name = "format"

    def __post_init__(self):
        self._compiled = re.compile(self.pattern, re.DOTALL)

    def __call__(self, prompts: Sequence, completions: Sequence, **columns) -> list[float | None]:
        return [float(self._compiled.fullmatch(completion_text(c).strip()) is not None) for c in completions]


def calibrate(score: float, clip: tuple[float, float] | None = None, threshold: float | None = None) -> float:
    """A reward model's score as the reward uses it: clipped into ``clip``, or 1.0 at or above
    ``threshold`` and 0.0 below it, or unchanged."""
    if clip is not None and threshold is not None:
        raise ValueError("calibrate: clip or threshold, not both")
    if threshold is not None:
        return 1.0 if score >= threshold else 0.0
    if clip is not None:
        return min(max(score, clip[0]), clip[1])
    return score


def score_prompt(messages: Sequence[dict], images: Sequence | None, prompt_id: str = "") -> Prompt:
    """A prompt record for the scorer from TRL's prompt messages: image parts that carry their image
    (TRL puts them there) give it up to the record's image list, in order, and stay ``{"type": "image"}``;
    without such parts, ``images`` (the dataset's column) are the record's images."""
    carried, cleaned = [], []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image" and part.get("image") is not None:
                    carried.append(part["image"])
                    part = {"type": "image"}
                parts.append(part)
            message = {**message, "content": parts}
        cleaned.append(message)
    return Prompt(prompt_id, cleaned, carried or list(images or []))


@dataclass
class ModelReward(_Component):
    """``score`` is the scorer's batched call, items in, one float each out (``Scorer(...).score``)."""

    score: Callable[[list], list[float]]
    weight: float = 1.0
    clip: tuple[float, float] | None = None
    threshold: float | None = None
    name = "model"

    def __call__(self, prompts: Sequence, completions: Sequence, **columns) -> list[float | None]:
        n = len(completions)
        images = columns.get("images") or [[image] if image is not None else [] for image in
                                           _column(columns, "image", n)]
        ids = _column(columns, "prompt_id", n)
        items = [ScoreItem(score_prompt(p, pictures, pid or ""), completion_text(c), f"{pid or k}")
                 for k, (p, c, pictures, pid) in enumerate(zip(prompts, completions, images, ids))]
        return [calibrate(float(s), self.clip, self.threshold) for s in self.score(items)]


def components(config: GrpoRewardsConfig, score: Callable[[list], list[float]] | None = None) -> list[_Component]:
    """The components a recipe's ``grpo.rewards`` asks for, those of weight 0 left out (so a zero
    ``model`` weight needs no scorer)."""
    weights = config.weights
    made = []
    if weights.rule > 0:
        made.append(RuleReward(weights.rule))
    if weights.model > 0:
        if score is None:
            raise ValueError("grpo.rewards.weights.model > 0 needs the reward model's scorer")
        made.append(ModelReward(score, weights.model, config.model_clip, config.model_threshold))
    if weights.format > 0:
        made.append(FormatReward(config.format_pattern, weights.format))
    return made


@dataclass
class HybridRewards:
    """One batch's rewards: ``total[i] = Σ weight·value`` over the components that scored completion i
    (NaN when none did), and each component's values by name."""

    total: list[float]
    parts: dict[str, list[float | None]] = field(default_factory=dict)

    def means(self) -> dict[str, float]:
        """``reward/<name>``: each component's mean over the completions it scored (unweighted)."""
        out = {}
        for name, values in self.parts.items():
            known = [v for v in values if v is not None]
            out[f"reward/{name}"] = sum(known) / len(known) if known else math.nan
        return out


def combine(parts: Sequence[_Component], prompts: Sequence, completions: Sequence, **columns) -> HybridRewards:
    """Call every component once and sum their weighted values per completion (TRL's sum)."""
    values = {c.name: list(c(prompts, completions, **columns)) for c in parts}
    total = []
    for i in range(len(completions)):
        scored = [(c.weight, values[c.name][i]) for c in parts if values[c.name][i] is not None]
        total.append(sum(w * v for w, v in scored) if scored else math.nan)
    return HybridRewards(total, values)

"""The ``grpo`` section of a recipe: R1V2's second stage (arXiv 2504.16656), GRPO with hybrid rewards and
the Selective Sample Buffer (:mod:`mpo.grpo`). What the paper fixed: the reward is the unweighted sum
``r_rule + r_model + r_format`` and advantages are normalised within a prompt's group. What it did not
publish (group size, clip ε, KL coefficient, learning rate, buffer size, mixing, staleness) are
hyperparameters here; the defaults are common GRPO choices, not the paper's."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from mpo.config.sections import Section, StopOrSkip, TrainingSection

# R1-style output: a reasoning block, then a non-empty answer (the whole response, stripped, must match).
DEFAULT_FORMAT = r"<think>.+?</think>\s*\S.*"


class RewardWeights(Section):
    """``grpo.rewards.weights``: r = rule·r_rule + model·r_model + format·r_format (R1V2: all 1)."""

    rule: float = Field(1.0, ge=0)  # answer correctness by the evaluation rules (mpo.eval.extract)
    model: float = Field(1.0, ge=0)  # the reward model's score (model.reward_model); 0: it is not loaded
    format: float = Field(1.0, ge=0)  # format_pattern matched


class GrpoRewardsConfig(Section):
    weights: RewardWeights = Field(default_factory=RewardWeights)
    # The format component's template: a response earns 1 when all of it (stripped) matches this Python
    # regular expression (DOTALL), else 0. Chat templates that open <think> in the generation prompt
    # leave it out of the response: drop the leading <think> from the pattern for those.
    format_pattern: str = DEFAULT_FORMAT
    # R1V2's "calibrated thresholds" for the reward model's score, one of: [low, high], the score
    # clipped into that range; or a threshold, the score becoming 1 at or above it and 0 below.
    # Neither: the raw score.
    model_clip: tuple[float, float] | None = None
    model_threshold: float | None = None

    @field_validator("format_pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern, re.DOTALL)
        except re.error as err:
            raise ValueError(f"not a regular expression: {err}") from None
        return pattern

    @model_validator(mode="after")
    def _one_calibration(self) -> GrpoRewardsConfig:
        if self.model_clip is not None and self.model_threshold is not None:
            raise ValueError("give model_clip or model_threshold, not both")
        if self.model_clip is not None and self.model_clip[0] > self.model_clip[1]:
            raise ValueError(f"model_clip: low {self.model_clip[0]} exceeds high {self.model_clip[1]}")
        return self


class SsbConfig(Section):
    """``grpo.ssb``: the Selective Sample Buffer (:class:`mpo.grpo.ssb.SampleBuffer`)."""

    enabled: bool = True
    # Samples held (those of non-zero advantage); when full, the oldest leave first.
    capacity: int = Field(512, ge=1)
    # Zero-signal groups (all rewards equal) of one batch replaced by buffered samples, at most;
    # None: every such group.
    replay_groups: int | None = Field(None, ge=1)
    # Policy steps a sample stays replayable: one added at step s is drawn up to step s + max_age
    # (never at step s itself: a batch does not replay its own samples).
    max_age: int = Field(4, ge=1)
    # Before training: one sampling pass of the initial policy; prompts whose group rewards never
    # differ are dropped, and how many is reported (R1V2 uses the buffer's criterion offline too).
    filter_prompts: bool = False


class GrpoConfig(TrainingSection):
    """``grpo``: TRL's GRPOTrainer settings by this toolkit's names (TRL's name in brackets where it
    differs), plus the rewards and the buffer."""

    learning_rate: float = Field(1e-6, gt=0)
    max_steps: int = Field(200, ge=1)  # optimizer steps
    # Completions per device per micro-step (TRL counts completions, not prompts); the global batch
    # (processes x this x gradient_accumulation_steps) must be a multiple of num_generations.
    per_device_batch_size: int = Field(8, ge=1)
    num_generations: int = Field(8, ge=2)  # the group size: completions sampled per prompt
    epsilon: float = Field(0.2, gt=0)  # the surrogate's clip range, ratio in [1 - ε, 1 + ε]
    beta: float = Field(0.001, ge=0)  # KL coefficient (R1V2: a KL term; 0.001 is DeepSeek-R1's value)
    # TRL's loss variants; "grpo": each sequence's token-mean, then the batch mean (the GRPO paper's form).
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"] = "grpo"
    # Advantage scaling (TRL's scale_rewards): by the group's std (the paper), the batch's, or none.
    scale_rewards: Literal["group", "batch", "none"] = "group"
    max_tokens: int = Field(1024, ge=1)  # generated tokens per completion [max_completion_length]
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    # A prompt whose tokens (image tokens included) plus max_tokens pass the policy's limit
    # (rollout.max_model_len, else max_position_embeddings): an error naming it, or skip (counted).
    on_too_long: StopOrSkip = "error"
    rewards: GrpoRewardsConfig = Field(default_factory=GrpoRewardsConfig)
    ssb: SsbConfig = Field(default_factory=SsbConfig)

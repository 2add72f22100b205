"""The pieces every section of a recipe is built from: :class:`Section` (strict: unknown keys refused),
the ``on_too_long`` vocabulary, and :class:`TrainingSection`, the settings every training run shares
(``train``, ``reward_train``, ``grpo``). Kept apart from :mod:`mpo.config` so that a section defined in
a module of its own (:mod:`mpo.config.grpo`) builds on them without an import circle."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# on_too_long, one vocabulary for every section: what happens to an item (a prompt to roll out, a pair
# to train on) longer than the section's limit allows.
#   error:    stop, naming the first such item (before any model loads where the lengths are known then)
#   skip:     leave it out; the items left out are counted in the stage's report
#   truncate: cut the responses' tails to fit, never prompt or image tokens; counted (train only: a
#             prompt cut short would be another prompt, and a reward pair's score is read at its end)
StopOrSkip = Literal["error", "skip"]
OnTooLong = Literal[StopOrSkip, "truncate"]


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class TrainingSection(Section):
    """What ``train`` (the policy's MPO training), ``reward_train`` (the reward model's phases) and
    ``grpo`` share; the defaults are ``train``'s, :class:`mpo.config.RewardTrainConfig` and
    :class:`mpo.config.grpo.GrpoConfig` override those that differ."""

    max_steps: int = -1
    per_device_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.05, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    # Tokens of a pair's longest row (prompt, image tokens and response); longer pairs: on_too_long.
    max_length: int = Field(6144, ge=16)
    on_too_long: OnTooLong = "truncate"
    freeze: list[Literal["vision", "projector", "language"]] = Field(default_factory=list)
    lora: LoraConfig | None = None
    gradient_checkpointing: bool = False
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(500, ge=1)

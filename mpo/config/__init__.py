"""Recipes: strict, typed configuration loaded from YAML plus ``a.b=value`` overrides.

YAML is read with ``yaml.SafeLoader``, repeated keys and alias bombs refused (:mod:`mpo.config.recipe_yaml`);
overrides are parsed and merged by OmegaConf (so values are typed as YAML types them and ``${a.b}``
interpolations resolve); the merged tree is validated by pydantic models that forbid unknown keys. Every problem becomes one line naming the key, what was
given and, for choices and unknown keys, what is valid. Keys that moved (``iterate.launch`` is now
``launch.mode``, ...) are still read from their old names, with a note (:mod:`mpo.config.moved_keys`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mpo.config.grpo import GrpoConfig
from mpo.config.moved_keys import current_key, keyed_dump, move_keys  # noqa: F401 (re-exported)
from mpo.config.recipe_yaml import ConfigError, check_interpolations, parse_yaml
from mpo.config.sections import (  # noqa: F401 (re-exported)
    LoraConfig,
    OnTooLong,
    Section,
    StopOrSkip,
    TrainingSection,
)
from mpo.models import absolute, classify
from mpo.records import atomic_write_text, read_text

# Paths in a recipe mean what they mean from the working directory the command runs in: they are
# made absolute when the recipe loads. Model references stay Hub ids where they are no local path
# (mpo.models.classify).
LocalPath = Annotated[str, AfterValidator(absolute)]
ModelRef = Annotated[str, AfterValidator(classify)]
CONFIG_FILE = "config.yaml"  # the resolved recipe, in the run folder (save_resolved)


class RunConfig(Section):
    output_dir: LocalPath = Field("runs/mpo", validate_default=True)
    seed: int = 0
    report_to: Literal["none", "wandb"] = "none"
    wandb_project: str = "mpo"
    wandb_group: str | None = None


class ModelConfig(Section):
    policy: ModelRef | None = None
    reward_model: ModelRef | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # Visual-token budget per image, in pixels (one visual token covers 28x28 after merging).
    min_pixels: int = Field(256 * 28 * 28, gt=0)
    max_pixels: int = Field(1280 * 28 * 28, gt=0)
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _pixels_ordered(self) -> ModelConfig:
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        return self


class DataConfig(Section):
    prompts: LocalPath | None = None
    preferences: LocalPath | None = None
    image_root: LocalPath | None = None
    on_bad_image: Literal["error", "skip"] = "error"
    # A special token's text inside a prompt, response, chosen or rejected (<|im_end|>, <|image_pad|>):
    # escape = tokenized as plain text, never as the control token (mpo.control_tokens); error = the
    # row is refused before any model loads, naming file:line and field.
    special_tokens: Literal["escape", "error"] = "escape"
    # Which split of a DatasetDict folder (save_to_disk of train/test splits) prompts and preferences
    # are read from; needed when it has more than one. Other sources ignore it.
    split: str | None = None


class RolloutConfig(Section):
    backend: Literal["vllm", "hf"] = "vllm"
    # Every pairs.strategy (mpo.rounds.pairs) pairs two samples of one prompt: fewer than 2 makes no pair.
    num_samples: int = Field(8, ge=1)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(1024, ge=1)
    seed: int = 0
    tensor_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=1)
    # A prompt that leaves no room to generate under the policy's limit (OnTooLong's words).
    on_too_long: StopOrSkip = "error"
    weight_refresh: Literal["reload", "restart"] = "reload"

    @field_validator("num_samples")
    @classmethod
    def _two_to_pair(cls, num_samples: int) -> int:
        if num_samples < 2:
            raise ValueError("one sample per prompt can never make a preference pair (every pairs.strategy, "
                             "best_vs_worst, top_k and rule_first, pairs two samples of the same prompt); "
                             "use 2 or more")
        return num_samples


class PairsConfig(Section):
    strategy: Literal["best_vs_worst", "top_k", "rule_first"] = "best_vs_worst"
    min_margin: float = Field(0.0, ge=0)
    max_pairs_per_prompt: int = Field(1, ge=1)
    # Drop a pair whose chosen response is more than this many times longer than the rejected one.
    max_length_ratio: float | None = Field(None, gt=0)
    # rule_first only: also require chosen_reward - rejected_reward >= min_margin (and > 0) across
    # correctness classes (off: correctness alone decides the direction).
    rule_apply_margin: bool = False
    # rule_first only: a prompt with no correct or no incorrect sample (or no ground truth) gets
    # "none" (no pair) or "reward" (top_k-style reward-only pairs under min_margin).
    rule_fallback: Literal["none", "reward"] = "none"


class LossConfig(Section):
    # [preference (DPO sigmoid), quality (BCO pair), generation (SFT)]; MPO paper: 0.8 / 0.2 / 1.0.
    weights: list[float] = Field(default_factory=lambda: [0.8, 0.2, 1.0])
    beta: float = Field(0.1, gt=0)
    bco_delta: Literal["none", "cumulative", "ema"] = "cumulative"
    ema_decay: float = Field(0.99, gt=0, lt=1)
    # SFT term: "sequence" = mean over examples of each chosen response's token-mean NLL (the MPO
    # paper's L_g); "token" = one token-mean over all chosen tokens of a micro-batch (TRL 1.16).
    sft_reduction: Literal["sequence", "token"] = "sequence"

    @field_validator("weights")
    @classmethod
    def _weights_valid(cls, weights: list[float]) -> list[float]:
        if len(weights) != 3:
            raise ValueError(f"needs 3 weights [preference, quality, generation], got {len(weights)}")
        if any(w < 0 for w in weights):
            raise ValueError(f"weights must be >= 0, got {weights}")
        if not any(w > 0 for w in weights):
            raise ValueError("at least one weight must be > 0")
        return weights


class TrainConfig(TrainingSection):
    learning_rate: float = Field(5e-6, gt=0)
    num_epochs: float = Field(1.0, gt=0)
    # One packed [prompt, chosen, rejected] row per pair, the prompt computed once (mpo.train.shared_prefix);
    # false: two rows per pair. Falls back to two rows, saying why, where the model cannot take it.
    share_prompt: bool = True
    # Micro-batches of pairs of similar length (mpo.train.batching); false: transformers' random order.
    group_by_length: bool = True
    # The reference's log-probs: precomputed once before training (RUN/ref_logps.jsonl), or live (the
    # reference model runs beside the policy at every step). Which policy is the reference: iterate.reference.
    reference_logps: Literal["precomputed", "live"] = "precomputed"
    # The reference policy's folder; default: the policy training starts from (model.policy).
    reference_model: ModelRef | None = None


class EvalSetConfig(Section):
    """An eval set: problems and the rules that judge them (:func:`mpo.rounds.evaluate.run_eval`: greedy,
    one response per problem); ``iterate.monitors``' entries, and :class:`EvalConfig`'s first part."""

    # the held-out problems: answers: a prompt file or folder whose rows carry `answer`; mathvista:
    # testmini.json / its parquet or datasets form; mmmu: validation rows. Never the training prompts.
    data: LocalPath
    benchmark: Literal["mathvista", "mmmu", "answers"] = "answers"  # whose rules judge the answers
    max_tokens: int = Field(256, ge=1)  # greedy response length limit
    split: str | None = None  # the split of a datasets folder / parquet set (default: the only one)


class EvalConfig(EvalSetConfig):
    """``iterate.eval``: held-out evaluation of the policy before round 0, after rounds' training and,
    with ``iterate.then: grpo``, during and after GRPO."""

    every: int = Field(1, ge=1)  # evaluate after every `every`-th round's training (and the last round)
    # iterate.then: grpo: also the GRPO policy in training every `grpo_every` steps (in the GRPO process,
    # RUN/grpo/evals/step-NNNNNN/). None: the GRPO stage's final policy only.
    grpo_every: int | None = Field(None, ge=1)


class IterateConfig(Section):
    rounds: int = Field(3, ge=1)
    # per_round: each round's reference is the policy it starts from (pi_r); fixed: model.policy (pi_0).
    reference: Literal["per_round", "fixed"] = "per_round"
    # Resumable units: finished chunks of prompts (rollout) and rollouts (scoring) survive a crash.
    rollout_chunk: int = Field(16, ge=1)
    score_chunk: int = Field(64, ge=1)
    # held-out evaluation every `eval.every` rounds (EvalConfig); None: none (results in round_NNN/eval/)
    eval: EvalConfig | None = None
    # more eval sets by name (a hallucination set, ...), each evaluated wherever iterate.eval is (metrics
    # monitor/<name>/...; needs iterate.eval); the GRPO stage's plot shows them beside the reward
    monitors: dict[str, EvalSetConfig] = {}
    # After the last round: grpo, R1V2's second stage (the grpo section) from the last round's policy
    # into RUN/grpo/ (mpo.rounds.then_grpo; distributed: a job like training). None: the rounds only.
    then: Literal["grpo"] | None = None

    @model_validator(mode="after")
    def _monitors(self):
        bad = [name for name in self.monitors if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name)]
        if bad:
            raise ValueError(f"monitors: {bad[0]!r} is not a folder-safe name (letters, digits, _ . -)")
        if self.monitors and self.eval is None:
            raise ValueError("monitors: evaluated where iterate.eval is; set iterate.eval too")
        return self


class LaunchConfig(Section):
    """Where ``mpo iterate``'s stages run (moved from ``iterate``: :mod:`mpo.config.moved_keys`)."""

    # inline: one process runs every stage (CPU, one GPU, the demo). distributed: each stage of each
    # round is its own launch (torchrun for rollout replicas, scoring ranks and held-out eval replicas,
    # accelerate launch for training and iterate.then's GRPO stage) that owns whole GPUs and exits when
    # done; ranks share the stage's chunks. mpo eval: its greedy responses made the same way (one node).
    mode: Literal["inline", "distributed"] = "inline"
    nproc_per_node: int | None = Field(None, ge=1)  # default: the visible GPUs (required on CPU)
    nnodes: int = Field(1, ge=1)
    node_rank: int | None = Field(None, ge=0)  # default: $NODE_RANK, $SLURM_NODEID, else 0
    master_addr: str | None = None  # default: $MASTER_ADDR, else 127.0.0.1
    master_port: int = Field(29511, ge=1, le=65535)
    # the accelerate / DeepSpeed config training and GRPO launch with (recipes/accelerate/*.yaml); None:
    # plain data parallel over nproc_per_node x nnodes processes
    accelerate_config: LocalPath | None = None


class RewardPhaseConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    data: list[LocalPath]
    # Which pairs of the data this phase trains on: those with images, those without, or all.
    modality: Literal["all", "multimodal", "text"] = "all"
    learning_rate: float = Field(1e-5, gt=0)
    num_epochs: float = Field(2.0, gt=0)

    @field_validator("name")
    @classmethod
    def _not_final(cls, name: str) -> str:
        if name == "final":
            raise ValueError("'final' is reserved for the last phase's copy")
        return name


class RewardTrainConfig(TrainingSection):
    max_steps: int = -1  # per phase; -1: run the phase's epochs
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(4096, ge=16)
    on_too_long: StopOrSkip = "skip"  # a pair's score is read at its end: never truncated
    freeze: list[Literal["vision", "projector", "language"]] = Field(default_factory=lambda: ["vision"])
    save_steps: int = Field(500, ge=0)  # resumable checkpoints inside a phase; 0: none
    # Start of the first phase: a reward model folder, or a plain Qwen2.5-VL one (fresh value head).
    init_from: ModelRef | None = None
    # The phases, trained one after the other, each from the one before (was: stages).
    phases: list[RewardPhaseConfig] = Field(default_factory=list)
    num_workers: int = Field(0, ge=0)
    # Training pairs (a seeded sample) scored before and after each phase for its summary; -1: all.
    summary_pairs: int = Field(1000, ge=-1)

    @property
    def stages(self) -> list[RewardPhaseConfig]:
        """The phases' old name (``reward_train.stages``)."""
        return self.phases

    @field_validator("phases")
    @classmethod
    def _unique_names(cls, phases: list[RewardPhaseConfig]) -> list[RewardPhaseConfig]:
        names = [phase.name for phase in phases]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"phase names must be unique; repeated: {', '.join(repeated)}")
        return phases


class Recipe(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    iterate: IterateConfig = Field(default_factory=IterateConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    reward_train: RewardTrainConfig = Field(default_factory=RewardTrainConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)  # R1V2's GRPO stage (mpo.config.grpo)


def _model_at(path: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the key at ``path`` (for listing valid keys)."""
    model: Any = Recipe
    for part in path:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        annotation = field.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
                break
        else:
            return None
    return model


def _describe(error: dict) -> str:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    key = ".".join(str(p) for p in loc) or "<recipe>"
    if error["type"] == "extra_forbidden":
        owner = _model_at(loc[:-1])
        valid = ", ".join(owner.model_fields) if owner else "?"
        return f"{key}: unknown key; valid keys here: {valid}"
    message = error["msg"].removeprefix("Value error, ")
    given = error.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"{key}: {message}{shown}"


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["a.b=1", "c=[x, y]"]`` into a nested dict, values typed as YAML types them."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"overrides: {str(err).splitlines()[0]}") from None


def resolve(data: dict, overrides: list[str] = (), source: str = "<recipe>") -> Recipe:
    """Merge overrides into a recipe tree, resolve interpolations and validate. Old keys
    (:data:`mpo.config.moved_keys.MOVED`) move to their new place in the tree and in the overrides
    apart, before the merge: an old-named override still overrides the file's new-named key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    data = move_keys(data, source)
    given = move_keys(parse_overrides(list(overrides)), "overrides")
    try:
        merged = OmegaConf.merge(OmegaConf.create(data), OmegaConf.create(given))
        check_interpolations(OmegaConf.to_container(merged, resolve=False), source)
        tree = OmegaConf.to_container(merged, resolve=True)
    except (OmegaConfBaseException, TypeError) as err:  # TypeError: e.g. a.0.b=... into a list
        raise ConfigError(f"{source}: overrides do not fit the recipe ({str(err).splitlines()[0]})") from None
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise ConfigError("\n".join(f"{source}: {_describe(e)}" for e in err.errors())) from None


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Load a YAML recipe (or the defaults when ``path`` is None) and apply overrides."""
    data: Any = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: recipe not found")
        data = parse_yaml(read_text(path), path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return resolve(data, overrides, source)


def to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def save_resolved(recipe: Recipe, run_dir: str | Path) -> Path:
    """Write the resolved recipe as ``config.yaml`` in the run folder (atomically; a file that
    already says the same is left untouched, so a rerun of a finished run changes nothing)."""
    path = Path(run_dir) / CONFIG_FILE
    text = to_yaml(recipe)
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        atomic_write_text(path, text)
    return path

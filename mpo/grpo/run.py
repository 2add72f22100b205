"""One GRPO run from a recipe: what ``mpo grpo`` does (R1V2's second stage, arXiv 2504.16656).

Steps (:func:`run_grpo`): load the prompts (``data.prompts``, any source :mod:`mpo.data` reads; rows
with an ``answer`` give the rule reward) -> name the run's key (:func:`grpo_key`): a finished run with
the same key is not trained again, a run folder holding another key's work is refused in one line ->
load the policy and processor -> the reward components (:func:`mpo.grpo.rewards.components`; the reward
model through :class:`reward.scorer.Scorer` only when its weight is above 0) -> with
``grpo.ssb.filter_prompts``, one sampling pass of the starting policy drops the prompts whose group
rewards never differ (:func:`filter_pass`) -> :class:`mpo.grpo.trainer.MpoGRPOTrainer` on TRL's
``GRPOConfig`` (:func:`grpo_arguments`) -> train, resuming from the newest complete checkpoint -> save.

Run folder (``run.output_dir``)::

    run_key.json        what the run is made of (:func:`grpo_key`), written before training starts
    config.yaml         the resolved recipe
    prompt_filter.json  grpo.ssb.filter_prompts: the prompts kept and dropped (reused by a rerun)
    metrics.jsonl       one row per logged step: loss, reward, reward/<component>, ssb/*, kl, ...
    checkpoint-N/       every grpo.save_steps steps (Trainer's files, ssb_state.pt: the buffer)
    policy/             at the end: the trained policy and processor (LoRA merged in), as mpo train saves it
    mpo_state.json      written last: the run finished

Under ``accelerate launch`` (by hand, or ``mpo iterate``'s distributed GRPO stage:
:mod:`mpo.rounds.then_grpo`) the main process alone starts afresh, writes the key, ``config.yaml`` and
the prompt filter's outcome; the other ranks wait for it, then read them.

Rerunning the same command resumes from the newest complete checkpoint (the buffer's state and the
random generators' with it) and ends at the weights an uninterrupted run ends at; ``resume=False``
removes the checkpoints of the run it replaces and starts afresh.
"""

from __future__ import annotations

import json
from pathlib import Path

from mpo.config import ConfigError

FILTER_FILE = "prompt_filter.json"  # grpo.ssb.filter_prompts' outcome, in the run folder


def check_recipe(recipe) -> None:
    """What ``mpo grpo`` needs from a recipe, checked before anything is loaded or written."""
    from mpo.models import model_folder

    if not recipe.model.policy:
        raise ConfigError("model.policy: a policy folder or hub id is required for mpo grpo")
    if not recipe.data.prompts:
        raise ConfigError("data.prompts: a prompt set (rows with an 'answer' for the rule reward) is required "
                          "for mpo grpo")
    model_folder(recipe.model.policy, "model.policy")
    if recipe.grpo.rewards.weights.model > 0:
        if not recipe.model.reward_model:
            raise ConfigError("model.reward_model: required while grpo.rewards.weights.model > 0 "
                              "(set it to 0 to train without the reward model)")
        model_folder(recipe.model.reward_model, "model.reward_model", reward=True)


def grpo_key(recipe, prompts) -> dict:
    """What a GRPO run is made of: the prompts by content, the policy (and reward model, when it is
    used) by its files, and :data:`mpo.keys.GRPO_SETTINGS`."""
    from mpo.keys import GRPO_SETTINGS, prompts_identity, settings
    from mpo.models import folder_identity

    key = {"prompts": prompts_identity(prompts), "policy files": folder_identity(recipe.model.policy)}
    if recipe.grpo.rewards.weights.model > 0:
        key["reward model files"] = folder_identity(recipe.model.reward_model)
    return {**key, **settings(recipe, GRPO_SETTINGS)}


def reward_components(recipe) -> list:
    """The recipe's reward components; the reward model's scorer is made only when it is weighted."""
    from mpo.grpo.rewards import components

    score = None
    if recipe.grpo.rewards.weights.model > 0:
        from mpo.models import model_folder
        from reward.scorer import ScoreOptions, Scorer

        folder = model_folder(recipe.model.reward_model, "model.reward_model", reward=True)
        # loaded now, not at the first score: loading draws on torch's generator, which must be where a
        # resumed run's is when generation starts (a checkpoint restores it)
        score = Scorer(folder, ScoreOptions.for_rounds(recipe.model)).load().score
    return components(recipe.grpo.rewards, score)


def use_vllm(recipe) -> bool:
    """TRL's vLLM generation (colocated) where ``rollout.backend`` is vllm and vllm imports; else
    transformers ``generate``."""
    if recipe.rollout.backend != "vllm":
        return False
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("rollout.backend vllm: vllm does not import here; generating with transformers")
        return False
    return True


def grpo_arguments(recipe, reward_weights: list[float]):
    """TRL's ``GRPOConfig`` from ``recipe.grpo`` (the shared Trainer settings through
    :func:`mpo.train.setup.base_arguments`)."""
    from trl import GRPOConfig

    from mpo.train.setup import base_arguments, checkpointing_arguments

    g, run = recipe.grpo, recipe.run
    vllm = use_vllm(recipe)
    return base_arguments(
        run, run.output_dir, Path(run.output_dir).name, recipe.model.dtype, arguments=GRPOConfig,
        learning_rate=g.learning_rate, max_steps=g.max_steps, per_device_train_batch_size=g.per_device_batch_size,
        gradient_accumulation_steps=g.gradient_accumulation_steps, lr_scheduler_type=g.lr_scheduler,
        warmup_steps=g.warmup_ratio, weight_decay=g.weight_decay, max_grad_norm=g.max_grad_norm,
        logging_steps=g.logging_steps, save_steps=g.save_steps, save_strategy="steps",
        **checkpointing_arguments(g.gradient_checkpointing),
        num_generations=g.num_generations, epsilon=g.epsilon, beta=g.beta, loss_type=g.loss_type,
        scale_rewards=g.scale_rewards, max_completion_length=g.max_tokens, temperature=g.temperature,
        top_p=g.top_p, top_k=0, num_iterations=1, reward_weights=reward_weights,
        use_vllm=vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=recipe.rollout.gpu_memory_utilization,
        # replayed rows carry no vLLM sampling ratio: with the buffer on, no importance-sampling correction
        vllm_importance_sampling_correction=vllm and not g.ssb.enabled,
        log_completions=False, shuffle_dataset=True,
    )


def prompt_dataset(prompts, processor):
    """TRL's dataset of the prompts: ``prompt`` (messages), ``images`` (opened and fitted to the recipe's
    pixel budget, :func:`mpo.data.images.fit_image`; no such column for a text-only set), ``answer``,
    ``prompt_id``."""
    from datasets import Dataset

    from mpo.data.images import fit_image

    rows = [{"prompt": p.messages, "answer": p.answer, "prompt_id": p.prompt_id} for p in prompts]
    if any(p.images for p in prompts):
        for row, prompt in zip(rows, prompts):
            row["images"] = [fit_image(image, processor.image_processor) for image in prompt.images]
    return Dataset.from_list(rows)


def filter_pass(recipe, prompts, parts, out: Path) -> list:
    """``grpo.ssb.filter_prompts``: one sampling pass of the starting policy (``num_generations``
    samples per prompt, GRPO's temperature, top-p and length; ``rollout.backend``, ``rollout.seed``),
    each sample's reward sum (:func:`mpo.grpo.rewards.combine`), :func:`mpo.grpo.ssb.filter_prompts`;
    the outcome is kept in :data:`FILTER_FILE` and reused by a rerun. Returns the prompts kept."""
    from mpo.grpo.rewards import combine
    from mpo.grpo.ssb import PromptFilter, filter_prompts
    from mpo.models import model_folder
    from mpo.records import write_json
    from mpo.rollout import make_backend

    path = out / FILTER_FILE
    if path.is_file():
        outcome = PromptFilter(**json.loads(path.read_text(encoding="utf-8")))
    else:
        g = recipe.grpo
        config = recipe.rollout.model_copy(update={"temperature": g.temperature, "top_p": g.top_p,
                                                   "max_tokens": g.max_tokens})
        with make_backend(config, recipe.model, model_folder(recipe.model.policy, "model.policy")) as backend:
            rollouts = backend.generate(prompts, num_samples=g.num_generations, seed=recipe.rollout.seed)
        by_id = {p.prompt_id: p for p in prompts}
        groups = {p.prompt_id: [] for p in prompts}
        for rollout in rollouts:
            groups[rollout.prompt_id].append(rollout.response)
        rewards = {}
        for pid, responses in groups.items():
            prompt = by_id[pid]
            n = len(responses)
            rewards[pid] = combine(parts, [prompt.messages] * n, responses, answer=[prompt.answer] * n,
                                   prompt_id=[pid] * n, images=[prompt.images] * n).total
        outcome = filter_prompts(rewards)
        write_json(path, {"kept": outcome.kept, "dropped": outcome.dropped})
    print(outcome.summary())
    kept = set(outcome.kept)
    if not kept:
        raise ConfigError(f"grpo.ssb.filter_prompts: every prompt of {recipe.data.prompts} was dropped (the "
                          "starting policy's rewards never differ on any); nothing to train on")
    return [p for p in prompts if p.prompt_id in kept]


def build_grpo_trainer(recipe, prompts, model, processor, parts, callbacks=None):
    """The policy's parts frozen or a LoRA adapter added (``grpo.freeze``, ``grpo.lora``), and
    :class:`mpo.grpo.trainer.MpoGRPOTrainer` on the prompts (``callbacks``: more ``TrainerCallback``s),
    encoding them with the :class:`mpo.chat.ChatEncoder` rollout uses: a control token's text in a prompt
    is plain text (``data.special_tokens: escape``; ``error`` refused such prompts in
    :func:`mpo.rollout.prompt_set.load_prompt_set`, before any weights loaded)."""
    from mpo.chat import ChatEncoder
    from mpo.grpo.ssb import Identity
    from mpo.grpo.trainer import MpoGRPOTrainer
    from mpo.keys import records_digest
    from mpo.models import model_folder, stop_ids
    from mpo.train.setup import add_lora, freeze_parts, frozen_summary

    g = recipe.grpo
    identity = Identity(str(model.config.model_type), records_digest(prompts))
    if g.freeze:
        print(f"frozen: {frozen_summary(freeze_parts(model, g.freeze))}")
    if g.lora is not None:
        model = add_lora(model, g.lora, g.freeze)
    return MpoGRPOTrainer(model=model, args=grpo_arguments(recipe, [c.weight for c in parts]),
                          train_dataset=prompt_dataset(prompts, processor), processing_class=processor,
                          components=parts, ssb=g.ssb, identity=identity, callbacks=callbacks,
                          encoder=ChatEncoder(processor, stop_ids(model_folder(recipe.model.policy, "model.policy"))))


def run_grpo(recipe, resume: bool = True, callbacks=None, quiet: bool = False) -> Path:
    """``mpo grpo``: GRPO of ``model.policy`` on ``data.prompts``; returns the saved policy folder. The
    run folder is locked while it trains; see the module docstring for what it holds and how a rerun
    resumes. ``callbacks``: more ``TrainerCallback``s for the trainer (``mpo iterate``'s evals in
    training, :mod:`mpo.rounds.grpo_eval`); ``quiet``: no per-step log dicts printed (inside ``mpo iterate``
    and ``mpo demo``)."""
    from mpo.keys import kept_beside
    from mpo.run_lock import run_lock

    check_recipe(recipe)
    out = Path(recipe.run.output_dir)
    with run_lock(out), kept_beside(out):
        return _grpo_locked(recipe, out, resume, callbacks, quiet)


def grpo_prompts(recipe, out: Path, quiet: bool = False) -> list:
    """The run's prompts (``data.prompts``), checked with ``grpo.on_too_long`` against ``grpo.max_tokens``."""
    from mpo.rollout.prompt_set import load_prompt_set

    return load_prompt_set(recipe, on_too_long=recipe.grpo.on_too_long, setting="grpo.on_too_long",
                           room=recipe.grpo.max_tokens, room_setting="grpo.max_tokens",
                           image_cache=out / "image_cache", quiet=quiet)


def is_finished(recipe) -> bool:
    """The GRPO run in ``run.output_dir`` finished with this recipe's prompts and settings
    (:func:`mpo.keys.finished` with :func:`grpo_key`): what each node of a distributed ``mpo iterate``
    asks before it launches the GRPO stage (:mod:`mpo.rounds.then_grpo`)."""
    from mpo.keys import finished

    out = Path(recipe.run.output_dir)
    return finished(out) and finished(out, grpo_key(recipe, grpo_prompts(recipe, out, quiet=True)))


def _start(recipe, out: Path, key: dict, resume: bool, main: bool) -> bool:
    """Check the folder's key (resume) or start afresh; False when the run finished earlier. Under a
    launcher the main process (``main``) runs this first and alone starts afresh (removes the checkpoints
    and the prompt filter's outcome, writes the key); the others then find its key."""
    from mpo.keys import KEY_FILE, check_key, finished
    from mpo.train.setup import start_afresh

    if finished(out, key):
        print(f"{out}: trained earlier with the same prompts and settings; nothing to do (policy: {out / 'policy'})")
        return False
    if resume and (out / KEY_FILE).is_file():
        check_key(out, key, f"{out} (or run mpo grpo with --fresh)", key_file=out / KEY_FILE)
        return True
    if main:
        start_afresh(out, key, also=(FILTER_FILE,))
    return True


def _grpo_locked(recipe, out: Path, resume: bool, callbacks=None, quiet: bool = False) -> Path:
    from accelerate import PartialState

    from mpo.config import save_resolved
    from mpo.errors import writing_into
    from mpo.keys import last_complete_checkpoint
    from mpo.preempt import check, deferred
    from mpo.train.run import _stop_if_preempted, load_policy, save_outputs
    from mpo.train.setup import METRICS_FILE, hide_log_dicts, trim_metrics, wandb_scope

    prompts = grpo_prompts(recipe, out)
    state = PartialState()  # under accelerate launch: the main process writes, the others read what it wrote
    with state.main_process_first():
        if not _start(recipe, out, grpo_key(recipe, prompts), resume, state.is_main_process):
            return out / "policy"
    if state.is_main_process:
        print(f"resolved recipe: {save_resolved(recipe, out)}")
    parts = reward_components(recipe)
    if recipe.grpo.ssb.filter_prompts:
        with state.main_process_first():  # the others read its outcome (FILTER_FILE)
            prompts = filter_pass(recipe, prompts, parts, out)
    model, processor = load_policy(recipe)
    trainer = build_grpo_trainer(recipe, prompts, model, processor, parts, callbacks)
    if quiet:
        hide_log_dicts(trainer)
    checkpoint = last_complete_checkpoint(out)
    if checkpoint:
        print(f"resuming from {checkpoint}")
    if trainer.is_world_process_zero():
        trim_metrics(out / METRICS_FILE, int(checkpoint.rsplit("-", 1)[1]) if checkpoint else 0)
    with writing_into(out, "GRPO training"), wandb_scope(recipe.run, out), deferred():
        trainer.train(resume_from_checkpoint=checkpoint)
        _stop_if_preempted(trainer, out, rounds=True)
        policy_dir = save_outputs(trainer, processor, recipe)
    check(f"GRPO finished and saved ({policy_dir}); rerun the same command to continue")
    print(f"policy saved to {policy_dir}")
    return policy_dir

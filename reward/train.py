"""Bradley-Terry reward-model training in phases (the Skywork-VL Reward recipe, arXiv 2505.07263).

The paper: vision encoder frozen; projector (the visual merger), LM and value head trained with
AdamW; phase 1 on multimodal pairs at lr 1e-5, phase 2 on multimodal + text-only pairs at lr 1e-6;
2 epochs each; batch size 1. The loss and the Trainer are :mod:`reward.trainer`'s.

:func:`run_phases` (``reward_train.phases``): phase k starts from phase k-1's folder (the first from ``reward_train.init_from``:
a reward model folder, or a plain Qwen2.5-VL one that gets a fresh seeded value head), trains with
``transformers.Trainer`` (accelerate / DeepSpeed launch, gradient accumulation, checkpoints, resume
and W&B come from there) and writes ``OUTPUT_DIR/<phase>/``: backbone + ``value_head.safetensors``
+ processor (the Skywork layout), ``metrics.jsonl`` (one line per logging step),
``pair_scores.jsonl`` (a sample of the training pairs scored before and after) and, last,
``done.json`` (:data:`mpo.keys.PHASE_DONE_FILE`). A phase with ``done.json`` is skipped on rerun; one
killed mid-way resumes from its newest checkpoint (checkpoints are deleted once it is done). The last
phase is also published at
``OUTPUT_DIR/final`` (hard links where possible). Weights train in float32; ``model.dtype``
bfloat16/float16 turns on autocast and is the dtype folders are saved in. LoRA adapters are saved
under ``<phase>/adapter`` and merged into the saved backbone (not under ZeRO-3).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from mpo.keys import PHASE_DONE_FILE
from reward.collate import (
    PairCollator,
    PairDataError,
    PairDataset,
    PairwiseRewardModel,
    drop_too_long,
    load_stage_pairs,
)

PAIR_SCORES_FILE = "pair_scores.jsonl"  # a sample of a phase's training pairs scored before and after


def phase_key(recipe, phase, init_dir: Path, legacy: bool = False) -> dict:
    """What a phase's checkpoints and model are made of: its start model and data files by content
    (:func:`mpo.models.folder_identity`, :func:`mpo.keys.file_digest`; no paths or file times, so
    a copied or moved output folder reads back), the phase's own settings and
    :data:`mpo.keys.REWARD_TRAIN_SETTINGS` (:func:`mpo.keys.settings`: not logging, checkpoint cadence
    or workers), grouped by section. ``legacy``: the key as the earlier format held it."""
    from mpo.keys import KEY_FORMAT, REWARD_TRAIN_SETTINGS, file_digest, legacy_file_stat, settings
    from mpo.models import folder_identity, legacy_folder_identity

    inputs = {"reward_train.phases", "reward_train.stages"}  # each phase is keyed by its own entry
    if not legacy:  # the start model is in "init", by content; a phase reads its own data files
        inputs |= {"reward_train.init_from", "data.prompts", "data.preferences", "data.image_root"}
    grouped: dict = {}
    for name, value in settings(recipe, REWARD_TRAIN_SETTINGS).items():
        section, _, field = name.partition(".")
        if name == "run.seed":
            grouped[name] = value
        elif name not in inputs:
            grouped.setdefault(section, {})[field] = value
    if legacy:
        files = [[p, *legacy_file_stat(p)] if os.path.exists(p) else [p] for p in phase.data]
        return {"stage": phase.model_dump(mode="json"), "init": legacy_folder_identity(init_dir),
                "data files": files, **grouped}
    return {"key_format": KEY_FORMAT, "stage": _portable(phase), "init": folder_identity(init_dir),
            "data files": [file_digest(p) if os.path.isfile(p) else None for p in phase.data], **grouped}


def _portable(phase) -> dict:
    """A phase's settings without its data files' paths (the key holds their content)."""
    return {k: v for k, v in phase.model_dump(mode="json").items() if k != "data"}


def run_phase(recipe, phase, init_dir: Path, phase_dir: Path, key: dict) -> dict:
    """Train one phase from ``init_dir`` into ``phase_dir``; returns its summary (``done.json``)."""
    from transformers import set_seed

    from mpo.chat import ChatEncoder
    from mpo.keys import KEY_FILE, check_key
    from mpo.models import recipe_processor
    from mpo.preempt import check, deferred
    from mpo.train.setup import wandb_scope

    cfg = recipe.reward_train
    set_seed(recipe.run.seed)
    processor = recipe_processor(init_dir, recipe.model)
    encoder = ChatEncoder(processor)
    pairs = load_stage_pairs(phase.data, phase.modality, recipe.data.image_root, recipe.data.on_bad_image,
                             image_cache=phase_dir.parent / "image_cache")
    if recipe.data.special_tokens == "error":  # a pair holding a control token's text, before any weights load
        from mpo.control_tokens import check_pairs

        check_pairs(encoder.literals, pairs.records, pairs.where)
    pairs = drop_too_long(pairs, encoder, cfg.max_length, cfg.on_too_long)
    if not pairs.records:
        raise PairDataError(f"stage {phase.name!r}: no {phase.modality} pairs in {', '.join(phase.data)}")
    check_key(phase_dir, key, str(phase_dir), key_file=phase_dir / KEY_FILE,
              legacy=lambda: phase_key(recipe, phase, init_dir, legacy=True))
    with wandb_scope(recipe.run, recipe.run.output_dir, default_group=Path(recipe.run.output_dir).name), deferred():
        trainer, wrapper, peft_model = _phase_trainer(recipe, phase, init_dir, phase_dir, pairs, encoder)
        result, scores = _train_and_score(trainer, pairs, encoder, recipe, phase_dir)
        from reward.model import DTYPES
        from reward.trainer import save_stage_model

        save_stage_model(trainer, wrapper, peft_model, processor, phase_dir, DTYPES[recipe.model.dtype])
    summary = _finish_phase(trainer, recipe, phase, init_dir, phase_dir, key, pairs, result, scores)
    trainer.accelerator.wait_for_everyone()
    check(f"stage {phase.name} finished and saved ({phase_dir}); rerun the same command to continue")
    return summary


def _phase_trainer(recipe, phase, init_dir: Path, phase_dir: Path, pairs, encoder):
    """``(trainer, wrapper, peft_model)`` for one phase: the start model, parts frozen, LoRA,
    checkpointing, the pair collator and the metrics file."""
    from mpo.train.collate import pad_token_id
    from mpo.train.setup import METRICS_FILE, MetricsFile, StopOnSignal, enable_checkpointing, frozen_summary
    from reward.trainer import RewardTrainer, apply_lora, load_start, set_trainable, training_arguments

    cfg = recipe.reward_train
    args = training_arguments(recipe, phase, phase_dir)
    reward = load_start(init_dir, recipe, torch.float32)
    counts = set_trainable(reward, cfg.freeze)
    if counts:
        print(f"stage {phase.name}: frozen {frozen_summary(counts)}")
    peft_model = apply_lora(reward, cfg.lora, cfg.freeze) if cfg.lora else None
    if cfg.gradient_checkpointing:
        enable_checkpointing(reward.backbone)
    wrapper = PairwiseRewardModel(reward)
    trainer = RewardTrainer(
        model=wrapper, args=args, train_dataset=PairDataset(pairs.records, encoder, pairs.where),
        data_collator=PairCollator(pad_token_id(encoder.tokenizer), reward.config.image_token_id,
                                   reward.config.video_token_id),
        callbacks=[MetricsFile(phase_dir / METRICS_FILE, only_training_steps=True), StopOnSignal()],
    )
    return trainer, wrapper, peft_model


def _train_and_score(trainer, pairs, encoder, recipe, phase_dir: Path):
    """Resume from the newest complete checkpoint (metrics cut back to it), train, and score the
    sampled pairs before and after: ``(train result, (sample, before, after))``."""
    from mpo.keys import last_complete_checkpoint
    from mpo.preempt import check
    from mpo.train.setup import METRICS_FILE, StopOnSignal, trim_metrics
    from reward.trainer import sample_pairs, score_sample

    checkpoint = last_complete_checkpoint(phase_dir / "checkpoints")
    if trainer.accelerator.is_main_process:
        trim_metrics(phase_dir / METRICS_FILE, int(checkpoint.rsplit("-", 1)[1]) if checkpoint else 0)
    sample = sample_pairs(pairs, recipe.reward_train.summary_pairs, recipe.run.seed)
    # Scoring before train() would make DeepSpeed / FSDP wrap the model for inference first, which
    # the Trainer's later training set-up does not undo; those runs report only the "after" scores.
    sharded = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
    before = None if sharded else score_sample(trainer, pairs, sample, encoder)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    stopped = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StopOnSignal)).stopped_at
    if stopped is not None:
        check(f"stage {phase_dir.name}: checkpoint saved at step {stopped} of {trainer.state.max_steps} "
              f"({phase_dir / 'checkpoints' / f'checkpoint-{stopped}'}); rerun the same command to continue from it")
    return result, (sample, before, score_sample(trainer, pairs, sample, encoder))


def _finish_phase(trainer, recipe, phase, init_dir, phase_dir: Path, key, pairs, result, scores) -> dict:
    """The phase's summary; on the main process ``pair_scores.jsonl`` and, last, ``done.json``."""
    from mpo.records import write_json, write_jsonl
    from reward.trainer import pair_metrics

    sample, before, after = scores
    summary = {
        "stage": phase.name, "init_from": str(init_dir), "config": phase.model_dump(), "key": key,
        "pairs": len(pairs.records), "multimodal_pairs": pairs.num_multimodal,
        "skipped": {reason: len(items) for reason, items in pairs.skipped.items()},
        "steps": trainer.state.global_step, "train_runtime_s": result.metrics.get("train_runtime"),
        "summary_pairs": len(sample),
        "before": pair_metrics(before[:, 0], before[:, 1]) if sample and before is not None else None,
        "after": pair_metrics(after[:, 0], after[:, 1]) if sample else None,
    }
    if trainer.accelerator.is_main_process:
        for reason, items in pairs.skipped.items():
            print(f"stage {phase.name}: skipped {len(items)} pair(s), {reason}; first: {items[0]}")
        rows = before.tolist() if before is not None else [[None, None]] * len(sample)
        write_jsonl(phase_dir / PAIR_SCORES_FILE, [
            {"where": pairs.where[i], "chosen_before": b[0], "rejected_before": b[1], "chosen_after": a[0],
             "rejected_after": a[1]} for i, b, a in zip(sample, rows, after.tolist())
        ])
        write_json(phase_dir / PHASE_DONE_FILE, summary)  # last: its presence marks the phase finished
        shutil.rmtree(phase_dir / "checkpoints", ignore_errors=True)
    return summary


def publish_final(phase_dir: Path, final_dir: Path) -> None:
    """Make ``final_dir`` hold the last phase's model files (hard links, else copies), atomically."""
    from mpo.records import TEMP_SUFFIX
    from mpo.train.setup import METRICS_FILE

    staging = final_dir.with_name(f".{final_dir.name}{TEMP_SUFFIX}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for source in phase_dir.iterdir():
        if source.is_file() and source.name not in (METRICS_FILE, PAIR_SCORES_FILE):
            try:
                os.link(source, staging / source.name)
            except OSError:
                shutil.copy2(source, staging / source.name)
    shutil.rmtree(final_dir, ignore_errors=True)
    staging.rename(final_dir)


def run_phases(recipe) -> list[dict]:
    """Run the recipe's phases in order, skipping finished ones; returns one summary per phase.

    The output folder is locked while it trains. A finished phase is reused only if it was made
    the same way (:func:`phase_key`); otherwise the run stops, naming what changed and what to delete."""
    from accelerate import PartialState

    from mpo.config import CONFIG_FILE, save_resolved
    from mpo.errors import MpoError, writing_into
    from mpo.keys import kept_beside
    from mpo.models import model_folder
    from mpo.run_lock import run_lock

    cfg = recipe.reward_train
    if not cfg.phases:
        raise MpoError("reward_train.phases is empty: nothing to train")
    if not cfg.init_from:
        raise MpoError("reward_train.init_from is not set: the first stage needs a model to start from")
    out = Path(recipe.run.output_dir)
    summaries, init_dir = [], None
    with run_lock(out), kept_beside(out), writing_into(out, "reward-model training"):
        finished = (out / CONFIG_FILE).is_file() and all((out / s.name / PHASE_DONE_FILE).is_file() for s in cfg.phases)
        if PartialState().is_main_process and not finished:  # a finished run (perhaps copied here) is only read
            print(f"resolved recipe: {save_resolved(recipe, out)}")
        for phase in cfg.phases:
            init_dir = init_dir or model_folder(cfg.init_from, "reward_train.init_from")
            summaries.append(_phase(recipe, phase, init_dir, out / phase.name))
            init_dir = out / phase.name
        if PartialState().is_main_process and _stale(init_dir, out / "final"):
            publish_final(init_dir, out / "final")
    return summaries


def _phase(recipe, phase, init_dir: Path, phase_dir: Path) -> dict:
    """One phase: its summary when it finished earlier with the same key, else train it."""
    from mpo.errors import RunFolderError

    key = json.loads(json.dumps(phase_key(recipe, phase, init_dir)))
    done = phase_dir / PHASE_DONE_FILE
    if not done.is_file():
        print(f"stage {phase.name}: training from {init_dir} on {', '.join(phase.data)} ({phase.modality} pairs)")
        return run_phase(recipe, phase, init_dir, phase_dir, key)
    summary = json.loads(done.read_text(encoding="utf-8"))
    found = summary.get("key", key)
    if "key_format" not in found:  # an earlier mpo's key (paths, file times): checked as it was made
        key = json.loads(json.dumps(phase_key(recipe, phase, init_dir, legacy=True)))
    config = summary.get("config") or {}
    if found != key or {k: v for k, v in config.items() if k != "data"} != _portable(phase):
        from mpo.keys import key_differences

        later = [s.name for s in recipe.reward_train.phases]
        after = later[later.index(phase.name):]
        what = key_differences(found, key) if found != key else "stage settings changed"
        raise RunFolderError(
            f"{done}: stage {phase.name} finished earlier with other settings, data or start model ({what}); rerun "
            f"with those, or delete {', '.join(str(phase_dir.parent / name) for name in after)} to retrain"
        )
    print(f"stage {phase.name}: finished earlier ({done}); skipped")
    return {**summary, "skipped_rerun": True}


def _stale(phase_dir: Path, final_dir: Path) -> bool:
    """``final/`` does not hold the last phase's finished model (its ``done.json`` differs)."""
    done, published = phase_dir / PHASE_DONE_FILE, final_dir / PHASE_DONE_FILE
    return not (published.is_file() and published.read_bytes() == done.read_bytes())


def format_summary(summaries: list[dict]) -> str:
    """One line per phase: pairs, steps, accuracy / margin on the training pairs before -> after."""
    def show(metrics, key, fmt):
        return format(metrics[key], fmt) if metrics else "-"

    return "\n".join(
        f"{s['stage']}: {s['pairs']} pairs ({s['multimodal_pairs']} with images), {s['steps']} steps; "
        f"training-pair accuracy {show(s['before'], 'accuracy', '.3f')} -> "
        f"{show(s['after'], 'accuracy', '.3f')}, "
        f"margin {show(s['before'], 'margin', '+.3f')} -> {show(s['after'], 'margin', '+.3f')} "
        f"(on {s['summary_pairs']} pairs){' [skipped: finished earlier]' if s.get('skipped_rerun') else ''}"
        for s in summaries
    )

"""Bradley-Terry reward-model training in stages (the Skywork-VL Reward recipe, arXiv 2505.07263).

Loss: per pair ``-log sigmoid(r(x, y+) - r(x, y-))`` (Bradley & Terry 1952, as the paper trains),
averaged over the batch; no score calibration. The paper: vision encoder frozen; projector (the
visual merger), LM and value head trained with AdamW; stage 1 on multimodal pairs at lr 1e-5, stage
2 on multimodal + text-only pairs at lr 1e-6; 2 epochs each; batch size 1.

:func:`run_stages`: stage k starts from stage k-1's folder (the first from ``reward_train.init_from``:
a reward model folder, or a plain Qwen2.5-VL one that gets a fresh seeded value head), trains with
``transformers.Trainer`` (accelerate / DeepSpeed launch, gradient accumulation, checkpoints, resume
and W&B come from there) and writes ``OUTPUT_DIR/<stage>/``: backbone + ``value_head.safetensors``
+ processor (the Skywork layout), ``metrics.jsonl`` (one line per logging step),
``pair_scores.jsonl`` (a sample of the training pairs scored before and after) and, last,
``done.json``. A stage with ``done.json`` is skipped on rerun; one killed mid-way resumes from its
newest checkpoint (checkpoints are deleted once it is done). The last stage is also published at
``OUTPUT_DIR/final`` (hard links where possible). Weights train in float32; ``model.dtype``
bfloat16/float16 turns on autocast and is the dtype folders are saved in. LoRA adapters are saved
under ``<stage>/adapter`` and merged into the saved backbone (not under ZeRO-3).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from reward.collate import (
    PairCollator,
    PairDataError,
    PairDataset,
    PairwiseRewardModel,
    drop_too_long,
    load_stage_pairs,
)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair Bradley-Terry loss ``-log sigmoid(r+ - r-)``: [B], [B] -> [B] (reduce outside).

    The pairwise objective of Skywork-VL Reward (arXiv 2505.07263, section on training)."""
    return -nn.functional.logsigmoid(chosen.float() - rejected.float())


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Accuracy (chosen strictly above rejected), mean margin and mean scores of scored pairs."""
    chosen, rejected = chosen.double(), rejected.double()
    return {
        "accuracy": float((chosen > rejected).double().mean()),
        "margin": float((chosen - rejected).mean()),
        "chosen_score": float(chosen.mean()),
        "rejected_score": float(rejected.mean()),
        "loss": float(bradley_terry_loss(chosen, rejected).mean()),
    }


def _trainer_class():
    from transformers import Trainer, TrainerCallback

    class RewardTrainer(Trainer):
        """``Trainer`` with the Bradley-Terry loss and pair metrics added to every training log."""

        loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by accumulation steps

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._window = torch.zeros(5, dtype=torch.float64)  # correct, margin, chosen, rejected, pairs

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            chosen, rejected = model(**inputs).float().chunk(2)  # rows: chosen..., rejected...
            loss = bradley_terry_loss(chosen, rejected).mean()
            if model.training:  # sums (not rows) are gathered: ranks may hold batches of different sizes
                c, r = chosen.detach().double(), rejected.detach().double()
                sums = torch.stack([(c > r).sum(), (c - r).sum(), c.sum(), r.sum(), c.new_tensor(len(c))])
                self._window += self.accelerator.gather(sums[None]).sum(0).cpu()
            return (loss, torch.stack([chosen, rejected], dim=-1)) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                chosen, rejected = model(**inputs).float().chunk(2)
            loss = bradley_terry_loss(chosen, rejected).mean().detach()
            return loss, torch.stack([chosen, rejected], dim=-1), None

        def log(self, logs, start_time=None):
            if "loss" in logs and self._window[4] > 0:
                correct, margin, chosen, rejected = (self._window[:4] / self._window[4]).tolist()
                logs.update(accuracy=correct, margin=margin, chosen_score=chosen, rejected_score=rejected)
                self._window.zero_()
            super().log(logs, start_time)

    class MetricsFile(TrainerCallback):
        """Append each training log (loss, accuracy, margin, scores, lr, grad norm) to a JSONL file."""

        def __init__(self, path: Path):
            self.path = path

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                with self.path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return RewardTrainer, MetricsFile


def set_trainable(reward, freeze: list[str]) -> None:
    """Freeze the named parts (vision = the ViT blocks, projector = the visual merger, language =
    the decoder); the unused LM head is always frozen, the value head always trained."""
    backbone = reward.backbone.model
    parts = {
        "vision": [p for n, p in backbone.visual.named_parameters() if not n.startswith("merger.")],
        "projector": list(backbone.visual.merger.parameters()),
        "language": list(backbone.language_model.parameters()),
    }
    for name, params in parts.items():
        for param in params:
            param.requires_grad_(name not in freeze)
    reward.backbone.lm_head.requires_grad_(False)
    reward.v_head.requires_grad_(True)


def apply_lora(reward, lora, freeze: list[str]):
    """Inject LoRA adapters into the backbone in place (frozen parts get none); returns the
    ``PeftModel`` (for saving and merging). The value head stays fully trainable."""
    from peft import LoraConfig, get_peft_model

    patterns = {"vision": r"visual\.(patch_embed|blocks)", "projector": r"visual\.merger",
                "language": r"language_model"}
    excluded = "|".join(rf".*{patterns[part]}\..*" for part in freeze) or None
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, exclude_modules=excluded)
    peft_model = get_peft_model(reward.backbone, config)
    reward.v_head.requires_grad_(True)
    return peft_model


def load_start(path: Path, recipe, dtype: torch.dtype):
    """A :class:`RewardModel` from a reward folder, or from a plain backbone with a fresh head."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from reward.model import VALUE_HEAD_FILE, RewardModel

    attn = recipe.model.attn_implementation
    if (path / VALUE_HEAD_FILE).is_file():
        return RewardModel.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    print(f"{path}: no {VALUE_HEAD_FILE}; starting from the backbone with a fresh value head")
    backbone = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation=attn, use_safetensors=True
    )
    torch.manual_seed(recipe.run.seed)
    return RewardModel(backbone)


def training_arguments(recipe, stage, stage_dir: Path):
    """``TrainingArguments`` for one stage (built before the model, so ZeRO-3 can shard its load)."""
    from transformers import TrainingArguments

    cfg = recipe.reward_train
    report = recipe.run.report_to == "wandb"
    if report:
        os.environ["WANDB_PROJECT"] = recipe.run.wandb_project
        os.environ.setdefault("WANDB_RUN_GROUP", recipe.run.wandb_group or Path(recipe.run.output_dir).name)
    return TrainingArguments(
        output_dir=str(stage_dir / "checkpoints"),
        run_name=f"{Path(recipe.run.output_dir).name}/{stage.name}",
        report_to=["wandb"] if report else [],
        per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=stage.learning_rate,
        num_train_epochs=stage.num_epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=1,
        seed=recipe.run.seed,
        # autocast where a GPU runs it (Trainer refuses bf16 on CPU); the weights train in float32
        bf16=recipe.model.dtype == "bfloat16" and torch.cuda.is_available(),
        fp16=recipe.model.dtype == "float16" and torch.cuda.is_available(),
        remove_unused_columns=False,
        dataloader_num_workers=cfg.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=not os.isatty(1),
    )


def _sample(pairs, limit: int, seed: int) -> list[int]:
    indices = list(range(len(pairs.records)))
    if 0 <= limit < len(indices):
        indices = sorted(random.Random(seed).sample(indices, limit))
    return indices


def score_sample(trainer, pairs, indices, encoder) -> torch.Tensor:
    """Scores ``[N, 2]`` (chosen, rejected) of the sampled pairs, model in eval mode."""
    if not indices:
        return torch.zeros(0, 2)
    dataset = PairDataset([pairs.records[i] for i in indices], encoder, [pairs.where[i] for i in indices])
    return torch.as_tensor(trainer.predict(dataset).predictions).float().reshape(-1, 2)


def save_stage_model(trainer, wrapper, peft_model, processor, out: Path, dtype: torch.dtype) -> None:
    """Write the Skywork layout (backbone + ``value_head.safetensors``) and the processor to ``out``."""
    from safetensors.torch import save_file

    from reward.model import VALUE_HEAD_FILE

    accelerator = trainer.accelerator
    if peft_model is not None:
        if accelerator.is_main_process:
            peft_model.save_pretrained(out / "adapter")
        wrapper.reward.backbone = peft_model.merge_and_unload()
    state = accelerator.get_state_dict(trainer.model_wrapped)
    if accelerator.is_main_process:
        def cast(tensor):
            return tensor.to(dtype) if tensor.is_floating_point() else tensor

        backbone = {k.removeprefix("reward.backbone."): cast(v) for k, v in state.items()
                    if k.startswith("reward.backbone.")}
        head = {k.removeprefix("reward."): cast(v).contiguous() for k, v in state.items()
                if k.startswith("reward.v_head.")}
        wrapper.reward.backbone.save_pretrained(out, state_dict=backbone)
        save_file(head, str(out / VALUE_HEAD_FILE), metadata={"format": "pt"})
        processor.save_pretrained(out)
    accelerator.wait_for_everyone()


def stage_key(recipe, stage, init_dir: Path) -> dict:
    """What a stage's checkpoints and model are made of: its start, its data files, the stage's and
    the shared training settings (not logging, checkpoint cadence or workers)."""
    from mpo.models import folder_identity

    shared = recipe.reward_train.model_dump(mode="json")
    for name in ("stages", "logging_steps", "save_steps", "num_workers", "summary_pairs"):
        shared.pop(name)
    model = recipe.model.model_dump(mode="json")
    files = [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] if os.path.exists(p) else [p] for p in stage.data]
    return {"stage": stage.model_dump(mode="json"), "init": folder_identity(init_dir), "data files": files,
            "reward_train": shared, "model": {k: model[k] for k in ("dtype", "attn_implementation", "min_pixels",
                                                                   "max_pixels")},
            "run.seed": recipe.run.seed, "data": recipe.data.model_dump(mode="json")}


def run_stage(recipe, stage, init_dir: Path, stage_dir: Path, key: dict) -> dict:
    """Train one stage from ``init_dir`` into ``stage_dir``; returns its summary (``done.json``)."""
    from transformers import set_seed

    from mpo.chat import ChatEncoder
    from mpo.models import recipe_processor
    from mpo.records import write_json, write_jsonl
    from mpo.stages import check_key, last_complete_checkpoint
    from mpo.training import KEY_FILE, trim_metrics
    from reward.model import DTYPES

    cfg = recipe.reward_train
    set_seed(recipe.run.seed)
    processor = recipe_processor(init_dir, recipe.model)
    encoder = ChatEncoder(processor)
    pairs = load_stage_pairs(stage.data, stage.modality, recipe.data.image_root, recipe.data.on_bad_image,
                             image_cache=stage_dir.parent / "image_cache")
    pairs = drop_too_long(pairs, encoder, cfg.max_length, cfg.on_too_long)
    if not pairs.records:
        raise PairDataError(f"stage {stage.name!r}: no {stage.modality} pairs in {', '.join(stage.data)}")
    check_key(stage_dir, key, str(stage_dir), key_file=stage_dir / KEY_FILE)
    args = training_arguments(recipe, stage, stage_dir)

    reward = load_start(init_dir, recipe, torch.float32)
    set_trainable(reward, cfg.freeze)
    peft_model = apply_lora(reward, cfg.lora, cfg.freeze) if cfg.lora else None
    if cfg.gradient_checkpointing:
        backbone, kwargs = reward.backbone, {"use_reentrant": False}
        if hasattr(backbone, "activation_checkpointing_enable"):
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    wrapper = PairwiseRewardModel(reward)
    config = reward.config
    tokenizer = encoder.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    RewardTrainer, MetricsFile = _trainer_class()
    trainer = RewardTrainer(
        model=wrapper, args=args, train_dataset=PairDataset(pairs.records, encoder, pairs.where),
        data_collator=PairCollator(pad_id, config.image_token_id, config.video_token_id),
        callbacks=[MetricsFile(stage_dir / "metrics.jsonl")],
    )
    checkpoints = stage_dir / "checkpoints"
    checkpoint = last_complete_checkpoint(checkpoints)
    if trainer.accelerator.is_main_process:
        trim_metrics(stage_dir / "metrics.jsonl", int(checkpoint.rsplit("-", 1)[1]) if checkpoint else 0)
    sample = _sample(pairs, cfg.summary_pairs, recipe.run.seed)
    # Scoring before train() would make DeepSpeed / FSDP wrap the model for inference first, which
    # the Trainer's later training set-up does not undo; those runs report only the "after" scores.
    sharded = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
    before = None if sharded else score_sample(trainer, pairs, sample, encoder)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    after = score_sample(trainer, pairs, sample, encoder)
    save_stage_model(trainer, wrapper, peft_model, processor, stage_dir, DTYPES[recipe.model.dtype])

    summary = {
        "stage": stage.name, "init_from": str(init_dir), "config": stage.model_dump(), "key": key,
        "pairs": len(pairs.records), "multimodal_pairs": pairs.num_multimodal,
        "skipped": {reason: len(items) for reason, items in pairs.skipped.items()},
        "steps": trainer.state.global_step, "train_runtime_s": result.metrics.get("train_runtime"),
        "summary_pairs": len(sample),
        "before": pair_metrics(before[:, 0], before[:, 1]) if sample and before is not None else None,
        "after": pair_metrics(after[:, 0], after[:, 1]) if sample else None,
    }
    if trainer.accelerator.is_main_process:
        for reason, items in pairs.skipped.items():
            print(f"stage {stage.name}: skipped {len(items)} pair(s), {reason}; first: {items[0]}")
        rows = before.tolist() if before is not None else [[None, None]] * len(sample)
        write_jsonl(stage_dir / "pair_scores.jsonl", [
            {"where": pairs.where[i], "chosen_before": b[0], "rejected_before": b[1], "chosen_after": a[0],
             "rejected_after": a[1]} for i, b, a in zip(sample, rows, after.tolist())
        ])
        write_json(stage_dir / "done.json", summary)  # last: its presence marks the stage finished
        shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
    wandb = sys.modules.get("wandb")  # close the stage's run: the next stage opens its own
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
        wandb.teardown()  # wandb keeps per-process settings (its folder) until torn down
    trainer.accelerator.wait_for_everyone()
    return summary


def publish_final(stage_dir: Path, final_dir: Path) -> None:
    """Make ``final_dir`` hold the last stage's model files (hard links, else copies), atomically."""
    staging = final_dir.with_name(f".{final_dir.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for source in stage_dir.iterdir():
        if source.is_file() and source.name not in ("metrics.jsonl", "pair_scores.jsonl"):
            try:
                os.link(source, staging / source.name)
            except OSError:
                shutil.copy2(source, staging / source.name)
    shutil.rmtree(final_dir, ignore_errors=True)
    staging.rename(final_dir)


def run_stages(recipe) -> list[dict]:
    """Run the recipe's stages in order, skipping finished ones; returns one summary per stage.

    The output folder is locked while it trains. A finished stage is reused only if it was made
    the same way (:func:`stage_key`); otherwise the run stops, naming what changed and what to delete."""
    from accelerate import PartialState

    from mpo.config import save_resolved
    from mpo.errors import MpoError, writing_into
    from mpo.models import model_folder
    from mpo.run_lock import run_lock

    cfg = recipe.reward_train
    if not cfg.stages:
        raise MpoError("reward_train.stages is empty: nothing to train")
    if not cfg.init_from:
        raise MpoError("reward_train.init_from is not set: the first stage needs a model to start from")
    out = Path(recipe.run.output_dir)
    summaries, init_dir = [], None
    with run_lock(out), writing_into(out, "reward-model training"):
        if PartialState().is_main_process:
            print(f"resolved recipe: {save_resolved(recipe, out)}")
        for stage in cfg.stages:
            init_dir = init_dir or model_folder(cfg.init_from, "reward_train.init_from")
            summaries.append(_stage(recipe, stage, init_dir, out / stage.name))
            init_dir = out / stage.name
        if PartialState().is_main_process and _stale(init_dir, out / "final"):
            publish_final(init_dir, out / "final")
    return summaries


def _stage(recipe, stage, init_dir: Path, stage_dir: Path) -> dict:
    """One stage: its summary when it finished earlier with the same key, else train it."""
    from mpo.errors import RunFolderError

    key = json.loads(json.dumps(stage_key(recipe, stage, init_dir)))
    done = stage_dir / "done.json"
    if not done.is_file():
        print(f"stage {stage.name}: training from {init_dir} on {', '.join(stage.data)} ({stage.modality} pairs)")
        return run_stage(recipe, stage, init_dir, stage_dir, key)
    summary = json.loads(done.read_text(encoding="utf-8"))
    if summary.get("key", key) != key or summary.get("config") != stage.model_dump():
        later = [s.name for s in recipe.reward_train.stages]
        after = later[later.index(stage.name):]
        raise RunFolderError(
            f"{done}: stage {stage.name} finished earlier with other settings, data or start model; rerun "
            f"with those, or delete {', '.join(str(stage_dir.parent / name) for name in after)} to retrain"
        )
    print(f"stage {stage.name}: finished earlier ({done}); skipped")
    return {**summary, "skipped_rerun": True}


def _stale(stage_dir: Path, final_dir: Path) -> bool:
    """``final/`` does not hold the last stage's finished model (its ``done.json`` differs)."""
    done, published = stage_dir / "done.json", final_dir / "done.json"
    return not (published.is_file() and published.read_bytes() == done.read_bytes())


def format_summary(summaries: list[dict]) -> str:
    """One line per stage: pairs, steps, accuracy / margin on the training pairs before -> after."""
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

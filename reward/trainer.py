"""The reward model on ``transformers.Trainer``: the Bradley-Terry loss, :class:`RewardTrainer`, and
how a stage's model is started, made trainable, configured and saved (the Skywork layout).

Loss: per pair ``-log sigmoid(r(x, y+) - r(x, y-))`` (Bradley & Terry 1952, as Skywork-VL Reward,
arXiv 2505.07263, trains), averaged over the batch; no score calibration. What it shares with the
MPO trainer (parts, LoRA's exclude rule, checkpointing, arguments, the metrics file, W&B) is
:mod:`mpo.train.setup`'s.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer

from reward.collate import PairDataset


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


def set_trainable(reward, freeze: list[str]) -> dict[str, int]:
    """Freeze the named parts (:func:`mpo.train.setup.freeze_parts`); the unused LM head is always
    frozen, the value head always trained. Returns the tensors frozen per part."""
    from mpo.train.setup import freeze_parts

    counts = freeze_parts(reward, freeze) if freeze else {}
    reward.backbone.lm_head.requires_grad_(False)
    reward.v_head.requires_grad_(True)
    return counts


def apply_lora(reward, lora, freeze: list[str]):
    """Inject LoRA adapters into the backbone in place (frozen parts get none); returns the
    ``PeftModel`` (for saving and merging). The value head stays fully trainable."""
    from mpo.train.setup import add_lora

    peft_model = add_lora(reward.backbone, lora, freeze, task_type=None)
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
    from mpo.train.setup import base_arguments

    cfg = recipe.reward_train
    return base_arguments(
        recipe.run, stage_dir / "checkpoints", f"{Path(recipe.run.output_dir).name}/{stage.name}", recipe.model.dtype,
        per_device_train_batch_size=cfg.per_device_batch_size, per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=stage.learning_rate,
        num_train_epochs=stage.num_epochs, max_steps=cfg.max_steps, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no", save_steps=cfg.save_steps or 500, save_total_limit=1,
        dataloader_num_workers=cfg.num_workers,
    )


def sample_pairs(pairs, limit: int, seed: int) -> list[int]:
    """Indices of a seeded sample of ``limit`` pairs (all of them for -1), in order."""
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

"""The GRPO trainer: TRL 1.16's ``GRPOTrainer`` with the hybrid reward's metrics and the Selective Sample
Buffer (Skywork R1V2, arXiv 2504.16656).

What comes from ``GRPOTrainer`` unchanged: sampling a group of ``num_generations`` completions per
prompt (transformers ``generate``, or vLLM), the reward functions' weighted sum and the group-normalised
advantages, the loss (``loss_type``, clip ε, KL coefficient β), the optimizer, gradient accumulation,
DDP / DeepSpeed, checkpoints and resume. What :class:`MpoGRPOTrainer` adds:

- ``reward/<name>`` per step for each component of :mod:`mpo.grpo.rewards` (rule, model, format): its
  unweighted mean over the completions of the global batch that it scored, taken from the gathered
  rewards TRL computes (:meth:`MpoGRPOTrainer._calculate_rewards`).
- The buffer (:meth:`MpoGRPOTrainer._generate_and_score_completions`): after TRL has sampled and scored
  a generation batch, its rows (:func:`mpo.grpo.rows.split_rows`) are gathered from every rank into
  the global batch's groups, in TRL's order (a group's completions are consecutive there, even
  where its rows sit on different ranks). :meth:`mpo.grpo.ssb.SampleBuffer.fill` replaces the
  zero-signal groups by buffered rows drawn ∝ |advantage| and keeps the batch's rows of non-zero
  advantage. Every rank holds the same buffer (same seed, same gathered rows), so the draws do not
  depend on the number of ranks; each rank then takes its own slice of the global rows, joined at
  their widths (:func:`mpo.grpo.rows.join_rows`), and ``num_items_in_batch`` is counted again. A
  replayed row carries its stored advantage and reference log-probs; with ``num_iterations`` 1 and a
  generation per optimizer step TRL takes the current log-probs as the old ones (ratio 1), the
  on-policy treatment of VL-Rethinker's replay. Where nothing is replaced, TRL's batch is returned as
  it is. Logged per step: ``ssb/effective_fraction``, ``ssb/zero_signal_groups``,
  ``ssb/replayed_groups``, ``ssb/buffer_size``; with the buffer off ``ssb/effective_fraction`` and
  ``ssb/zero_signal_groups`` still (the with/without comparison).
- The buffer in every checkpoint: ``checkpoint-N/`` :data:`SSB_STATE_FILE`, written before transformers
  writes the checkpoint's ``trainer_state.json`` (the file that marks it complete,
  :func:`mpo.keys.last_complete_checkpoint`) and read back on resume, so a resumed run draws what an
  uninterrupted one would.
- ``metrics.jsonl`` (:class:`mpo.train.setup.MetricsFile`), a preemption signal ending training with a
  checkpoint (:class:`mpo.train.setup.StopOnSignal`), full models resumed through ``from_pretrained``
  (:func:`mpo.train.trainer.reload_full_model`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from trl import GRPOTrainer

from mpo.errors import MpoError
from mpo.grpo.advantages import zero_signal
from mpo.grpo.rows import join_rows, split_rows
from mpo.grpo.ssb import Group, Identity, SampleBuffer, effective_fraction
from mpo.train.setup import METRICS_FILE, MetricsFile, StopOnSignal
from mpo.train.trainer import reload_full_model

SSB_STATE_FILE = "ssb_state.pt"  # the Selective Sample Buffer's state, inside each checkpoint-N/


def _on_cpu(row: dict) -> dict:
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in row.items()}


class MpoGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with the components of :mod:`mpo.grpo.rewards` as its reward functions (pass their
    weights as ``GRPOConfig.reward_weights``), ``ssb`` a :class:`mpo.config.grpo.SsbConfig` (None or
    disabled: no buffer) and ``identity`` what buffered samples are valid for
    (:class:`mpo.grpo.ssb.Identity`; default: the policy's ``model_type`` and no prompt set)."""

    def __init__(self, *args, components, ssb=None, identity: Identity | None = None, **kwargs):
        super().__init__(*args, reward_funcs=list(components), **kwargs)
        self.components = list(components)
        model_type = getattr(getattr(self.model, "config", None), "model_type", "")
        self.identity = identity or Identity(str(model_type), "")
        self.buffer = None
        if ssb is not None and ssb.enabled:
            self.buffer = SampleBuffer(ssb.capacity, ssb.max_age, ssb.replay_groups, seed=self.args.seed)
        self._rewards_per_func = None
        self.add_callback(MetricsFile(Path(self.args.output_dir) / METRICS_FILE))
        self.stop_on_signal = StopOnSignal()
        self.add_callback(self.stop_on_signal)

    # ---- rewards ---------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        gathered = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards_per_func = gathered  # (global batch, components): what the buffer's groups are made of
        mode = "train" if self.model.training else "eval"
        for i, component in enumerate(self.components):
            self._metrics[mode][f"reward/{component.name}"].append(torch.nanmean(gathered[:, i]).item())
        return gathered

    def _global_groups(self, advantages: torch.Tensor, inputs, payloads=None) -> list[Group]:
        """The global batch's groups: TRL's weighted reward sums (NaN where no component scored) and
        advantages, gathered from every rank; ``payloads`` the global batch's rows (or None)."""
        from accelerate.utils import gather_object

        per_func = self._rewards_per_func
        totals = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        totals[torch.isnan(per_func).all(dim=1)] = torch.nan
        totals, advantages = totals.tolist(), self.accelerator.gather(advantages).tolist()
        ids = gather_object([str(row.get("prompt_id", "")) for row in inputs])
        size = self.num_generations
        return [Group(ids[start], totals[start:start + size], advantages[start:start + size],
                      None if payloads is None else payloads[start:start + size])
                for start in range(0, len(totals), size)]

    # ---- the Selective Sample Buffer ----------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        metrics = self._metrics["train"]
        if self.buffer is None:
            groups = self._global_groups(out["advantages"], inputs)
            metrics["ssb/effective_fraction"].append(effective_fraction(groups))
            metrics["ssb/zero_signal_groups"].append(float(sum(zero_signal(g.rewards) for g in groups)))
            return out
        from accelerate.utils import gather_object

        rows = gather_object([_on_cpu(row) for row in split_rows(out)])
        filled = self.buffer.fill(self._global_groups(out["advantages"], inputs, rows), self.state.global_step,
                                  self.identity)
        for key, value in filled.stats.items():
            metrics[key].append(value)
        if not filled.replaced:
            return out
        rows = [row for group in filled.groups for row in group.payloads]
        start = self.accelerator.process_index * len(inputs)
        batch = join_rows(rows[start:start + len(inputs)], self._tokenizer.pad_token_id)
        device = self.accelerator.device
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        counted = batch["completion_mask"] * batch["tool_mask"] if "tool_mask" in batch else batch["completion_mask"]
        batch["num_items_in_batch"] = self.accelerator.gather(counted.sum()).sum()
        return batch

    # ---- checkpoints ------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        if self.buffer is not None and self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f"{SSB_STATE_FILE}.partial"
            torch.save(self.buffer.state_dict(), partial)
            os.replace(partial, folder / SSB_STATE_FILE)
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.buffer is None or checkpoint is None:
            return
        path = Path(checkpoint) / SSB_STATE_FILE
        if not path.is_file():
            raise MpoError(f"{checkpoint}: no {SSB_STATE_FILE} (the sample buffer's state); it cannot resume "
                           "exactly: delete the checkpoint to train afresh")
        self.buffer.load_state_dict(torch.load(path, weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not reload_full_model(self, resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def create_model_card(self, *args, **kwargs):
        """No ``README.md`` model card in the run folder (TRL writes one with every checkpoint)."""

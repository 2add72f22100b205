"""The GRPO trainer: TRL 1.16's ``GRPOTrainer`` with the hybrid reward's metrics and the Selective Sample
Buffer (Skywork R1V2, arXiv 2504.16656).

What comes from ``GRPOTrainer`` unchanged: sampling a group of ``num_generations`` completions per
prompt (vLLM; or transformers ``generate``, row by row with a seed per row of the global batch,
:class:`mpo.grpo.sampling.RowSeededGeneration`, so 2 ranks sample what one process does), the reward
functions' weighted sum and the group-normalised advantages, the loss (``loss_type``, clip ε, KL
coefficient β), the optimizer, gradient accumulation, DDP / DeepSpeed, checkpoints and resume. What
:class:`MpoGRPOTrainer` adds:

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
  replayed row carries its stored advantage, reference log-probs and the log-probs of the policy that
  sampled it (``old_per_token_logps``, one no-grad pass per generation batch while the buffer is on,
  :meth:`MpoGRPOTrainer._sampling_logps`), so TRL's clipped surrogate takes its ratio against the
  policy that sampled it, as PPO does for any off-policy sample: a replayed completion stops being
  pushed once the ratio leaves [1 - ε, 1 + ε]. (Taken as on-policy, ratio 1, a replayed wrong answer is
  pushed down at every replay, and the KL term's exp(ref - logp) grew to 1e9 in ``mpo demo --grpo``.)
  For the batch's own rows those log-probs are the current ones (ratio 1, as TRL has it). Where
  nothing is replaced, TRL's batch is returned as it is. Logged per step: ``ssb/effective_fraction``,
  ``ssb/zero_signal_groups``, ``ssb/replayed_groups``, ``ssb/buffer_size``; with the buffer off
  ``ssb/effective_fraction`` and ``ssb/zero_signal_groups`` still (the with/without comparison).
- The buffer in every checkpoint: ``checkpoint-N/`` :data:`SSB_STATE_FILE`, written before transformers
  writes the checkpoint's ``trainer_state.json`` (the file that marks it complete,
  :func:`mpo.keys.last_complete_checkpoint`) and read back on resume, so a resumed run draws what an
  uninterrupted one would.
- Prompts' ids from :meth:`mpo.chat.ChatEncoder.encode_prompts` (:meth:`MpoGRPOTrainer._tokenize_prompts`),
  the one encoding of a prompt that rollout, scoring and training share: a control token's text in a
  prompt (``<|im_end|>``, ``<|image_pad|>``...) is tokenized as plain text, as ``data.special_tokens:
  escape`` says (``error`` refuses such prompts before the trainer is built), where TRL's own rendering
  would make it the control token or stop on an image-token count. Ordinary prompts get TRL's ids and
  multimodal fields exactly. TRL's forward pass re-runs the processor on the rendered prompts for the
  per-image tensors; while :meth:`MpoGRPOTrainer._generate_and_score_completions` runs, that call is
  answered from the same encodings (:class:`_EncodedPrompts`), left-padded as TRL pads ``prompt_ids``.
- Metrics of other callbacks in the step's log row (:class:`LoggedCallback`: the evals in training of
  :mod:`mpo.rounds.grpo_eval`).
- ``metrics.jsonl`` (:class:`mpo.train.setup.MetricsFile`), a preemption signal ending training with a
  checkpoint (:class:`mpo.train.setup.StopOnSignal`), full models resumed through ``from_pretrained``
  (:func:`mpo.train.trainer.reload_full_model`).
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from mpo.chat import PER_TOKEN, ChatEncoder
from mpo.errors import MpoError
from mpo.grpo.advantages import zero_signal
from mpo.grpo.rows import join_rows, split_rows
from mpo.grpo.sampling import RowSeededGeneration
from mpo.grpo.ssb import Group, Identity, SampleBuffer, effective_fraction
from mpo.train.setup import METRICS_FILE, MetricsFile, StopOnSignal
from mpo.train.trainer import reload_full_model

# TRL 1.16 asks transformers 5.2x's deprecated ``is_gradient_checkpointing`` at every generation: not the user's
warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)

# the inputs of a batch that TRL's forward pass takes besides ids and masks (as GRPOTrainer._compute_loss)
FORWARD_FIELDS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                  "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
SSB_STATE_FILE = "ssb_state.pt"  # the Selective Sample Buffer's state, inside each checkpoint-N/


class LoggedCallback(TrainerCallback):
    """A callback whose :attr:`pending` metrics join the trainer's next log row (``metrics.jsonl``, W&B);
    to log them at the step that made them, set ``control.should_log`` there."""

    def __init__(self):
        self.pending: dict[str, float] = {}


def _on_cpu(row: dict) -> dict:
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in row.items()}


def prompt_fields(encoded, per_token=()) -> dict:
    """TRL's ``multimodal_fields`` of a batch of :class:`mpo.chat.PromptEncoding`: each per-image output
    joined over the batch's images, each per-token list one per prompt (the keys in ``per_token`` for
    every prompt, 0s where the encoder gave none: the processor returns them for text-only prompts too)."""
    fields = {key: torch.cat([e.vision[key] for e in encoded if key in e.vision])
              for key in dict.fromkeys(k for e in encoded for k in e.vision)}
    for key in dict.fromkeys([*per_token, *(k for e in encoded for k in e.token_types)]):
        fields[key] = [e.token_types.get(key, [0] * len(e.input_ids)) for e in encoded]
    return fields


class _EncodedPrompts:
    """The processor TRL's ``_generate_and_score_completions`` sees while :class:`MpoGRPOTrainer` runs it:
    the real one in every attribute, except that its call on the batch's rendered prompts with their
    images (the forward pass's per-image tensors and per-token types) is answered from the encodings
    :meth:`MpoGRPOTrainer._tokenize_prompts` made, per-token lists left-padded as TRL pads
    ``prompt_ids``: they line up with the ids TRL trains on, control-token text escaped or not."""

    def __init__(self, processor, trainer: MpoGRPOTrainer):
        self._processor, self._trainer = processor, trainer

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, *args, **kwargs):
        from transformers import BatchFeature
        from trl.trainer.utils import pad

        encoded, self._trainer._encoded = self._trainer._encoded, None
        text = kwargs.get("text")
        if encoded is None or args or kwargs.get("images") is None or not isinstance(text, list) \
                or len(text) != len(encoded):
            return self._processor(*args, **kwargs)
        fields = prompt_fields(encoded)
        for key in [k for k, v in fields.items() if isinstance(v, list)]:
            fields[key] = pad([torch.tensor(v) for v in fields[key]], padding_value=0, padding_side="left")
        return BatchFeature(fields)


class MpoGRPOTrainer(RowSeededGeneration, GRPOTrainer):
    """``GRPOTrainer`` with the components of :mod:`mpo.grpo.rewards` as its reward functions (pass their
    weights as ``GRPOConfig.reward_weights``), ``ssb`` a :class:`mpo.config.grpo.SsbConfig` (None or
    disabled: no buffer), ``identity`` what buffered samples are valid for
    (:class:`mpo.grpo.ssb.Identity`; default: the policy's ``model_type`` and no prompt set) and
    ``encoder`` the :class:`mpo.chat.ChatEncoder` prompts are encoded with (default: one on the processor
    and TRL's stop ids)."""

    def __init__(self, *args, components, ssb=None, identity: Identity | None = None,
                 encoder: ChatEncoder | None = None, **kwargs):
        super().__init__(*args, reward_funcs=list(components), **kwargs)
        self.encoder = encoder or ChatEncoder(self.processing_class, self.eos_token_ids)
        self._encoded = None  # the batch's prompt encodings, between _tokenize_prompts and the forward pass
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

    # ---- prompts' ids ----------------------------------------------------------------------------

    def _tokenize_prompts(self, prompts: list):
        """TRL's ``(prompt_ids, images, multimodal_fields)`` from :meth:`mpo.chat.ChatEncoder.encode_prompts`
        (a control token's text in a prompt as plain text; any other prompt's ids and fields are TRL's);
        the encodings are kept for the forward pass (:class:`_EncodedPrompts`). Tools, environments or a
        chat template given to TRL itself: TRL's own tokenization."""
        from trl.data_utils import is_conversational, prepare_multimodal_messages

        if self.tools or self.environment_factories is not None or self.chat_template is not None \
                or self.chat_template_kwargs or not is_conversational({"prompt": prompts[0]}):
            return super()._tokenize_prompts(prompts)
        if self._is_vlm:
            prompts = [prepare_multimodal_messages(prompt) for prompt in prompts]
        images = [[part["image"] for message in prompt if isinstance(message["content"], list)
                   for part in message["content"] if part["type"] == "image"] for prompt in prompts]
        self._encoded = self.encoder.encode_prompts(prompts, images)
        names = getattr(self.processing_class, "model_input_names", ()) if self._is_vlm else ()
        fields = prompt_fields(self._encoded, [k for k in PER_TOKEN if k in names])
        images = [found or None for found in images] if any(images) else None
        return [e.input_ids for e in self._encoded], images, fields

    def _row_inputs(self, prompt_ids, images, multimodal_fields, i):
        """Row ``i``'s generation inputs from its own encoding (any image layout, InternVL's tiles too);
        without encodings (TRL tokenized the batch): cut from the batch's
        (:func:`mpo.grpo.sampling.row_inputs`)."""
        if self._encoded is None or len(self._encoded) != len(prompt_ids):
            return super()._row_inputs(prompt_ids, images, multimodal_fields, i)
        per_token = [k for k in PER_TOKEN if k in multimodal_fields]
        return [prompt_ids[i]], None if images is None else [images[i]], prompt_fields(self._encoded[i:i + 1],
                                                                                        per_token)

    @contextmanager
    def _encoded_forward(self):
        """While TRL generates and scores a batch: its processor is :class:`_EncodedPrompts`."""
        processor = self.processing_class
        self.processing_class = _EncodedPrompts(processor, self)
        try:
            yield
        finally:
            self.processing_class, self._encoded = processor, None

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
        with self._encoded_forward():
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

        if out.get("old_per_token_logps") is None:
            out["old_per_token_logps"] = self._sampling_logps(out)
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

    def _sampling_logps(self, batch: dict) -> torch.Tensor:
        """Per-token log-probs of ``batch``'s completions under the current policy, the one that sampled
        them (no gradient; the forward pass of TRL's ``_compute_loss``)."""
        from trl.models.utils import disable_gradient_checkpointing

        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        fields = {key: batch.get(key) for key in FORWARD_FIELDS}
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model, ids, mask, batch["completion_ids"].size(1), self.args.per_device_train_batch_size,
                **fields)
        return logps

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, LoggedCallback):
                logs.update(callback.pending)
                callback.pending = {}
        super().log(logs, start_time)

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

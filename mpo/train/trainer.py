"""The MPO trainer: :class:`transformers.Trainer` with the MPO loss, δ and MPO metrics.

What comes from ``transformers.Trainer`` unchanged: the optimizer and schedule, gradient
accumulation, DDP / DeepSpeed launch, bf16 autocast, gradient checkpointing, checkpoints and resume,
W&B reporting. What this class adds:

- ``compute_loss``: policy log-probs of a pair batch with one vision encode per pair and, with
  ``train.share_prompt``, one prompt per pair (:mod:`mpo.train.shared_prefix`; else
  :func:`mpo.train.logprobs.pair_logps`), reference log-probs (precomputed and carried in the batch, a
  frozen ``ref_model``, or the PEFT model with its adapter disabled), and :func:`mpo.train.losses.mpo_loss`.
- δ of the BCO quality loss (:class:`mpo.train.losses.DeltaTracker`): every micro-batch of an optimizer
  step uses the same δ; the rewards of the whole accumulation window are summed (and all-reduced
  across ranks) and folded in once per optimizer step, so δ does not depend on how a window is split
  into micro-batches. Evaluation reads δ and never updates it. δ is Trainer state
  (:class:`DeltaState`, transformers' ``ExportableState``): it is written inside every checkpoint's
  ``trainer_state.json`` (the file whose presence marks a checkpoint complete, so a complete
  checkpoint always has δ) and restored on resume.
- Metrics, each a mean over the micro-batches (losses) or pairs (rewards, log-probs) since the last
  log, all-reduced across ranks: ``loss/{preference,quality,generation}`` (raw),
  ``weighted/{...}`` (times their weights), ``delta``, ``rewards/{chosen,rejected,margins,accuracies}``
  (β·log-ratios, not scaled by the weights), ``logps/{chosen,rejected}``, ``grad_norm`` (mean over
  the optimizer steps), ``learning_rate`` (the last step's) and ``tokens/s`` (non-pad tokens through
  the policy per wall-clock second). They go wherever ``report_to`` sends logs and, on the main
  process, to ``OUTPUT_DIR/metrics.jsonl`` (one JSON object per log). The end-of-training row's
  ``train_loss`` is the mean over every step, a resumed run's too (:class:`LossTotal`).
- A preemption signal stops training at the end of its step with a checkpoint
  (:class:`mpo.train.setup.StopOnSignal`, :mod:`mpo.preempt`).

Not supported: FSDP (the single vision encode calls the vision tower outside the root forward) and a
live reference model under ZeRO-3 (use the default precomputed reference).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from mpo.errors import MpoError
from mpo.train.logprobs import PairLogps
from mpo.train.losses import DeltaTracker, mpo_loss, window_sum_across_ranks
from mpo.train.setup import METRICS_FILE, MetricsFile, StopOnSignal
from mpo.train.shared_prefix import PairForward


class MetricWindow:
    """Sums and counts per metric since the last log, kept as tensors (no device sync per step)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, key: str, total: torch.Tensor | float, count: float = 1.0) -> None:
        total = torch.as_tensor(total, dtype=torch.float64).detach()
        self.sums[key] = self.sums[key] + total.to(self.sums[key].device) if key in self.sums else total
        self.counts[key] += count

    def means(self, device) -> dict[str, float]:
        """All-reduce sums and counts across ranks; return the means and reset."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        packed = torch.stack(
            [self.sums[k].to(device).reshape(()) for k in keys]
            + [torch.tensor(self.counts[k], dtype=torch.float64, device=device) for k in keys]
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(packed)
        totals, counts = packed[: len(keys)].tolist(), packed[len(keys) :].tolist()
        self.sums.clear()
        self.counts.clear()
        return {k: t / c for k, t, c in zip(keys, totals, counts) if c > 0}


class _WindowCallback(TrainerCallback):
    """Closes the δ window after each optimizer step (before logging and saving)."""

    def __init__(self, trainer: MPOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._last_log_time = time.perf_counter()
        # the sum of the logged losses goes on from the checkpoint's (transformers restarts it at 0)
        self.trainer._total_loss_scalar = self.trainer.loss_total.total

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.close_window()


class DeltaState(TrainerCallback, ExportableState):
    """δ as Trainer state: ``state()`` goes into ``trainer_state.json`` (``stateful_callbacks``) with
    every checkpoint; on resume transformers builds a new instance from it (``args``, then the
    ``saved`` attribute) in place of this one (``restore_callback_states_from_checkpoint``)."""

    def __init__(self, mode: str = "cumulative", ema_decay: float = 0.99):
        self.tracker = DeltaTracker(mode, ema_decay)

    @property
    def saved(self) -> dict:
        return self.tracker.state_dict()

    @saved.setter
    def saved(self, state: dict) -> None:
        self.tracker.load_state_dict(state)

    def state(self) -> dict:
        return {"args": {"mode": self.tracker.mode, "ema_decay": self.tracker.ema_decay},
                "attributes": {"saved": self.saved}}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0 and self.tracker.mode != "none" and "DeltaState" not in state.stateful_callbacks:
            raise MpoError(f"{args.output_dir}: the checkpoint resumed at step {state.global_step} holds no δ state "
                           f"(bco_delta={self.tracker.mode}); it cannot resume exactly: train afresh")


class LossTotal(TrainerCallback, ExportableState):
    """The Trainer's running sum of logged losses (``_total_loss_scalar``) as Trainer state, so a
    resumed training's end-of-training ``train_loss`` is the mean over every step (transformers'
    own covers only the steps of the last process)."""

    def __init__(self):
        self.total = 0.0

    def state(self) -> dict:
        return {"args": {}, "attributes": {"total": self.total}}


def find_peft_model(model):
    """The PeftModel under DDP / DeepSpeed wrappers, or None."""
    while hasattr(model, "module"):
        model = model.module
    return model if hasattr(model, "disable_adapter") and hasattr(model, "peft_config") else None


class MPOTrainer(Trainer):
    """``Trainer`` on :class:`mpo.train.collate.PairDataset` batches with the MPO loss.

    Args (beyond ``Trainer``'s): ``loss`` a :class:`mpo.config.LossConfig`; ``ref_model`` a frozen
    reference for ``reference: live`` with full tuning (None when the batches carry precomputed
    reference log-probs, or with PEFT, where the adapter-disabled model is the reference);
    ``pair_forward`` the pair log-prob path (:func:`mpo.train.shared_prefix.choose_pair_forward`; default
    the unshared :func:`mpo.train.logprobs.pair_logps`); ``pair_lengths`` per-pair row lengths for the
    length-grouped train sampler (:mod:`mpo.train.batching`; None: transformers' own sampler).
    """

    def __init__(self, *args, loss, ref_model=None, pair_forward=None, pair_lengths=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pair_forward = pair_forward or PairForward(False, "no pair_forward given")
        self.pair_lengths = pair_lengths
        self._padding = torch.zeros(3, dtype=torch.float64)  # tokens, slots, micro-batches (mpo.train.batching)
        self.loss_config = loss
        self.args.restore_callback_states_from_checkpoint = True  # δ comes back with the checkpoint
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.requires_grad_(False).eval().to(self.args.device)
        self._window_sum = torch.zeros((), dtype=torch.float64)
        self._window_count = 0
        self._metrics = {"train": MetricWindow(), "eval": MetricWindow()}
        self._grad_norms: list[float] = []
        self._tokens = torch.zeros((), dtype=torch.float64)
        self._last_log_time = time.perf_counter()
        self.add_callback(DeltaState(loss.bco_delta, loss.ema_decay))
        self.add_callback(_WindowCallback(self))
        self.add_callback(MetricsFile(Path(self.args.output_dir) / METRICS_FILE))
        self.add_callback(LossTotal())
        self.stop_on_signal = StopOnSignal()
        self.add_callback(self.stop_on_signal)

    @property
    def delta(self) -> DeltaTracker:
        """δ's tracker (held by the :class:`DeltaState` callback, which a resume replaces)."""
        return next(c for c in self.callback_handler.callbacks if isinstance(c, DeltaState)).tracker

    @property
    def loss_total(self) -> LossTotal:
        return next(c for c in self.callback_handler.callbacks if isinstance(c, LossTotal))

    # ---- loss ---------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy = self.pair_forward(model, inputs)
        ref_chosen, ref_rejected = self._reference_logps(model, inputs, policy)
        chosen_tokens, chosen_mask = policy.chosen_tokens
        cfg = self.loss_config
        out = mpo_loss(
            policy.chosen,
            policy.rejected,
            ref_chosen,
            ref_rejected,
            chosen_tokens,
            chosen_mask,
            weights=tuple(cfg.weights),
            beta=cfg.beta,
            delta=self.delta.value,
            sft_reduction=cfg.sft_reduction,
        )
        training = model.training
        if training:
            rewards = torch.cat([out.chosen_rewards, out.rejected_rewards]).to(torch.float64)
            self._window_sum = self._window_sum.to(rewards.device) + rewards.sum()
            self._window_count += rewards.numel()
            self._tokens = self._tokens.to(rewards.device) + inputs["attention_mask"].sum()
            self._padding = self._padding.to(rewards.device) + self.pair_forward.padding(inputs)
        self._record(out, policy, "train" if training else "eval")
        return (out.total, {"mpo": out}) if return_outputs else out.total

    def _reference_logps(self, model, inputs, policy: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = policy.sums.dtype
        if "ref_logps_bits" in inputs:
            ref = inputs["ref_logps_bits"].view(torch.float64).to(dtype)
        else:
            with torch.no_grad():
                ref = self._live_reference(model, inputs).sums.detach().to(dtype)
        b = policy.batch_size
        return ref[:b], ref[b:]

    def _live_reference(self, model, inputs) -> PairLogps:
        if self.ref_model is not None:
            return self.pair_forward(self.ref_model, inputs)
        peft_model = find_peft_model(model)
        if peft_model is None:
            raise MpoError(
                "no reference: the batch carries no precomputed reference log-probs, no ref_model was given "
                "and the model has no adapter to disable (set train.reference_logps or pass ref_model)"
            )
        with peft_model.disable_adapter():
            return self.pair_forward(model, inputs)

    # ---- length-grouped batches (mpo.train.batching) ------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        if self.pair_lengths is None or (train_dataset is not None and train_dataset is not self.train_dataset):
            return super()._get_train_sampler(train_dataset)
        from mpo.train.batching import LengthGroupedPairSampler

        a = self.args
        step = a.train_batch_size * a.gradient_accumulation_steps * max(1, a.world_size)
        seed = a.data_seed if a.data_seed is not None else a.seed
        return LengthGroupedPairSampler(self.pair_lengths, step, seed=seed)

    def padding_report(self) -> dict:
        """Tokens, slots and padding fraction of the training micro-batches run (all ranks)."""
        from mpo.train.batching import padding_summary

        return padding_summary(self._padding, self.pair_forward, self.pair_lengths is not None)

    # ---- δ window -------------------------------------------------------------------------------

    def close_window(self) -> None:
        """Fold the finished accumulation window's rewards (all ranks) into δ; called per optimizer step."""
        count = self._window_count
        total = self._window_sum
        self._window_sum = torch.zeros((), dtype=torch.float64, device=total.device)
        self._window_count = 0
        if self.delta.mode == "none":
            return
        reward_sum, n = window_sum_across_ranks(total, count)
        if n > 0:
            self.delta.update(reward_sum, n)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not reload_full_model(self, resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    # ---- metrics --------------------------------------------------------------------------------

    def _record(self, out, policy: PairLogps, mode: str) -> None:
        window = self._metrics[mode]
        for part in ("preference", "quality", "generation"):
            window.add(f"loss/{part}", getattr(out, part))
            window.add(f"weighted/{part}", getattr(out, f"{part}_weighted"))
        window.add("delta", self.delta.value)
        pairs = out.chosen_rewards.numel()
        window.add("rewards/chosen", out.chosen_rewards.sum(), pairs)
        window.add("rewards/rejected", out.rejected_rewards.sum(), pairs)
        window.add("rewards/margins", out.margins.sum(), pairs)
        window.add("rewards/accuracies", out.accuracies.sum(), pairs)
        window.add("logps/chosen", policy.chosen.detach().sum(), pairs)
        window.add("logps/rejected", policy.rejected.detach().sum(), pairs)

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if grad_norm is not None:
            self._grad_norms.append(float(grad_norm))
        return grad_norm

    def log(self, logs: dict, start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        device = self.args.device
        means = self._metrics[mode].means(device)
        if mode == "eval":
            means = {f"eval_{k}": v for k, v in means.items()}
        elif "loss" in logs:
            if self._grad_norms:
                logs["grad_norm"] = sum(self._grad_norms) / len(self._grad_norms)
                self._grad_norms.clear()
            logs["tokens/s"] = self._tokens_per_second(device)
            self.loss_total.total = self._total_loss_scalar  # what the next checkpoint keeps
        if "train_loss" in logs:  # the end-of-training row: the mean over every step, resumed or not
            logs["train_loss"] = self._total_loss_scalar / max(self.state.global_step, 0.001)
        logs.update(means)
        super().log(logs, start_time)

    def _tokens_per_second(self, device) -> float:
        tokens = self._tokens.to(device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(tokens)
        now = time.perf_counter()
        rate = float(tokens) / max(now - self._last_log_time, 1e-9)
        self._tokens = torch.zeros((), dtype=torch.float64, device=tokens.device)
        self._last_log_time = now
        return rate

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def reload_full_model(trainer, checkpoint, model=None) -> bool:
    """A full model's weights from ``checkpoint`` through ``from_pretrained`` (True), for a Trainer's
    ``_load_from_checkpoint`` (this one's and :class:`mpo.grpo.trainer.MpoGRPOTrainer`'s); False for a
    PEFT model, FSDP or a model that is not a ``PreTrainedModel``: the Trainer's own loading then.
    transformers 5.23's Trainer loads ``model.safetensors`` with a raw, non-strict ``load_state_dict``,
    but checkpoints are saved in the legacy key layout (``model.layers.*``, ``visual.*`` for
    Qwen2.5-VL), so on resume it silently matched no key and kept the initial weights."""
    from transformers import PreTrainedModel

    target = trainer.model if model is None else model
    if find_peft_model(target) is not None or trainer.is_fsdp_enabled or not isinstance(target, PreTrainedModel):
        return False
    dtype = next(target.parameters()).dtype
    fresh = type(target).from_pretrained(checkpoint, dtype=dtype)
    target.load_state_dict(fresh.state_dict(), strict=True)
    return True


def reference_context(model):
    """Context for a reference pass outside training: PEFT adapter disabled; otherwise a no-op."""
    peft_model = find_peft_model(model)
    return peft_model.disable_adapter() if peft_model is not None else contextlib.nullcontext()

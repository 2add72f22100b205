"""The MPO loss as pure tensor functions: DPO sigmoid, BCO pair, SFT, their weighted sum, and δ.

Notation (MPO, arXiv 2411.10442): a *log-ratio* is the sum of the policy's token log-probs over the
response tokens minus the same sum under the reference policy; the implicit reward is
``r = β · logratio``. Mixed Preference Optimization minimises ``w_p·L_p + w_q·L_q + w_g·L_g``
(published weights 0.8 / 0.2 / 1.0, β = 0.1). Each loss function returns one value per example and
leaves the reduction to the caller; :func:`mpo_loss` does the reduction and the weighting. Nothing
here touches a model, a trainer or an optimizer.

δ, the reward shift of the BCO quality loss
-------------------------------------------
BCO (arXiv 2404.04656, the binary-classifier loss with a reward shift) subtracts δ, a moving average
of past rewards, so that "good" means "better than the policy has recently been". Implementations
disagree, so :class:`DeltaTracker` makes the choice explicit:

* InternVL / TRL <= 0.28 / ms-swift: δ is the cumulative mean of per-*micro-batch* means of
  ``[r_c; r_r]``, updated inside the loss *before* it is used (the current micro-batch counts), also
  during evaluation, and never checkpointed. δ therefore resets on resume and depends on how a batch
  is split for gradient accumulation (trl issue 7265).
* TRL >= 0.29, including 1.16: no δ at all (``bco_pair`` uses δ = 0).
* Here: ``DeltaTracker.value`` is the δ for the current optimizer step (0.0 before any update).
  ``update(reward_sum, count)`` is called once per optimizer step with the sum and count of all
  rewards ``[r_c; r_r]`` of the whole gradient-accumulation window, summed across ranks (see
  :func:`window_sum_across_ranks`). With window mean ``m = sum / count``: ``"cumulative"`` sets δ to
  the mean of all past window means (each window counts once, as InternVL counts each batch once);
  ``"ema"`` sets δ = m on the first update and ``δ = decay·δ + (1-decay)·m`` afterwards; ``"none"``
  keeps δ = 0 (TRL 1.16's behaviour). The δ used in window t comes only from windows < t: it lags
  one window, and that lag is what makes it independent of the micro-batch split. Evaluation never
  calls ``update`` (read-only), and ``state_dict()`` holds plain numbers for the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

DeltaMode = Literal["none", "cumulative", "ema"]
SftReduction = Literal["sequence", "token"]


def dpo_sigmoid(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float
) -> torch.Tensor:
    """Preference loss ``L_p = -log σ(β·(lc - lr))``: DPO (arXiv 2305.18290, Eq. 7); MPO's L_p.

    Args: ``chosen_logratios`` [B], ``rejected_logratios`` [B] (summed policy minus reference log-probs).
    Returns: [B], one loss per pair.
    """
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def bco_pair(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    delta: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Quality loss ``L_q = -log σ(r_c - δ) - log σ(-(r_r - δ))``: BCO (arXiv 2404.04656); MPO's L_q.

    Args: ``chosen_logratios`` [B], ``rejected_logratios`` [B]; ``delta`` a float or 0-dim tensor
    (treated as a constant: a tensor is detached). δ = 0 is TRL 1.16's ``bco_pair``.
    Returns: [B], one loss per pair.
    """
    delta = torch.as_tensor(delta, dtype=chosen_logratios.dtype, device=chosen_logratios.device).detach()
    chosen_rewards = beta * chosen_logratios
    rejected_rewards = beta * rejected_logratios
    return -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))


def _masked_nll_sums(
    token_logps: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if token_logps.shape != response_mask.shape:
        raise ValueError(
            f"token_logps {tuple(token_logps.shape)} and mask {tuple(response_mask.shape)} differ"
        )
    mask = response_mask.bool()
    # torch.where rather than a product, so -inf log-probs at padded positions cannot turn into nan.
    nll = -torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(dim=-1)
    return nll, mask.sum(dim=-1)


def sft_nll(token_logps: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Generation loss ``L_g = -ℓθ(y_c) / |y_c|`` per example: MPO's L_g (token-mean NLL of y_c).

    Args: ``token_logps`` [B, T], the policy's log-prob of each target token; ``response_mask`` [B, T],
    true/1 on the chosen response's tokens. Only the mask decides which tokens count: this function
    never sees token ids, so it cannot drop id 0 (TRL 0.21 did) -- the caller must not either.
    An example with no response tokens gets loss 0.
    Returns: [B]. Its batch mean is the paper's "mean of per-example means" (``sft_reduction="sequence"``).

    TRL 1.16 reduces differently: ``-chosen_per_token_logps[chosen_mask.bool()].mean()``, one
    token-mean over all chosen tokens of the micro-batch (trl/trainer/dpo_trainer.py:1495-1502), so
    longer responses weigh more. :func:`sft_nll_token_mean` computes that; the two agree when every
    response in the batch has the same length.
    """
    nll, counts = _masked_nll_sums(token_logps, response_mask)
    return nll / counts.clamp(min=1).to(nll.dtype)


def sft_nll_token_mean(token_logps: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """TRL 1.16's SFT reduction: total NLL over all masked tokens of the batch / their count.

    Args: ``token_logps`` [B, T], ``response_mask`` [B, T]. Returns: a scalar (0-dim). Call it per
    micro-batch and per rank, as TRL does, to reproduce TRL's loss exactly. Differs from TRL only when
    the batch has no response token at all: TRL gives nan, this gives 0.
    """
    nll, counts = _masked_nll_sums(token_logps, response_mask)
    return nll.sum() / counts.sum().clamp(min=1).to(nll.dtype)


@dataclass(frozen=True)
class MPOLoss:
    """:func:`mpo_loss`'s result. Scalars are 0-dim tensors (not detached); backpropagate ``total``.

    Rewards are ``β·logratio``, not scaled by the loss weights (TRL 0.21 logged them multiplied by
    the weights' sum); ``margins = chosen_rewards - rejected_rewards``; ``accuracies`` is 1.0 where the
    chosen reward is strictly higher (ties count as wrong, as in TRL). All per-pair tensors are detached.
    """

    total: torch.Tensor
    preference: torch.Tensor  # raw batch mean of dpo_sigmoid
    quality: torch.Tensor  # raw batch mean of bco_pair
    generation: torch.Tensor  # raw SFT loss under the chosen reduction
    preference_weighted: torch.Tensor
    quality_weighted: torch.Tensor
    generation_weighted: torch.Tensor
    chosen_rewards: torch.Tensor  # [B]
    rejected_rewards: torch.Tensor  # [B]
    margins: torch.Tensor  # [B]
    accuracies: torch.Tensor  # [B]


def _check_arguments(weights, sft_reduction, chosen_token_logps, summed) -> None:
    if len(weights) != 3:
        raise ValueError(f"weights must be (preference, quality, generation), got {weights!r}")
    if sft_reduction not in ("sequence", "token"):
        raise ValueError(f"sft_reduction must be 'sequence' or 'token', got {sft_reduction!r}")
    shapes = {t.shape for t in summed}
    if len(shapes) != 1 or summed[0].dim() != 1:
        raise ValueError(
            f"the four summed log-prob tensors must all be [B], got shapes {sorted(map(tuple, shapes))}"
        )
    if chosen_token_logps.shape[0] != summed[0].shape[0]:
        raise ValueError("chosen_token_logps and the summed log-probs disagree on the batch size")


def mpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    weights: tuple[float, float, float] = (0.8, 0.2, 1.0),
    beta: float = 0.1,
    delta: float | torch.Tensor = 0.0,
    sft_reduction: SftReduction = "sequence",
) -> MPOLoss:
    """MPO objective L (arXiv 2411.10442): ``w_p·mean(L_p) + w_q·mean(L_q) + w_g·L_g``.

    Args: ``policy_*_logps`` and ``ref_*_logps`` [B], response log-probs summed over tokens (normally
    ``policy_chosen_logps == sft-masked sum of chosen_token_logps``); ``chosen_token_logps`` and
    ``chosen_mask`` [B, T] for the SFT term; ``weights`` (w_p, w_q, w_g); ``delta`` the BCO shift
    (``DeltaTracker.value``). ``sft_reduction="sequence"`` (default) averages per-example token-means
    as the paper writes L_g; ``"token"`` is TRL 1.16's token-mean over the whole micro-batch. With
    δ = 0 and ``"token"``, ``total`` equals TRL 1.16's DPOTrainer loss for
    ``loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=weights``, which sums
    ``per_sequence_loss.mean() * weight`` over the loss types (dpo_trainer.py:1386-1528).
    """
    _check_arguments(weights, sft_reduction, chosen_token_logps,
                     (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    preference = dpo_sigmoid(chosen_logratios, rejected_logratios, beta).mean()
    quality = bco_pair(chosen_logratios, rejected_logratios, beta, delta).mean()
    if sft_reduction == "sequence":
        generation = sft_nll(chosen_token_logps, chosen_mask).mean()
    else:
        generation = sft_nll_token_mean(chosen_token_logps, chosen_mask)
    w_p, w_q, w_g = (float(w) for w in weights)
    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    return MPOLoss(
        total=w_p * preference + w_q * quality + w_g * generation,
        preference=preference,
        quality=quality,
        generation=generation,
        preference_weighted=w_p * preference,
        quality_weighted=w_q * quality,
        generation_weighted=w_g * generation,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=chosen_rewards - rejected_rewards,
        accuracies=(chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
    )


def window_sum_across_ranks(reward_sum: torch.Tensor, count: torch.Tensor | int) -> tuple[float, int]:
    """Sum a window's reward sum and reward count over all ranks; a no-op when not distributed.

    Args: ``reward_sum`` 0-dim tensor (sum of ``[r_c; r_r]`` over this rank's micro-batches of the
    window), ``count`` the number of those rewards. Returns plain ``(sum, count)`` for
    :meth:`DeltaTracker.update`. Every rank must call it (it is a collective when distributed).
    """
    packed = torch.stack(
        [
            reward_sum.detach().to(torch.float64).reshape(()),
            torch.as_tensor(count, dtype=torch.float64, device=reward_sum.device).reshape(()),
        ]
    )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
    total, n = packed.tolist()
    return total, round(n)


class DeltaTracker:
    """δ for the BCO quality loss, updated once per optimizer step; see the module docstring.

    ``mode``: ``"none"`` (δ = 0 always), ``"cumulative"`` (mean of past window means) or ``"ema"``
    (exponential moving average of window means with ``ema_decay`` in (0, 1)).
    """

    MODES = ("none", "cumulative", "ema")

    def __init__(self, mode: DeltaMode = "cumulative", ema_decay: float = 0.99):
        if mode not in self.MODES:
            raise ValueError(f"DeltaTracker mode must be one of {self.MODES}, got {mode!r}")
        if not (isinstance(ema_decay, (int, float)) and 0.0 < ema_decay < 1.0):
            raise ValueError(
                f"DeltaTracker ema_decay must be a number strictly between 0 and 1, got {ema_decay!r}"
            )
        self.mode = mode
        self.ema_decay = float(ema_decay)
        self._value = 0.0
        self._num_windows = 0
        self._window_mean_sum = 0.0  # cumulative mode: sum of all past window means

    @property
    def value(self) -> float:
        """δ for the current optimizer step: 0.0 before the first update and always in mode "none"."""
        return self._value

    @property
    def num_windows(self) -> int:
        return self._num_windows

    def update(self, reward_sum: float, count: int) -> float:
        """Fold in one finished accumulation window (its rewards' sum and count, all ranks); returns new δ."""
        if self.mode == "none":
            return self._value
        if count <= 0:
            raise ValueError(
                f"DeltaTracker.update needs at least one reward in the window, got count={count}"
            )
        window_mean = float(reward_sum) / int(count)
        if not math.isfinite(window_mean):
            raise ValueError(
                f"DeltaTracker.update got a non-finite window mean ({window_mean}); rewards diverged"
            )
        self._num_windows += 1
        if self.mode == "cumulative":
            self._window_mean_sum += window_mean
            self._value = self._window_mean_sum / self._num_windows
        elif self._num_windows == 1:
            self._value = window_mean
        else:
            self._value = self.ema_decay * self._value + (1.0 - self.ema_decay) * window_mean
        return self._value

    def state_dict(self) -> dict:
        """Plain, JSON-serialisable state for a checkpoint."""
        return {
            "mode": self.mode,
            "ema_decay": self.ema_decay,
            "value": self._value,
            "num_windows": self._num_windows,
            "window_mean_sum": self._window_mean_sum,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; the mode and decay must match this tracker's."""
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"DeltaTracker state needs keys {sorted(expected)}, got {sorted(state)}")
        if state["mode"] != self.mode or float(state["ema_decay"]) != self.ema_decay:
            raise ValueError(
                f"DeltaTracker state was saved with mode={state['mode']!r}, "
                f"ema_decay={state['ema_decay']}; this tracker has mode={self.mode!r}, "
                f"ema_decay={self.ema_decay}"
            )
        self._value = float(state["value"])
        self._num_windows = int(state["num_windows"])
        self._window_mean_sum = float(state["window_mean_sum"])

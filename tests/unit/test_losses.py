"""mpo.train.losses pinned to numbers worked out by hand (math.log / math.exp, never the function under
test), and to TRL 1.16's own loss code.

TRL's DPOTrainer has no standalone loss function: the maths lives inline in
``DPOTrainer._compute_loss`` (trl/trainer/dpo_trainer.py:1285-1612), which runs the model itself.
``_trl_loss`` below therefore builds a bare DPOTrainer (``__new__``, no ``__init__``), sets the few
attributes that method reads, and hands it a stand-in "model" that returns fixed per-token
log-probs, zeroed where the label is -100 as TRL's fused LM head does
(trl/trainer/utils.py:1627-1664). TRL's loss code is real; only the network is replaced. This
reaches into TRL internals: if a TRL upgrade breaks the harness, fix the harness -- the parity test
against a real TRL training run lives with the trainer tests.
"""

from __future__ import annotations

import collections
import json
import math
import types

import pytest
import torch

from mpo.train.losses import (
    DeltaTracker,
    bco_pair,
    dpo_sigmoid,
    mpo_loss,
    sft_nll,
    sft_nll_token_mean,
    window_sum_across_ranks,
)


def neg_log_sigmoid(x: float) -> float:
    """-log σ(x) = log(1 + e^-x), by hand."""
    return math.log(1.0 + math.exp(-x))


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------- DPO sigmoid and BCO pair


def test_dpo_sigmoid_hand_numbers():
    # β = 0.1. Pair 0: logratios 2 and -1 -> r_c = 0.2, r_r = -0.1, -log σ(0.3) = 0.5543552444685271.
    # Pair 1: logratios equal -> -log σ(0) = log 2 = 0.6931471805599453.
    losses = dpo_sigmoid(t([2.0, 0.0]), t([-1.0, 0.0]), beta=0.1)
    assert losses.shape == (2,)
    assert losses.tolist() == pytest.approx([neg_log_sigmoid(0.3), math.log(2.0)], abs=1e-12)
    assert losses[0].item() == pytest.approx(0.5543552444685271, abs=1e-12)


def test_bco_pair_without_delta_hand_numbers():
    # r_c = 0.2, r_r = -0.1, δ = 0: -log σ(0.2) - log σ(0.1) = 0.5981388693815918 + 0.6443966600735709
    #                                                      = 1.2425355294551625.
    # Pair 1: r_c = r_r = 0 -> 2·log 2.
    losses = bco_pair(t([2.0, 0.0]), t([-1.0, 0.0]), beta=0.1)
    assert losses.tolist() == pytest.approx(
        [neg_log_sigmoid(0.2) + neg_log_sigmoid(0.1), 2 * math.log(2.0)], abs=1e-12
    )
    assert losses[0].item() == pytest.approx(1.2425355294551625, abs=1e-12)


@pytest.mark.parametrize("delta", [0.05, torch.tensor(0.05, dtype=torch.float64, requires_grad=True)])
def test_bco_pair_with_delta_hand_numbers(delta):
    # δ = 0.05: r_c - δ = 0.15 and -(r_r - δ) = -(-0.1 - 0.05) = 0.15, so L = 2·(-log σ(0.15))
    #         = 2 · 0.6209570477895321 = 1.2419140955790642.
    chosen = t([2.0]).requires_grad_()
    losses = bco_pair(chosen, t([-1.0]), beta=0.1, delta=delta)
    assert losses.item() == pytest.approx(2 * neg_log_sigmoid(0.15), abs=1e-12)
    assert losses.item() == pytest.approx(1.2419140955790642, abs=1e-12)
    losses.sum().backward()
    assert chosen.grad is not None
    if isinstance(delta, torch.Tensor):
        assert delta.grad is None  # δ is a statistic, never optimised


# ---------------------------------------------------------------- SFT


def test_sft_nll_uses_only_masked_tokens():
    # Row 0: mask picks -2 and -3 -> (2 + 3) / 2 = 2.5; the masked -inf must not leak in as nan.
    # Row 1: mask picks -0.5 only -> 0.5.  Row 2: no response token -> 0 by convention.
    logps = t([[-1.0, -2.0, -3.0, -math.inf], [-0.5, -math.inf, -7.0, -7.0], [-1.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert sft_nll(logps, mask).tolist() == pytest.approx([2.5, 0.5, 0.0], abs=1e-12)
    assert sft_nll(logps, mask.bool()).tolist() == pytest.approx([2.5, 0.5, 0.0], abs=1e-12)
    # TRL's reduction: all 3 masked tokens of the batch at once -> (2 + 3 + 0.5) / 3 = 1.8333...
    assert sft_nll_token_mean(logps, mask).item() == pytest.approx(5.5 / 3, abs=1e-12)
    # Mean of per-example means (rows 0 and 1) would be (2.5 + 0.5) / 2 = 1.5: the reductions differ.
    assert sft_nll(logps[:2], mask[:2]).mean().item() == pytest.approx(1.5, abs=1e-12)


def test_sft_nll_counts_token_id_zero():
    # Vocabulary of 3, logits [0, 1, 2] at every position: log p(k) = k - L with
    # L = log(1 + e + e²) = 2.40760596444438. Response token ids [2, 0, 1] -> NLLs L-2, L, L-1,
    # mean = L - 1 = 1.4076059644443801. Dropping id 0 (TRL 0.21's bug) would give L - 1.5.
    logits = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64).expand(1, 3, 3)
    labels = torch.tensor([[2, 0, 1]])
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    mask = torch.ones_like(labels)
    big_l = math.log(1.0 + math.e + math.e**2)
    assert sft_nll(token_logps, mask).item() == pytest.approx(big_l - 1.0, abs=1e-12)
    assert sft_nll(token_logps, mask).item() != pytest.approx(big_l - 1.5, abs=1e-6)


def test_sft_nll_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        sft_nll(torch.zeros(2, 3), torch.ones(2, 4))


# ---------------------------------------------------------------- MPO


def _mpo_batch():
    # Pair 0: policy -3 vs ref -5 (chosen) -> lc = 2; policy -4 vs ref -3 (rejected) -> lr = -1.
    # Pair 1: both logratios 0. Chosen token log-probs agree with the sums: [-1, -2] and [-0.5, -1.5, -3].
    return {
        "policy_chosen_logps": t([-3.0, -5.0]),
        "policy_rejected_logps": t([-4.0, -6.0]),
        "ref_chosen_logps": t([-5.0, -5.0]),
        "ref_rejected_logps": t([-3.0, -6.0]),
        "chosen_token_logps": t([[-1.0, -2.0, 0.0], [-0.5, -1.5, -3.0]]),
        "chosen_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
    }


def test_mpo_loss_hand_numbers_and_weighted_sum():
    # preference = (0.5543552444685271 + log 2) / 2                     = 0.6237512125142362
    # quality    = (1.2425355294551625 + 2 log 2) / 2                   = 1.3144149452875267
    # generation = mean(3/2, 5/3) = 1.5833333 ("sequence");  8/5 = 1.6 ("token")
    # total      = 0.8·0.62375 + 0.2·1.31441 + 1.0·1.58333             = 2.3452172924022276
    p = (neg_log_sigmoid(0.3) + math.log(2.0)) / 2
    q = (neg_log_sigmoid(0.2) + neg_log_sigmoid(0.1) + 2 * math.log(2.0)) / 2
    g_seq, g_tok = (1.5 + 5.0 / 3.0) / 2, 8.0 / 5.0
    out = mpo_loss(**_mpo_batch())
    assert (out.preference.item(), out.quality.item(), out.generation.item()) == pytest.approx((p, q, g_seq))
    assert out.preference_weighted.item() == pytest.approx(0.8 * p)
    assert out.quality_weighted.item() == pytest.approx(0.2 * q)
    assert out.generation_weighted.item() == pytest.approx(1.0 * g_seq)
    assert out.total.item() == pytest.approx(0.8 * p + 0.2 * q + g_seq, abs=1e-12)
    assert out.total.item() == pytest.approx(2.3452172924022276, abs=1e-12)
    parts = out.preference_weighted + out.quality_weighted + out.generation_weighted
    assert out.total.item() == pytest.approx(parts.item(), abs=1e-12)

    token = mpo_loss(**_mpo_batch(), sft_reduction="token")
    assert token.generation.item() == pytest.approx(g_tok)
    assert token.total.item() == pytest.approx(0.8 * p + 0.2 * q + g_tok, abs=1e-12)


def test_mpo_loss_rewards_are_unscaled_by_weights():
    # r = β·logratio: r_c = [0.2, 0], r_r = [-0.1, 0], margins [0.3, 0], accuracies [1, 0] (a tie is wrong).
    for weights in [(0.8, 0.2, 1.0), (2.0, 3.0, 4.0)]:
        out = mpo_loss(**_mpo_batch(), weights=weights)
        assert out.chosen_rewards.tolist() == pytest.approx([0.2, 0.0])
        assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.0])
        assert out.margins.tolist() == pytest.approx([0.3, 0.0])
        assert out.accuracies.tolist() == [1.0, 0.0]
    b = mpo_loss(**_mpo_batch(), weights=(2.0, 3.0, 4.0))
    assert b.total.item() == pytest.approx(
        2 * b.preference.item() + 3 * b.quality.item() + 4 * b.generation.item()
    )


def test_mpo_loss_delta_enters_quality_only_and_gradient_flows():
    batch = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in _mpo_batch().items()}
    shifted = mpo_loss(**batch, delta=0.05)
    plain = mpo_loss(**batch)
    assert shifted.preference.item() == plain.preference.item()
    assert shifted.generation.item() == plain.generation.item()
    # pair 0 as in the δ test above; pair 1: -log σ(-0.05) - log σ(0.05) = log(1+e^0.05) + log(1+e^-0.05)
    q = (2 * neg_log_sigmoid(0.15) + neg_log_sigmoid(-0.05) + neg_log_sigmoid(0.05)) / 2
    assert shifted.quality.item() == pytest.approx(q, abs=1e-12)
    shifted.total.backward()
    assert batch["policy_chosen_logps"].grad is not None and batch["chosen_token_logps"].grad is not None
    assert not shifted.chosen_rewards.requires_grad


def test_mpo_loss_rejects_bad_arguments():
    with pytest.raises(ValueError, match="weights"):
        mpo_loss(**_mpo_batch(), weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="sft_reduction"):
        mpo_loss(**_mpo_batch(), sft_reduction="batch")
    bad = _mpo_batch() | {"ref_rejected_logps": t([0.0, 0.0, 0.0])}
    with pytest.raises(ValueError, match="must all be"):
        mpo_loss(**bad)


# ---------------------------------------------------------------- δ tracker

MEANS = [(1.2, 4), (-0.8, 8), (0.8, 2)]  # (sum, count) of three windows: means 0.3, -0.1, 0.4


def test_delta_cumulative_hand_worked():
    # δ before window 1 = 0; after: mean(0.3) = 0.3; mean(0.3, -0.1) = 0.1; mean(0.3, -0.1, 0.4) = 0.2.
    tracker = DeltaTracker("cumulative")
    seen = [tracker.value]
    for reward_sum, count in MEANS:
        seen.append(tracker.update(reward_sum, count))
        assert tracker.value == seen[-1]
    assert seen == pytest.approx([0.0, 0.3, 0.1, 0.2], abs=1e-12)
    assert tracker.num_windows == 3


def test_delta_ema_hand_worked():
    # decay 0.9: first update sets δ = 0.3; then 0.9·0.3 + 0.1·(-0.1) = 0.26; then 0.9·0.26 + 0.1·0.4 = 0.274.
    tracker = DeltaTracker("ema", ema_decay=0.9)
    seen = [tracker.value] + [tracker.update(s, n) for s, n in MEANS]
    assert seen == pytest.approx([0.0, 0.3, 0.26, 0.274], abs=1e-12)


def test_delta_none_stays_zero():
    tracker = DeltaTracker("none")
    for reward_sum, count in MEANS:
        tracker.update(reward_sum, count)
    assert tracker.value == 0.0 and tracker.num_windows == 0


@pytest.mark.parametrize("mode", ["cumulative", "ema"])
def test_delta_state_dict_round_trip_continues_identically(mode):
    first = DeltaTracker(mode, ema_decay=0.9)
    for reward_sum, count in MEANS[:2]:
        first.update(reward_sum, count)
    saved = json.loads(json.dumps(first.state_dict()))  # plain numbers only
    restored = DeltaTracker(mode, ema_decay=0.9)
    restored.load_state_dict(saved)
    assert restored.value == first.value and restored.num_windows == first.num_windows
    assert restored.update(*MEANS[2]) == first.update(*MEANS[2])
    assert restored.state_dict() == first.state_dict()


def test_delta_load_state_dict_refuses_other_settings():
    saved = DeltaTracker("ema", ema_decay=0.9).state_dict()
    with pytest.raises(ValueError, match="mode='ema'"):
        DeltaTracker("cumulative").load_state_dict(saved)
    with pytest.raises(ValueError, match="ema_decay"):
        DeltaTracker("ema", ema_decay=0.99).load_state_dict(saved)
    with pytest.raises(ValueError, match="keys"):
        DeltaTracker("ema", ema_decay=0.9).load_state_dict({"mode": "ema"})


@pytest.mark.parametrize("mode", ["cumulative", "ema"])
def test_delta_independent_of_micro_batch_split(mode):
    # One window of 4 pairs = 8 rewards [r_c; r_r]; mean = 0.8 / 8 = 0.1. Fed as one micro-batch of 8
    # or as four micro-batches of 2 whose sums and counts add up into ONE update, δ is the same. (In
    # the InternVL scheme each micro-batch would update δ and the 4x2 split would give another value.)
    rewards = t([0.5, -0.2, 0.3, 0.4, -0.6, 0.1, 0.2, 0.1])
    whole, split = DeltaTracker(mode, 0.9), DeltaTracker(mode, 0.9)
    for tracker in (whole, split):
        tracker.update(1.0, 5)  # an earlier window (mean 0.2), so the second update is not trivial
    whole.update(*window_sum_across_ranks(rewards.sum(), rewards.numel()))
    acc_sum, acc_count = torch.zeros((), dtype=torch.float64), 0
    for micro in rewards.split(2):
        assert split.value == pytest.approx(0.2)  # δ is frozen for the whole window: it lags one window
        acc_sum, acc_count = acc_sum + micro.sum(), acc_count + micro.numel()
    split.update(*window_sum_across_ranks(acc_sum, acc_count))
    assert split.value == pytest.approx(whole.value, abs=1e-12)
    expected = (0.2 + 0.1) / 2 if mode == "cumulative" else 0.9 * 0.2 + 0.1 * 0.1
    assert whole.value == pytest.approx(expected, abs=1e-12)


def test_window_sum_across_ranks_is_a_no_op_without_distributed():
    assert not torch.distributed.is_initialized()
    total, count = window_sum_across_ranks(torch.tensor(1.25), torch.tensor(6))
    assert (total, count) == (1.25, 6) and isinstance(total, float) and isinstance(count, int)


@pytest.mark.parametrize(
    "mode, decay",
    [
        ("mean", 0.99),
        ("EMA", 0.99),
        ("ema", 0.0),
        ("ema", 1.0),
        ("ema", 1.5),
        ("cumulative", -0.1),
        ("ema", "0.9"),
    ],
)
def test_delta_rejects_bad_mode_or_decay(mode, decay):
    with pytest.raises(ValueError, match="mode must be one of|ema_decay must be"):
        DeltaTracker(mode, ema_decay=decay)


def test_delta_rejects_empty_or_non_finite_window():
    with pytest.raises(ValueError, match="at least one reward"):
        DeltaTracker("cumulative").update(0.0, 0)
    with pytest.raises(ValueError, match="non-finite"):
        DeltaTracker("ema").update(float("nan"), 4)


# ---------------------------------------------------------------- TRL 1.16 as the oracle


def _trl_loss(loss_types, weights, per_token_logps, completion_mask, ref_chosen, ref_rejected, beta=0.1):
    """Run TRL's DPOTrainer._compute_loss on fixed per-token log-probs (see the module docstring).

    ``per_token_logps`` [2B, T] are the shifted targets' log-probs, chosen rows first;
    ``completion_mask`` [2B, T+1] marks response tokens of the unshifted input."""
    from trl import DPOTrainer

    class FixedLogProbs(torch.nn.Module):
        def forward(self, input_ids, labels=None, fused_lm_head=False, **kwargs):
            keep = labels[:, 1:] != -100  # the fused head zeroes every per-token field where label == -100
            zeros = torch.zeros_like(per_token_logps)
            return types.SimpleNamespace(
                log_probs=torch.where(keep, per_token_logps, zeros),
                entropy=zeros,
                mean_logits=zeros,
                is_top1=torch.zeros_like(keep),
                aux_loss=None,
            )

    model = FixedLogProbs()
    trainer = DPOTrainer.__new__(DPOTrainer)
    same = lambda x: x  # one process: gathering is the identity
    trainer.__dict__.update(
        model=model,
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=same, gather_for_metrics=same),
        beta=beta,
        loss_types=list(loss_types),
        loss_weights=list(weights),
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        label_smoothing=0.0,
        use_weighting=False,
        aux_loss_enabled=False,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    # Token id 0 appears inside the responses: TRL 1.16 masks by completion_mask only, so it counts.
    input_ids = torch.arange(completion_mask.numel()).reshape(completion_mask.shape) % 3
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


def _trl_batch(seed=0, batch=3, length=6):
    gen = torch.Generator().manual_seed(seed)
    per_token = -torch.rand(2 * batch, length, generator=gen, dtype=torch.float64) * 3
    completion = torch.zeros(2 * batch, length + 1, dtype=torch.long)
    for row, start in enumerate(
        [1, 3, 2, 4, 1, 5]
    ):  # prompts of different lengths -> responses differ in length
        completion[row, start:] = 1
    ref = -torch.rand(2 * batch, generator=gen, dtype=torch.float64) * 10
    mask = completion[:, 1:]
    sums = torch.where(mask.bool(), per_token, 0).sum(-1)
    ours = {
        "policy_chosen_logps": sums[:batch],
        "policy_rejected_logps": sums[batch:],
        "ref_chosen_logps": ref[:batch],
        "ref_rejected_logps": ref[batch:],
        "chosen_token_logps": per_token[:batch],
        "chosen_mask": mask[:batch],
    }
    return per_token, completion, ours


@pytest.mark.parametrize("loss_type", ["sigmoid", "bco_pair", "sft"])
def test_each_part_matches_trl(loss_type):
    per_token, completion, ours = _trl_batch()
    trl_loss, _ = _trl_loss(
        [loss_type], [1.0], per_token, completion, ours["ref_chosen_logps"], ours["ref_rejected_logps"]
    )
    lc = ours["policy_chosen_logps"] - ours["ref_chosen_logps"]
    lr = ours["policy_rejected_logps"] - ours["ref_rejected_logps"]
    mine = {
        "sigmoid": lambda: dpo_sigmoid(lc, lr, 0.1).mean(),
        "bco_pair": lambda: bco_pair(lc, lr, 0.1, delta=0.0).mean(),  # TRL 1.16 has no δ
        "sft": lambda: sft_nll_token_mean(ours["chosen_token_logps"], ours["chosen_mask"]),
    }[loss_type]()
    torch.testing.assert_close(mine, trl_loss, rtol=1e-12, atol=1e-12)


def test_mpo_total_and_rewards_match_trl():
    per_token, completion, ours = _trl_batch(seed=1)
    trl_loss, metrics = _trl_loss(
        ["sigmoid", "bco_pair", "sft"],
        [0.8, 0.2, 1.0],
        per_token,
        completion,
        ours["ref_chosen_logps"],
        ours["ref_rejected_logps"],
    )
    out = mpo_loss(**ours, weights=(0.8, 0.2, 1.0), beta=0.1, delta=0.0, sft_reduction="token")
    torch.testing.assert_close(out.total, trl_loss, rtol=1e-12, atol=1e-12)
    assert metrics["rewards/chosen"] == pytest.approx(out.chosen_rewards.mean().item(), abs=1e-12)
    assert metrics["rewards/rejected"] == pytest.approx(out.rejected_rewards.mean().item(), abs=1e-12)
    assert metrics["rewards/margins"] == pytest.approx(out.margins.mean().item(), abs=1e-12)
    assert metrics["rewards/accuracies"] == pytest.approx(out.accuracies.mean().item(), abs=1e-12)
    # The paper's per-example reduction differs from TRL's once response lengths differ
    # (the 3 chosen rows have 6, 4 and 5 tokens).
    paper = mpo_loss(**ours, weights=(0.8, 0.2, 1.0), beta=0.1, sft_reduction="sequence")
    assert abs(paper.total.item() - trl_loss.item()) > 1e-6


def _sum_on_rank(rank: int, world: int, init_file: str, results: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        # rank 0 saw rewards summing to 1.5 over 4, rank 1 -0.5 over 6: the window is 1.0 over 10.
        local_sum, local_count = [(1.5, 4), (-0.5, 6)][rank]
        total, count = window_sum_across_ranks(torch.tensor(local_sum), local_count)
        with open(f"{results}.{rank}", "w") as fh:
            json.dump([total, count], fh)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # spawns two processes (~6 s)
def test_window_sum_across_ranks_sums_over_two_gloo_ranks(tmp_path):
    results = str(tmp_path / "out")
    torch.multiprocessing.spawn(_sum_on_rank, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    for rank in range(2):
        with open(f"{results}.{rank}") as fh:
            assert json.load(fh) == [1.0, 10]

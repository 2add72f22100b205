"""Per-round metrics and the printed round table, on hand-worked values."""

import json

import pytest

from mpo.records import ScoredRollout
from mpo.rounds.driver import rollout_metrics, train_metrics
from mpo.rounds.report import format_round_table


def _scored(rewards, responses=None):
    responses = responses or ["ok"] * len(rewards)
    return [ScoredRollout("p", i, text, 4 + i, "length" if i == 0 else "stop", "pi", reward=r)
            for i, (r, text) in enumerate(zip(rewards, responses))]


def test_rollout_metrics_by_hand():
    metrics = rollout_metrics(_scored([float(r) for r in range(1, 11)], ["x"] * 9 + [" "]))
    assert metrics["reward/mean"] == 5.5
    assert metrics["reward/std"] == pytest.approx((99 / 12) ** 0.5)  # population variance of 1..10 is 8.25
    # linear interpolation between order statistics: p10 = 1 + 0.9 * (2 - 1)
    assert (metrics["reward/p10"], metrics["reward/p50"], metrics["reward/p90"]) == pytest.approx((1.9, 5.5, 9.1))
    assert metrics["response/tokens_mean"] == 8.5  # 4..13
    assert metrics["response/truncated_fraction"] == 0.1
    assert metrics["response/empty"] == 1


def test_train_metrics_means_over_the_round(tmp_path):
    rows = [{"step": 1, "loss": 2.0, "delta": 0.0, "rewards/margins": 0.1},
            {"step": 2, "loss": 1.0, "delta": 0.5, "rewards/margins": 0.3},
            {"step": 2, "train_runtime": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = train_metrics(tmp_path)
    assert metrics["train/loss"] == 1.5 and metrics["train/delta"] == 0.25
    assert metrics["train/rewards/margins"] == pytest.approx(0.2)
    assert train_metrics(tmp_path / "nothing") == {}


def test_round_table_shows_eval_columns_and_dashes():
    table = format_round_table([{"round": 0, "reward/mean": 1.23456, "pairs/kept": 7, "eval/right_colour": 0.5},
                                {"round": 1, "reward/mean": 2.0}])
    header, first, second = table.splitlines()
    assert header.split() == ["round", "reward/mean", "reward/p50", "pairs/kept", "pairs/margin_mean",
                              "train/loss", "train/delta", "eval/right_colour"]
    assert first.split() == ["0", "1.235", "-", "7", "-", "-", "-", "0.500"]
    assert second.split()[-1] == "-"

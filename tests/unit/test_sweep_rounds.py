"""``mpo sweep --command iterate``'s report on hand-made round summaries (no model): the long table
(one row per point and rounds trained, round 0 = before training), the ranking by the last round's
held-out accuracy, the printed table and the plot."""

from __future__ import annotations

import csv

import pytest

from mpo.cli.sweep_report import write_csv
from mpo.cli.sweep_rounds import (
    ROUND_METRICS,
    PointRounds,
    format_rounds_table,
    long_table,
    write_rounds_plot,
)

KEY = "eval/answers/accuracy"


def _round(n: int, accuracy: float | None, margin: float, before: float | None = None) -> dict:
    """One round's metrics as a manifest (and summary.json) holds them."""
    row = {"round": n, "reward/mean": 0.1 * n, "reward/std": 1.0, "pairs/kept": 10 - n, "pairs/margin_mean": margin,
           "train/loss": 0.7, "train/rewards/margins": 0.01 * (n + 1), "train/rewards/accuracies": 0.5,
           "train/delta": 0.02, "pairs/dropped/below_margin": n, "time/rollout_s": 1.0}
    if accuracy is not None:
        row[KEY] = accuracy
        row["eval/answers/category/colour"] = accuracy
    if before is not None:
        row["eval_before/answers/accuracy"] = before
    return row


def _point(name: str, rounds: list[dict], status: str = "iterated", total: int = 2) -> PointRounds:
    return PointRounds({"point": name, "pairs.min_margin": name.split("=")[1]}, rounds, status, f"/runs/{name}",
                       total)


# R1V2's curves in miniature: a low threshold peaks then falls, a high one keeps rising.
PEAKS = _point("min_margin=7", [_round(0, 0.50, 8.0, before=0.25), _round(1, 0.40, 9.0)])
RISES = _point("min_margin=15", [_round(0, 0.30, 16.0, before=0.25), _round(1, 0.45, 17.0)])
STOPPED = _point("min_margin=10", [_round(0, 0.90, 11.0, before=0.25)], status="1/2 rounds")  # round 1 unfinished


def test_one_row_per_point_and_rounds_trained_ranked_by_the_last_round():
    rows = long_table([PEAKS, STOPPED, RISES], KEY)
    assert list(rows[0]) == ["point", "pairs.min_margin", "rank", "rounds_trained", KEY, *ROUND_METRICS,
                             "status", "output_dir"]
    # the final accuracy ranks (0.45 > 0.40), not the best round (0.50 after one round);
    # the stopped point is last and unranked, however high its one round
    assert [(r["point"], r["rank"], r["rounds_trained"], r[KEY]) for r in rows] == [
        ("min_margin=15", 1, 0, 0.25), ("min_margin=15", 1, 1, 0.30), ("min_margin=15", 1, 2, 0.45),
        ("min_margin=7", 2, 0, 0.25), ("min_margin=7", 2, 1, 0.50), ("min_margin=7", 2, 2, 0.40),
        ("min_margin=10", "", 0, 0.25), ("min_margin=10", "", 1, 0.90),
    ]
    # rounds_trained k carries the metrics of round k - 1 (which trained that policy); 0 has none
    first, second, third = rows[:3]
    assert all(first[m] == "" for m in ROUND_METRICS)
    assert second["pairs/margin_mean"] == 16.0 and third["pairs/margin_mean"] == 17.0
    assert second["pairs/kept"] == 10 and third["pairs/kept"] == 9
    assert third["train/rewards/margins"] == pytest.approx(0.02)
    no_pairs = {**RISES.rounds[1], "pairs/kept": 0, "pairs/margin_mean": None}  # what a round without pairs holds
    (row,) = long_table([_point("m=0", [no_pairs], total=1)], None)
    assert row["pairs/kept"] == 0 and row["pairs/margin_mean"] == ""
    assert {r["status"] for r in rows[6:]} == {"1/2 rounds"} and rows[6]["output_dir"] == "/runs/min_margin=10"


def test_ties_keep_grid_order_and_skipped_evals_are_empty():
    # iterate.eval.every=2 over 3 rounds: the initial policy, round 1's and round 2's (the last) evaluated
    a = _point("m=1", [_round(0, None, 1.0, before=0.1), _round(1, 0.2, 1.0), _round(2, 0.3, 1.0)], total=3)
    b = _point("m=2", [_round(0, None, 2.0, before=0.1), _round(1, 0.4, 2.0), _round(2, 0.3, 2.0)], total=3)
    rows = long_table([a, b], KEY)
    assert [(r["point"], r["rank"]) for r in rows[::4]] == [("m=1", 1), ("m=2", 2)]
    assert [r[KEY] for r in rows[:4]] == [0.1, "", 0.2, 0.3]
    # a grid over iterate.rounds: each point's own last round is its final one
    short = _point("m=3", [_round(0, 0.35, 1.0, before=0.1)], total=1)
    assert [r["point"] for r in long_table([a, short], KEY) if r["rounds_trained"] == 0] == ["m=3", "m=1"]


def test_without_iterate_eval_no_round_zero_and_no_rank():
    plain = [{k: v for k, v in row.items() if not k.startswith("eval")} for row in RISES.rounds]
    rows = long_table([_point("m=1", plain), _point("m=2", plain[:1])], None)
    assert [(r["point"], r["rank"], r["rounds_trained"]) for r in rows] == [("m=1", "", 1), ("m=1", "", 2),
                                                                           ("m=2", "", 1)]
    assert "rank" in format_rounds_table(rows).splitlines()[0]


def test_csv_loads_into_pandas_as_one_curve_per_point(tmp_path):
    pandas = pytest.importorskip("pandas")
    rows = long_table([PEAKS, STOPPED, RISES], KEY)
    write_csv(rows, tmp_path / "sweep.csv")
    with (tmp_path / "sweep.csv").open(encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == 8
    curves = pandas.read_csv(tmp_path / "sweep.csv").pivot(index="rounds_trained", columns="point", values=KEY)
    assert curves["min_margin=7"].tolist() == [0.25, 0.50, 0.40]
    assert curves["min_margin=10"].iloc[:2].tolist() == [0.25, 0.90]


def test_table_and_plot(tmp_path):
    rows = long_table([PEAKS, STOPPED, RISES], KEY)
    lines = format_rounds_table(rows).splitlines()
    assert lines[1].split() == ["1", "min_margin=15", "0.450", "0.450", "(2)", "0.250", "->", "0.300", "->",
                                "0.450", "iterated"]
    assert lines[2].split()[:5] == ["2", "min_margin=7", "0.400", "0.500", "(1)"]  # best: after 1 round
    assert lines[3].split()[:3] == ["min_margin=10", "-", "0.900"]  # unranked: no rank, no final
    png = write_rounds_plot(rows, tmp_path / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

"""`mpo demo` as a user runs it: the reward model learns, and over three MPO rounds both the mean
reward and the fraction of rollouts naming the image's colour (a check the reward model never
sees) rise, and so does the greedy right-colour rate on held-out images. With ``--grpo`` (the same run:
the MPO numbers are those of a plain ``mpo demo``), GRPO with the Selective Sample Buffer from the last
round's policy keeps (seed 0 here: raises) the held-out rate, and over its late steps the buffer keeps
the effective fraction at least 1.5x what it is without. A rerun reuses everything that finished."""

import json
import os
import re
import subprocess
import sys

import pytest

from mpo.cli.demo import GRPO_RUNS
from mpo.rounds.layout import EVAL_DIR
from mpo.train.setup import METRICS_FILE, read_metrics

pytestmark = pytest.mark.slow


def test_demo_reward_and_right_colour_rise(tmp_path):
    # one thread: with other processes on the machine, OpenMP's spinning threads slow it many-fold
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mpo", "demo", "--grpo", "--out-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "rounds" / "summary.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    reward = [r["reward/mean"] for r in rows]
    right = [r["eval/right_colour"] for r in rows]
    assert reward[2] > reward[0] and right[2] > right[0] + 0.3, (reward, right)
    stage = json.loads((tmp_path / "reward" / "colours" / "done.json").read_text())
    assert stage["after"]["accuracy"] >= 0.9 > stage["before"]["accuracy"]
    assert "eval/right_colour" in result.stdout and "demo finished" in result.stdout
    # held out: 12 images never trained on, greedy, before round 0 and after the last round (seed 0: 25% -> 50%)
    held_out = rows[0]["eval_before/answers/accuracy"], rows[2]["eval/answers/accuracy"]
    assert held_out[1] > held_out[0], held_out
    assert "eval/answers/accuracy" not in rows[1]  # iterate.eval.every=1000: only the last round
    assert f"held-out right colour (greedy, 12 images never trained on): {held_out[0]:.0%} before" in result.stdout
    for plot in ("reward_by_round", "pair_margins", "loss_parts", "delta"):
        assert (tmp_path / "rounds" / "plots" / f"{plot}.png").exists()
    grpo_lines = check_grpo(tmp_path, result.stdout, held_out[1])
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0 and "finished earlier" in again.stdout
    assert json.loads((tmp_path / "rounds" / "summary.json").read_text())["rounds"] == rows
    assert check_grpo(tmp_path, again.stdout, held_out[1]) == grpo_lines  # the GRPO runs and evals read back


def check_grpo(out, stdout: str, start: float) -> list[str]:
    """The --grpo lines (seed 0 on the 2026-12-03 evening machine, one thread: held-out 50% -> 100% with the
    buffer, 50% without; late effective fraction 1.000 / 0.094), checked against the runs' metrics.jsonl;
    returns them. The float results, and with them which colours 16 steps fix, differ by CPU and thread
    count (README: held-out rose with the buffer in 4 of 5 measured runs with room to rise), so what is
    asserted for every machine is what held in all of them: the buffered run loses no held-out accuracy
    and keeps at least 1.5x the unbuffered run's late effective fraction."""
    for label, folder, buffered in GRPO_RUNS:
        line = re.search(rf"GRPO {label} *: held-out right colour (\d+)% -> (\d+)%; late: right colour (\d+)%, "
                         r"effective fraction ([\d.]+)", stdout)
        assert line, stdout[-3000:]
        before, after, right, fraction = (float(g) for g in line.groups())
        steps = [row for row in read_metrics(out / folder / METRICS_FILE) if "loss" in row]
        late = steps[len(steps) // 2:]
        assert before == round(100 * start) and len(steps) == 16, line.group(0)
        assert right == pytest.approx(100 * sum(r["reward/rule"] for r in late) / len(late), abs=0.5)
        assert fraction == pytest.approx(sum(r["ssb/effective_fraction"] for r in late) / len(late), abs=1e-3)
        scores = json.loads((out / folder / EVAL_DIR / "scores.json").read_text())["overall"]
        assert after == round(100 * scores["correct"] / scores["total"]) and scores["total"] == 12, line.group(0)
        if buffered:
            assert after >= before, line.group(0)
    ratio = re.search(r"effective fraction ([\d.]+) with the buffer / ([\d.]+) without = ([\d.]+)x", stdout)
    on, off = float(ratio.group(1)), float(ratio.group(2))
    assert on >= 1.5 * off, ratio.group(0)
    return [line for line in stdout.splitlines() if line.startswith(("GRPO with", "SSB effect"))]

"""`mpo demo` as a user runs it: the reward model learns, and over three MPO rounds both the mean
reward and the fraction of rollouts naming the image's colour (a check the reward model never
sees) rise, and so does the greedy right-colour rate on held-out images. A rerun reuses everything that
finished."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_reward_and_right_colour_rise(tmp_path):
    # one thread: with other processes on the machine, OpenMP's spinning threads slow it many-fold
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mpo", "demo", "--out-dir", str(tmp_path)]
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
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0 and "finished earlier" in again.stdout
    assert json.loads((tmp_path / "rounds" / "summary.json").read_text())["rounds"] == rows

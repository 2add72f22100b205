"""`mpo grpo` through the console script, run from the repository root with the shipped tiny recipe (its
relative prompt path; the tiny models and the run folder given as overrides): every step's metrics
carry the reward components and the buffer's statistics, each checkpoint the buffer's state, the
policy is saved, and the same command again trains nothing; user errors are one line. Slow: SIGKILL
during a step, and the same command resumes to the same final weights as an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from processes import kill_when

ROOT = Path(__file__).resolve().parents[2]
RECIPE = Path("recipes/tiny/grpo.yaml")
MPO = str(Path(sys.executable).parent / "mpo")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
KEYS = ("loss", "reward", "reward/rule", "reward/model", "reward/format", "kl", "ssb/effective_fraction",
        "ssb/zero_signal_groups", "ssb/replayed_groups", "ssb/buffer_size")


def _command(out: Path, policy: Path, reward: Path, *extra) -> list[str]:
    return [MPO, "grpo", str(RECIPE), f"run.output_dir={out}", f"model.policy={policy}",
            f"model.reward_model={reward}", *extra]


def mpo(*args):
    return subprocess.run([MPO, *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tiny_recipe_writes_metrics_checkpoints_and_policy(tmp_path, tiny_policy_dir, header_reward_dir):
    out = tmp_path / "grpo"
    first = mpo(*_command(out, tiny_policy_dir, header_reward_dir)[1:])
    assert first.returncode == 0, first.stderr[-3000:]
    steps = [row for row in _rows(out) if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3, 4, 5, 6]
    for row in steps:
        assert set(KEYS) <= set(row), sorted(set(KEYS) - set(row))
        assert 0.0 <= row["ssb/effective_fraction"] <= 1.0
    assert sum(row["ssb/replayed_groups"] for row in steps) > 0  # the threshold leaves groups without signal
    assert all(row["ssb/replayed_groups"] <= row["ssb/zero_signal_groups"] for row in steps)
    assert steps[0]["ssb/replayed_groups"] == 0  # nothing to replay from an empty buffer
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert all((p / "ssb_state.pt").is_file() for p in out.glob("checkpoint-*"))
    assert (out / "policy" / "model.safetensors").is_file() and (out / "policy" / "processor_config.json").is_file()
    assert json.loads((out / "mpo_state.json").read_text()) == {"global_step": 6}
    assert not (out / "README.md").exists()
    before = _snapshot(out)
    again = mpo(*_command(out, tiny_policy_dir, header_reward_dir)[1:])
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-2000:]
    assert _snapshot(out) == before
    changed = mpo(*_command(out, tiny_policy_dir, header_reward_dir, "grpo.beta=0.02")[1:])
    assert changed.returncode == 2 and changed.stderr.strip().splitlines() == [
        f"error: {out}: made with other settings (grpo.beta: 0.01 -> 0.02); rerun with the earlier settings, "
        f"or delete {out} (or run mpo grpo with --fresh) to redo it with these"]


def test_user_errors_are_one_line(tmp_path, tiny_policy_dir):
    no_reward = mpo(*_command(tmp_path / "a", tiny_policy_dir, "null")[1:])
    assert no_reward.returncode == 2 and no_reward.stderr.strip().splitlines() == [
        "error: model.reward_model: required while grpo.rewards.weights.model > 0 (set it to 0 to train without "
        "the reward model)"]
    missing = mpo(*_command(tmp_path / "b", tmp_path / "nowhere", tiny_policy_dir)[1:])
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "model.policy" in missing.stderr and "nowhere" in missing.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # prompts + grpo.max_tokens past the tiny policy's 4096 positions: one line naming the prompt and the setting
    no_model = ("grpo.rewards.weights.model=0", "grpo.max_tokens=4090")
    long = mpo(*_command(tmp_path / "c", tiny_policy_dir, "null", *no_model)[1:])
    assert long.returncode == 2 and len(long.stderr.strip().splitlines()) == 1, long.stderr
    assert "mpo/assets/demo/prompts.jsonl:1: the prompt is" in long.stderr and "+ 4090 to generate" in long.stderr
    assert "(grpo.on_too_long=skip)" in long.stderr
    skip = mpo(*_command(tmp_path / "d", tiny_policy_dir, "null", *no_model, "grpo.on_too_long=skip")[1:])
    assert skip.returncode == 2 and "16 prompt(s) skipped as too long for the policy, 0 kept" in skip.stdout
    (line,) = skip.stderr.strip().splitlines()
    assert line.startswith("error: ") and line.endswith("mpo/assets/demo/prompts.jsonl: no usable prompts")


@pytest.mark.slow
def test_kill_during_a_step_resumes_to_the_same_weights(tmp_path, tiny_policy_dir, header_reward_dir):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = subprocess.run(_command(reference, tiny_policy_dir, header_reward_dir), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ready = (killed / "checkpoint-2" / "trainer_state.json").exists  # step 3 under way
    in_root = ["bash", "-c", 'cd "$0" && exec "$@"', str(ROOT)]  # kill_when runs where the test runs
    assert kill_when([*in_root, *_command(killed, tiny_policy_dir, header_reward_dir)], ENV, ready)
    assert not (killed / "policy").exists()
    resumed = subprocess.run(_command(killed, tiny_policy_dir, header_reward_dir), cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {killed / 'checkpoint-2'}" in resumed.stdout
    assert (killed / "policy" / "model.safetensors").read_bytes() == \
        (reference / "policy" / "model.safetensors").read_bytes()
    assert [row.get("loss") for row in _rows(killed)] == [row.get("loss") for row in _rows(reference)]
    assert any(row.get("ssb/replayed_groups", 0) > 0 for row in _rows(killed)[2:])  # replays after the resume

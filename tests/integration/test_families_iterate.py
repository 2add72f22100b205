"""One round of `mpo iterate` for every policy family, through the console script: `mpo tiny policy
--family F` builds the policy, the Qwen2.5-VL tiny reward model scores, and the round trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def mpo(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(Path(sys.executable).parent / "mpo"), *args], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "glm4v", "internvl", "llava", "gemma3"])
def test_one_round_of_iterate(family, tmp_path, tiny_reward_dir):
    mpo("tiny", "policy", str(tmp_path / "policy"), "--family", family)
    out = tmp_path / "run"
    done = mpo("iterate", "recipes/tiny/iterate.yaml", f"model.policy={tmp_path / 'policy'}",
               f"model.reward_model={tiny_reward_dir}", f"run.output_dir={out}", "iterate.rounds=1",
               "train.freeze=[vision]")
    manifest = json.loads((out / "round_000" / "manifest.json").read_text())
    assert manifest["trained"], manifest["metrics"]
    assert (Path(manifest["policy_out"]) / "model.safetensors").is_file()
    assert "frozen: vision" in done.stdout
    rollouts = [json.loads(line) for line in (out / "round_000" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 16 * 4 and {r["finish_reason"] for r in rollouts} <= {"stop", "length"}

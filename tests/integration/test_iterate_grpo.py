"""`mpo iterate` with `iterate.then=grpo` (issue 21 item 4) through the console script from the repository
root, the tiny iterate recipe, tiny models, hf backend: the MPO round runs, then GRPO from its trained
policy into RUN/grpo (metrics with the reward components, policy/), the GRPO policy's held-out eval into
RUN/grpo/eval, summary.json's "grpo" entry and the table's last row; the same command again changes no
file. Slow: SIGKILL during the GRPO stage of a copy of the run, and the same command finishes it with the
bytes of the uninterrupted run's policy."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from processes import kill_when

ROOT = Path(__file__).resolve().parents[2]
MPO = str(Path(sys.executable).parent / "mpo")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
HELD_OUT = Path("tests/fixtures/geometry3k/prompts.jsonl")
GRPO = ("iterate.then=grpo", "grpo.max_steps=3", "grpo.num_generations=2", "grpo.per_device_batch_size=4",
        "grpo.max_tokens=8", "grpo.save_steps=1", "grpo.logging_steps=1")


def _command(out: Path, policy: Path, reward: Path) -> list[str]:
    return [MPO, "iterate", "recipes/tiny/iterate.yaml", f"run.output_dir={out}", f"model.policy={policy}",
            f"model.reward_model={reward}", "iterate.rounds=1", f"iterate.eval.data={HELD_OUT}",
            "iterate.eval.max_tokens=8", *GRPO]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=900)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory, tiny_policy_dir, tiny_reward_dir):
    out = tmp_path_factory.mktemp("iterate_grpo") / "run"
    result = _run(_command(out, tiny_policy_dir, tiny_reward_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_rounds_then_grpo_then_its_eval(hybrid_run, tiny_policy_dir, tiny_reward_dir):
    out, stdout = hybrid_run
    grpo = out / "grpo"
    assert json.loads((grpo / "mpo_state.json").read_text()) == {"global_step": 3}
    assert (grpo / "policy" / "model.safetensors").is_file()
    config = (grpo / "config.yaml").read_text()
    assert f"policy: {out / 'round_000' / 'train' / 'policy'}\n" in config  # from the round's trained policy
    rows = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3]
    assert all({"reward/rule", "reward/model", "reward/format", "ssb/effective_fraction"} <= set(row) for row in steps)
    scores = json.loads((grpo / "eval" / "scores.json").read_text())
    problems = len((ROOT / HELD_OUT).read_text().splitlines())
    assert scores["overall"]["total"] == problems
    entry = json.loads((out / "summary.json").read_text())["grpo"]
    assert entry["policy_out"] == str(grpo / "policy") and entry["steps"] == 3
    assert entry["eval/answers/accuracy"] == scores["overall"]["correct"] / problems
    assert entry["train/reward/model"] == pytest.approx(sum(r["reward/model"] for r in steps) / 3)
    assert stdout.index("round 0: held-out") < stdout.index("GRPO from the last round's policy")
    lines = stdout.splitlines()
    last = next(i for i, line in enumerate(lines) if line.split()[:1] == ["grpo"])  # the table's last row
    assert lines[last + 1].startswith("GRPO stage:") and lines[last - 1].split()[0] == "0"
    before = _snapshot(out)
    again = _run(_command(out, tiny_policy_dir, tiny_reward_dir))
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-2000:]
    assert _snapshot(out) == before


@pytest.mark.slow
def test_kill_during_grpo_resumes_to_the_same_policy(hybrid_run, tmp_path, monkeypatch, tiny_policy_dir,
                                                    tiny_reward_dir):
    done, _ = hybrid_run
    monkeypatch.chdir(ROOT)  # the command's relative paths, as _run runs it
    out = tmp_path / "run"
    shutil.copytree(done, out, ignore=lambda folder, names: ["grpo"] if Path(folder) == done else [])
    command = _command(out, tiny_policy_dir, tiny_reward_dir)
    killed = kill_when(command, ENV, lambda: (out / "grpo" / "checkpoint-1" / "trainer_state.json").is_file())
    assert killed and not (out / "grpo" / "policy").exists()
    again = _run(command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "round 0: 64 rollouts" not in again.stdout
    name = "policy/model.safetensors"
    assert (out / "grpo" / name).read_bytes() == (done / "grpo" / name).read_bytes()
    assert (out / "grpo" / "eval" / "scores.json").read_bytes() == (done / "grpo" / "eval" / "scores.json").read_bytes()

"""`mpo iterate` with `iterate.then=grpo` (issue 21 item 4) through the console script from the repository
root, the tiny iterate recipe, tiny models, hf backend: the MPO round runs, then GRPO from its trained
policy into RUN/grpo (metrics with the reward components, policy/), the GRPO policy's held-out eval into
RUN/grpo/eval, summary.json's "grpo" entry and the table's last row; the same command again changes no
file. The same run evaluates the GRPO policy in training (iterate.eval.grpo_every) and a monitor
(iterate.monitors) wherever the held-out set is, and plots them beside the reward. Slow: SIGKILL during the
GRPO stage of a copy of the run, and the same command finishes it with the bytes of the uninterrupted run's
policy and evals."""

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
MONITOR = Path("mpo/assets/demo/prompts.jsonl")  # 16 colour questions with answers, as a monitor "colour"
EVALS = ("iterate.eval.grpo_every=1", f"iterate.monitors.colour.data={MONITOR}", "iterate.monitors.colour.max_tokens=4")


def _command(out: Path, policy: Path, reward: Path, *more: str) -> list[str]:
    return [MPO, "iterate", "recipes/tiny/iterate.yaml", f"run.output_dir={out}", f"model.policy={policy}",
            f"model.reward_model={reward}", "iterate.rounds=1", f"iterate.eval.data={HELD_OUT}",
            "iterate.eval.max_tokens=8", *GRPO, *more]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=900)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory, tiny_policy_dir, tiny_reward_dir):
    out = tmp_path_factory.mktemp("iterate_grpo") / "run"
    result = _run(_command(out, tiny_policy_dir, tiny_reward_dir, *EVALS))
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
    again = _run(_command(out, tiny_policy_dir, tiny_reward_dir, *EVALS))
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-2000:]
    assert _snapshot(out) == before


def _accuracy(folder: Path) -> float:
    overall = json.loads((folder / "scores.json").read_text())["overall"]
    return overall["correct"] / overall["total"]


def test_evals_in_training_and_a_monitor_beside_the_reward(hybrid_run):
    out, stdout = hybrid_run
    grpo, evals = out / "grpo", out / "grpo" / "evals"
    rows = {row["step"]: row for row in map(json.loads, (grpo / "metrics.jsonl").read_text().splitlines())
            if "loss" in row}
    assert sorted(p.name for p in evals.iterdir()) == ["step-000001", "step-000002"]  # the last: the final eval
    entry = json.loads((out / "summary.json").read_text())["grpo"]
    assert entry["final_step"] == 3 and [e["step"] for e in entry["step_evals"]] == [1, 2]
    for step, listed in zip((1, 2), entry["step_evals"]):
        held_out, monitor = evals / f"step-{step:06d}" / "eval", evals / f"step-{step:06d}" / "monitor" / "colour"
        key = json.loads((held_out / "rollouts.key.json").read_text())["policy"]
        assert key["step"] == step and set(key) == {"grpo run", "step"}  # the model in training, by run and step
        assert json.loads((monitor / "scores.json").read_text())["overall"]["total"] == 16
        for name, folder in (("eval/answers/accuracy", held_out), ("monitor/colour/accuracy", monitor)):
            assert rows[step][name] == listed[name] == _accuracy(folder)  # logged at that step
        assert f"GRPO step {step}: held-out answers accuracy" in stdout
    assert not {"eval/answers/accuracy", "monitor/colour/accuracy"} & set(rows[3])
    assert entry["monitor/colour/accuracy"] == _accuracy(grpo / "monitor" / "colour")  # the final policy's
    first = json.loads((out / "summary.json").read_text())["rounds"][0]
    assert first["monitor_before/colour/accuracy"] == _accuracy(out / "round_000" / "monitor_before" / "colour")
    assert first["monitor/colour/accuracy"] == _accuracy(out / "round_000" / "monitor" / "colour")
    assert "round 0: monitor colour (answers) accuracy" in stdout
    assert (out / "plots" / "grpo_progress.png").stat().st_size > 1000


@pytest.mark.slow
def test_kill_during_grpo_resumes_to_the_same_policy(hybrid_run, tmp_path, monkeypatch, tiny_policy_dir,
                                                    tiny_reward_dir):
    done, _ = hybrid_run
    monkeypatch.chdir(ROOT)  # the command's relative paths, as _run runs it
    out = tmp_path / "run"
    shutil.copytree(done, out, ignore=lambda folder, names: ["grpo"] if Path(folder) == done else [])
    command = _command(out, tiny_policy_dir, tiny_reward_dir, *EVALS)
    killed = kill_when(command, ENV, lambda: (out / "grpo" / "checkpoint-1" / "trainer_state.json").is_file())
    assert killed and not (out / "grpo" / "policy").exists()
    again = _run(command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "round 0: 64 rollouts" not in again.stdout
    name = "policy/model.safetensors"
    assert (out / "grpo" / name).read_bytes() == (done / "grpo" / name).read_bytes()
    assert (out / "grpo" / "eval" / "scores.json").read_bytes() == (done / "grpo" / "eval" / "scores.json").read_bytes()
    made = sorted(p.relative_to(done) for p in (done / "grpo" / "evals").rglob("*") if p.suffix in (".json", ".jsonl"))
    assert made and all((out / p).read_bytes() == (done / p).read_bytes() for p in made)  # step 2's made after resume

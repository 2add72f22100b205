"""Preemption and resumed metrics, through the console script: SIGTERM (what Slurm sends before it
kills a job) in the middle of `mpo train` saves a checkpoint at the end of that step and exits 143
with one line; `--resume` then finishes with the weights, metrics (the end-of-training `train_loss`
included) and δ of an uninterrupted run. A rerun after a kill during the final save writes one
end-of-training row, not two; temporaries left by killed writes are gone after a rerun. A second
driver whose environment says `RANK=1` is refused while the first holds the folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TIMED = ("tokens/s", "train_runtime", "train_samples_per_second", "train_steps_per_second")


def _args(out: Path, policy: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "mpo"), "train", "recipes/tiny/mpo_offline.yaml",
            f"model.policy={policy}", f"run.output_dir={out}", "train.save_steps=1000"]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def _run(args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=_env(**env), timeout=600)


def _metrics(out: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock figures."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMED} for row in rows]


def _step_rows(out: Path) -> int:
    try:
        return sum('"loss/preference"' in line for line in (out / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_policy_dir):
    out = tmp_path_factory.mktemp("preemption") / "uninterrupted"
    done = _run(_args(out, tiny_policy_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _same_as(out: Path, reference: Path) -> None:
    assert (out / "policy" / "model.safetensors").read_bytes() == \
        (reference / "policy" / "model.safetensors").read_bytes()
    assert json.loads((out / "mpo_state.json").read_text()) == json.loads((reference / "mpo_state.json").read_text())
    got, expected = _metrics(out), _metrics(reference)
    assert [r for r in got if "train_loss" in r] == [r for r in expected if "train_loss" in r]  # one summary row
    assert got == expected


def test_sigterm_mid_training_saves_a_checkpoint_and_resumes_exactly(uninterrupted, tmp_path, tiny_policy_dir):
    out = tmp_path / "run"
    args = _args(out, tiny_policy_dir)
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_env())
    deadline = time.time() + 600
    while _step_rows(out) < 2 and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    # hold it mid-training (a tiny step takes a fraction of a second) while a second driver tries the folder
    process.send_signal(signal.SIGSTOP)
    at = _step_rows(out)
    second = _run(args, RANK="1", LOCAL_RANK="1", WORLD_SIZE="2")  # inherited from a Slurm / torchrun shell
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
    _, err = process.communicate(timeout=600)
    assert 2 <= at < 12, "the run was not mid-training when signalled"
    # the second driver: one line naming the holder, nothing run
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    (refused,) = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert f"{out}: in use by pid {process.pid}" in refused, refused
    # the preempted run: a checkpoint of the step it was in, one line, exit 128 + SIGTERM
    assert process.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()
    step = int(checkpoints[0].name.split("-")[1])
    assert at <= step < 12
    assert line == (f"error: stopped by SIGTERM: checkpoint saved at step {step} of 12 ({checkpoints[0]}); "
                    "rerun the same command with --resume to continue from it")
    assert not (out / "policy").exists()
    # a temporary a kill mid-write left (here: of the reference pass's cache) goes with the rerun
    stale = out / ".ref_logps.jsonl.k1ll3d.tmp"
    stale.write_text('{"half a ')
    resumed = _run(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoints[0]}" in resumed.stdout
    _same_as(out, uninterrupted)
    assert not list(out.rglob("*.tmp"))

    # killed during the final save (after the end-of-training row, before policy/ and mpo_state.json):
    # the rerun resumes from the last checkpoint and writes that row once
    for leftover in ("mpo_state.json", "policy/config.json"):
        (out / leftover).unlink()
    again = _run(args + ["--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    _same_as(out, uninterrupted)


def test_sigusr1_mid_rollout_keeps_the_finished_chunks(tmp_path, tiny_policy_dir, tiny_reward_dir):
    """Slurm's `--signal=USR1` during a rollout: the process stops at once (exit 138), naming the
    chunks it kept; the same command makes only the rest."""
    run = tmp_path / "run"
    args = [str(Path(sys.executable).parent / "mpo"), "rollout", "recipes/tiny/iterate.yaml", "--round", "0",
            f"run.output_dir={run}", f"model.policy={tiny_policy_dir}", f"model.reward_model={tiny_reward_dir}"]
    parts = run / "round_000" / "rollouts.jsonl.parts"
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_env())
    deadline = time.time() + 600
    while len(list(parts.glob("0*.jsonl"))) < 2 and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGUSR1)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGUSR1, err[-3000:]
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    kept = sorted(parts.glob("0*.jsonl"))
    assert 2 <= len(kept) < 8 and not (run / "round_000" / "rollouts.jsonl").exists()
    assert line == (f"error: stopped by SIGUSR1; {len(kept)} of 8 chunks finished and kept in {parts}: "
                    "rerun the same command to continue")
    assert not (run / ".mpo.lock").exists()
    kept_text = [part.read_text() for part in kept]
    resumed = _run(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = (run / "round_000" / "rollouts.jsonl").read_text()
    assert rows.count("\n") == 64 and rows.startswith("".join(kept_text))  # the kept chunks, reused as they were


def test_sigterm_mid_reward_training_resumes_exactly(tmp_path, tiny_reward_dir):
    """`mpo reward train`: the same stop at a step with a checkpoint, and the same resume."""
    base = [str(Path(sys.executable).parent / "mpo"), "reward", "train", "recipes/tiny/reward_stage1.yaml",
            f"reward_train.init_from={tiny_reward_dir}", "reward_train.logging_steps=1",
            "reward_train.save_steps=1000"]
    reference = _run(base + [f"run.output_dir={tmp_path / 'uninterrupted'}"])
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "run"
    metrics = out / "stage1" / "metrics.jsonl"
    process = subprocess.Popen(base + [f"run.output_dir={out}"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 600
    while (not metrics.exists() or metrics.read_text().count("\n") < 2) and process.poll() is None \
            and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGSTOP)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 143 and "Traceback" not in err, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    (checkpoint,) = (out / "stage1" / "checkpoints").glob("checkpoint-*")
    assert line.startswith(f"error: stopped by SIGTERM: stage stage1: checkpoint saved at step "
                           f"{checkpoint.name.split('-')[1]} of 384 ({checkpoint}); rerun the same command")
    assert not (out / "stage1" / "done.json").exists()
    resumed = _run(base + [f"run.output_dir={out}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("metrics.jsonl", "model.safetensors", "value_head.safetensors"):
        assert (out / "stage1" / name).read_bytes() == (tmp_path / "uninterrupted" / "stage1" / name).read_bytes()
    assert not list(out.rglob("*.tmp"))

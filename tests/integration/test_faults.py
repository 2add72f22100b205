"""Faults of the machine, not of the input: a disk that fills up during a checkpoint and a run folder
on a read-only file system. Each is one line naming the folder and the cause; once space is back
the same command (with --resume) finishes; a finished run can be read back from read-only storage.

The file systems are real (a size-limited tmpfs, remounted read-only); where this machine does not
allow mounting, the tests skip and say so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _mount(folder: Path, options: str) -> None:
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot mount a tmpfs here ({err}); needs root in a container that allows mounts")


@pytest.fixture
def disk(tmp_path):
    folder = tmp_path / "disk"
    folder.mkdir()
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def mpo(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(Path(sys.executable).parent / "mpo"), *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=600)


def _one_error(result) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return line


def test_disk_full_during_a_checkpoint_then_resume(disk, tiny_policy_dir):
    _mount(disk, "size=8m")  # one 5.3 MB checkpoint fits, the second does not
    out = disk / "run"
    args = ["train", "recipes/tiny/mpo_offline.yaml", f"model.policy={tiny_policy_dir}", f"run.output_dir={out}"]
    line = _one_error(mpo(*args))
    assert f"error: {out}: training failed" in line and ("no space left" in line or "disk full" in line), line
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    resumed = mpo(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and (out / "policy" / "model.safetensors").is_file()
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss/preference" in line]
    assert steps == list(range(1, 13))


def test_read_only_run_folder(disk, tiny_policy_dir, tiny_reward_dir):
    _mount(disk, "size=64m")
    out = disk / "run"
    args = ["iterate", "recipes/tiny/iterate.yaml", f"model.policy={tiny_policy_dir}",
            f"model.reward_model={tiny_reward_dir}", f"run.output_dir={out}", "train.save_steps=1000"]
    assert mpo(*args).returncode == 0
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    again = mpo(*args)  # a finished run reads back: nothing needs writing
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reward/mean" in again.stdout
    line = _one_error(mpo(*args, "iterate.rounds=3"))  # a round to add: the folder cannot take it
    assert str(out) in line and "read-only" in line, line

"""``accelerate launch ... -m mpo train`` with the shipped accelerate configs, on CPU.

- DDP (``recipes/accelerate/ddp.yaml``): 2 ranks x 2 pairs per micro-batch log the same losses,
  rewards, δ and gradient norms, and save the same weights, as 1 process x 4 pairs (same global
  batch, same accumulation). On CPU, accelerate needs ``ACCELERATE_USE_CPU=true`` in the environment
  *and no* ``--cpu`` flag: ``accelerate launch --cpu --num_processes 2`` starts a single process.
  (tests/model/test_trainer.py checks the same equality through ``torch.distributed.run``; this one
  goes through the launcher and config users run.)
- ``mpo grpo`` under DDP: 2 ranks x 4 completions log the same losses, rewards, KL and buffer
  statistics, and save the same weights, as 1 process x 8 (each row sampled under its own seed,
  :mod:`mpo.grpo.sampling`; the buffer's draws are global).
- DeepSpeed ZeRO-2 / ZeRO-3 (``recipes/accelerate/zero2.yaml``, ``zero3.yaml``): one process on
  DeepSpeed's CPU accelerator trains three steps and saves a full policy equal to the plain run's.
  One process only: accelerate gives no process group to DeepSpeed ranks without a GPU (each rank
  would see a world of 1). Skipped when deepspeed is not installed (``pip install -e ".[deepspeed]"``);
  the first start JIT-builds DeepSpeed's shared-memory comm op (about a minute, then cached).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mpo.config import load_recipe

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "tiny" / "mpo_offline.yaml"
GRPO_RECIPE = REPO / "recipes" / "tiny" / "grpo.yaml"
PAIRS = REPO / "tests" / "fixtures" / "pairs" / "colour_pairs.jsonl"
COMMON = ["train.max_steps=3", "train.gradient_accumulation_steps=2", "train.save_steps=100"]
KEYS = ("loss", "loss/preference", "loss/quality", "loss/generation", "delta", "rewards/chosen",
        "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm", "epoch")


def _overrides(policy, out, batch):
    return [f"model.policy={policy}", f"data.preferences={PAIRS}", f"run.output_dir={out}",
            f"train.per_device_batch_size={batch}", *COMMON]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: str, processes: int, overrides: list[str], cpu_env: bool, timeout: int,
            stage: str = "train", recipe: Path = RECIPE):
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--config_file", config, "--num_processes", str(processes),
               "--mixed_precision", "no", "--main_process_port", str(_free_port()),
               "-m", "mpo", stage, str(recipe.relative_to(REPO)), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    if cpu_env:
        env["ACCELERATE_USE_CPU"] = "true"
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _logged(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss/preference" in r]


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "policy" / "model.safetensors")


def _assert_same_run(got: Path, want: Path, tol: float) -> None:
    a, b = _logged(want), _logged(got)
    assert [r["step"] for r in b] == [r["step"] for r in a] == [1, 2, 3]
    for key in KEYS:
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], abs=tol), key
    assert a[-1]["delta"] != 0.0  # δ moved, and moved the same way
    wa, wb = _weights(want), _weights(got)
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst < 1e-4, worst


@pytest.fixture(scope="module")
def single(tiny_policy_dir, tmp_path_factory) -> Path:
    """One process, 4 pairs per micro-batch, 2 micro-batches per step."""
    from mpo.train.run import run_training

    out = tmp_path_factory.mktemp("single") / "run"
    run_training(load_recipe(RECIPE, _overrides(tiny_policy_dir, out, 4)), quiet=True)
    return out


def test_accelerate_launch_ddp_two_cpu_ranks_match_one_process(single, tiny_policy_dir, tmp_path):
    out = tmp_path / "ddp"
    done = _launch("recipes/accelerate/ddp.yaml", 2, _overrides(tiny_policy_dir, out, 2), cpu_env=True, timeout=300)
    assert done.stdout.count("data: 16 pairs") == 2  # two ranks really ran
    _assert_same_run(out, single, 1e-4)


@pytest.mark.parametrize("config", ["recipes/accelerate/zero2.yaml", "recipes/accelerate/zero3.yaml"])
def test_deepspeed_zero_on_cpu_trains_and_saves_the_same_policy(config, single, tiny_policy_dir, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed not installed (pip install -e '.[deepspeed]')")
    out = tmp_path / "zero"
    done = _launch(config, 1, _overrides(tiny_policy_dir, out, 4), cpu_env=False, timeout=600)
    output = done.stdout + done.stderr
    assert "deepspeed" in output.lower() and "policy saved to" in done.stdout
    assert "DDP" not in output  # DeepSpeed's engine, not a DDP fallback
    _assert_same_run(out, single, 1e-4)


GRPO_KEYS = ("loss", "reward", "reward_std", "reward/rule", "reward/model", "reward/format", "kl", "entropy",
             "ssb/effective_fraction", "ssb/zero_signal_groups", "ssb/replayed_groups", "ssb/buffer_size",
             "completions/mean_length")


def _grpo_overrides(policy, reward, out, batch):
    return [f"model.policy={policy}", f"model.reward_model={reward}", f"run.output_dir={out}",
            f"grpo.per_device_batch_size={batch}", "grpo.max_steps=4", "grpo.max_tokens=6", "grpo.save_steps=100"]


def test_grpo_two_cpu_ranks_match_one_process(tiny_policy_dir, header_reward_dir, tmp_path):
    from mpo.grpo.run import run_grpo

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_grpo(load_recipe(GRPO_RECIPE, _grpo_overrides(tiny_policy_dir, header_reward_dir, single, 8)))
    _launch("recipes/accelerate/ddp.yaml", 2, _grpo_overrides(tiny_policy_dir, header_reward_dir, ddp, 4),
            cpu_env=True, timeout=300, stage="grpo", recipe=GRPO_RECIPE)
    a, b = ([r for r in _rows(out) if "loss" in r] for out in (single, ddp))
    assert [r["step"] for r in b] == [r["step"] for r in a] == [1, 2, 3, 4]
    for key in GRPO_KEYS:
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], abs=1e-4), key
    # not vacuous: on-policy GRPO's loss is ~0 (ratio 1) but for replayed rows, and the KL grows
    assert any(r["ssb/replayed_groups"] > 0 and abs(r["loss"]) > 1e-3 for r in a) and a[-1]["kl"] > 1e-3
    wa, wb = _weights(single), _weights(ddp)
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) < 1e-4


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

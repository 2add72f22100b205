"""`mpo iterate ... iterate.launch=distributed iterate.nproc_per_node=2` on CPU (gloo), through the
console script: every stage its own launch (torchrun for rollout and scoring ranks, accelerate for
training). Rollouts, scores and pairs are the same bytes as the inline run's; training with 2 ranks
logs the one-process losses; a rank killed with SIGKILL mid-rollout or mid-scoring fails the stage
with a line naming it, and the same command (or one with another world size) resumes to the same
pairs."""

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
RECIPE = "recipes/tiny/iterate.yaml"
STAGE_FILES = ("rollouts.jsonl", "scored.jsonl", "pairs.jsonl")


def _command(run_dir, policy, reward, *extra):
    return [str(Path(sys.executable).parent / "mpo"), "iterate", RECIPE, f"run.output_dir={run_dir}",
            f"model.policy={policy}", f"model.reward_model={reward}", "iterate.rounds=2", *extra]


DISTRIBUTED = ("iterate.launch=distributed", "iterate.nproc_per_node=2", "train.per_device_batch_size=2")


def _env():
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _run(command, timeout=900):
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _steps(run_dir, n):
    rows = [json.loads(line) for line in (run_dir / f"round_{n:03d}" / "train" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss/preference" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_policy_dir, tiny_reward_dir):
    """The same two rounds inline (4 pairs a step) and distributed (2 ranks x 2 pairs a step)."""
    root = tmp_path_factory.mktemp("distributed")
    _run(_command(root / "inline", tiny_policy_dir, tiny_reward_dir))
    _run(_command(root / "distributed", tiny_policy_dir, tiny_reward_dir, *DISTRIBUTED))
    return root


def test_distributed_records_are_the_inline_bytes(runs):
    for n in range(2):
        for name in STAGE_FILES:
            got = (runs / "distributed" / f"round_{n:03d}" / name).read_bytes()
            assert got == (runs / "inline" / f"round_{n:03d}" / name).read_bytes(), (n, name)
        logs = runs / "distributed" / f"round_{n:03d}" / "logs"
        assert {p.name for p in logs.iterdir()} == {"rollout", "score", "train"}  # each stage its own launch


def test_two_training_ranks_log_the_one_process_losses(runs):
    for n in range(2):
        one, two = _steps(runs / "inline", n), _steps(runs / "distributed", n)
        assert [r["step"] for r in two] == [r["step"] for r in one] and len(one) == 8
        for key in ("loss", "loss/preference", "loss/quality", "delta", "rewards/margins", "logps/chosen"):
            assert [r[key] for r in two] == pytest.approx([r[key] for r in one], abs=1e-4), key
    manifests = [json.loads((runs / side / "round_001" / "manifest.json").read_text()) for side in ("inline",
                                                                                                    "distributed")]
    for key, value in manifests[0]["metrics"].items():
        if key.startswith("time/"):
            continue
        # An accuracy counts margins > 0: a pair whose margin is within float noise of 0 (the ranks pad
        # other batches) may count on one side only, so it may differ by one pair of the round's 32.
        tolerance = 1 / 32 + 1e-9 if key.endswith("rewards/accuracies") else 1e-4
        assert manifests[1]["metrics"][key] == pytest.approx(value, abs=tolerance), key


def _kill_one_rank(command, ready, timeout=600):
    """Start ``command``; once ``ready()``, SIGKILL one stage rank (a child of torchrun)."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_env())
    deadline = time.time() + timeout
    killed = None
    while time.time() < deadline and process.poll() is None and killed is None:
        if ready():
            ranks = subprocess.run(["pgrep", "-f", "mpo.rounds.rank"], capture_output=True, text=True).stdout.split()
            workers = [int(p) for p in ranks if _parent_is_torchrun(int(p)) and _descends(int(p), process.pid)]
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    out, err = process.communicate(timeout=600)
    return killed, process.returncode, err


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[1])


def _descends(pid: int, ancestor: int) -> bool:
    """``pid`` is a descendant of ``ancestor`` (not a rank of some other run on this machine)."""
    try:
        while pid > 1:
            pid = _parent(pid)
            if pid == ancestor:
                return True
    except (OSError, IndexError, ValueError):
        pass
    return False


def _parent_is_torchrun(pid: int) -> bool:
    try:
        parent = _parent(pid)
        return "torch.distributed.run" in Path(f"/proc/{parent}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, IndexError):
        return False


def _check_failed_stage(killed, status, err, stage):
    assert killed is not None, f"no {stage} rank to kill: the stage finished first"
    assert status != 0 and "Traceback" not in err.splitlines()[-1]
    assert f"error: round 0 {stage} failed" in err and "rerun the same command to resume" in err
    # the ranks torchrun stopped after the kill say so in their logs; the driver names the cause, not them
    assert "stopped by SIG" not in [line for line in err.splitlines() if "failed (exit status" in line][-1]


def test_killed_ranks_and_a_killed_driver_resume_to_the_uninterrupted_run(runs, tmp_path, tiny_policy_dir,
                                                                         tiny_reward_dir):
    """One run, three interruptions (one run's cost instead of three): a rank SIGKILLed mid-rollout
    (2 ranks), then, resumed with another world size (1 rank), its rank SIGKILLed mid-scoring: each
    fails its stage with a line naming it and keeps its finished chunks. Resumed on 2 ranks, the
    driver's process group gets ``kill -9`` mid-training (the ranks run in sessions of their own):
    within 10 s no process of the run is left (the ranks' parent-death signal and their watchdog on
    the driver), so no lock is held, and the same command finishes with the uninterrupted
    distributed run's records, weights and metrics."""
    run_dir = tmp_path / "run"
    one_rank = ("iterate.launch=distributed", "iterate.nproc_per_node=1", "train.per_device_batch_size=4")
    for stage, parts, world in (("rollout", "rollouts.jsonl.parts", DISTRIBUTED), ("score", "scored.jsonl.parts",
                                                                                    one_rank)):
        folder = run_dir / "round_000" / parts
        killed, status, err = _kill_one_rank(_command(run_dir, tiny_policy_dir, tiny_reward_dir, *world),
                                             lambda folder=folder: len(list(folder.glob("0*.jsonl"))) >= 1)
        _check_failed_stage(killed, status, err, stage)
        assert len(list(folder.glob("0*.jsonl"))) >= 1  # finished chunks are kept

    command = _command(run_dir, tiny_policy_dir, tiny_reward_dir, *DISTRIBUTED)
    mark = f"MPO_TEST_RUN={os.getpid()}-{time.time_ns()}"
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**_env(), mark.split("=")[0]: mark.split("=")[1]}, start_new_session=True)
    metrics = run_dir / "round_000" / "train" / "metrics.jsonl"
    deadline = time.time() + 900
    while not metrics.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None and metrics.exists(), "the run was not training when it was to be killed"
    assert len(_marked(mark)) >= 3  # the driver, the launcher, the ranks
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed = time.time()
    while _marked(mark) and time.time() - killed < 10:
        time.sleep(0.1)
    assert not _marked(mark), f"left running 10 s after the driver's kill: {_marked(mark)}"
    assert "Traceback" not in _run(command).stderr
    for n in range(2):
        for name in STAGE_FILES:
            assert (run_dir / f"round_{n:03d}" / name).read_bytes() == \
                (runs / "inline" / f"round_{n:03d}" / name).read_bytes(), (n, name)
        assert (run_dir / f"round_{n:03d}" / "train/policy/model.safetensors").read_bytes() == \
            (runs / "distributed" / f"round_{n:03d}" / "train/policy/model.safetensors").read_bytes(), n
        assert [{k: v for k, v in r.items() if k != "tokens/s"} for r in _steps(run_dir, n)] == \
            [{k: v for k, v in r.items() if k != "tokens/s"} for r in _steps(runs / "distributed", n)]
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.rglob(".mpo.lock"))


def test_two_nodes_on_one_machine(runs, tmp_path, tiny_policy_dir, tiny_reward_dir):
    """The multi-node form (`iterate.nnodes=2`, one driver per node with its NODE_RANK, rendezvous at
    MASTER_ADDR) with both "nodes" on this machine, one process each: the inline bytes again. Then
    `iterate.then=grpo` (folded into this run, not a run of its own): the GRPO stage an accelerate job
    with a rank on each node, node 1 waiting for its finished marker."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run_dir = tmp_path / "run"
    command = _command(run_dir, tiny_policy_dir, tiny_reward_dir, "iterate.launch=distributed", "iterate.nnodes=2",
                       "iterate.nproc_per_node=1", "train.per_device_batch_size=2", f"iterate.master_port={port}",
                       "iterate.then=grpo", "grpo.max_steps=2", "grpo.num_generations=2", "grpo.per_device_batch_size=2",
                       "grpo.max_tokens=8", "grpo.logging_steps=1", "grpo.save_steps=1")
    nodes = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**_env(), "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1"})
             for rank in (0, 1)]
    results = [node.communicate(timeout=1200) for node in nodes]
    for node, (out, err) in zip(nodes, results):
        assert node.returncode == 0, out[-2000:] + err[-3000:]
    assert "node 1: every round finished" in results[1][0]
    for n in range(2):
        for name in STAGE_FILES:
            assert (run_dir / f"round_{n:03d}" / name).read_bytes() == \
                (runs / "inline" / f"round_{n:03d}" / name).read_bytes(), (n, name)
    one, two = _steps(runs / "inline", 1), _steps(run_dir, 1)
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-4)
    grpo = run_dir / "grpo"
    assert "node 1: the GRPO stage finished" in results[1][0] and "grpo: launching" in results[0][0]
    assert json.loads((grpo / "mpo_state.json").read_text()) == {"global_step": 2}
    assert (grpo / "policy" / "model.safetensors").is_file() and (grpo / "logs" / "grpo").is_dir()
    assert f"policy: {run_dir / 'round_001' / 'train' / 'policy'}\n" in (grpo / "config.yaml").read_text()
    steps = [r for r in map(json.loads, (grpo / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]  # one row a step: the main process logs
    assert all({"reward/rule", "reward/model", "reward/format", "ssb/effective_fraction"} <= set(r) for r in steps)
    entry = json.loads((run_dir / "summary.json").read_text())["grpo"]
    assert entry["policy_out"] == str(grpo / "policy") and entry["steps"] == 2
    assert not list(run_dir.rglob(".mpo.lock"))


def _marked(mark: str) -> list[int]:
    """Processes whose environment holds ``mark`` (the driver, its launchers and their ranks)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mark.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except (OSError, ValueError):
            continue
    return found

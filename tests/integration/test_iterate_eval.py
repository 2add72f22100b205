"""`mpo iterate` with `iterate.eval` end to end (issue 20 item 4), tiny models, hf backend: held-out
accuracy of the initial policy and of every round's trained policy in the manifests, `summary.json`,
the table and the plots; a finished run started again changes no file; a run killed with SIGKILL
in the middle of an eval, started again, gives the same predictions and numbers (one round: round 0 is the
same in a one-round and a two-round run, every key leaves iterate.rounds out). With launch.mode=distributed
on two "nodes" of this machine each eval is a job of its own that node 1 joins too: the same files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from processes import kill_when

REPO = Path(__file__).resolve().parents[2]
HELD_OUT = REPO / "tests" / "fixtures" / "geometry3k" / "prompts.jsonl"
ACCURACY = "eval/answers/accuracy"
pytestmark = pytest.mark.slow


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _command(run_dir, policy, reward, rounds=2):
    return [sys.executable, "-m", "mpo", "iterate", str(REPO / "recipes" / "tiny" / "iterate.yaml"),
            f"run.output_dir={run_dir}", f"model.policy={policy}", f"model.reward_model={reward}",
            f"data.prompts={REPO / 'mpo/assets/demo/prompts.jsonl'}", f"iterate.eval.data={HELD_OUT}",
            "iterate.eval.max_tokens=8", f"iterate.rounds={rounds}"]


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, tiny_policy_dir, tiny_reward_dir):
    run_dir = tmp_path_factory.mktemp("iterate_eval") / "run"
    result = subprocess.run(_command(run_dir, tiny_policy_dir, tiny_reward_dir), capture_output=True, text=True,
                            env=_env(), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result.stdout


def _files(run_dir: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_held_out_accuracy_before_and_every_round(eval_run, tiny_policy_dir, tiny_reward_dir):
    run_dir, stdout = eval_run
    problems = len(HELD_OUT.read_text().splitlines())
    folders = [run_dir / "round_000" / "eval_before", run_dir / "round_000" / "eval", run_dir / "round_001" / "eval"]
    for folder in folders:
        predictions = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        assert len(predictions) == problems and all(isinstance(p["true_false"], bool) for p in predictions)
        scores = json.loads((folder / "scores.json").read_text())
        assert scores["overall"]["total"] == problems
        assert scores["overall"]["correct"] == sum(p["true_false"] for p in predictions)
    rows = json.loads((run_dir / "summary.json").read_text())["rounds"]
    accuracies = [rows[0]["eval_before/answers/accuracy"], rows[0][ACCURACY], rows[1][ACCURACY]]
    assert accuracies == [json.loads((f / "scores.json").read_text())["overall"]["correct"] / problems
                          for f in folders]
    for n, row in enumerate(rows):  # the same scalars in each round's manifest (what W&B logs)
        manifest = json.loads((run_dir / f"round_{n:03d}" / "manifest.json").read_text())
        assert manifest["metrics"][ACCURACY] == row[ACCURACY]
    assert (run_dir / "plots" / "held_out_accuracy.png").stat().st_size > 1000
    table = stdout[stdout.index("    round  reward/mean"):].splitlines()
    assert table[0].split()[-1] == ACCURACY and table[1].split()[0] == "before"

    before = _files(run_dir)
    again = subprocess.run(_command(run_dir, tiny_policy_dir, tiny_reward_dir), capture_output=True, text=True,
                           env=_env(), timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert _files(run_dir) == before  # nothing rewritten, not even a timestamp


def test_killed_eval_resumes_to_the_same_numbers(eval_run, tmp_path, tiny_policy_dir, tiny_reward_dir):
    reference_dir, _ = eval_run
    run_dir = tmp_path / "run"
    parts = run_dir / "round_000" / "eval_before" / "rollouts.jsonl.parts"
    command = _command(run_dir, tiny_policy_dir, tiny_reward_dir, rounds=1)  # round 0 is the same run's
    assert kill_when(command, _env(), lambda: len(list(parts.glob("0*.jsonl"))) >= 2), "finished before the kill"
    assert not (parts.parent / "scores.json").exists()
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for folder in ("round_000/eval_before", "round_000/eval"):
        for name in ("predictions.jsonl", "scores.json"):
            assert (run_dir / folder / name).read_bytes() == (reference_dir / folder / name).read_bytes(), folder
    for name in ("rollouts.jsonl", "pairs.jsonl", "train/policy/model.safetensors"):  # the round's own records
        assert (run_dir / "round_000" / name).read_bytes() == (reference_dir / "round_000" / name).read_bytes()


def test_distributed_eval_on_two_nodes_gives_the_inline_bytes(eval_run, tmp_path, tiny_policy_dir, tiny_reward_dir):
    """One round with launch.mode=distributed, nnodes=2 (one driver per "node", one rank each; node 1
    joins each eval job in follow_rounds): the initial policy's eval is the inline run's bytes, the
    trained policy's (two training ranks: not the inline weights) what `mpo eval` makes of it in one process."""
    import socket

    reference_dir, _ = eval_run
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run_dir = tmp_path / "run"
    command = _command(run_dir, tiny_policy_dir, tiny_reward_dir, rounds=1) + [
        "launch.mode=distributed", "launch.nnodes=2", "launch.nproc_per_node=1", "train.per_device_batch_size=2",
        f"launch.master_port={port}"]
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**_env(), "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1"}) for rank in (0, 1)]
    results = [node.communicate(timeout=1200) for node in nodes]
    for node, (out, err) in zip(nodes, results):
        assert node.returncode == 0, out[-2000:] + err[-3000:]
    assert "node 1: every round finished" in results[1][0]
    before, after = run_dir / "round_000" / "eval_before", run_dir / "round_000" / "eval"
    for name in ("predictions.jsonl", "scores.json"):
        assert (before / name).read_bytes() == (reference_dir / "round_000" / "eval_before" / name).read_bytes()
    assert {p.name for p in (run_dir / "round_000" / "logs").iterdir()} >= {"eval_before", "eval"}
    check = tmp_path / "check"
    inline = subprocess.run([sys.executable, "-m", "mpo", "eval", str(REPO / "recipes" / "tiny" / "iterate.yaml"),
                             f"model.reward_model={tiny_reward_dir}", "--policy", str(run_dir / "round_000" / "train" /
                                                                                      "policy"),
                             "--benchmark", "answers", "--data", str(HELD_OUT), "--max-tokens", "8", "--chunk-size",
                             "2", "--work-dir", str(check)], capture_output=True, text=True, env=_env(), timeout=900)
    assert inline.returncode == 0, inline.stdout[-2000:] + inline.stderr[-3000:]
    for name in ("predictions.jsonl", "scores.json"):
        assert (after / name).read_bytes() == (check / name).read_bytes(), name
    manifest = json.loads((run_dir / "round_000" / "manifest.json").read_text())
    scores = json.loads((after / "scores.json").read_text())["overall"]
    assert manifest["metrics"][ACCURACY] == scores["correct"] / scores["total"]

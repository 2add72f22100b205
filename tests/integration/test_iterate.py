"""`mpo iterate` end to end on tiny models (hf backend): every artifact of a run, and a run killed
with SIGKILL mid-rollout, mid-scoring and mid-training that, started again, finishes with the same
pairs as an uninterrupted run and a valid policy."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from processes import kill_when

from mpo.records import PreferencePair, Rollout, ScoredRollout, read_jsonl

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "tiny" / "iterate.yaml"
pytestmark = pytest.mark.slow


def _overrides(run_dir, policy, reward):
    return [f"run.output_dir={run_dir}", f"model.policy={policy}", f"model.reward_model={reward}",
            f"data.prompts={REPO / 'mpo/assets/demo/prompts.jsonl'}", "iterate.rounds=2"]


def _command(run_dir, policy, reward):
    return [sys.executable, "-m", "mpo", "iterate", str(RECIPE), *_overrides(run_dir, policy, reward)]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_policy_dir, tiny_reward_dir):
    run_dir = tmp_path_factory.mktemp("iterate") / "run"
    result = subprocess.run(_command(run_dir, tiny_policy_dir, tiny_reward_dir), capture_output=True, text=True,
                            env=_env(), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result.stdout


def test_every_artifact_of_a_run(reference_run):
    run_dir, stdout = reference_run
    assert (run_dir / "config.yaml").exists()
    for n in range(2):
        round_dir = run_dir / f"round_{n:03d}"
        rollouts = read_jsonl(round_dir / "rollouts.jsonl", Rollout)
        assert len(rollouts) == 16 * 4
        assert {r.sample_idx for r in rollouts} == {0, 1, 2, 3}
        scored = read_jsonl(round_dir / "scored.jsonl", ScoredRollout)
        assert [(s.prompt_id, s.sample_idx) for s in scored] == [(r.prompt_id, r.sample_idx) for r in rollouts]
        pairs = read_jsonl(round_dir / "pairs.jsonl", PreferencePair)
        stats = json.loads((round_dir / "pair_stats.json").read_text())
        assert stats["pairs_kept"] == len(pairs) > 0
        assert all(p.chosen_reward > p.rejected_reward and p.chosen != p.rejected for p in pairs)
        manifest = json.loads((round_dir / "manifest.json").read_text())
        assert manifest["round"] == n and manifest["trained"]
        assert (Path(manifest["policy_out"]) / "model.safetensors").exists()
        assert (round_dir / "train" / "metrics.jsonl").exists()
        assert not list(round_dir.glob("*.parts"))
    # round 1 rolls out from round 0's trained policy
    assert json.loads((run_dir / "round_001" / "manifest.json").read_text())["policy_in"] == \
        json.loads((run_dir / "round_000" / "manifest.json").read_text())["policy_out"]
    summary = json.loads((run_dir / "summary.json").read_text())["rounds"]
    assert [r["round"] for r in summary] == [0, 1]
    assert {"reward/mean", "pairs/kept", "train/loss", "train/delta"} <= set(summary[0])
    for plot in ("reward_by_round", "pair_margins", "loss_parts", "delta"):
        assert (run_dir / "plots" / f"{plot}.png").stat().st_size > 1000
    assert "reward/mean" in stdout  # the per-round table


@pytest.mark.parametrize("moment", ["rollout", "scoring", "training"])
def test_killed_run_resumes_to_the_same_pairs(reference_run, tmp_path, tiny_policy_dir, tiny_reward_dir, moment):
    reference_dir, _ = reference_run
    run_dir = tmp_path / "run"
    round_dir = run_dir / "round_000"
    ready = {
        "rollout": lambda: len(list((round_dir / "rollouts.jsonl.parts").glob("0*.jsonl"))) >= 2,
        "scoring": lambda: len(list((round_dir / "scored.jsonl.parts").glob("0*.jsonl"))) >= 2,
        "training": lambda: any((round_dir / "train").glob("checkpoint-*/trainer_state.json")),
    }[moment]
    command = _command(run_dir, tiny_policy_dir, tiny_reward_dir)
    assert kill_when(command, _env(), ready), f"the run finished before it could be killed {moment}"
    assert not (round_dir / "manifest.json").exists()
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for n in range(2):
        name = f"round_{n:03d}"
        for stage in ("rollouts.jsonl", "scored.jsonl", "pairs.jsonl"):
            assert (run_dir / name / stage).read_bytes() == (reference_dir / name / stage).read_bytes(), stage
        # the training log holds each step once, with the uninterrupted run's values
        assert _training_log(run_dir / name) == _training_log(reference_dir / name)
        assert _untimed(json.loads((run_dir / name / "manifest.json").read_text()), run_dir) == \
            _untimed(json.loads((reference_dir / name / "manifest.json").read_text()), reference_dir)
        for weights in ("train/policy/model.safetensors",):
            assert (run_dir / name / weights).read_bytes() == (reference_dir / name / weights).read_bytes()
    summary, expected = (json.loads((d / "summary.json").read_text())["rounds"] for d in (run_dir, reference_dir))
    assert [_untimed(r, run_dir) for r in summary] == [_untimed(r, reference_dir) for r in expected]


def _training_log(round_dir):
    """The rows of metrics.jsonl without wall-clock figures: each step's, and the end-of-training row,
    whose ``train_loss`` is the mean over every step, a resumed run's too."""
    timed = ("tokens/s", "train_runtime", "train_samples_per_second", "train_steps_per_second")
    rows = [json.loads(line) for line in (round_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in timed} for row in rows]


def _untimed(obj, run_dir):
    """A manifest or summary row without its timings, with the run folder's path made generic."""
    if isinstance(obj, dict):
        return {k: _untimed(v, run_dir) for k, v in obj.items() if not k.startswith("time/")}
    return obj.replace(str(run_dir), "RUN") if isinstance(obj, str) else obj


def _recipe(run_dir, policy, reward, *extra):
    from mpo.config import load_recipe

    return load_recipe(RECIPE, _overrides(run_dir, policy, reward) + ["iterate.rounds=1", *extra])


def test_round_without_pairs_carries_the_policy_over(tmp_path, tiny_policy_dir, tiny_reward_dir, capsys):
    from mpo.rounds.driver import run_iterate

    recipe = _recipe(tmp_path / "run", tiny_policy_dir, tiny_reward_dir, "pairs.min_margin=1000000",
                     "iterate.rounds=2")
    manifests = run_iterate(recipe)
    assert [m["trained"] for m in manifests] == [False, False]
    assert manifests[1]["policy_out"] == str(tiny_policy_dir)
    stats = json.loads((tmp_path / "run" / "round_000" / "pair_stats.json").read_text())
    assert stats["pairs_kept"] == 0 and stats["prompts_dropped"]["below_margin"] == 16
    assert "no preference pairs" in capsys.readouterr().out


def test_missing_prompt_image_is_a_counted_skip(tmp_path, tiny_policy_dir, tiny_reward_dir, capsys):
    from mpo.data import DataError
    from mpo.rounds.driver import run_iterate

    source = REPO / "mpo" / "assets" / "demo"
    prompts = tmp_path / "prompts.jsonl"
    lines = (source / "prompts.jsonl").read_text().splitlines()[:3]
    rows = [json.loads(line) for line in lines]
    for row in rows:
        row["images"] = [str(source / row["images"][0])]
    rows[1]["images"] = [str(tmp_path / "gone.png")]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = [f"data.prompts={prompts}", "train.max_steps=1"]
    with pytest.raises(DataError, match=rf"{prompts}:2: field 'images': image not found"):
        run_iterate(_recipe(tmp_path / "a", tiny_policy_dir, tiny_reward_dir, *extra))
    run_iterate(_recipe(tmp_path / "b", tiny_policy_dir, tiny_reward_dir, *extra, "data.on_bad_image=skip"))
    assert "1 prompt(s) skipped for bad images, 2 kept" in capsys.readouterr().out
    rollouts = read_jsonl(tmp_path / "b" / "round_000" / "rollouts.jsonl", Rollout)
    assert {r.prompt_id for r in rollouts} == {rows[0]["prompt_id"], rows[2]["prompt_id"]}


def test_fixed_reference_and_wandb_offline(tmp_path, tiny_policy_dir, tiny_reward_dir, monkeypatch):
    from mpo.rounds.driver import run_iterate

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    recipe = _recipe(run_dir, tiny_policy_dir, tiny_reward_dir, "iterate.rounds=2", "iterate.reference=fixed",
                     "train.max_steps=2", "run.report_to=wandb", "run.wandb_project=mpo-test")
    manifests = run_iterate(recipe)
    assert [m["reference"] for m in manifests] == [str(tiny_policy_dir)] * 2
    assert manifests[1]["policy_in"] == manifests[0]["policy_out"] != str(tiny_policy_dir)
    round1 = yaml.safe_load((run_dir / "round_001" / "train" / "config.yaml").read_text())
    assert round1["train"]["reference_model"] == str(tiny_policy_dir)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # one W&B run for the whole iterate; the trainer logs into it too
    assert (run_dir / "wandb_id.txt").read_text().strip() in runs[0].name
    (log,) = runs[0].glob("*.wandb")  # offline runs keep their history in this protobuf log
    data = log.read_bytes()
    for key in (b"round/reward/mean", b"round/pairs/kept", b"round/rollouts", b"rewards/margins"):
        assert key in data, key


def test_second_iterate_on_the_same_folder_is_refused(tmp_path, tiny_policy_dir, tiny_reward_dir):
    run_dir = tmp_path / "run"
    command = _command(run_dir, tiny_policy_dir, tiny_reward_dir)
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    lock = run_dir / ".mpo.lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text()):
        time.sleep(0.05)
    second = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"in use by pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert first.wait(timeout=900) == 0, first.stderr.read()[-2000:]
    rows = _training_log(run_dir / "round_000")
    steps = [row["step"] for row in rows if "train_loss" not in row]
    assert steps == sorted(set(steps)) and steps  # every step's row written once
    assert [row["step"] for row in rows if "train_loss" in row] == [steps[-1]]  # and one end-of-training row
    assert not lock.exists()


def test_changed_reward_model_after_a_kill_in_scoring_is_refused(reference_run, tmp_path, tiny_policy_dir,
                                                                tiny_reward_dir):
    from mpo.cli.tiny import save_reward_model

    reference_dir, _ = reference_run
    run_dir = tmp_path / "run"
    round_dir = run_dir / "round_000"
    command = _command(run_dir, tiny_policy_dir, tiny_reward_dir)
    assert kill_when(command, _env(), lambda: len(list((round_dir / "scored.jsonl.parts").glob("0*.jsonl"))) >= 2)
    config = (run_dir / "config.yaml").read_bytes()
    other = save_reward_model(tmp_path / "other_reward", seed=7)
    changed = subprocess.run(_command(run_dir, tiny_policy_dir, other), capture_output=True, text=True, env=_env(),
                             timeout=300)
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert "round_000/scored.jsonl: made with other settings (model.reward_model: files changed: " in changed.stderr
    assert "value_head.safetensors" in changed.stderr
    assert f"delete {round_dir}/{{scored,pairs,train,manifest}}*" in changed.stderr
    assert not (round_dir / "scored.jsonl").exists() and (run_dir / "config.yaml").read_bytes() == config
    resumed = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (round_dir / "scored.jsonl").read_bytes() == (reference_dir / "round_000" / "scored.jsonl").read_bytes()

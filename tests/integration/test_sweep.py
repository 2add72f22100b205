"""``mpo sweep`` end to end on the tiny policy (CPU, in process): a 2 x 2 grid of loss weights x β
trains four points, each in its own folder with its own recipe; ``sweep.csv`` holds one row per point
whose numbers are the points' own ``metrics.jsonl``; ``sweep.png`` is written; a rerun skips finished
points and retrains a deleted one; W&B runs share the sweep's group; bad grids stop with one line.
The ``--launch`` mode is checked through ``--print-commands`` (the launched runs are plain
``mpo train`` commands, which tests/integration/test_distributed_cpu.py launches for real)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mpo.cli import app
from mpo.cli.sweep import METRICS, format_value, point_names, split_values
from mpo.config import load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "tiny" / "mpo_offline.yaml"
PAIRS = REPO / "tests" / "fixtures" / "pairs" / "colour_pairs.jsonl"
RUNNER = CliRunner()
GRID = ["--grid", "loss.weights=[0.8,0.2,1.0];[1,0,0]", "--grid", "loss.beta=0.1,0.2"]
POINTS = {
    "weights=0.8-0.2-1__beta=0.1": ([0.8, 0.2, 1.0], 0.1),
    "weights=0.8-0.2-1__beta=0.2": ([0.8, 0.2, 1.0], 0.2),
    "weights=1-0-0__beta=0.1": ([1, 0, 0], 0.1),
    "weights=1-0-0__beta=0.2": ([1, 0, 0], 0.2),
}


def _args(policy, root, *extra):
    return ["sweep", str(RECIPE), *GRID, f"model.policy={policy}", f"data.preferences={PAIRS}",
            f"run.output_dir={root}", "train.max_steps=2", "train.save_steps=100", *extra]


def _csv(root: Path) -> list[dict]:
    import csv

    with (root / "sweep.csv").open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _expected(point_dir: Path, tail: int = 5) -> dict:
    rows = [json.loads(line) for line in (point_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss/preference" in r][-tail:]
    return {key: sum(r[key] for r in rows) / len(rows) for key in METRICS}


@pytest.fixture(scope="module")
def swept(tiny_policy_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep") / "ablation"
    result = RUNNER.invoke(app, _args(tiny_policy_dir, root))
    assert result.exit_code == 0, result.output[-3000:]
    return root, result.output


def test_split_values_and_names():
    assert split_values("[0.8,0.2,1.0];[1,0,0]") == ["[0.8,0.2,1.0]", "[1,0,0]"]
    assert split_values("[0.8,0.2,1.0],[1,0,0]") == ["[0.8,0.2,1.0]", "[1,0,0]"]
    assert split_values("0.1, 0.2") == ["0.1", "0.2"]
    assert split_values("'a,b',{x: 1, y: 2}") == ["'a,b'", "{x: 1, y: 2}"]
    assert format_value([0.8, 0.2, 1.0]) == "0.8-0.2-1" and format_value("../etc/x y") == "..etcxy"
    names = point_names(["train.lora.r", "reward_train.lora.r"], [(4, 4), (8, 4)])
    assert names == ["train.lora.r=4__reward_train.lora.r=4", "train.lora.r=8__reward_train.lora.r=4"]
    assert point_names(["a.b"], [("x/",), ("x?",)]) == ["b=x", "b=x_2"]


@pytest.mark.slow
def test_four_points_each_with_its_recipe_and_a_csv_row(swept):
    root, output = swept
    assert set(p.name for p in root.iterdir() if p.is_dir()) == set(POINTS)
    rows = _csv(root)
    assert [r["point"] for r in rows] == list(POINTS)
    assert list(rows[0]) == ["point", "loss.weights", "loss.beta", "status", "steps", "steps_averaged",
                             *METRICS, "output_dir"]
    for row in rows:
        weights, beta = POINTS[row["point"]]
        point_dir = root / row["point"]
        assert json.loads(row["loss.weights"]) == weights and float(row["loss.beta"]) == beta
        assert row["status"] == "trained" and row["steps"] == "2" and row["steps_averaged"] == "2"
        config = yaml.safe_load((point_dir / "config.yaml").read_text())
        assert config["loss"]["weights"] == weights and config["loss"]["beta"] == beta
        assert config["run"]["output_dir"] == str(point_dir)
        assert (point_dir / "policy" / "model.safetensors").is_file()
        expected = _expected(point_dir)
        for key in METRICS:
            assert float(row[key]) == pytest.approx(expected[key], rel=1e-12), (row["point"], key)
        if weights == [1, 0, 0]:  # the grid reached the loss: DPO alone
            assert float(row["loss"]) == pytest.approx(float(row["loss/preference"]), rel=1e-6)
    assert rows[0]["rewards/margins"] != rows[1]["rewards/margins"]  # β changed the rewards
    png = (root / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # one shared reference pass: the first point computes, the others reuse
    assert output.count("reference log-probs: 16 computed") == 1
    assert output.count("reference log-probs: 0 computed, 16 reused") == 3


@pytest.mark.slow
def test_rerun_skips_finished_points_and_retrains_a_missing_one(swept, tiny_policy_dir):
    import shutil

    root, _ = swept
    before = {name: (root / name / "metrics.jsonl").stat().st_mtime_ns for name in POINTS}
    result = RUNNER.invoke(app, _args(tiny_policy_dir, root))
    assert result.exit_code == 0, result.output[-3000:]
    assert result.output.count("finished earlier; skipped") == 4
    assert {r["status"] for r in _csv(root)} == {"skipped"}
    assert all((root / n / "metrics.jsonl").stat().st_mtime_ns == t for n, t in before.items())

    gone = "weights=1-0-0__beta=0.2"
    shutil.rmtree(root / gone)
    result = RUNNER.invoke(app, _args(tiny_policy_dir, root))
    assert result.exit_code == 0, result.output[-3000:]
    assert result.output.count("finished earlier; skipped") == 3
    assert {r["point"]: r["status"] for r in _csv(root)}[gone] == "trained"
    assert (root / gone / "policy" / "model.safetensors").is_file()


def test_bad_grid_key_is_one_line_naming_it(tmp_path):
    result = RUNNER.invoke(app, ["sweep", str(RECIPE), "--grid", "loss.wieghts=[1,0,0],[0,0,1]",
                                 f"run.output_dir={tmp_path}"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == ["error: --grid loss.wieghts: unknown key; valid keys under loss: weights, beta, "
                     "bco_delta, ema_decay, sft_reduction"]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "grid, message",
    [
        (["--grid", "loss.beta=0.1,-1"], "error: grid point loss.beta=-1: "),
        (["--grid", "run.output_dir=a,b"], "error: --grid run.output_dir: reserved"),
        (["--grid", "loss.beta"], "error: --grid 'loss.beta': expected KEY=VALUE1,VALUE2"),
        (["--grid", "loss.beta=0.1", "--grid", "loss.beta=0.2"], "error: --grid loss.beta: given twice"),
        ([], "error: --grid: give at least one"),
    ],
)
def test_bad_grids_fail_before_training(grid, message, tmp_path):
    result = RUNNER.invoke(app, ["sweep", str(RECIPE), *grid, f"run.output_dir={tmp_path}"])
    assert result.exit_code == 2 and result.output.startswith(message), result.output
    assert len(result.output.strip().splitlines()) == 1


def test_print_commands_gives_one_launch_per_point_in_one_wandb_group(tmp_path):
    launch = "accelerate launch --config_file recipes/accelerate/ddp.yaml -m"
    result = RUNNER.invoke(app, ["sweep", str(RECIPE), *GRID, "--launch", launch, "--print-commands",
                                 "--name", "weights-x-beta", f"run.output_dir={tmp_path}", "run.report_to=wandb"])
    assert result.exit_code == 0, result.output
    commands = [shlex.split(line) for line in result.stdout.strip().splitlines()]
    assert len(commands) == 4 and not any(tmp_path.iterdir())  # printed, nothing run
    for command, (name, (weights, beta)) in zip(commands, POINTS.items()):
        assert command[:6] == [*shlex.split(launch), "mpo", "train"][:6]
        train_at = command.index("train")
        recipe = load_recipe(command[train_at + 1], command[train_at + 2:])
        assert recipe.loss.weights == weights and recipe.loss.beta == beta
        assert recipe.run.output_dir == str(tmp_path / name)
        assert recipe.run.wandb_group == "weights-x-beta"


@pytest.mark.slow
def test_launch_runs_each_point_as_its_own_process(tiny_policy_dir, tmp_path):
    import sys

    root = tmp_path / "launched"
    args = ["sweep", str(RECIPE), "--grid", "loss.beta=0.3", f"model.policy={tiny_policy_dir}",
            f"data.preferences={PAIRS}", f"run.output_dir={root}", "train.max_steps=1", "train.save_steps=100"]
    result = RUNNER.invoke(app, [*args, "--launch", f"{sys.executable} -m"])
    assert result.exit_code == 0, result.output[-3000:]
    (row,) = _csv(root)
    assert row["point"] == "beta=0.3" and row["status"] == "trained" and row["steps"] == "1"
    assert float(row["loss"]) == pytest.approx(_expected(root / "beta=0.3")["loss"])

    failed = RUNNER.invoke(app, [*args[:-3], f"run.output_dir={tmp_path / 'failed'}", "--launch", "false"])
    assert failed.exit_code == 2
    last = failed.output.strip().splitlines()[-1]
    assert last.startswith("error: grid point beta=0.3: `false mpo train ") and last.endswith("exited with status 1")


@pytest.mark.slow
def test_wandb_runs_share_the_sweep_group(tiny_policy_dir, tmp_path, monkeypatch):
    for key in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    root = tmp_path / "wb"
    result = RUNNER.invoke(app, ["sweep", str(RECIPE), "--grid", "loss.beta=0.1,0.2", "--name", "beta-sweep",
                                 f"model.policy={tiny_policy_dir}", f"data.preferences={PAIRS}",
                                 f"run.output_dir={root}", "train.max_steps=1", "train.save_steps=100",
                                 "run.report_to=wandb"])
    assert result.exit_code == 0, result.output[-3000:]
    for name in ("beta=0.1", "beta=0.2"):
        logs = list((root / name / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(logs) == 1, name  # each point's W&B files in its own folder
        data = logs[0].read_bytes()
        assert b"beta-sweep" in data and name.encode() in data  # group, and the run named after the point
    import os

    assert "WANDB_RUN_GROUP" not in os.environ and "WANDB_DIR" not in os.environ

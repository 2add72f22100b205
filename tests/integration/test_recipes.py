"""Every recipe under ``recipes/`` resolves and opens with the command that runs it (which
tests/integration/test_recipes_as_shipped.py runs, from the root of a copy of the repository).
``recipes/accelerate/*.yaml`` (accelerate configs) and W&B sweep files are checked as YAML of their
own kind; tests/integration/test_distributed_cpu.py launches with the accelerate configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mpo.config import load_recipe

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
# the last command of the first line: `mpo train|iterate|grpo|reward train RECIPE`, possibly after
# `mpo tiny ... &&` or an `accelerate launch ... -m` prefix
COMMAND = re.compile(r"\bmpo (train|iterate|grpo|reward train) (\S+\.yaml)")


def _load(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def is_wandb_sweep(data) -> bool:
    return isinstance(data, dict) and {"method", "parameters"} <= data.keys()


ALL_YAML = sorted(RECIPES.rglob("*.yaml"))
ACCELERATE = sorted((RECIPES / "accelerate").glob("*.yaml"))
SWEEPS = [p for p in ALL_YAML if p not in ACCELERATE and is_wandb_sweep(_load(p))]
RUNNABLE = [p for p in ALL_YAML if p not in ACCELERATE and p not in SWEEPS]


def _id(path: Path) -> str:
    return str(path.relative_to(RECIPES))


def command_of(path: Path) -> str:
    """The ``mpo`` command the recipe's first line names (and that it names this very file)."""
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#"), f"{_id(path)}: the first line must be a comment with the command"
    found = COMMAND.findall(first)
    assert found, f"{_id(path)}: first line names no `mpo train|iterate|grpo|reward train RECIPE`: {first!r}"
    command, named = found[-1]
    assert named == str(path.relative_to(REPO)), f"{_id(path)}: first line runs {named}, not this file"
    return command


def test_the_recipes_are_found():
    assert len(RUNNABLE) >= 9 and len(ACCELERATE) >= 5 and SWEEPS
    assert {command_of(p) for p in RUNNABLE} == {"train", "iterate", "grpo", "reward train"}


@pytest.mark.parametrize("path", RUNNABLE, ids=_id)
def test_recipe_resolves_as_shipped(path):
    """It loads, and sets what its command reads (a recipe missing it would fail only once run)."""
    recipe = load_recipe(path)
    needs = {
        "train": {"model.policy": recipe.model.policy, "data.preferences": recipe.data.preferences},
        "iterate": {"model.policy": recipe.model.policy, "model.reward_model": recipe.model.reward_model,
                    "data.prompts": recipe.data.prompts},
        "grpo": {"model.policy": recipe.model.policy, "data.prompts": recipe.data.prompts},
        "reward train": {"reward_train.stages": recipe.reward_train.stages},
    }[command_of(path)]
    assert all(needs.values()), f"{_id(path)}: unset: {[key for key, value in needs.items() if not value]}"


@pytest.mark.parametrize("path", ACCELERATE, ids=_id)
def test_accelerate_config_parses(path):
    data = _load(path)
    assert data["distributed_type"] in {"MULTI_GPU", "DEEPSPEED", "FSDP", "MULTI_CPU", "NO"}
    assert isinstance(data["num_processes"], int) and data["num_processes"] >= 1
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"accelerate launch --config_file {path.relative_to(REPO)}" in line for line in header), \
        "the opening comment shows the launch command"
    if data["distributed_type"] == "DEEPSPEED":
        assert data["deepspeed_config"]["zero_stage"] in (0, 1, 2, 3)


@pytest.mark.parametrize("path", SWEEPS, ids=_id)
def test_wandb_sweep_file_builds_valid_mpo_commands(path, monkeypatch):
    """What ``wandb agent`` would run for every grid point (its own argument builder) resolves."""
    import itertools

    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    data = _load(path)
    assert data["method"] in {"grid", "random", "bayes"} and data["command"][0] == "${env}"
    assert "${args_no_hyphens}" in data["command"]
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")
    names = list(data["parameters"])
    for combo in itertools.product(*[data["parameters"][n]["values"] for n in names]):
        args = create_sweep_command_args({"args": {n: {"value": v} for n, v in zip(names, combo)}})
        command = [a for c in data["command"] for a in (args["args_no_hyphens"] if c == "${args_no_hyphens}" else
                                                        [data["program"]] if c == "${program}" else [c])]
        at = command.index("train")
        assert command[at - 1] == "mpo"
        recipe = load_recipe(REPO / command[at + 1], command[at + 2:])
        assert recipe.run.output_dir.endswith("/abc123") and recipe.run.report_to == "wandb"
        dumped = recipe.model_dump()
        for name, value in zip(names, combo):
            section, key = name.split(".")
            assert dumped[section][key] == value

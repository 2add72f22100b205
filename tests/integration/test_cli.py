"""The `mpo` command: fast help, --help on every subcommand, config printing and errors."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mpo.cli import app

RUNNER = CliRunner()


def _command_paths(command, prefix=()):
    yield prefix
    for name, sub in getattr(command, "commands", {}).items():  # groups have sub-commands
        yield from _command_paths(sub, prefix + (name,))


ALL_COMMANDS = list(_command_paths(typer.main.get_command(app)))


def test_help_is_fast_and_imports_no_heavy_library():
    mpo = Path(sys.executable).parent / "mpo"
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        result = subprocess.run([str(mpo), "--help"], capture_output=True, text=True)
        runs.append(time.perf_counter() - start)
        assert result.returncode == 0 and "demo" in result.stdout
    assert min(runs) < 1.5, runs
    probe = "import sys, mpo.cli; print(sorted(m for m in ('torch', 'transformers', 'trl', 'vllm', 'wandb') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "mpo")
def test_every_subcommand_has_help(path):
    result = RUNNER.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_config_prints_resolved_recipe():
    result = RUNNER.invoke(app, ["config", "loss.beta=0.25", "pairs.strategy=top_k"])
    assert result.exit_code == 0, result.output
    assert "beta: 0.25" in result.output and "strategy: top_k" in result.output


def test_config_error_is_one_clear_line():
    result = RUNNER.invoke(app, ["config", "loss.bco_delta=always"])
    assert result.exit_code == 2
    assert "error: <defaults>: loss.bco_delta: Input should be 'none', 'cumulative' or 'ema'" in result.output


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "mpo", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "Usage" in result.stdout

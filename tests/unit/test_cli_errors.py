"""What the CLI guard does with an exception: a user's problem (MpoError, a machine fault) is one
red line and exit 2; anything else is a bug: its traceback, a line saying so, exit 1."""

from __future__ import annotations

import errno

import typer
from typer.testing import CliRunner

from mpo.cli_common import BUG_LINE, guarded
from mpo.errors import MpoError

app = typer.Typer()


@app.command()
@guarded
def run(kind: str):
    if kind == "user":
        raise MpoError("data.jsonl:3: field 'images': image not found: a.png")
    if kind == "disk":
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/a.tmp")
    if kind == "bug":
        raise RuntimeError("shape mismatch in a step")  # e.g. torch deep inside; must not look like user error
    if kind == "value":
        raise ValueError("a ValueError that is not ours is a bug too")


def test_user_error_is_one_line_and_exit_2():
    result = CliRunner().invoke(app, ["user"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: data.jsonl:3: field 'images': image not found: a.png"


def test_machine_fault_is_one_line_naming_the_path():
    result = CliRunner().invoke(app, ["disk"])
    assert result.exit_code == 2 and result.output.strip() == "error: runs/x/a.tmp: no space left on the device"


def test_a_bug_keeps_its_traceback_and_exits_1():
    for kind, message in (("bug", "RuntimeError: shape mismatch in a step"),
                          ("value", "ValueError: a ValueError that is not ours is a bug too")):
        result = CliRunner().invoke(app, [kind])
        assert result.exit_code == 1
        assert "Traceback (most recent call last)" in result.output and message in result.output
        assert result.output.strip().endswith(BUG_LINE)

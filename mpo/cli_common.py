"""What every ``mpo`` command shares: the one-line error exit, and the guard that decides what is a
user's problem (one line, exit 2) and what is a bug (the traceback, exit 1). A leaf module: command
modules import it, it imports none of them."""

from __future__ import annotations

import functools
import sys

import typer

from mpo.errors import MpoError, fault_line

BUG_LINE = "this is a bug in mpo-vl, not in your input: please report it with the traceback above"


def fail(message: str, status: int = 2) -> None:
    """Print ``error: message`` in red on stderr and exit with ``status`` (2; a preemption's is 128 +
    the signal, :class:`mpo.preempt.Preempted`)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(status)


def user_line(err: BaseException) -> str | None:
    """The one line to print for an exception a user can act on, or None for a bug."""
    import pickle

    if isinstance(err, MpoError):
        return str(err)
    if isinstance(err, pickle.UnpicklingError):  # torch.load(weights_only=True) refused a file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"refused to unpickle a file (only plain tensors are ever loaded from pickles): {first}"
    return fault_line(err)


def guarded(command):
    """Decorate a command: user errors become one line and exit 2; anything else keeps its
    traceback, followed by a line saying it is a bug, and exits 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:
            line = user_line(err)
            if line is not None:
                fail(line, getattr(err, "exit_status", 2))
            import traceback

            traceback.print_exc()
            print(BUG_LINE, file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper

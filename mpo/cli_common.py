"""What every ``mpo`` command shares: the one-line error exit, and the guard that decides what is a
user's problem (one line, exit 2) and what is a bug (the traceback, exit 1). A leaf module: command
modules import it, it imports none of them."""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path

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


def check_output_file(path: str | os.PathLike, option: str, example: str) -> None:
    """Before any work: ``path`` can be written as a file (it is no folder, no file stands where one
    of its folders goes, the folder it goes in can be written), else one line naming ``option``."""
    path = Path(path)
    if path.is_dir():
        raise MpoError(f"{option} {path}: is a folder; name the file to write (e.g. {path / example})")
    problem = _unwritable(path.absolute().parent)
    if problem:
        raise MpoError(f"{option} {path}: {problem}")


def check_output_folder(path: str | os.PathLike, key: str) -> None:
    """Before any work: ``path`` can be a run folder (no file stands there or where one of its
    parents goes; a new one can be made). An existing folder passes as it is: a finished run reads
    back even from read-only storage, and a write that fails later says so in one line."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MpoError(f"{key}: {path}: is a file, not a folder (name another path, or move the file)")
    problem = None if path.is_dir() else _unwritable(path.absolute().parent)
    if problem:
        raise MpoError(f"{key}: {path}: {problem}")


def _unwritable(folder: Path) -> str | None:
    """Why nothing can be written in ``folder`` (made where missing), or None."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    return f"cannot write in {folder} ({'the file system is read-only' if read_only else 'permission denied'})"


def write_or_recover(path: str | os.PathLike, write, what: str) -> None:
    """``write(path)``; where that fails (a full disk, no permission, a folder in the way), what was
    computed is written by ``write`` beside it instead, as ``<name>.recovered<suffix>`` in the working
    directory (else the temporary folder), and one line says where."""
    path = Path(path)
    try:
        write(path)
        return
    except (OSError, MpoError) as err:
        cause = str(err) if isinstance(err, MpoError) else fault_line(err) or f"{err.strerror or err}"
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        target = folder / f"{path.stem}.recovered{path.suffix}"
        number = 1
        while target.exists():
            target, number = folder / f"{path.stem}.recovered-{number}{path.suffix}", number + 1
        try:
            write(target)
        except (OSError, MpoError):
            continue
        raise MpoError(f"{path}: could not write ({cause}); {what} written to {target} instead")
    raise MpoError(f"{path}: could not write ({cause}), nor a recovery copy in {Path.cwd()} or "
                   f"{tempfile.gettempdir()}; {what} are lost")

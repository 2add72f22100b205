"""The project's error type, and how an exception becomes the one line a user reads.

Every problem a user can fix (a recipe key, a line of an input file, a model folder, a run folder)
raises :class:`MpoError` or a subclass, with a message that names where: ``file:line: field ...``
or ``recipe.key: ...``. The CLI prints such a message and exits 2. An environment fault (disk full,
read-only folder, no permission) is turned into one line naming the path and the cause by
:func:`fault_line`. Anything else is a bug: it keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path


class MpoError(ValueError):
    """A problem the user can fix; the message is one line (per problem) naming where it is."""


class RunFolderError(MpoError):
    """A run folder that cannot be used: locked by another process, unwritable, made with other settings."""


FAULTS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# What torch and safetensors say when a write fails half-way (they do not raise OSError).
_WRITE_FAILURES = ("PytorchStreamWriter", "inline_container", "unexpected pos", "No space left",
                   "StorageFull", "Read-only file system", "file write failed")


def fault_line(err: BaseException) -> str | None:
    """One line for an environment fault (disk full, read-only, permissions), or None."""
    if isinstance(err, OSError) and err.errno in FAULTS:
        where = err.filename or err.filename2
        return f"{where}: {FAULTS[err.errno]}" if where else FAULTS[err.errno]
    return None


def free_space(path: str | os.PathLike) -> str:
    """Free space of the file system holding ``path`` (or its nearest existing parent), readable."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if free < 1024 or unit == "TB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return "unknown"


@contextlib.contextmanager
def writing_into(folder: str | os.PathLike, what: str):
    """Turn a failed write under ``folder`` (disk full, read-only, a torch or safetensors writer
    that failed half-way) into one :class:`RunFolderError` naming the folder, the cause and the free
    space. What was finished before stays; a rerun resumes from it."""
    try:
        yield
    except MpoError:
        raise
    except OSError as err:
        line = fault_line(err)
        if line is None:
            raise
        free = f" ({free_space(folder)} free)" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise RunFolderError(f"{folder}: {what} failed: {line}{free}") from None
    except Exception as err:  # torch's RuntimeError, safetensors' SafetensorError
        text = str(err)
        writer = isinstance(err, RuntimeError) or type(err).__name__ == "SafetensorError"
        if not writer or not any(marker in text for marker in _WRITE_FAILURES):
            raise
        first = text.strip().splitlines()[0][:160]
        raise RunFolderError(
            f"{folder}: {what} failed while writing ({first}); disk full? {free_space(folder)} free"
        ) from None

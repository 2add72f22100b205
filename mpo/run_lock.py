"""One process at a time per run folder.

``RUN_FOLDER/.mpo.lock`` is held with ``flock`` (which the kernel releases when the holder dies,
``kill -9`` included, and which NFS v4 carries across nodes) and names its holder (host, pid,
command, start time) for the message a second process gets. A lock file left by a dead process is
taken over with a line saying so. The file is removed when the holder finishes, so a rerun of a
finished run leaves the folder as it found it. A read-only folder is not locked: nothing can write
there, so a finished run can still be read back.

Processes a holder starts for its stages (``iterate.launch: distributed``) inherit the lock through
``MPO_RUN_LOCK``; only the first process of a launch (``RANK`` 0 or unset) takes it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from mpo.errors import RunFolderError, fault_line

LOCK_NAME = ".mpo.lock"
INHERITED = "MPO_RUN_LOCK"


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv)[:300],
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe(info: dict) -> str:
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} (since {info.get('since', '?')}: {info.get('command', '?')})"


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike):
    """Hold the run folder's lock for the duration of the block (see the module docstring)."""
    folder = Path(run_dir).absolute()
    path = folder / LOCK_NAME
    inherited = os.environ.get(INHERITED)
    if inherited and Path(inherited) == path or os.environ.get("RANK", "0") != "0":
        yield
        return
    fd = _open(folder, path)
    if fd is None:  # read-only folder: nobody can write here
        yield
        return
    try:
        _take(fd, path)
        previous = os.environ.get(INHERITED)
        os.environ[INHERITED] = str(path)
        try:
            yield
        finally:
            _restore(previous)
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)


def _open(folder: Path, path: Path) -> int | None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        if err.errno == errno.EROFS:
            return None
        raise RunFolderError(f"{folder}: cannot lock the run folder: {fault_line(err) or err}") from None


def _take(fd: int, path: Path) -> None:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunFolderError(
            f"{path.parent}: in use by {_describe(_read(fd))}; wait for it to finish or stop it "
            f"(lock: {path})"
        ) from None
    except OSError:  # no flock on this file system: the holder's pid is all there is to go by
        _check_pid(_read(fd), path)
    if os.fstat(fd).st_ino != _inode(path):  # the holder removed the file as we opened it
        raise RunFolderError(f"{path.parent}: another process took the lock just now; run again")
    left = _read(fd)
    if left:
        print(f"{path.parent}: taking over the lock left by {_describe(left)}, which is no longer running")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(_holder()).encode("utf-8"))
    os.fsync(fd)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def _check_pid(info: dict, path: Path) -> None:
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        raise RunFolderError(f"{path.parent}: in use by {_describe(info)}; wait for it or stop it (lock: {path})")


def _restore(previous: str | None) -> None:
    if previous is None:
        os.environ.pop(INHERITED, None)
    else:
        os.environ[INHERITED] = previous

"""One process at a time per run folder.

``RUN_FOLDER/.mpo.lock`` is held with ``flock`` (which the kernel releases when the holder dies,
``kill -9`` included, and which NFS v4 carries across nodes) and names its holder (host, pid,
command, start time) for the message a second process gets. A lock file left by a dead process is
taken over with a line saying so. The file is removed when the holder finishes, so a rerun of a
finished run leaves the folder as it found it. A read-only folder is not locked: nothing can write
there, so a finished run can still be read back.

Processes a holder starts for its stages (``launch.mode: distributed``) share its lock: the holder
writes a random token into the lock file and hands it to them with the lock's path
(``MPO_RUN_LOCK``, ``MPO_RUN_LOCK_TOKEN``); a process with that proof runs under the lock of that
folder only while the file holds the token (a rank whose driver has gone stops with one line), and
dies with its driver (:func:`follow_driver`). A holder locking a folder inside its own takes that
folder's lock too. A rank of a launch started by hand (``accelerate launch -m mpo train``: ``RANK`` > 0
and a launcher, torchrun or accelerate, as its parent process) runs under the lock its rank 0 takes
(it waits for it to be held). Any other process takes the lock itself, whatever ``RANK`` its
environment inherited, so a second driver started with ``RANK=1`` is refused.

The holder removes the temporaries (``.NAME.XXXX.tmp``) an earlier process killed mid-write left in
the folder, and handles preemption signals while it holds the lock (:mod:`mpo.preempt`).
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
from mpo.records import TEMP_SUFFIX

LOCK_NAME = ".mpo.lock"
INHERITED = "MPO_RUN_LOCK"
TOKEN = "MPO_RUN_LOCK_TOKEN"
DRIVER = "MPO_DRIVER_PID"  # set by mpo.rounds.launch for the ranks of a stage job
LAUNCHERS = ("torch.distributed.run", "torchrun", "accelerate")
RANK_WAIT_S = 300.0


def _holder(token: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv)[:300],
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": token}


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
    from mpo.preempt import handling

    folder = Path(run_dir).absolute()
    path = folder / LOCK_NAME
    if _shared(path):
        with handling():
            yield
        return
    fd = _open(folder, path)
    if fd is None:  # read-only folder: nobody can write here
        yield
        return
    try:
        token = _take(fd, path)
        remove_stale_temporaries(folder)
        previous = {name: os.environ.get(name) for name in (INHERITED, TOKEN)}
        os.environ.update({INHERITED: str(path), TOKEN: token})
        try:
            with handling():
                yield
        finally:
            _restore(previous)
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)


def _shared(path: Path) -> bool:
    """Whether this process runs under a lock it or another holds: its own or its driver's (the
    token it was handed is in this folder's lock file) or its launch's rank 0 (a rank > 0 of a
    launch started by hand). A proof that no longer holds is an error, not a reason to take over."""
    inherited, token = os.environ.get(INHERITED), os.environ.get(TOKEN)
    if inherited and Path(inherited) == path:
        held = _content(path).get("token")
        if not token or held != token:
            raise RunFolderError(f"{path.parent}: the process that started this one does not hold the run "
                                 f"folder's lock ({'held by another' if held else 'not held'}); stopping")
        follow_driver()
        return True
    if os.environ.get("RANK", "0") != "0" and _launched():
        _wait_until_held(path)
        follow_driver()
        return True
    return False


def follow_driver() -> None:
    """A rank of a launched stage job ends (SIGKILL) when its driver (``MPO_DRIVER_PID``) or its
    launcher dies, so it never works on without the lock its driver held: the parent-death signal
    (Linux ``prctl``) covers the launcher, a watchdog thread on the driver's pid the driver."""
    import signal
    import threading

    pid = os.environ.get(DRIVER)
    if not pid or not pid.isdigit() or getattr(follow_driver, "started", False):
        return
    follow_driver.started = True
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    threading.Thread(target=_watch, args=(int(pid),), name="mpo-driver-watchdog", daemon=True).start()


def _watch(pid: int) -> None:
    import select
    import signal

    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        fd = None
    while True:
        if fd is not None:
            gone = bool(select.select([fd], [], [], 1.0)[0])
        else:
            time.sleep(0.5)
            try:
                os.kill(pid, 0)
                gone = False
            except ProcessLookupError:
                gone = True
            except PermissionError:
                gone = False
        if gone:
            print(f"error: the driver (pid {pid}) of this rank has ended; stopping", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def _content(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


def _launched() -> bool:
    """This process was started by a launcher (torchrun, accelerate): its parent's command says so."""
    try:
        command = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return any(name in command for name in LAUNCHERS)


def _wait_until_held(path: Path) -> None:
    """A rank > 0 of a launch: wait for its rank 0 to hold the lock (a file with a token, locked)."""
    import fcntl

    deadline = time.time() + RANK_WAIT_S
    while time.time() < deadline:
        if _content(path).get("token"):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                fd = None
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    return  # held: rank 0 has it
                except OSError:
                    return  # no flock here: the token is all there is to go by
                finally:
                    os.close(fd)
        time.sleep(0.5)
    raise RunFolderError(f"{path.parent}: rank 0 of this launch did not take the run folder's lock within "
                         f"{RANK_WAIT_S:.0f} s; stopping")


def remove_stale_temporaries(folder: Path) -> int:
    """Remove what writes killed mid-way left (``.NAME.XXXX.tmp`` files: :mod:`mpo.records`' atomic
    writes); only the lock's holder calls this, so no write of another process is under way."""
    removed = 0
    for tmp in folder.rglob(f".*{TEMP_SUFFIX}"):
        if tmp.is_file() and not tmp.is_symlink():
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed += 1
    return removed


def _open(folder: Path, path: Path) -> int | None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        if err.errno == errno.EROFS:
            return None
        raise RunFolderError(f"{folder}: cannot lock the run folder: {fault_line(err) or err}") from None


def _take(fd: int, path: Path) -> str:
    """Lock ``fd`` (or refuse in one line) and write this holder into it; returns its token."""
    import fcntl
    import secrets

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
    token = secrets.token_hex(16)
    os.write(fd, json.dumps(_holder(token)).encode("utf-8"))
    os.fsync(fd)
    return token


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


def _restore(previous: dict[str, str | None]) -> None:
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

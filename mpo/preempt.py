"""Preemption: what ``SIGTERM`` (what Slurm and Kubernetes send before they kill a job) and ``SIGUSR1``
(Slurm's ``--signal``) do to a process that holds a run folder.

- **During training** (:func:`deferred`: ``mpo train``, a round's training, a reward-model stage)
  the signal is noted and training stops at the end of the optimizer step it arrived in, with a
  checkpoint of that step (:class:`mpo.train.setup.StopOnSignal`); the command then exits with one
  line naming the checkpoint and how to resume, exit status 128 + the signal (143 for SIGTERM, 138
  for SIGUSR1). Repeated signals change nothing (SIGKILL is what stops at once).
- **Anywhere else** (rollout and scoring chunks, the reference pass, model loading) the process stops
  at once with the same kind of line: finished chunks and files are kept (every write is a temporary
  file and a rename), so the same command resumes.
- **A driver running a launched stage job** (``launch.mode: distributed``) passes the signal on to
  the job's ranks (:func:`forwarding`) and waits for them to stop as above.

The handlers are installed while a process holds (or shares) a run folder's lock
(:func:`mpo.run_lock.run_lock`), from the main thread only. A light module: no heavy imports.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from mpo.errors import MpoError

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(MpoError):
    """Stopped by a signal; finished work is kept. ``exit_status`` is 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + int(signum)


class _State:
    received: int | None = None  # the first signal received
    installed: int = 0  # nesting depth of handling()
    deferring: int = 0  # > 0 while training stops at a step boundary instead of at once
    forward = None  # a launched stage job's forwarder, while one runs


_state = _State()


def received() -> int | None:
    """The signal received (its number), or None."""
    return _state.received


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _handler(signum, frame):
    first = _state.received is None
    if first:
        _state.received = signum
    if _state.forward is not None:
        _state.forward(signum)
        return  # the driver waits for its job's ranks to stop
    if _state.deferring:  # a repeat is ignored too: it must not cut the checkpoint short
        if first:
            print(f"{signal_name(signum)} received: stopping at the end of this training step, with a checkpoint",
                  file=sys.stderr, flush=True)
        return
    raise Preempted(f"stopped by {signal_name(signum)}; finished work is kept: rerun the same command to "
                    "continue", signum)


@contextlib.contextmanager
def handling():
    """Install the handlers for the block (nested blocks share them); a no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS} if _state.installed == 0 else None
    _state.installed += 1
    try:
        yield
    finally:
        _state.installed -= 1
        if previous is not None:
            for s, handler in previous.items():
                signal.signal(s, handler)
            _state.received = None


@contextlib.contextmanager
def deferred():
    """Within the block a signal only marks the run as stopping (training checks it each step)."""
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1


@contextlib.contextmanager
def forwarding(forward):
    """Within the block a signal calls ``forward(signum)`` (a launched stage job's ranks get it)."""
    previous, _state.forward = _state.forward, forward
    try:
        yield
    finally:
        _state.forward = previous


def check(message: str) -> None:
    """Raise :class:`Preempted` with ``message`` (prefixed with the signal) if a signal came."""
    if _state.received is not None:
        raise Preempted(f"stopped by {signal_name(_state.received)}: {message}", _state.received)

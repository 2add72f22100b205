"""One process at a time per run folder: a second is refused naming the holder; a lock left by a
killed process is taken over with a line saying so; the lock file goes when its holder finishes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from mpo.errors import RunFolderError
from mpo.run_lock import LOCK_NAME, run_lock

HOLDER = "import sys, time\nfrom mpo.run_lock import run_lock\nwith run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n"


def _hold(folder):
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_second_holder_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    holder = _hold(tmp_path)
    try:
        with pytest.raises(RunFolderError, match=rf"{tmp_path}: in use by pid {holder.pid} on {socket.gethostname()}"):
            with run_lock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # kill -9 left it behind
    with run_lock(tmp_path):
        assert f"taking over the lock left by pid {holder.pid}" in capsys.readouterr().out
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_is_reentrant_for_the_holder_and_its_children(tmp_path, monkeypatch):
    with run_lock(tmp_path):
        with run_lock(tmp_path):  # a stage run by the holder (same process, or a child with MPO_RUN_LOCK)
            assert (tmp_path / LOCK_NAME).exists()
        assert (tmp_path / LOCK_NAME).exists()
    monkeypatch.setenv("RANK", "1")  # inherited from a Slurm or torchrun shell: no launcher parent, no proof
    with run_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).exists()  # so the lock is taken, not skipped


def test_inherited_rank_does_not_skip_the_lock(tmp_path):
    holder = _hold(tmp_path)
    try:
        second = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path)], capture_output=True, text=True,
                                env={**os.environ, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}, timeout=60)
        assert second.returncode != 0 and "held" not in second.stdout
        assert f"in use by pid {holder.pid}" in second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


CHILD = "import sys\nfrom mpo.run_lock import run_lock\nwith run_lock(sys.argv[1]):\n    print('shared', flush=True)\n"


def test_a_child_shares_the_lock_only_with_its_holders_token(tmp_path):
    with run_lock(tmp_path):
        shared = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                                env={**os.environ, "RANK": "1"}, timeout=60)
        assert shared.returncode == 0 and shared.stdout.strip() == "shared", shared.stderr
        forged = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                                env={**os.environ, "MPO_RUN_LOCK_TOKEN": "0" * 32}, timeout=60)
        assert forged.returncode != 0 and "does not hold the run folder's lock" in forged.stderr
        assert (tmp_path / LOCK_NAME).exists()


def test_the_holder_removes_temporaries_of_killed_writes(tmp_path):
    (tmp_path / "round_000").mkdir()
    stale = [tmp_path / ".ref_logps.jsonl.k2j4h1.tmp", tmp_path / "round_000" / ".scored.jsonl.x9.tmp"]
    for path in stale:
        path.write_text("half a line")
    kept = tmp_path / "round_000" / "notes.tmp"
    kept.write_text("not ours")
    with run_lock(tmp_path):
        assert not any(path.exists() for path in stale)
    assert kept.exists()


def test_a_finished_holder_leaves_nothing_behind(tmp_path):
    before = sorted(os.listdir(tmp_path))
    with run_lock(tmp_path):
        pass
    assert sorted(os.listdir(tmp_path)) == before

"""A helper the kill tests share: run a command in its own process group and SIGKILL the group."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def kill_when(command, env, ready, timeout=600) -> bool:
    """Start ``command``, SIGKILL its process group once ``ready()``; True if it was killed."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                               start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if ready():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.05)
    process.wait()
    return False

"""Each stage of a round as its own distributed job (``launch.mode: distributed``), on launchers
that exist: ``torchrun`` for rollout replicas, scoring ranks and held-out eval replicas
(:mod:`mpo.rounds.rank`), ``accelerate launch`` for training (``-m mpo train CONFIG --round N``, with
the recipe's accelerate / DeepSpeed config) and for ``iterate.then: grpo``'s GRPO stage (``-m mpo grpo
CONFIG --after-rounds``: :mod:`mpo.rounds.then_grpo`). Each job owns whole GPUs and exits when its
stage is done, so no vLLM engine, reward model and trainer are ever resident together.

- **Placement.** Per node, a rollout job runs ``nproc_per_node / rollout.tensor_parallel_size``
  replicas (each rank its own ``vllm.LLM`` on its own GPU slice, ``CUDA_VISIBLE_DEVICES`` set by the
  rank itself; vLLM's ``VLLM_DP_*`` offline data parallelism is not used), and so does an eval job;
  scoring runs ``nproc_per_node`` ranks, one reward model per GPU; training and GRPO
  ``nproc_per_node x nnodes`` processes.
- **Nodes.** Every node runs the same ``mpo iterate`` command (``scripts/slurm_iterate.sh``, or by
  hand with ``launch.node_rank`` / ``$NODE_RANK``); each stage job rendezvous at ``master_addr``
  (``$MASTER_ADDR``) on ``master_port`` (+1 scoring, +2 training, +3 eval, +4 GRPO), and the run folder
  is on a shared file system. Node 0 joins each stage's parts, writes the round's files and holds the
  run lock; the other nodes wait for those files.
- **Faults.** A rank that fails ends its job (torchrun stops the other ranks; the stage ranks share
  no collective, so none can hang on one): the driver stops with one line naming the round, the
  stage, the rank, its last ``error:`` line and its log. Finished chunks stay, whoever wrote them, and
  the same command resumes, with any world size.
- **Lock, driver, preemption.** The ranks run under the driver's run lock (its token, handed to them
  in ``MPO_RUN_LOCK_TOKEN``, :mod:`mpo.run_lock`) and die with their driver (``MPO_DRIVER_PID``: a
  watchdog, and the parent-death signal for their launcher). A preemption signal the driver gets
  (SIGTERM, SIGUSR1) is passed on to the ranks (the launcher's children): training stops at the end
  of its step with a checkpoint, rollout, scoring and eval at once with their finished chunks kept; the
  driver then exits with one line (:mod:`mpo.preempt`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mpo.errors import MpoError

PORT_OFFSETS = {"rollout": 0, "score": 1, "train": 2, "eval": 3, "grpo": 4}
ACCELERATED = ("train", "grpo")  # stages launched with accelerate (``-m mpo <stage> CONFIG ...``)


class StageFailed(MpoError):
    """A stage job that exited with an error; the message names the round, stage and rank."""


@dataclass(frozen=True)
class Topology:
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    gpus: int

    @property
    def main_node(self) -> bool:
        return self.node_rank == 0


def topology(launch) -> Topology:
    """Where the stages run, from the recipe's ``launch`` section and the launcher's environment."""
    import torch

    gpus = torch.cuda.device_count()
    nproc = launch.nproc_per_node or gpus
    if not nproc:
        raise MpoError("launch.nproc_per_node: no GPU is visible, so say how many processes a node runs "
                       "(e.g. launch.nproc_per_node=2 on a CPU)")
    node_rank = launch.node_rank
    if node_rank is None:
        node_rank = int(os.environ.get("NODE_RANK", os.environ.get("SLURM_NODEID", "0")))
    if not 0 <= node_rank < launch.nnodes:
        raise MpoError(f"launch.node_rank {node_rank}: outside 0..{launch.nnodes - 1} (launch.nnodes)")
    addr = launch.master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    return Topology(nproc, launch.nnodes, node_rank, addr, launch.master_port, gpus)


def replicas_per_node(recipe, topo: Topology) -> int:
    """Rollout processes per node: one per ``tensor_parallel_size`` GPUs (vLLM), else one per slot."""
    rollout = recipe.rollout
    per = rollout.tensor_parallel_size if rollout.backend == "vllm" and topo.gpus else 1
    if topo.nproc_per_node % per:
        raise MpoError(f"launch.nproc_per_node {topo.nproc_per_node} is not a multiple of "
                       f"rollout.tensor_parallel_size {per}")
    replicas = topo.nproc_per_node // per
    if rollout.data_parallel_size not in (1, replicas * topo.nnodes):
        raise MpoError(f"rollout.data_parallel_size {rollout.data_parallel_size}: this launch runs "
                       f"{replicas * topo.nnodes} replicas (nproc_per_node / tensor_parallel_size x nnodes); "
                       "leave it at 1 or set it to that")
    return replicas


def _free_port() -> int:
    """A free port for a one-node job's rendezvous (nodes of a multi-node run agree on master_port)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(topo: Topology, procs: int, port: int, log_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--nnodes",
            str(topo.nnodes), "--node_rank", str(topo.node_rank), "--master_addr", topo.master_addr,
            "--master_port", str(port), "--tee", "3", "--log_dir", str(log_dir)]


def stage_command(stage: str, config: Path, n: int | None, recipe, topo: Topology, log_dir: Path,
                  rank_args: list[str] | None = None) -> list[str]:
    """The launch of one stage of round ``n``; ``config`` is the run's resolved recipe. ``rank_args``: what
    the ranks get after it (default ``--round n``, and ``--stage-only`` for training; an eval's
    :meth:`mpo.rounds.evaluate.EvalSpec.argv`; the GRPO stage's ``--after-rounds``)."""
    port = topo.master_port + PORT_OFFSETS[stage] if topo.nnodes > 1 else _free_port()
    if stage in ACCELERATED:
        rank_args = ["--round", str(n), "--stage-only"] if rank_args is None else rank_args
        return _accelerate(recipe, topo, port, log_dir) + ["-m", "mpo", stage, str(config), *rank_args]
    procs = replicas_per_node(recipe, topo) if stage in ("rollout", "eval") else topo.nproc_per_node
    rank_args = ["--round", str(n)] if rank_args is None else rank_args
    return _torchrun(topo, procs, port, log_dir) + ["-m", "mpo.rounds.rank", stage, str(config), *rank_args]


def _accelerate(recipe, topo: Topology, port: int, log_dir: Path) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if recipe.launch.accelerate_config:
        command += ["--config_file", recipe.launch.accelerate_config]
    elif topo.nproc_per_node * topo.nnodes > 1:  # data parallel (on a CPU too, with ACCELERATE_USE_CPU)
        command += ["--multi_gpu"]
    command += ["--num_processes", str(topo.nproc_per_node * topo.nnodes), "--num_machines", str(topo.nnodes),
                "--machine_rank", str(topo.node_rank), "--main_process_ip", topo.master_addr,
                "--main_process_port", str(port), "--tee", "3", "--log_dir", str(log_dir)]
    if not topo.gpus:
        command += ["--mixed_precision", "no"]
    return command


def stage_environment(topo: Topology) -> dict[str, str]:
    from mpo.run_lock import DRIVER

    env = {**os.environ, "PYTHONUNBUFFERED": "1", DRIVER: str(os.getpid())}
    if not topo.gpus:  # accelerate on CPU: this variable, and no --cpu flag (which starts one process)
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def run_stage_job(stage: str, n: int | None, command: list[str], topo: Topology, log_dir: Path) -> float:
    """Run one stage job (of round ``n``; None: of no round, ``mpo eval``'s) to its end; returns its wall
    time. A failure is :class:`StageFailed`.

    The ranks' output comes through as they write it (prefixed with their rank); the launcher's own
    report of a failure (a traceback of the launcher, not of a rank) goes to ``launcher.log`` in the
    job's log folder, and the failing rank's error is the one line this raises."""
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    what = stage if n is None else f"round {n} {stage}"
    print(f"{what}: launching ({' '.join(command[2:5])} ...), logs in {log_dir}", flush=True)
    from mpo.preempt import check, forwarding, handling

    # the signal handlers are the run lock's on node 0; a driver of another node installs them here
    with handling():
        process = subprocess.Popen(command, env=stage_environment(topo), stderr=subprocess.PIPE, text=True,
                                   errors="replace")
        report = []
        with forwarding(lambda signum: signal_children(process.pid, signum)):
            for line in process.stderr:
                if report or (line.startswith("Traceback") and not line.startswith("[")):
                    report.append(line)  # the launcher's failure report, from here on
                elif not _banner(line):
                    sys.stderr.write(line)
            status = process.wait()
        if report:
            (log_dir / "launcher.log").write_text("".join(report), encoding="utf-8")
        check(f"{what}: its ranks stopped (training with a checkpoint of its last step, rollout and "
              f"scoring and eval keeping their finished chunks; logs in {log_dir}); rerun the same command to continue")
    if status != 0:
        raise StageFailed(f"{what} failed (exit status {status}): {failed_rank(log_dir, topo)}; "
                          "rerun the same command to resume")
    return time.perf_counter() - start


def signal_children(pid: int, signum: int) -> None:
    """Send ``signum`` to the processes whose parent is ``pid`` (a launcher's ranks)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid):
            try:
                os.kill(int(stat.parent.name), signum)
            except (ProcessLookupError, PermissionError, ValueError):
                pass


def _banner(line: str) -> bool:
    """torchrun's notice that it set OMP_NUM_THREADS, and accelerate's list of defaults it filled in."""
    return line.startswith("*****") or "OMP_NUM_THREADS environment variable" in line or \
        "were not passed to `accelerate launch`" in line or "--dynamo_backend" in line or \
        "To avoid this warning pass in values" in line


def failed_rank(log_dir: Path, topo: Topology) -> str:
    """The rank whose log ends in an error, its last error line and the log's path."""
    logs = sorted(log_dir.rglob("stderr.log"), key=lambda p: p.stat().st_mtime, reverse=True)
    for log in logs:
        lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        # a rank that torchrun stopped (SIGTERM) because another failed says so: not the cause
        errors = [line for line in lines if line.startswith("error:") and not line.startswith("error: stopped by SIG")]
        if errors or any("Traceback" in line for line in lines):
            rank = topo.node_rank * topo.nproc_per_node + int(log.parent.name) if log.parent.name.isdigit() else "?"
            return f"rank {rank}: {(errors or lines)[-1][:300]} (log: {log})"
    return f"a rank was stopped (killed or out of memory: no error in its log); logs in {log_dir}"


def wait_for(path: Path, what: str, poll: float = 2.0, timeout: float = 3600.0) -> None:
    """On a node other than 0: wait until node 0 has written ``path`` (after the stage job ended)."""
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            raise MpoError(f"{path}: node 0 did not write {what} within {timeout:.0f} s of the stage's end")
        time.sleep(poll)

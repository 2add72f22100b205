#!/usr/bin/env bash
# Multi-node `mpo iterate` on Slurm: every node runs the same command; each stage of each round is a
# torchrun / accelerate job across all nodes (rendezvous on the first node), the run folder on a
# shared file system. Run from the repository root (recipe paths are relative to it):
#
#   sbatch --nodes 4 scripts/slurm_iterate.sh recipes/r1v_mpo.yaml [overrides]
#
# Preemption and time limits: 120 s before the time limit Slurm sends USR1 to this script
# (--signal=B:USR1@120), which passes it to mpo (training stops at the end of its step with a
# checkpoint; rollout and scoring stop at once, finished chunks kept), waits for mpo to exit and
# requeues the job; the requeued job runs the same command, which resumes. A preemption
# (PreemptMode=REQUEUE) sends TERM instead: passed on the same way, and Slurm requeues the job itself.
#
#SBATCH --job-name=mpo-iterate
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --output=%x-%j.out
set -euo pipefail
RECIPE=${1:?usage: sbatch scripts/slurm_iterate.sh RECIPE [overrides]}
shift
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
GPUS=${SLURM_GPUS_PER_NODE:-8}
# one task per node; mpo reads its node's rank from SLURM_NODEID
srun --kill-on-bad-exit=1 mpo iterate "$RECIPE" launch.mode=distributed "launch.nnodes=$SLURM_NNODES" \
    "launch.nproc_per_node=${GPUS##*:}" "$@" &
MPO=$!

stop() {  # $1: the signal; $2: requeue afterwards
    echo "$(date): $1 received: mpo saves a checkpoint at the end of its step and stops" >&2
    kill -s "$1" "$MPO" 2>/dev/null || true  # srun passes it to mpo on every node
    wait "$MPO" || true
    if [ "$2" = requeue ]; then
        echo "$(date): requeueing job $SLURM_JOB_ID; it resumes where mpo stopped" >&2
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit 0
}
trap 'stop USR1 requeue' USR1
trap 'stop TERM no' TERM
wait "$MPO"

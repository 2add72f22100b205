#!/usr/bin/env bash
# Multi-node `mpo iterate` on Slurm: every node runs the same command; each stage of each round is a
# torchrun / accelerate job across all nodes (rendezvous on the first node), the run folder on a
# shared file system. Run from the repository root (recipe paths are relative to it):
#
#   sbatch --nodes 4 scripts/slurm_iterate.sh recipes/r1v_mpo.yaml [overrides]
#
#SBATCH --job-name=mpo-iterate
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail
RECIPE=${1:?usage: sbatch scripts/slurm_iterate.sh RECIPE [overrides]}
shift
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
GPUS=${SLURM_GPUS_PER_NODE:-8}
# one task per node; mpo reads its node's rank from SLURM_NODEID
srun --kill-on-bad-exit=1 mpo iterate "$RECIPE" iterate.launch=distributed "iterate.nnodes=$SLURM_NNODES" \
    "iterate.nproc_per_node=${GPUS##*:}" "$@"

"""One rank of a distributed rollout, scoring or eval stage (what :mod:`mpo.rounds.launch` starts with torchrun):

    python -m mpo.rounds.rank rollout|score RUN/config.yaml --round N
    python -m mpo.rounds.rank eval CONFIG --benchmark=B --data=D --policy=P --out-dir=O ...

The rank makes the missing chunks it owns (chunk c belongs to rank c mod world; ``mpo.keys``) and
exits; the driver joins the parts. An eval rank makes the greedy responses of its chunks of a held-out
eval (its options: :meth:`mpo.rounds.evaluate.EvalSpec.argv`, written by the driver, ``mpo iterate``'s
for ``iterate.eval`` on a round's policy or ``mpo eval``'s); the driver joins them and scores them.
CONFIG is the driver's resolved recipe (``mpo iterate``'s run folder, ``mpo eval``'s work folder),
and the rank runs under the lock of the folder it is in (the driver's). Before anything heavy loads
the rank keeps only its own GPUs visible (its slice of ``CUDA_VISIBLE_DEVICES``:
``rollout.tensor_parallel_size`` GPUs for a vLLM replica, rollout or eval, one otherwise) and takes
torchrun's rendezvous variables out of its environment, so each replica is a plain single-process
vLLM engine and no rank joins a collective. User errors end the rank with one ``error:`` line (exit
status 2), which the driver reports with the rank.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DIST_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "GROUP_WORLD_SIZE")


def take_rank() -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` from torchrun's environment, which is then cleared."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    for name in DIST_VARIABLES:
        os.environ.pop(name, None)
    return rank, world, local_rank


def keep_gpus(local_rank: int, per_rank: int) -> None:
    """Leave this rank its own ``per_rank`` GPUs (of those visible to the node)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible == "":
        return
    if visible is None:
        import subprocess

        try:
            listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            return  # no GPU here
        visible = ",".join(str(i) for i, line in enumerate(listed.splitlines()) if line.startswith("GPU "))
        if not visible:
            return
    ids = visible.split(",")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids[local_rank * per_rank:(local_rank + 1) * per_rank])


def run(stage: str, config: str, n: int | None, spec=None) -> None:
    """Under the run's lock (the driver's, :mod:`mpo.run_lock`; the rank dies with its driver)."""
    from pathlib import Path

    from mpo.config import load_recipe
    from mpo.run_lock import run_lock

    started = time.perf_counter()
    recipe = load_recipe(config)
    with run_lock(Path(config).parent):
        _run(recipe, stage, n, started, spec)


def _run(recipe, stage: str, n: int | None, started: float, spec) -> None:
    rank, world, local_rank = take_rank()
    replica = stage in ("rollout", "eval") and recipe.rollout.backend == "vllm"
    keep_gpus(local_rank, recipe.rollout.tensor_parallel_size if replica else 1)
    work, backend = _eval_work(recipe, spec) if stage == "eval" else _round_work(recipe, stage, n, rank)
    desc = f"{f'eval {spec.out_dir}' if stage == 'eval' else f'round {n} {stage}'} rank {rank}/{world}"
    loaded = time.perf_counter()
    try:
        work((rank, world))
    finally:
        if backend is not None:
            backend.close()
    # the rank's log ends with its timings (scripts/bench_round.py reads them)
    print(f"{desc}: start-up {loaded - started:.2f} s, work {time.perf_counter() - loaded:.2f} s",
          file=sys.stderr, flush=True)


def _one_replica(recipe):
    return recipe.rollout.model_copy(update={"data_parallel_size": 1})  # this rank is one replica


def _round_work(recipe, stage: str, n: int, rank: int):
    """``(work(share), backend)`` of round ``n``'s rollout or score stage."""
    from mpo.records import Rollout, read_jsonl
    from mpo.rollout import make_backend
    from mpo.rounds.chunks import run_chunked
    from mpo.rounds.driver import load_round_prompts
    from mpo.rounds.layout import ROLLOUTS_FILE, RoundLayout
    from mpo.rounds.runners import chunk_spec, make_scorer, rollout_chunks, score_chunks

    layout = RoundLayout(recipe)
    prompts = load_round_prompts(recipe, quiet=rank != 0)
    out, cls, chunk_size, seed = chunk_spec(layout, n, stage)
    if stage == "rollout":
        backend = make_backend(_one_replica(recipe), recipe.model, layout.policy(n))
        items, process = prompts, rollout_chunks(recipe, backend)
    else:
        backend = None
        items = read_jsonl(layout.file(n, ROLLOUTS_FILE), Rollout)
        process = score_chunks(prompts, make_scorer(recipe))

    def work(share):
        run_chunked(items, out, cls, process, chunk_size=chunk_size, seed=seed, share=share)

    return work, backend


def _eval_work(recipe, spec):
    """``(work(share), backend)`` of the eval ``spec``: the policy loads only if this rank has chunks to make."""
    from mpo.rounds.evaluate import LazyBackend

    problems = spec.problems()
    backend = LazyBackend(_one_replica(recipe), recipe.model, spec.policy)
    return (lambda share: spec.responses(problems, backend, share)), backend


def main(argv: list[str] | None = None) -> int:
    from mpo.config import CONFIG_FILE

    parser = argparse.ArgumentParser(prog="python -m mpo.rounds.rank", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("rollout", "score", "eval"))
    parser.add_argument("config", help=f"the driver's resolved recipe (RUN/{CONFIG_FILE})")
    parser.add_argument("--round", type=int, dest="round_index", help="the round (rollout, score)")
    args, rest = parser.parse_known_args(argv)
    spec = None
    if args.stage == "eval":
        from mpo.rounds.evaluate import EvalSpec

        spec = EvalSpec.parse(rest)
    elif rest or args.round_index is None:
        parser.error(f"{args.stage}: --round N and nothing else" + (f" (got {' '.join(rest)})" if rest else ""))
    from mpo.cli_common import user_line

    try:
        run(args.stage, args.config, args.round_index, spec)
    except Exception as err:
        line = user_line(err)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr, flush=True)
        return getattr(err, "exit_status", 2)  # a preemption: 128 + the signal
    return 0


if __name__ == "__main__":
    sys.exit(main())

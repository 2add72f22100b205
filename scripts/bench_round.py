"""Stage wall times of one round for 1 and 2 ranks, side by side in one run (``launch.mode:
distributed`` on CPU: each rank one process with one thread; tiny models built offline).

For each world size the rollout and scoring stages of round 0 run as the launches ``mpo iterate``
makes (``torchrun ... -m mpo.rounds.rank``), each into a fresh run folder, timed from launch to exit
(model loading included); the joined outputs must be the same bytes for every world size. Each
rank's last log line splits its time into start-up (imports, model, prompt checks) and work (its
chunks); "work" below is the slowest rank's. Prints a table (seconds per stage, launch to exit and
work alone, speed-ups of 2 ranks over 1; medians of ``--repeats`` runs) and writes it as JSON. Real rounds amortise the start-up
(a minute on GPUs) over minutes to hours of work; on tiny models it is most of a stage's wall time.

    python scripts/bench_round.py --prompts 128 --samples 8 --max-tokens 128 --output bench_round.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prepare(work: Path, args) -> dict:
    """Tiny models and a prompt set of ``args.prompts`` prompts (the demo's, ids made distinct)."""
    from mpo.cli.tiny import ASSETS, save_policy, save_reward_model

    policy, reward = save_policy(work / "policy", seed=0), save_reward_model(work / "reward", seed=1)
    rows = [json.loads(line) for line in (ASSETS / "demo" / "prompts.jsonl").read_text().splitlines()]
    prompts = []
    for i in range(args.prompts):
        row = dict(rows[i % len(rows)])
        row["prompt_id"] = f"{row['prompt_id']}-{i}"
        row["images"] = [str(ASSETS / "demo" / image) for image in row["images"]]
        prompts.append(row)
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    return {"policy": policy, "reward": reward, "prompts": work / "prompts.jsonl"}


def config_for(work: Path, world: int, inputs: dict, args) -> Path:
    from mpo.config import load_recipe, save_resolved

    recipe = load_recipe(REPO / "recipes" / "tiny" / "iterate.yaml", [
        f"run.output_dir={work / f'world{world}'}", f"model.policy={inputs['policy']}",
        f"model.reward_model={inputs['reward']}", f"data.prompts={inputs['prompts']}",
        f"rollout.num_samples={args.samples}", f"rollout.max_tokens={args.max_tokens}", "iterate.rounds=1",
        f"iterate.rollout_chunk={args.rollout_chunk}", f"iterate.score_chunk={args.score_chunk}"])
    return save_resolved(recipe, recipe.run.output_dir)


def time_stage(stage: str, config: Path, world: int) -> dict:
    """Launch-to-exit seconds, and the slowest rank's start-up and work from the ranks' last lines."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               "-m", "mpo.rounds.rank", stage, str(config), "--round", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    start = time.perf_counter()
    done = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    ranks = re.findall(r"rank \d+/\d+: start-up ([\d.]+) s, work ([\d.]+) s", done.stderr + done.stdout)
    if len(ranks) != world:
        raise RuntimeError(f"expected {world} rank timing lines, found {len(ranks)}")
    return {"wall": wall, "startup": max(float(s) for s, _ in ranks), "work": max(float(w) for _, w in ranks)}


def join(stage: str, config: Path) -> bytes:
    """The stage's output joined from its parts, as the driver joins them."""
    from mpo.config import load_recipe
    from mpo.rounds.chunks import run_chunked
    from mpo.rounds.layout import RoundLayout
    from mpo.rounds.runners import chunk_spec

    layout = RoundLayout(load_recipe(config))
    out, cls, size, seed = chunk_spec(layout, 0, stage)
    run_chunked([None] * _count(layout, stage), out, cls, _absent, chunk_size=size, seed=seed)
    return out.read_bytes()


def _absent(chunk, seed):
    raise RuntimeError("a chunk is missing after the stage's launch")


def _count(layout, stage: str) -> int:
    if stage == "rollout":
        return len(Path(layout.recipe.data.prompts).read_text().splitlines())
    return len(layout.file(0, "rollouts.jsonl").read_text().splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rollout-chunk", type=int, default=2)
    parser.add_argument("--score-chunk", type=int, default=16)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="runs of every launch; medians are quoted")
    parser.add_argument("--output", type=Path, default=Path("bench_round.json"))
    args = parser.parse_args()
    seconds, same = {}, True
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs = prepare(work, args)
        for repeat in range(args.repeats):
            outputs = {}
            for world in args.ranks:
                config = config_for(work / f"repeat{repeat}", world, inputs, args)
                for stage in ("rollout", "score"):
                    seconds.setdefault((stage, world), []).append(time_stage(stage, config, world))
                    outputs[(stage, world)] = join(stage, config)
            same &= all(outputs[(stage, w)] == outputs[(stage, args.ranks[0])] for stage in ("rollout", "score")
                        for w in args.ranks)
    seconds = {key: {kind: statistics.median(t[kind] for t in runs) for kind in runs[0]}
               for key, runs in seconds.items()}
    first = args.ranks[0]
    rows = []
    for stage in ("rollout", "score"):
        row = {"stage": stage}
        for w in args.ranks:
            row |= {f"{w}_ranks_{k}_s": round(v, 2) for k, v in seconds[(stage, w)].items()}
        for w in args.ranks[1:]:
            for kind in ("wall", "work"):
                row[f"speedup_{kind}_{w}_over_{first}"] = round(
                    seconds[(stage, first)][kind] / seconds[(stage, w)][kind], 2)
        rows.append(row)
    columns = [(f"{w}r {kind} s", f"{w}_ranks_{kind}_s") for w in args.ranks for kind in ("wall", "startup", "work")]
    columns += [(f"x{kind} {w}/{first}", f"speedup_{kind}_{w}_over_{first}") for w in args.ranks[1:]
                for kind in ("wall", "work")]
    print(f"{'stage':<8}" + "".join(f"{title:>14}" for title, _ in columns))
    for row in rows:
        print(f"{row['stage']:<8}" + "".join(f"{row[key]:>14.2f}" for _, key in columns))
    print(f"joined outputs identical across world sizes: {same}")
    result = {"settings": vars(args) | {"output": str(args.output)}, "stages": rows, "identical": same,
              "cpus": os.cpu_count()}
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    if not same:
        sys.exit("the joined outputs differ between world sizes")


if __name__ == "__main__":
    main()

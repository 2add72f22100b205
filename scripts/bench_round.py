"""Stage wall times of one round for 1 and 2 ranks, side by side in one run (``iterate.launch:
distributed`` on CPU: each rank one process with one thread; tiny models built offline).

For each world size the rollout and scoring stages of round 0 run as the launches ``mpo iterate``
makes (``torchrun ... -m mpo.stage_rank``), each into a fresh run folder, timed from launch to exit
(model loading included); the joined outputs must be the same bytes for every world size. Prints a
table (seconds per stage, speed-up of 2 ranks over 1) and writes it as JSON.

    python scripts/bench_round.py --prompts 32 --samples 8 --max-tokens 48 --output bench_round.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prepare(work: Path, args) -> dict:
    """Tiny models and a prompt set of ``args.prompts`` prompts (the demo's, ids made distinct)."""
    from mpo.tiny import ASSETS, save_policy, save_reward_model

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


def time_stage(stage: str, config: Path, world: int) -> float:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               "-m", "mpo.stage_rank", stage, str(config), "--round", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def join(stage: str, config: Path) -> bytes:
    """The stage's output joined from its parts, as the driver joins them."""
    from mpo.config import load_recipe
    from mpo.engines import chunk_spec
    from mpo.round_layout import RoundLayout
    from mpo.stages import run_chunked

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
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rollout-chunk", type=int, default=2)
    parser.add_argument("--score-chunk", type=int, default=16)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--output", type=Path, default=Path("bench_round.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs = prepare(work, args)
        seconds, outputs = {}, {}
        for world in args.ranks:
            config = config_for(work, world, inputs, args)
            for stage in ("rollout", "score"):
                seconds[(stage, world)] = time_stage(stage, config, world)
                outputs[(stage, world)] = join(stage, config)
        same = all(outputs[(stage, w)] == outputs[(stage, args.ranks[0])] for stage in ("rollout", "score")
                   for w in args.ranks)
    first = args.ranks[0]
    rows = [{"stage": stage, **{f"{w}_ranks_s": round(seconds[(stage, w)], 2) for w in args.ranks},
             **{f"speedup_{w}_over_{first}": round(seconds[(stage, first)] / seconds[(stage, w)], 2)
                for w in args.ranks if w != first}} for stage in ("rollout", "score")]
    print(f"{'stage':<8}" + "".join(f"{f'{w} rank(s) s':>14}" for w in args.ranks)
          + "".join(f"{f'speed-up {w}/{first}':>16}" for w in args.ranks if w != first))
    for row in rows:
        print(f"{row['stage']:<8}" + "".join(f"{row[f'{w}_ranks_s']:>14.2f}" for w in args.ranks)
              + "".join(f"{row[f'speedup_{w}_over_{first}']:>16.2f}" for w in args.ranks if w != first))
    print(f"joined outputs identical across world sizes: {same}")
    result = {"settings": vars(args) | {"output": str(args.output)}, "stages": rows, "identical": same,
              "cpus": os.cpu_count()}
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    if not same:
        sys.exit("the joined outputs differ between world sizes")


if __name__ == "__main__":
    main()

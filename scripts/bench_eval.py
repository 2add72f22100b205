"""The cost of ``mpo eval``: :func:`mpo.rounds.evaluate.run_eval` on N problems against the round
loop's rollout stage on the same N prompts with one sample each, with the same backend (one engine,
loaded once, shared by both sides) and the same ``max_tokens``, side by side in one run.

The rollout side is what a round's rollout stage does (:func:`mpo.rounds.chunks.run_chunked` over
``backend.generate(chunk, num_samples=1)`` with the recipe's sampling, written to a fresh file); the eval
side is the whole eval stage into a fresh folder: its key (the policy's files, the problems' content),
greedy chunked generation, rule extraction, scoring and its files. Each figure is the median over
``--repeats`` timed rounds after one warm-up round; a round runs both sides in turn. The issue's target
is ``eval / rollout <= 1.10``. Generated tokens are reported for both sides, with the ratio of seconds per
token (a random tiny policy rarely
stops early, so both run to ``max_tokens``; a trained policy's greedy and sampled lengths may differ).

Problems: ``--problems`` N prompt rows with an answer and one generated PNG each (``--benchmark answers``).
CPU (default): the tiny random Qwen2.5-VL policy (``mpo tiny policy``), HF backend,
``torch.set_num_threads(1)``. ``--policy DIR --backend vllm``: another policy / engine.

    python scripts/bench_eval.py [--problems 16] [--max-tokens 32] [--repeats 3] [--output bench_eval.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


def write_problems(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` prompt rows (``--benchmark answers``): one PNG, a colour question, a letter answer."""
    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    colours = ["red", "green", "blue", "yellow"]
    rows = []
    for i in range(count):
        colour = rng.choice(colours)
        Image.new("RGB", (rng.randint(56, 112), rng.randint(56, 112)), colour).save(folder / f"{i}.png")
        text = "What colour is the image?\nChoices: " + " ".join(f"{'ABCD'[k]}. {c}" for k, c in enumerate(colours))
        rows.append({"prompt_id": f"q{i}", "images": [f"{i}.png"], "answer": "ABCD"[colours.index(colour)],
                     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]})
    (folder / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder / "problems.jsonl"


def timed(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median wall seconds of each ``fns[name]()`` over ``repeats`` rounds after one warm-up round, and
    each one's last result; every round runs every function once, in turn."""
    results = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def compare(problems, backend, work: Path, max_tokens: int, chunk_size: int, repeats: int) -> dict:
    from mpo.keys import kept_beside
    from mpo.records import Rollout, read_jsonl
    from mpo.rounds.chunks import run_chunked
    from mpo.rounds.evaluate import ROLLOUTS_FILE, run_eval

    prompts = [p.prompt for p in problems]
    runs = iter(range(10**6))

    def rollout():
        out = work / f"rollout_{next(runs)}" / ROLLOUTS_FILE
        return run_chunked(prompts, out, Rollout, lambda chunk, s: backend.generate(chunk, num_samples=1, seed=s),
                           chunk_size=chunk_size, seed=0)

    def evaluate():
        folder = work / f"eval_{next(runs)}"
        with kept_beside(work):
            run_eval(problems, backend, folder, "answers", max_tokens=max_tokens, chunk_size=chunk_size, quiet=True)
        return read_jsonl(folder / ROLLOUTS_FILE, Rollout)

    seconds, results = timed({"rollout": rollout, "eval": evaluate}, repeats)
    tokens = {name: sum(r.num_tokens for r in results[name]) for name in ("rollout", "eval")}
    return {"problems": len(problems), "max_tokens": max_tokens, "chunk_size": chunk_size,
            "rollout_s": seconds["rollout"], "eval_s": seconds["eval"], "ratio": seconds["eval"] / seconds["rollout"],
            "rollout_tokens": tokens["rollout"], "eval_tokens": tokens["eval"],
            "ratio_per_token": (seconds["eval"] / tokens["eval"]) / (seconds["rollout"] / tokens["rollout"])}


def print_table(row: dict, header: str) -> None:
    print(header)
    print(f"{'problems':>9}{'max_tokens':>11}{'rollout s':>11}{'eval s':>9}{'eval/rollout':>14}"
          f"{'rollout tok':>13}{'eval tok':>10}{'per token':>11}")
    print(f"{row['problems']:>9}{row['max_tokens']:>11}{row['rollout_s']:>11.2f}{row['eval_s']:>9.2f}"
          f"{row['ratio']:>13.2f}x{row['rollout_tokens']:>13}{row['eval_tokens']:>10}{row['ratio_per_token']:>10.2f}x")


def run(args) -> dict:
    import torch

    from mpo.config import ModelConfig, RolloutConfig
    from mpo.rollout import make_backend
    from mpo.rounds.evaluate import load_eval_problems

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        policy = args.policy
        if policy is None:
            from mpo.cli.tiny import save_policy

            policy = save_policy(tmp / "policy", seed=0)
        problems = load_eval_problems("answers", write_problems(tmp / "data", args.problems))
        rollout_config = RolloutConfig(backend=args.backend, max_tokens=args.max_tokens, temperature=1.0)
        model_config = ModelConfig(policy=str(policy), dtype="float32" if args.backend == "hf" else "bfloat16")
        with make_backend(rollout_config, model_config, policy) as backend:
            row = compare(problems, backend, tmp / "work", args.max_tokens, args.chunk_size, args.repeats)
    header = (f"mpo eval vs a rollout of N prompts x 1 sample ({args.backend}, "
              f"{'tiny policy' if args.policy is None else args.policy}, median of {args.repeats})")
    print_table(row, header)
    return {"header": header, "rows": [row], "target_ratio": 1.10, "python": sys.version.split()[0],
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--policy", type=Path, default=None, help="a policy folder (default: the tiny policy)")
    parser.add_argument("--output", type=Path, default=Path("bench_eval.json"))
    args = parser.parse_args()
    result = run(args)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()

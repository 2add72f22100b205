"""Scoring throughput: the batched ``reward.scorer.Scorer`` against the Skywork-VL-Reward model
card's loop (one item per forward: render the chat template, run the processor on that one item,
run ``Qwen2_5_VLForConditionalGeneration`` with ``output_hidden_states=True``, apply the value head
to ``hidden_states[-1]`` and read it at ``attention_mask.sum(-1) - 1``), on the same model and items,
side by side in one run.

Both sides open the same image files with PIL (the card's ``process_vision_info`` is left out on both
so that the images, and so the scores, are identical; the script checks that they are). Times are
end to end: image decoding, preprocessing, tokenizing and the forward passes. Each figure is the
median over ``--repeats`` timed rounds after one warm-up round; a round runs both sides in turn.
The ``bound`` column is the card loop's time over the scorer's preprocessing time alone: the
speed-up the scorer could not exceed even with a free forward pass (the processor's per-image work
is the same on both sides; only shared prompts let the scorer skip some of it).

Item sets: ``distinct`` (every item its own prompt and image), ``pairs`` (two responses per prompt,
as a preference benchmark row), ``rollouts-4`` and ``rollouts-8`` (4 or 8 sampled responses per
prompt; 8 is ``rollout.num_samples``'s default, what the round loop scores). Where items share a
prompt the scorer preprocesses it once and runs it through the model once (``reward/forward.py``);
the card loop does both once per item.

CPU (default): a tiny random Qwen2.5-VL reward model, ``torch.set_num_threads(1)``.
``--gpu``: a random Qwen2.5-VL-7B-shaped reward model in bf16 on CUDA (real Qwen2.5 vocabulary, the
card's pixel bounds); refuses to run without a CUDA device.

    python scripts/bench_score.py [--items 64] [--repeats 5] [--output bench_score.json] [--gpu]
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

from bench_models import WORDS  # scripts/, beside this file

CARD_MIN_PIXELS, CARD_MAX_PIXELS = 256 * 28 * 28, 1280 * 28 * 28
ITEM_SETS = (("distinct", 1), ("pairs", 2), ("rollouts-4", 4), ("rollouts-8", 8))  # responses per prompt


def make_items(
    folder: Path, count: int, per_prompt: int, sizes: tuple[int, int], words: tuple[int, int], seed: int = 0
) -> list:
    """``count`` :class:`reward.items.ScoreItem` with one real PNG each (random sizes), ``per_prompt``
    responses per prompt record, responses of ``words`` (min, max) words."""
    from PIL import Image

    from mpo.records import Prompt
    from reward.items import ScoreItem

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for p in range((count + per_prompt - 1) // per_prompt):
        path = folder / f"image_{p}.png"
        colour = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", (rng.randint(*sizes), rng.randint(*sizes)), colour).save(path)
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + "?"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = Prompt(f"p{p}", messages, [str(path)])
        for _ in range(per_prompt):
            response = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
            items.append(ScoreItem(prompt, response))
    return items[:count]


def card_loop(model, processor, items: list) -> list[float]:
    """The model card's scoring, one item per forward."""
    import torch
    from PIL import Image

    backbone, head = model.backbone, model.v_head
    device = next(backbone.parameters()).device
    scores = []
    for item in items:
        messages = item.messages + [{"role": "assistant", "content": item.response}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        images = [Image.open(path).convert("RGB") for path in item.images]
        inputs = processor(text=[text], images=images, padding=True, return_tensors="pt").to(device)
        with torch.inference_mode():
            hidden = backbone(**inputs, output_hidden_states=True, use_cache=False).hidden_states[-1]
            values = head(hidden).squeeze(-1)
        index = inputs["attention_mask"].sum(dim=-1, keepdim=True) - 1
        scores.append(values.gather(dim=-1, index=index)[0].item())
    return scores


def timed(fns: dict, repeats: int, sync) -> tuple[dict, dict]:
    """Median wall seconds of each ``fns[name]()`` over ``repeats`` rounds after one warm-up round, and
    each one's warm-up result. Each round runs every function once, in turn, so that a change in
    the machine's load falls on all of them alike."""
    results = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def compare(name: str, items: list, model, processor, scorer, repeats: int, sync) -> dict:
    seconds, results = timed(
        {
            "loop": lambda: card_loop(model, processor, items),
            "batched": lambda: scorer.score_all(items),
            "encode": lambda: scorer.encode(items),  # the batched side's preprocessing alone
        },
        repeats,
        sync,
    )
    loop_s, batched_s = seconds["loop"], seconds["batched"]
    scored = results["batched"]
    return {
        "name": name,
        "items": len(items),
        "prompts": len({json.dumps(i.messages) for i in items}),
        "tokens": scored.num_tokens,
        "batches": scored.num_batches,
        "card_loop_s": loop_s,
        "batched_s": batched_s,
        "batched_preprocess_s": seconds["encode"],
        "card_loop_items_per_s": len(items) / loop_s,
        "batched_items_per_s": len(items) / batched_s,
        "card_loop_tokens_per_s": scored.num_tokens / loop_s,
        "batched_tokens_per_s": scored.num_tokens / batched_s,
        "speedup": loop_s / batched_s,
        # Even with a free forward pass the scorer would still pay its preprocessing:
        "speedup_bound_from_preprocessing": loop_s / seconds["encode"],
        "max_abs_score_diff": max(abs(a - b) for a, b in zip(results["loop"], scored.scores)),
    }


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    print(
        f"{'items':<12}{'n':>5}{'prompts':>9}{'tokens':>8}{'card loop it/s':>16}{'batched it/s':>14}"
        f"{'tok/s':>10}{'speedup':>9}{'bound':>8}{'max |diff|':>12}"
    )
    for r in rows:
        print(
            f"{r['name']:<12}{r['items']:>5}{r['prompts']:>9}{r['tokens']:>8}"
            f"{r['card_loop_items_per_s']:>16.1f}"
            f"{r['batched_items_per_s']:>14.1f}{r['batched_tokens_per_s']:>10.0f}{r['speedup']:>8.1f}x"
            f"{r['speedup_bound_from_preprocessing']:>7.1f}x"
            f"{r['max_abs_score_diff']:>12.1e}"
        )


def build_gpu_model():
    """A random Qwen2.5-VL-7B-shaped reward model in bf16, initialised directly on the GPU (no CPU
    copy, no checkpoint on disk), and its processor at the card's pixel bounds."""
    from bench_models import random_backbone

    from mpo.cli.tiny import build_processor
    from reward.model import RewardModel

    backbone, tokenizer = random_backbone("7b", "cuda")
    return RewardModel(backbone).eval(), build_processor(tokenizer, CARD_MIN_PIXELS, CARD_MAX_PIXELS)


def run(args) -> dict:
    import torch

    from reward.scorer import Scorer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.gpu:
            model, processor = build_gpu_model()
            sync = torch.cuda.synchronize
            sizes, words = (224, 896), (20, 400)
            device = "cuda"
        else:
            from transformers import AutoProcessor

            from mpo.cli.tiny import save_reward_model
            from reward.model import RewardModel

            folder = save_reward_model(tmp / "reward", seed=1)
            model, processor = RewardModel.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
            sync = lambda: None
            sizes, words = (56, 224), (5, 120)
            device = "cpu"
        scorer = Scorer.from_model(
            model,
            processor,
            token_budget=args.token_budget,
            max_batch_size=args.max_batch_size,
            progress=False,
        )
        rows = [
            compare(
                name,
                make_items(tmp / name, args.items, k, sizes, words, seed=k),
                model,
                processor,
                scorer,
                args.repeats,
                sync,
            )
            for name, k in ITEM_SETS
        ]
    header = (
        f"scoring throughput on {device} ({'7B-shaped, bf16' if args.gpu else 'tiny, fp32, 1 thread'}); "
        f"median of {args.repeats}, token_budget {args.token_budget}, max_batch_size {args.max_batch_size}"
    )
    print_table(rows, header)
    return {
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "token_budget": args.token_budget,
        "max_batch_size": args.max_batch_size,
        "gpu_name": torch.cuda.get_device_name() if args.gpu else None,
        "results": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--output", type=Path, default=Path("bench_score.json"))
    parser.add_argument("--gpu", action="store_true", help="7B-shaped model in bf16 on CUDA")
    args = parser.parse_args(argv)
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("--gpu needs a CUDA device; none is available here (nothing was run)", file=sys.stderr)
            return 2
    report = run(args)
    from mpo.records import write_json

    write_json(args.output, report)
    print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

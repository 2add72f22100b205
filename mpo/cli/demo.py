"""``mpo demo``: the whole loop on CPU, on tiny models it builds itself.

1. Build a tiny random Qwen2.5-VL policy and a tiny reward model offline.
2. Train the reward model (``mpo reward train``'s code) on the bundled pairs, in which the chosen
   answer names the image's dominant colour, so its score means something.
3. Warm the policy up with SFT (``mpo train`` with weights [0, 0, 1]) on "The image is <colour>."
   with every colour for every image: it learns the answer format, not the right colour, so it
   starts the rounds guessing, as an instruct model starts MPO knowing the format.
4. Run three MPO rounds (``mpo iterate``'s code) on the bundled colour prompts: rollout with the HF
   backend -> score with the reward model in process -> pairs -> MPO.
5. Print, per round, the mean reward and the fraction of rollouts that name the right colour (a
   check the reward model never sees), and where the plots are.
6. Held out: colour images the demo never trains on (:func:`held_out_set`, made in the bundled
   images' style under ``--out-dir``), answered greedily before round 0 and after the last round
   (``iterate.eval``, ``--benchmark answers`` rules): the "held-out right colour" line.

Rising reward is real learning here only because the second curve rises with it. Everything lands
under ``--out-dir``; a rerun reuses whatever finished.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import yaml

from mpo.cli.tiny import ASSETS
from mpo.models import VALUE_HEAD_FILE

DEMO = ASSETS / "demo"
DEMO_PROMPTS = DEMO / "prompts.jsonl"
COLOURS = ("red", "green", "blue", "yellow")
RGB = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40)}  # the assets'
HELD_OUT_PER_COLOUR = 3


def colour_metrics(prompts, scored) -> dict:
    """Fraction of rollouts naming the prompt's colour, and naming any colour at all."""
    answers = {p.prompt_id: p.answer for p in prompts}

    def names(text: str, colour: str) -> bool:
        return re.search(rf"\b{colour}\b", text, flags=re.IGNORECASE) is not None

    right = sum(names(s.response, answers[s.prompt_id]) for s in scored)
    any_colour = sum(any(names(s.response, c) for c in COLOURS) for s in scored)
    return {"eval/right_colour": right / len(scored), "eval/any_colour": any_colour / len(scored)}


def held_out_set(folder: Path) -> Path:
    """``folder/prompts.jsonl``: colour images in the bundled images' style (56 x 56, one dominant
    colour, three 9 x 9 squares of others) at square positions of their own, never trained on;
    ``answer`` is the colour's name. Drawn from a private ``random.Random``; written once."""
    import json
    import random

    from PIL import Image, ImageDraw

    prompts = folder / "prompts.jsonl"
    if prompts.is_file():
        return prompts
    (folder / "images").mkdir(parents=True, exist_ok=True)
    draw_rng, rows = random.Random(20), []
    for colour in COLOURS:
        for i in range(HELD_OUT_PER_COLOUR):
            image = Image.new("RGB", (56, 56), RGB[colour])
            pen = ImageDraw.Draw(image)
            for other in draw_rng.sample([c for c in COLOURS if c != colour], 3):
                x, y = draw_rng.randrange(0, 47), draw_rng.randrange(0, 47)
                pen.rectangle((x, y, x + 8, y + 8), fill=RGB[other])
            name = f"images/held_out_{colour}_{i}.png"
            image.save(folder / name)
            rows.append({"prompt_id": f"held-out-{colour}-{i}", "messages": [{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": "What colour is this image?"}]}],
                "images": [name], "answer": colour})
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return prompts


def _recipe(name: str, settings: dict):
    from mpo.config import resolve

    data = yaml.safe_load((DEMO / name).read_text(encoding="utf-8"))
    for dotted, value in settings.items():
        node = data
        *parents, key = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    return resolve(data, source=str(DEMO / name))


def train_reward_model(out: Path, init_dir: Path, seed: int) -> Path:
    from reward.train import run_phases

    recipe = _recipe("reward.yaml", {"run.output_dir": str(out / "reward"), "run.seed": seed,
                                     "reward_train.init_from": str(init_dir)})
    recipe.reward_train.phases[0].data = [str(DEMO / "reward_pairs.jsonl")]
    run_phases(recipe)
    return out / "reward" / "final"


def warm_up_policy(out: Path, policy_dir: Path, seed: int) -> Path:
    from mpo.data import load_prompts
    from mpo.records import PreferencePair, write_jsonl
    from mpo.rounds.layout import PAIRS_FILE
    from mpo.train.run import run_training

    folder = out / "warmup"
    if (folder / "policy" / "config.json").exists():
        return folder / "policy"
    prompts = load_prompts(DEMO_PROMPTS).records
    pairs = [PreferencePair(f"{p.prompt_id}-{c}", p.messages, p.images, f"The image is {c}.", "I do not know.")
             for p in prompts for c in COLOURS]
    write_jsonl(folder / PAIRS_FILE, pairs)
    recipe = _recipe("warmup.yaml", {"run.output_dir": str(folder), "run.seed": seed,
                                     "model.policy": str(policy_dir), "data.preferences": str(folder / PAIRS_FILE)})
    return run_training(recipe)


def run_demo(out_dir: str | Path, seed: int = 0, rounds: int | None = None) -> list[dict]:
    import torch

    from mpo.cli.tiny import save_policy, save_reward_model
    from mpo.rounds.driver import run_iterate

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    start = time.perf_counter()
    out = Path(out_dir)
    policy_dir, reward_init = out / "models" / "policy", out / "models" / "reward_init"
    if not (policy_dir / "config.json").exists():
        save_policy(policy_dir, seed)
    if not (reward_init / VALUE_HEAD_FILE).exists():
        save_reward_model(reward_init, seed + 1)
    print(f"== 1/3 reward model: Bradley-Terry on {DEMO / 'reward_pairs.jsonl'}")
    reward_dir = train_reward_model(out, reward_init, seed)
    print("== 2/3 policy warm-up: SFT on the answer format, colours at random")
    warm_policy = warm_up_policy(out, policy_dir, seed)

    print("== 3/3 MPO rounds: rollout -> score -> pairs -> MPO")
    settings = {"run.output_dir": str(out / "rounds"), "run.seed": seed, "rollout.seed": seed,
                "model.policy": str(warm_policy), "model.reward_model": str(reward_dir),
                "data.prompts": str(DEMO_PROMPTS), "iterate.eval.data": str(held_out_set(out / "held_out")),
                "iterate.eval.max_tokens": 8, "iterate.eval.every": 1000}  # every: before and after the last
    if rounds is not None:
        settings["iterate.rounds"] = rounds
    manifests = run_iterate(_recipe("iterate.yaml", settings), extra_metrics=colour_metrics)
    rows = [m["metrics"] for m in manifests]
    print(f"demo finished in {time.perf_counter() - start:.0f}s: mean reward "
          + " -> ".join(f"{r['reward/mean']:.3f}" for r in rows) + "; right colour "
          + " -> ".join(f"{r['eval/right_colour']:.0%}" for r in rows))
    print(f"held-out right colour (greedy, {4 * HELD_OUT_PER_COLOUR} images never trained on): "
          f"{rows[0]['eval_before/answers/accuracy']:.0%} before -> {rows[-1]['eval/answers/accuracy']:.0%} after "
          f"{len(rows)} rounds")
    return rows

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

7. ``--grpo`` (:func:`grpo_phase`): R1V2's second stage after the rounds. GRPO (``mpo grpo``'s code,
   :func:`mpo.grpo.run.run_grpo`, on ``grpo.yaml``: rule reward only, groups of 8) from the last round's
   policy on the same prompts, run twice with the same seed, the Selective Sample Buffer on and off;
   per run the held-out right colour after it (``iterate.eval``) and the mean ``ssb/effective_fraction``
   over the second half of its steps, where many groups are all right or all wrong (so have no signal);
   and the ratio of the two means.

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
# --grpo: (label, run folder under --out-dir, grpo.ssb.enabled); the same policy and seed for both
GRPO_RUNS = (("with buffer", "grpo_ssb_on", True), ("without buffer", "grpo_ssb_off", False))


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


def grpo_phase(out: Path, settings: dict, policy: Path, before: float) -> dict:
    """:data:`GRPO_RUNS` from ``policy`` (``grpo.yaml`` with ``settings``: seeds, prompts, held-out set),
    each then evaluated on the held-out set (``before``: ``policy``'s accuracy there). Per run: the
    accuracy after it, and the means of ``ssb/effective_fraction`` and ``reward/rule`` over the second
    half of its steps ("late": many groups without signal); ``ratio``: the effective fractions' quotient."""
    from mpo.grpo.run import run_grpo
    from mpo.rounds.then_grpo import final_evals
    from mpo.train.setup import METRICS_FILE, metric_means, read_metrics

    start, runs = time.perf_counter(), {}
    for label, folder, enabled in GRPO_RUNS:
        recipe = _recipe("grpo.yaml", {**settings, "model.policy": str(policy),
                                       "run.output_dir": str(out / folder), "grpo.ssb.enabled": enabled})
        after = final_evals(recipe, None, run_grpo(recipe, quiet=True), out / folder)["eval/answers/accuracy"]
        steps = [row for row in read_metrics(out / folder / METRICS_FILE) if "loss" in row]
        late = metric_means(steps[len(steps) // 2:], ("ssb/effective_fraction", "reward/rule"))
        runs[label] = {"after": after, "late_steps": (len(steps) // 2 + 1, len(steps)), **late}
    on, off = (runs[label]["ssb/effective_fraction"] for label, _, _ in GRPO_RUNS)
    ratio = on / off if off else float("inf")
    first, last = runs[GRPO_RUNS[0][0]]["late_steps"]
    print(f"== GRPO from the last round's policy ({time.perf_counter() - start:.0f}s), rule reward, with and "
          f"without the Selective Sample Buffer (same seed); late = steps {first}-{last}")
    for label, run in runs.items():
        print(f"GRPO {label:<14}: held-out right colour {before:.0%} -> {run['after']:.0%}; late: right colour "
              f"{run['reward/rule']:.0%}, effective fraction {run['ssb/effective_fraction']:.3f}")
    print(f"SSB effect, late steps: effective fraction {on:.3f} with the buffer / {off:.3f} without = {ratio:.1f}x")
    return {"before": before, "runs": runs, "ratio": ratio}


def run_demo(out_dir: str | Path, seed: int = 0, rounds: int | None = None, grpo: bool = False) -> list[dict]:
    import torch

    from mpo.cli.tiny import save_policy, save_reward_model
    from mpo.rounds.driver import run_iterate
    from mpo.rounds.layout import RoundLayout

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
    shared = {"run.seed": seed, "rollout.seed": seed, "data.prompts": str(DEMO_PROMPTS),
              "iterate.eval.data": str(held_out_set(out / "held_out")), "iterate.eval.max_tokens": 8}
    settings = {**shared, "run.output_dir": str(out / "rounds"), "model.policy": str(warm_policy),
                "model.reward_model": str(reward_dir), "iterate.eval.every": 1000}  # every: before and after the last
    if rounds is not None:
        settings["iterate.rounds"] = rounds
    recipe = _recipe("iterate.yaml", settings)
    manifests = run_iterate(recipe, extra_metrics=colour_metrics)
    rows = [m["metrics"] for m in manifests]
    print(f"demo finished in {time.perf_counter() - start:.0f}s: mean reward "
          + " -> ".join(f"{r['reward/mean']:.3f}" for r in rows) + "; right colour "
          + " -> ".join(f"{r['eval/right_colour']:.0%}" for r in rows))
    print(f"held-out right colour (greedy, {4 * HELD_OUT_PER_COLOUR} images never trained on): "
          f"{rows[0]['eval_before/answers/accuracy']:.0%} before -> {rows[-1]['eval/answers/accuracy']:.0%} after "
          f"{len(rows)} rounds")
    if grpo:
        grpo_phase(out, shared, RoundLayout(recipe).policy(recipe.iterate.rounds), rows[-1]["eval/answers/accuracy"])
    return rows

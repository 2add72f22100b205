"""Write the demo's bundled data: small PNGs, each dominated by one colour, prompts.jsonl, and
reward_pairs.jsonl (preference pairs the tiny reward model is trained on).

Deterministic: rerunning writes the same files. Usage: python scripts/make_demo_assets.py
"""

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40)}
OUT = Path(__file__).resolve().parent.parent / "mpo" / "assets" / "demo"


def main() -> None:
    rng = random.Random(0)
    (OUT / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for name, rgb in COLOURS.items():
        for variant in range(4):
            image = Image.new("RGB", (56, 56), rgb)
            draw = ImageDraw.Draw(image)
            for _ in range(3):  # small distractor shapes in other colours
                other = rng.choice([c for c in COLOURS.values() if c != rgb])
                x, y = rng.randint(0, 44), rng.randint(0, 44)
                draw.rectangle([x, y, x + 8, y + 8], fill=other)
            file = f"images/{name}_{variant}.png"
            image.save(OUT / file, optimize=True)
            rows.append({
                "prompt_id": f"{name}-{variant}",
                "messages": [{"role": "user", "content": [
                    {"type": "image"}, {"type": "text", "text": "What colour is this image?"}]}],
                "images": [file],
                "answer": name,
            })
    with (OUT / "prompts.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


# Text-only pairs: things whose colour is common knowledge (stage 2 of reward training mixes these
# with the image pairs, as the Skywork-VL Reward recipe mixes text-only preference data).
THINGS = {
    "a ripe banana": "yellow", "a lemon": "yellow", "fresh grass": "green", "a lime": "green",
    "the sky on a clear day": "blue", "a sapphire": "blue",
    "a ripe strawberry": "red", "a fire engine": "red",
}
OFF_TOPIC = [
    "Answer: B.", "The triangle has three sides.", "12 + 7 = 19", "I cannot see anything.",
    "Choose option D because it is the longest.", "The square is a shape.", "Yes.", "Therefore x = 42.",
]


def reward_pairs() -> list[dict]:
    """PreferencePair rows: 128 over the bundled images + 32 text-only, deterministic.

    Image pairs: the chosen answer names the image's dominant colour; the rejected one names each
    other colour in the same words (so only the image tells them apart), is off-topic, is cut short
    ("The image is"), repeats itself, or hedges with a second colour. The last three teach the reward
    model what a sampling policy produces on its way, so the rounds cannot win by babbling.
    Text-only pairs: the colour of a well-known thing, against a wrong colour or an off-topic reply.
    """
    rng = random.Random(1)
    rows = []
    for name in COLOURS:
        for variant in range(4):
            messages = [{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": "What colour is this image?"}]}]
            chosen = f"The image is {name}."
            rejected = [f"The image is {other}." for other in COLOURS if other != name]
            rejected.append(rng.choice(OFF_TOPIC))
            other = rng.choice([c for c in COLOURS if c != name])
            rejected += ["The image is", "The image", "The image is image is",
                         f"The image is {name}. The image is {other}."]
            for index, answer in enumerate(rejected):
                rows.append({"prompt_id": f"{name}-{variant}-r{index}", "messages": messages,
                             "images": [f"images/{name}_{variant}.png"],
                             "chosen": chosen, "rejected": answer})
    for index, (thing, colour) in enumerate(THINGS.items()):
        messages = [{"role": "user", "content": [{"type": "text", "text": f"What colour is {thing}?"}]}]
        chosen = f"{thing[0].upper()}{thing[1:]} is {colour}."
        rejected = [f"{thing[0].upper()}{thing[1:]} is {other}." for other in COLOURS if other != colour]
        rejected.append(rng.choice(OFF_TOPIC))
        for number, answer in enumerate(rejected):
            rows.append({"prompt_id": f"text-{index}-r{number}", "messages": messages, "images": [],
                         "chosen": chosen, "rejected": answer})
    return rows


def write_reward_pairs() -> None:
    with (OUT / "reward_pairs.jsonl").open("w") as handle:
        for row in reward_pairs():
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
    write_reward_pairs()

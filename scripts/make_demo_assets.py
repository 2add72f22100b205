"""Write the demo's bundled prompts: small PNGs, each dominated by one colour, and prompts.jsonl.

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


if __name__ == "__main__":
    main()

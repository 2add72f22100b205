"""Random Qwen2.5-VL models of the published shapes, synthetic image pairs and training-FLOP counts,
for the benchmarks' ``--gpu`` modes (``bench_train.py``, ``bench_score.py``). Imported by those scripts (their folder is
on ``sys.path`` when they run).

Shapes are those of the published ``config.json`` files of Qwen2.5-VL-3B/7B-Instruct: the text
towers below and one vision tower (32 blocks, hidden 1280, full attention at blocks 7/15/23/31,
about 675M parameters); ``tiny`` swaps in the tiny vision tower so the ``--gpu`` code can run on CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SHAPES = {
    "3b": {"hidden": 2048, "layers": 36, "heads": 16, "kv": 2, "inter": 11008, "vocab": 151936, "tied": True},
    "7b": {
        "hidden": 3584,
        "layers": 28,
        "heads": 28,
        "kv": 4,
        "inter": 18944,
        "vocab": 152064,
        "tied": False,
    },
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "kv": 2, "inter": 128, "vocab": 151936, "tied": False},
}
WORDS = "the a image shows red green blue square circle answer is because so therefore we get value".split()


def qwen_vl_config(tokenizer, size: str):
    """A ``Qwen2_5_VLConfig`` of one of :data:`SHAPES`, with ``tokenizer``'s special token ids."""
    from mpo.cli.tiny import qwen_config

    s = SHAPES[size]
    head_dim = s["hidden"] // s["heads"]
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # Qwen's 16/24/24 of 64, scaled
    section[0] += head_dim // 2 - sum(section)
    big = size != "tiny"
    text = {
        "vocab_size": s["vocab"],
        "hidden_size": s["hidden"],
        "intermediate_size": s["inter"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv"],
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "mrope_section": section, "rope_theta": 1e6},
    }
    vision = {
        "depth": 32 if big else 2,
        "hidden_size": 1280 if big else 64,
        "intermediate_size": 3420 if big else 128,
        "num_heads": 16 if big else 4,
        "out_hidden_size": s["hidden"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31] if big else [1],
    }
    return qwen_config(tokenizer, text, vision, tie_word_embeddings=s["tied"])


def random_backbone(size: str, device: str):
    """``(model, tokenizer)``: a random bf16 ``Qwen2_5_VLForConditionalGeneration`` of ``size``,
    initialised directly on ``device``, with the real Qwen2.5 vocabulary's tokenizer."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mpo.cli.tiny import load_real_vocab_tokenizer

    tokenizer = load_real_vocab_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            qwen_vl_config(tokenizer, size), dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    return model, tokenizer


def synthetic_pairs(work: Path, count: int, words: int, name: str = "pairs") -> Path:
    """``count`` pairs on 448x448 noise images (256 visual tokens), responses of ``words`` words,
    written to ``work/name.jsonl`` (the images are shared by every set made in ``work``)."""
    import numpy as np
    from PIL import Image

    rng = random.Random(0)
    text = lambda: " ".join(rng.choice(WORDS) for _ in range(words))
    question = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}
    ]
    rows = []
    for i in range(count):
        path = work / f"img{i}.png"
        if not path.exists():
            pixels = np.random.default_rng(i).integers(0, 255, (448, 448, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
        rows.append(
            {
                "prompt_id": f"g{i}",
                "images": [str(path)],
                "messages": question,
                "chosen": text(),
                "rejected": text(),
            }
        )
    path = work / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pair_counts(policy, pairs_file, min_pixels: int, max_pixels: int) -> dict:
    """Prompt, chosen and rejected tokens and vision patches summed over a pair set (the benchmarks'
    one batch), encoded as training encodes them."""
    from transformers import AutoProcessor

    from mpo.chat import ChatEncoder
    from mpo.data import load_preferences

    processor = AutoProcessor.from_pretrained(
        policy, size={"shortest_edge": min_pixels, "longest_edge": max_pixels}
    )
    encoder = ChatEncoder(processor)
    counts = {"pairs": 0, "prompt_tokens": 0, "chosen_tokens": 0, "rejected_tokens": 0, "patches": 0}
    for pair in load_preferences(pairs_file).records:
        enc = encoder.encode_pair(pair.messages, pair.images, pair.chosen, pair.rejected)
        counts["pairs"] += 1
        counts["prompt_tokens"] += len(enc.prompt_ids)
        counts["chosen_tokens"] += len(enc.chosen_ids)
        counts["rejected_tokens"] += len(enc.rejected_ids)
        counts["patches"] += int(enc.vision["pixel_values"].shape[0]) if enc.vision else 0
    return counts


def parameter_counts(config) -> tuple[int, int]:
    """``(language model without the input embedding, vision tower)`` parameters of a Qwen2.5-VL
    config, counted on the meta device (nothing allocated)."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    vision = sum(p.numel() for p in model.model.visual.parameters())
    embed = model.model.language_model.embed_tokens.weight.numel()
    return sum(p.numel() for p in model.parameters()) - vision - embed, vision


def path_flops(counts: dict, lm: int, vision: int, vision_trained: bool = True) -> dict:
    """Model FLOPs of one step of each pair path, from the same token counts: 6 per parameter and
    token trained (2 forward + 4 backward), 2 per parameter and token for a forward alone; no
    attention-score FLOPs, no recompute, logits counted at every token.

    - ``trl``: TRL 1.16 DPOTrainer, rows prompt+chosen and prompt+rejected (``2P + C + R`` tokens), the
      vision tower on each row's images (twice per pair), plus its live reference forward.
    - ``unshared`` (``train.share_prompt: false``): the same rows, the vision tower once per pair.
    - ``shared``: one packed row per pair (``P + C + R``), the vision tower once per pair.
    Ours compute the reference once per run, before training (``reference_once``: a forward).
    ``vision_trained=False`` (``train.freeze=[vision]``): the vision tower runs forward only (2 per
    parameter and patch; its small merger's backward is not counted)."""
    p, c, r, patches = (counts[k] for k in ("prompt_tokens", "chosen_tokens", "rejected_tokens", "patches"))
    train = lambda tokens, images: 6 * lm * tokens + (6 if vision_trained else 2) * vision * images
    forward = lambda tokens, images: 2 * lm * tokens + 2 * vision * images
    rows = {"trl": (2 * p + c + r, 2 * patches), "unshared": (2 * p + c + r, patches), "shared": (p + c + r, patches)}
    out = {}
    for path, (tokens, images) in rows.items():
        step = train(tokens, images) + (forward(tokens, images) if path == "trl" else 0)
        out[path] = {"lm_tokens": tokens, "vision_patches": images, "flops_per_step": step}
        if path != "trl":
            out[path]["reference_once_flops"] = forward(tokens, images)
    return out


def tokens_and_flops(policy, pairs_file, min_pixels: int, max_pixels: int) -> dict:
    """Tokens and patches per step (the whole pair set is one batch), the model's parameter counts and
    its training FLOPs per step (6 per parameter and token; the vision tower once per pair), for the
    unshared rows; ``paths``: :func:`path_flops` of each path."""
    from transformers import AutoConfig

    counts = pair_counts(policy, pairs_file, min_pixels, max_pixels)
    lm, vision = parameter_counts(AutoConfig.from_pretrained(policy))
    paths = path_flops(counts, lm, vision)
    return {
        **counts,
        "tokens_per_step": paths["unshared"]["lm_tokens"],
        "patches_per_step": counts["patches"],
        "lm_params": lm,
        "vision_params": vision,
        "flops_per_step": paths["unshared"]["flops_per_step"],
        "paths": paths,
    }

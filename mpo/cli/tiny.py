"""Tiny, randomly initialised Qwen2.5-VL policies and reward models, built offline.

No model hub is needed: the tokenizer is a byte-level BPE trained here on a fixed built-in corpus
(with the Qwen special tokens and a Qwen2-VL chat template), or the real Qwen2.5 vocabulary shipped
in ``mpo/assets`` (so special-token ids match real checkpoints). Models are ordinary Hugging Face
folders: ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained``
load them. The reward model is the same backbone plus ``value_head.safetensors`` in the
Skywork-VL-Reward layout (``v_head.summary.weight`` [1, hidden], ``v_head.summary.bias`` [1]).

The same seed gives the same bytes. These models are for tests, benchmarks and the CPU demo; their
weights mean nothing until trained.
"""

from __future__ import annotations

import lzma
import random
from dataclasses import dataclass
from pathlib import Path

from mpo.models import VALUE_HEAD_FILE

ASSETS = Path(__file__).resolve().parents[1] / "assets"

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The Qwen2-VL conversation format: a default system turn, <|im_start|>role\n...<|im_end|>\n per
# message, each image part as <|vision_start|><|image_pad|><|vision_end|> (the processor expands
# <|image_pad|> to one token per merged patch).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or 'video' in part %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part %}{{- part['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Images in the tiny world are small: 4..64 merged visual tokens each.
TINY_MIN_PIXELS = 4 * 28 * 28
TINY_MAX_PIXELS = 64 * 28 * 28


@dataclass(frozen=True)
class TinySize:
    hidden: int
    heads: int
    kv_heads: int
    layers: int
    mrope_section: tuple[int, int, int]


DEFAULT_SIZE = TinySize(hidden=64, heads=4, kv_heads=2, layers=2, mrope_section=(2, 3, 3))
# vLLM's kernels want head_dim >= 64; mrope sections must sum to head_dim / 2.
VLLM_SIZE = TinySize(hidden=128, heads=2, kv_heads=1, layers=2, mrope_section=(8, 12, 12))


def _corpus(seed: int = 0, lines: int = 3000) -> list[str]:
    """A fixed English-ish corpus: colours, shapes, numbers and answer phrasing."""
    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "gray"]
    shapes = ["square", "circle", "triangle", "line", "angle", "image", "picture", "diagram"]
    words = (
        "the a an is are of in on with what which how many this that it answer question choose "
        "option colour color shows find value length measure degrees area side point because so "
        "therefore first then we get and or not yes no final step think"
    ).split()
    out = []
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.4:
            out.append(f"The {rng.choice(shapes)} is {rng.choice(colours)}.")
        elif kind < 0.7:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "?")
        else:
            out.append(f"Answer: {rng.choice('ABCD')}. {rng.randint(0, 999)} + {rng.randint(0, 99)} = x")
    return out


def build_tokenizer(vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer offline and wrap it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_real_vocab_tokenizer():
    """The real Qwen2.5 tokenizer (151,643 BPE ranks + 22 special tokens) from the bundled asset."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    folder = ASSETS / "qwen2_5_tokenizer"
    backend = Tokenizer.from_str(lzma.decompress((folder / "tokenizer.json.xz").read_bytes()).decode("utf-8"))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=config["eos_token"],
        pad_token=config["pad_token"],
        additional_special_tokens=config["additional_special_tokens"],
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer, min_pixels: int = TINY_MIN_PIXELS, max_pixels: int = TINY_MAX_PIXELS):
    """A Qwen2.5-VL processor around ``tokenizer`` with a bounded per-image pixel budget."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def qwen_config(tokenizer, text: dict, vision: dict, tie_word_embeddings: bool = False):
    """A ``Qwen2_5_VLConfig`` of any shape whose special-token ids are ``tokenizer``'s."""
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text = {"vocab_size": len(tokenizer), "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"), "tie_word_embeddings": tie_word_embeddings, **text}
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=tie_word_embeddings,
    )


def build_config(tokenizer, size: TinySize = DEFAULT_SIZE):
    text = {
        "hidden_size": size.hidden,
        "intermediate_size": size.hidden * 2,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "mrope_section": list(size.mrope_section), "rope_theta": 1e6},
    }
    vision = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 4,
        "out_hidden_size": size.hidden,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
    }
    return qwen_config(tokenizer, text, vision)


def build_policy(seed: int = 0, *, vllm_compatible: bool = False, real_vocab: bool = False):
    """Return ``(model, processor)``: a tiny random Qwen2.5-VL policy in fp32."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = load_real_vocab_tokenizer() if real_vocab else build_tokenizer()
    processor = build_processor(tokenizer)
    config = build_config(tokenizer, VLLM_SIZE if vllm_compatible else DEFAULT_SIZE)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).float().eval()
    ids = tokenizer.convert_tokens_to_ids
    model.generation_config = GenerationConfig(
        eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")],
        pad_token_id=ids("<|endoftext|>"),
        bos_token_id=ids("<|endoftext|>"),
    )
    return model, processor


def value_head_tensors(hidden: int, seed: int) -> dict:
    """A freshly initialised value head (``nn.Linear(hidden, 1)`` init) in Skywork key names."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / hidden**0.5
    weight = (torch.rand(1, hidden, generator=generator) * 2 - 1) * bound
    bias = (torch.rand(1, generator=generator) * 2 - 1) * bound
    return {"v_head.summary.weight": weight, "v_head.summary.bias": bias}


def save_policy(out_dir: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build and save a tiny policy (model + processor) into ``out_dir``."""
    model, processor = build_policy(seed, **kwargs)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def save_reward_model(out_dir: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build and save a tiny reward model: backbone folder + ``value_head.safetensors``."""
    import json

    from safetensors.torch import save_file

    out = save_policy(out_dir, seed, **kwargs)
    hidden = json.loads((out / "config.json").read_text())["text_config"]["hidden_size"]
    save_file(value_head_tensors(hidden, seed), str(out / VALUE_HEAD_FILE), metadata={"format": "pt"})
    return out

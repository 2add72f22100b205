"""Tiny random policies of the vision-language families besides Qwen2.5-VL, built offline (tests and
users' smoke runs): ``mpo tiny policy OUT --family qwen2_vl|qwen3_vl|internvl|llava|gemma3|glm4v``.

Each is the family's own ``*ForConditionalGeneration`` (2 text layers, hidden 64; a 2-layer vision
tower) with the family's own processor class and its checkpoint's real chat template
(``mpo/assets/chat_templates``), a byte-level BPE tokenizer trained here holding the family's special
tokens (their strings match the real checkpoints; their ids do not), and the checkpoint's stop tokens
in ``generation_config``. Images are small (56-pixel tiles or 4..64 merged tokens). The same seed
gives the same weights. (Qwen2.5-VL, the reward model's family, is :mod:`mpo.cli.tiny`'s.)
"""

from __future__ import annotations

from pathlib import Path

from mpo.cli.tiny import ASSETS, _corpus

TEMPLATES = ASSETS / "chat_templates"
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 2048}
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def tokenizer_with(specials: list[str], named: dict, extra=None, add_bos_token: bool = False):
    """A byte-level BPE trained offline whose first ids are ``specials``; ``named`` sets
    ``bos_token``/``eos_token``/... and ``extra`` the named extra special tokens processors read."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                   model_max_length=8192, add_bos_token=add_bos_token,
                                   extra_special_tokens=extra if extra is not None else specials[1:], **named)


def _template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def _stops(model, tok, eos: list[str], pad: str, bos: str | None = None):
    from transformers import GenerationConfig

    ids = tok.convert_tokens_to_ids
    model.generation_config = GenerationConfig(eos_token_id=[ids(t) for t in eos], pad_token_id=ids(pad),
                                               bos_token_id=ids(bos) if bos else None)
    return model


def _qwen_like(tok, ids, vision: dict, rope: dict, config_class, processor_class, video_class, template,
               patch: int, **config):
    from transformers import Qwen2VLImageProcessor

    size = {"shortest_edge": 4 * (2 * patch) ** 2, "longest_edge": 64 * (2 * patch) ** 2}
    pixels = {"size": size, "patch_size": patch, "temporal_patch_size": 2, "merge_size": 2}
    if patch == 16:
        pixels |= {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    processor = processor_class(image_processor=config.pop("image_processor", Qwen2VLImageProcessor)(**pixels),
                                video_processor=video_class(**pixels), tokenizer=tok, chat_template=template)
    pad = ids(config.pop("pad"))
    text = {**TEXT, "vocab_size": len(tok), "rope_parameters": rope, "pad_token_id": pad, "bos_token_id": pad,
            "eos_token_id": tok.eos_token_id}
    return config_class(text_config=text, vision_config=vision, **config), processor


def _qwen_tokenizer():
    """The Qwen2-VL / Qwen3-VL tokenizer, its id lookup, and the config's pad and vision token ids."""
    tok = tokenizer_with(QWEN_SPECIALS, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    ids = tok.convert_tokens_to_ids
    vision = {name: ids(f"<|{token}|>") for name, token in (
        ("image_token_id", "image_pad"), ("video_token_id", "video_pad"),
        ("vision_start_token_id", "vision_start"), ("vision_end_token_id", "vision_end"))}
    return tok, ids, {"pad": "<|endoftext|>", **vision}


def _qwen_stops(model, tok):
    return _stops(model, tok, ["<|im_end|>", "<|endoftext|>"], "<|endoftext|>", "<|endoftext|>")


def build_qwen2_vl():
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tok, ids, tokens = _qwen_tokenizer()
    config, processor = _qwen_like(
        tok, ids, {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "hidden_size": 64, "patch_size": 14,
                   "spatial_merge_size": 2, "temporal_patch_size": 2},
        {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}, Qwen2VLConfig, Qwen2VLProcessor,
        Qwen2VLVideoProcessor, _template("qwen2_vl"), 14, **tokens)
    return _qwen_stops(Qwen2VLForConditionalGeneration(config), tok), processor


def build_qwen3_vl():
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tok, ids, tokens = _qwen_tokenizer()
    # one deepstack feature, added after text layer 0 (one added after the last text layer would reach
    # no response logit, and its merger would never train)
    config, processor = _qwen_like(
        tok, ids, {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                   "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                   "num_position_embeddings": 64, "deepstack_visual_indexes": [0]},
        {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2], "mrope_interleaved": True},
        Qwen3VLConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor, _template("qwen3_vl"), 16, tie_word_embeddings=True,
        **tokens)
    config.text_config.head_dim = 16
    return _qwen_stops(Qwen3VLForConditionalGeneration(config), tok), processor


def build_glm4v():
    from transformers import (
        Glm4vConfig,
        Glm4vForConditionalGeneration,
        Glm4vImageProcessor,
        Glm4vProcessor,
        Glm4vVideoProcessor,
    )

    specials = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                "<|end_of_video|>", "<|image|>", "<|video|>", "<think>", "</think>", "<answer>", "</answer>"]
    tok = tokenizer_with(specials, {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    ids = tok.convert_tokens_to_ids
    config, processor = _qwen_like(
        tok, ids, {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                   "image_size": 56, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5},
        Glm4vConfig, Glm4vProcessor, Glm4vVideoProcessor, _template("glm4v"), 14, pad="<|endoftext|>",
        image_processor=Glm4vImageProcessor, image_token_id=ids("<|image|>"), video_token_id=ids("<|video|>"),
        image_start_token_id=ids("<|begin_of_image|>"), image_end_token_id=ids("<|end_of_image|>"),
        video_start_token_id=ids("<|begin_of_video|>"), video_end_token_id=ids("<|end_of_video|>"))
    model = Glm4vForConditionalGeneration(config)
    return _stops(model, tok, ["<|endoftext|>", "<|user|>", "<|observation|>"], "<|endoftext|>"), processor


def build_internvl():
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<quad>",
                "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<video>"]
    tok = tokenizer_with(specials, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, extra=named)
    ids = tok.convert_tokens_to_ids
    tile, norm = 56, {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size={"height": tile, "width": tile}, crop_to_patches=True,
                                              min_patches=1, max_patches=4, **norm),
        video_processor=InternVLVideoProcessor(size={"height": tile, "width": tile}, **norm), tokenizer=tok,
        image_seq_length=4, chat_template=_template("internvl3_hf"))
    config = InternVLConfig(
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                       "image_size": [tile, tile], "patch_size": [14, 14], "use_absolute_position_embeddings": True},
        text_config={**TEXT, "model_type": "qwen2", "vocab_size": len(tok), "eos_token_id": ids("<|im_end|>"),
                     "pad_token_id": ids("<|endoftext|>"), "bos_token_id": ids("<|endoftext|>")},
        image_token_id=ids("<IMG_CONTEXT>"), image_seq_length=4, downsample_ratio=0.5, vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    model = InternVLForConditionalGeneration(config)
    return _stops(model, tok, ["<|im_end|>"], "<|endoftext|>", "<|endoftext|>"), processor


def build_llava():
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = tokenizer_with(["<unk>", "<s>", "</s>", "<image>", "<pad>"],
                         {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
                         extra={"image_token": "<image>"}, add_bos_token=True)
    ids = tok.convert_tokens_to_ids
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>", chat_template=_template("llava_1_5"))
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56, "patch_size": 14,
                       "projection_dim": 32},
        text_config={**TEXT, "model_type": "llama", "vocab_size": len(tok), "num_key_value_heads": 4,
                     "bos_token_id": ids("<s>"), "eos_token_id": ids("</s>"), "pad_token_id": ids("<pad>")},
        image_token_index=ids("<image>"), image_seq_length=16, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", pad_token_id=ids("<pad>"))
    model = LlavaForConditionalGeneration(config)
    return _stops(model, tok, ["</s>"], "<pad>", "<s>"), processor


def build_gemma3():
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>"]
    tok = tokenizer_with(specials, {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>",
                                    "unk_token": "<unk>"},
                         extra={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                "image_token": "<image_soft_token>"}, add_bos_token=True)
    ids = tok.convert_tokens_to_ids
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 56, "width": 56}, image_mean=[0.5] * 3,
                                             image_std=[0.5] * 3, resample=2),
        tokenizer=tok, image_seq_length=4, chat_template=_template("gemma3"))
    config = Gemma3Config(
        text_config={**TEXT, "vocab_size": len(tok), "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64,
                     "layer_types": ["sliding_attention", "full_attention"], "pad_token_id": ids("<pad>"),
                     "eos_token_id": [ids("<eos>"), ids("<end_of_turn>")], "bos_token_id": ids("<bos>")},
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56, "patch_size": 14,
                       "vision_use_head": False},
        mm_tokens_per_image=4, boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"))
    model = Gemma3ForConditionalGeneration(config)
    # transformers initialises the projection at zero (image tokens would carry nothing and the
    # projector's norm get no gradient until it moves); a real checkpoint's is not zero
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.02)
    return _stops(model, tok, ["<eos>", "<end_of_turn>"], "<pad>", "<bos>"), processor


FAMILIES = {"qwen2_vl": build_qwen2_vl, "qwen3_vl": build_qwen3_vl, "glm4v": build_glm4v,
            "internvl": build_internvl, "llava": build_llava, "gemma3": build_gemma3}


def save_family_policy(out_dir: str | Path, family: str, seed: int = 0) -> Path:
    """Build the tiny ``family`` policy (weights from ``seed``) and save model + processor."""
    import torch

    from mpo.errors import MpoError

    if family not in FAMILIES:
        raise MpoError(f"--family {family}: choose one of qwen2_5_vl, {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    model, processor = FAMILIES[family]()
    out = Path(out_dir)
    model.float().eval().save_pretrained(out)
    processor.save_pretrained(out)
    return out

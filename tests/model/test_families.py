"""Every policy family on tiny models built offline with its own processor class and its checkpoint's
chat template: the rendered pair (one BOS, the family's stop token after each response), the single
vision encode per pair against a plain two-pass forward, two training steps that move every trainable
tensor and no frozen one, the stop token inside the trained response, and HF rollout."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mpo.chat import ChatEncoder
from mpo.models import stop_ids

FAMILIES = ["qwen2_vl", "qwen3_vl", "glm4v", "internvl", "llava", "gemma3"]
USER = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
TWO = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
                                    {"type": "text", "text": "Same colour?"}]}]
TEXT = [{"role": "user", "content": [{"type": "text", "text": "Say a colour."}]}]
# The special tokens of a prompt with one image (runs collapsed), how many image tokens a 90 x 60
# image becomes, and the chosen response's last tokens ("Red."), worked out from each family's chat
# template and processor: Qwen-style 28-pixel grids give round(60/28) x round(90/28) = 2 x 3 = 6
# tokens (Qwen3-VL: 32-pixel, 2 x 3 again); LLaVA (4 x 4 patches) 16; Gemma 3 its 4 soft tokens.
FRAMES = {
    "qwen2_vl": (["<|im_start|>", "<|im_end|>", "<|im_start|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
                  "<|im_end|>", "<|im_start|>"], ("<|image_pad|>", 6), ["<|im_end|>", "Ċ"]),
    "qwen3_vl": (["<|im_start|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|im_end|>",
                  "<|im_start|>"], ("<|image_pad|>", 6), ["<|im_end|>", "Ċ"]),
    "glm4v": (["[gMASK]", "<sop>", "<|user|>", "<|begin_of_image|>", "<|image|>", "<|end_of_image|>",
               "<|assistant|>"], ("<|image|>", 6), [".", "<|endoftext|>"]),
    "internvl": (["<|im_start|>", "<img>", "<IMG_CONTEXT>", "</img>", "<|im_end|>", "<|im_start|>"], None,
                 ["<|im_end|>", "Ċ"]),
    "llava": (["<s>", "<image>"], ("<image>", 16), ["Ġ", "</s>"]),
    "gemma3": (["<bos>", "<start_of_turn>", "<start_of_image>", "<image_soft_token>", "<end_of_image>",
                "<end_of_turn>", "<start_of_turn>"], ("<image_soft_token>", 4), ["<end_of_turn>", "Ċ"]),
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    from transformers import AutoProcessor

    from mpo.cli.tiny_families import save_family_policy

    folder = save_family_policy(tmp_path_factory.mktemp(request.param) / "policy", request.param)
    processor = AutoProcessor.from_pretrained(folder)
    return request.param, folder, processor, ChatEncoder(processor, stop_ids(folder))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for name, size, colour in (("odd", (90, 60), "red"), ("tall", (40, 110), "blue"), ("square", (64, 64), "green")):
        paths.append(folder / f"{name}.png")
        Image.new("RGB", size, colour).save(paths[-1])
    return paths


def _tokens(processor, ids):
    return processor.tokenizer.convert_ids_to_tokens(ids)


def test_a_rendered_pair_frames_the_response_as_the_family_does(family, pictures):
    import itertools

    name, _, processor, encoder = family
    pair = encoder.encode_pair(USER, [pictures[0]], "Red.", "Blue.")
    specials, image_tokens, end = FRAMES[name]
    tokenizer = processor.tokenizer
    known = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    prompt, chosen = _tokens(processor, pair.prompt_ids), _tokens(processor, pair.chosen_ids)
    assert [k for k, _ in itertools.groupby(t for t in prompt if t in known)] == specials, prompt
    if image_tokens:
        assert prompt.count(image_tokens[0]) == image_tokens[1]
    assert chosen[-len(end):] == end, chosen
    assert encoder.stop_ids & set(pair.chosen_ids)  # training teaches the model to stop
    assert prompt.count(tokenizer.bos_token) == (1 if name in ("llava", "gemma3") else 0)  # never two BOS


def _batch(encoder, pictures):
    from mpo.records import PreferencePair
    from mpo.train.collate import PairCollator, pad_token_id

    pairs = [PreferencePair("a", USER, [pictures[0]], "Red.", "It is blue, I think."),
             PreferencePair("b", TWO, [pictures[1], pictures[2]], "No.", "Yes, both."),
             PreferencePair("c", TEXT, [], "Green.", "Purple, mostly.")]
    encoded = [encoder.encode_pair(p.messages, p.images, p.chosen, p.rejected) for p in pairs]
    items = [{"index": i, "prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids,
              "prompt_types": e.token_types, **e.vision} for i, e in enumerate(encoded)]
    return PairCollator(pad_token_id(encoder.processor))(items), encoded


def test_one_vision_encode_per_pair_equals_a_two_pass_forward(family, pictures):
    from transformers import AutoModelForImageTextToText

    from mpo.train.logprobs import naive_sequence_logps, pair_logps

    name, folder, _, encoder = family
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    batch, encoded = _batch(encoder, pictures)
    with torch.no_grad():
        ours = pair_logps(model, batch).sums.tolist()
        naive = [float(naive_sequence_logps(model, e.prompt_ids + ids, len(e.prompt_ids), e.vision, e.token_types))
                 for ids_of in ("chosen_ids", "rejected_ids") for e in encoded for ids in [getattr(e, ids_of)]]
    assert ours == pytest.approx(naive, rel=1e-6, abs=1e-5), name  # sums of 10-70 nats in float32
    assert len(set(round(v, 3) for v in ours)) == len(ours)


def test_two_steps_move_every_trainable_tensor_and_no_frozen_one(family, pictures, tmp_path):
    from transformers import AutoModelForImageTextToText

    from mpo.config import load_recipe
    from mpo.records import PreferencePair
    from mpo.train.run import build_trainer, precompute_reference
    from mpo.train.setup import part_of

    name, folder, processor, _ = family
    recipe = load_recipe(None, [f"model.policy={folder}", f"run.output_dir={tmp_path}", "model.dtype=float32",
                                "train.max_steps=2", "train.learning_rate=1e-2", "train.per_device_batch_size=2",
                                "train.freeze=[vision]", "train.save_steps=100", "train.warmup_ratio=0",
                                "loss.bco_delta=none"])
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    pairs = [PreferencePair(f"p{i}", USER if i % 2 == 0 else TEXT, [pictures[i % 3]] if i % 2 == 0 else [],
                            f"Colour {i}.", "No idea at all.") for i in range(4)]
    trainer, dataset = build_trainer(recipe, pairs, None, model, processor)
    precompute_reference(trainer, dataset, recipe)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    batch = trainer.data_collator([dataset[0]])
    stops = set(trainer.model.generation_config.eos_token_id)
    at = [t for t in range(int(batch["attention_mask"][0].sum())) if int(batch["input_ids"][0, t]) in stops]
    assert at and batch["response_mask"][0, at[-1]]  # the chosen row's stop token is a trained target
    trainer.train()
    for n, p in trainer.model.named_parameters():
        moved = not torch.equal(before[n], p.detach())
        if part_of(n) == "vision":
            assert not moved and not p.requires_grad, n
        elif p.requires_grad and "embed_tokens" not in n:  # untouched embedding rows stay; the matrix moves
            assert moved, n


def test_hf_rollout_samples_and_stops(family, pictures):
    from mpo.config import load_recipe
    from mpo.records import Prompt
    from mpo.rollout import make_backend

    name, folder, _, encoder = family
    recipe = load_recipe(None, ["rollout.backend=hf", "rollout.max_tokens=6", "rollout.temperature=1.0",
                                "model.dtype=float32"])
    prompts = [Prompt("img", USER, [str(pictures[0])]), Prompt("two", TWO, [str(pictures[1]), str(pictures[2])]),
               Prompt("text", TEXT)]
    with make_backend(recipe.rollout, recipe.model, folder) as backend:
        rollouts = backend.generate(prompts, num_samples=2, seed=3)
        again = backend.generate(prompts, num_samples=2, seed=3)
    assert [(r.prompt_id, r.sample_idx) for r in rollouts] == [(p, k) for p in ("img", "two", "text") for k in (0, 1)]
    assert rollouts == again  # seeded
    assert all(r.finish_reason in ("stop", "length") and 1 <= r.num_tokens <= 6 for r in rollouts)

"""One image path: HF rollout, reward scoring, MPO training and reward-model training build the same
``pixel_values`` and ``image_grid_thw`` for the same prompt, and those are what the model card's
computation (``qwen_vl_utils.process_vision_info`` with the processor's own bounds, then the
processor) builds; reward scores equal the card's on awkward images."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mpo.chat import ChatEncoder
from mpo.config import load_recipe
from mpo.data.images import ImageError, fit_image
from mpo.models import recipe_processor
from mpo.records import PreferencePair, Prompt

LOW, HIGH = 8 * 28 * 28, 40 * 28 * 28  # 8..40 visual tokens per image


def _exif_rotated_jpeg(path):
    image = Image.new("RGB", (160, 100), (30, 160, 200))
    image.paste((250, 20, 20), (0, 0, 40, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(path, exif=exif.tobytes())


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    """Images real data sets have: off-grid, tiny, huge, thin, and every common mode."""
    folder = tmp_path_factory.mktemp("awkward")
    rng = np.random.default_rng(0)

    def noise(w, h):
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    images = {
        "odd_301x77": noise(301, 77),
        "below_min_20x20": noise(20, 20),
        "above_max_900x700": noise(900, 700),
        "thin_1200x30": noise(1200, 30),
        "grey_123x99": noise(123, 99).convert("L"),
        "rgba_120x90": noise(120, 90).convert("RGBA"),
        "palette_101x67": noise(101, 67).convert("P"),
    }
    paths = {}
    for name, image in images.items():
        paths[name] = folder / f"{name}.png"
        image.save(paths[name])
    alpha = Image.open(paths["rgba_120x90"])
    alpha.putalpha(Image.fromarray(rng.integers(0, 255, (90, 120), dtype=np.uint8)))
    alpha.save(paths["rgba_120x90"])
    paths["sixteen_bit_90x70"] = folder / "sixteen_bit_90x70.png"
    Image.fromarray(rng.integers(0, 65535, (70, 90), dtype=np.uint16)).save(paths["sixteen_bit_90x70"])
    paths["exif_rotated"] = folder / "exif_rotated.jpg"
    _exif_rotated_jpeg(paths["exif_rotated"])
    return paths


def _messages(text="Describe it."):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def card_pixels(processor, image_path, text="Describe it."):
    """The Skywork-VL-Reward card's computation: process_vision_info with the processor's bounds."""
    from qwen_vl_utils import process_vision_info

    size = processor.image_processor.size
    messages = [{"role": "user", "content": [
        {"type": "image", "image": str(image_path), "min_pixels": size["shortest_edge"],
         "max_pixels": size["longest_edge"]},
        {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, _ = process_vision_info(messages)
    return processor(text=[prompt], images=images, return_tensors="pt")


def _recipe(policy, reward):
    return load_recipe(None, [f"model.policy={policy}", f"model.reward_model={reward}", f"model.min_pixels={LOW}",
                              f"model.max_pixels={HIGH}", "model.dtype=float32", "rollout.backend=hf"])


@pytest.fixture(scope="module")
def consumers(tiny_policy_dir, tiny_reward_dir):
    """Each consumer's own way of turning a prompt with one image into model inputs."""
    from mpo.rollout import make_backend
    from mpo.train.collate import PairDataset
    from reward.collate import PairDataset as RewardPairDataset
    from reward.scorer import Scorer

    recipe = _recipe(tiny_policy_dir, tiny_reward_dir)
    backend = make_backend(recipe.rollout, recipe.model, tiny_policy_dir)
    scorer = Scorer(tiny_reward_dir, min_pixels=LOW, max_pixels=HIGH, progress=False).load()
    train_encoder = ChatEncoder(recipe_processor(tiny_policy_dir, recipe.model))
    reward_encoder = ChatEncoder(recipe_processor(tiny_reward_dir, recipe.model))

    def rollout(path):
        prompt = Prompt("p", _messages(), [str(path)])
        return backend._collate([backend.encoder.encode_prompt(prompt.messages, prompt.images)])

    def scoring(path):
        return scorer.encode([{"messages": _messages(), "images": [str(path)], "response": "It is."}])[0].prompt.vision

    def training(path):
        pair = PreferencePair("p", _messages(), [str(path)], "Red.", "Blue.")
        return PairDataset([pair], train_encoder, max_length=4096)[0]

    def reward_training(path):
        pair = PreferencePair("p", _messages(), [str(path)], "Red.", "Blue.")
        return RewardPairDataset([pair], reward_encoder)[0]

    return {"rollout": rollout, "scoring": scoring, "training": training, "reward training": reward_training,
            "processor": backend.processor}


@pytest.mark.parametrize("name", ["odd_301x77", "below_min_20x20", "above_max_900x700", "thin_1200x30",
                                  "grey_123x99", "rgba_120x90", "palette_101x67", "sixteen_bit_90x70",
                                  "exif_rotated"])
def test_every_consumer_builds_the_same_pixels_as_the_card(consumers, awkward, name):
    built = {k: consumers[k](awkward[name]) for k in ("rollout", "scoring", "training", "reward training")}
    card = card_pixels(consumers["processor"], awkward[name])
    for consumer, inputs in built.items():
        assert torch.equal(inputs["image_grid_thw"].cpu(), card["image_grid_thw"]), consumer
        if name == "sixteen_bit_90x70":  # the one deliberate difference: scaled here, clipped to white there
            assert not torch.equal(inputs["pixel_values"].cpu(), card["pixel_values"])
            assert torch.equal(inputs["pixel_values"].cpu(), built["rollout"]["pixel_values"].cpu()), consumer
        else:
            assert torch.equal(inputs["pixel_values"].cpu(), card["pixel_values"]), consumer
    tokens = int(card["image_grid_thw"].prod()) // 4
    assert 8 <= tokens <= 40 or name == "thin_1200x30"


def test_the_image_is_on_the_grid_before_the_processor_sees_it(consumers, awkward):
    processor = consumers["processor"]
    for name, path in awkward.items():
        fitted = fit_image(path, processor.image_processor)
        assert fitted.mode == "RGB" and fitted.width % 28 == 0 and fitted.height % 28 == 0, name
        assert fitted.width * fitted.height <= HIGH, name


def test_too_thin_an_image_is_one_line_naming_it(consumers, tmp_path):
    path = tmp_path / "ribbon.png"
    Image.new("RGB", (4020, 20), "red").save(path)
    with pytest.raises(ImageError, match=rf"image too thin: {path} is 4020 x 20, an aspect ratio over 200:1"):
        fit_image(path, consumers["processor"].image_processor)
    encoder = ChatEncoder(consumers["processor"])
    with pytest.raises(ImageError, match=rf"image too thin: {path}"):
        encoder.prompt_length(_messages(), [path])


def test_prompt_length_from_headers_equals_the_encoding(consumers, awkward):
    encoder = ChatEncoder(consumers["processor"])
    for name, path in awkward.items():
        encoded = encoder.encode_prompt(_messages(), [path])
        assert encoder.prompt_length(_messages(), [path]) == len(encoded.input_ids), name


def test_scores_equal_the_cards_on_awkward_images(tiny_reward_dir, awkward):
    """The card: process_vision_info (the processor's bounds per image), the processor, the backbone,
    the value head at the last token; here the scorer with the same bounds."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mpo.models import load_processor
    from reward.model import RewardModel
    from reward.scorer import Scorer

    processor = load_processor(tiny_reward_dir, LOW, HIGH)
    backbone = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_reward_dir, dtype=torch.float32).eval()
    head = RewardModel.from_pretrained(tiny_reward_dir).v_head.eval()
    names = [n for n in awkward if n != "sixteen_bit_90x70"]
    card = []
    for name in names:
        from qwen_vl_utils import process_vision_info

        size = processor.image_processor.size
        messages = [{"role": "user", "content": [
            {"type": "image", "image": str(awkward[name]), "min_pixels": size["shortest_edge"],
             "max_pixels": size["longest_edge"]}, {"type": "text", "text": "Describe it."}]},
            {"role": "assistant", "content": "A picture."}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        images, _ = process_vision_info(messages)
        inputs = processor(text=[text], images=images, return_tensors="pt")
        with torch.no_grad():
            hidden = backbone(**inputs, output_hidden_states=True, use_cache=False).hidden_states[-1]
            card.append(float(head(hidden[0, -1]).squeeze()))
    scorer = Scorer(tiny_reward_dir, min_pixels=LOW, max_pixels=HIGH, progress=False)
    ours = scorer.score([{"messages": _messages(), "images": [str(awkward[n])], "response": "A picture."} for n in names])
    assert ours == pytest.approx(card, abs=1e-5)
    assert len(set(round(s, 4) for s in ours)) == len(ours)  # the images differ, so do the scores


def test_embedded_bytes_go_through_the_same_path(consumers, awkward):
    data = awkward["odd_301x77"].read_bytes()
    processor = consumers["processor"]
    assert fit_image(io.BytesIO(data), processor.image_processor).tobytes() == \
        fit_image(awkward["odd_301x77"], processor.image_processor).tobytes()

"""The one encoder: prompt tokens are identical for rollout, scoring and training, on the tiny
tokenizer and on the real Qwen2 vocabulary; the sequence equals the template's own rendering."""

from pathlib import Path

import pytest
import torch

from mpo.chat import ChatEncoder, ChatError
from mpo.data.images import open_image

QUESTION = "What colour is this image? Answer in one word."


def _messages(images=1):
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": QUESTION}]
    return [{"role": "user", "content": content}]


@pytest.fixture(params=["tiny", "real"])
def processor(request, tiny_processor, real_vocab_processor):
    return tiny_processor if request.param == "tiny" else real_vocab_processor


@pytest.fixture
def images(demo_prompts_path):
    return [
        open_image(demo_prompts_path.parent / "images" / "blue_1.png"),
        demo_prompts_path.parent / "images" / "green_2.png",
    ]


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_prompt_tokens_identical_in_all_three_uses(processor, images, num_images):
    encoder = ChatEncoder(processor)
    messages, used = _messages(num_images), images[:num_images]
    prompt = encoder.encode_prompt(messages, used)
    scored = encoder.encode_response(messages, used, "It is blue.")
    pair = encoder.encode_pair(messages, used, "It is blue.", "It is red, I think.")

    assert scored.input_ids[: scored.response_start] == prompt.input_ids
    assert scored.response_start == len(prompt.input_ids)
    assert pair.prompt_ids == prompt.input_ids
    assert prompt.input_ids + pair.chosen_ids == scored.input_ids
    for key, value in prompt.vision.items():
        assert torch.equal(value, scored.vision[key]) and torch.equal(value, pair.vision[key])
    assert ("pixel_values" in prompt.vision) == (num_images > 0)


def test_prompts_encoded_together_equal_each_alone(processor, images):
    """One processor call for several prompts (padded together) gives each prompt exactly the ids
    and pixels the processor gives it alone."""
    encoder = ChatEncoder(processor)
    long_question = [{"role": "user", "content": [{"type": "text", "text": QUESTION * 6}]}]
    conversations = [_messages(2), _messages(0), long_question, _messages(1)]
    pictures = [images, [], [], images[1:]]
    together = encoder.encode_prompts(conversations, pictures)
    for messages, used, got in zip(conversations, pictures, together):
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        alone = processor(
            text=[text],
            images=[open_image(i) if isinstance(i, Path) else i for i in used] or None,
            return_tensors="pt",
        )
        assert got.input_ids == alone["input_ids"][0].tolist()
        assert sorted(got.vision) == sorted(
            k for k in ("pixel_values", "image_grid_thw") if k in alone and used
        )
        for key, value in got.vision.items():
            assert torch.equal(value, alone[key])
    assert len({len(p.input_ids) for p in together}) == 4  # ragged, so the batch was padded
    texts = ["It is blue.", "", "Red, I think; maybe green."]
    assert encoder.responses_ids(texts) == [encoder.response_ids(t) for t in texts]


def test_sequence_is_the_templates_rendering(processor, images):
    """prompt + response equals the processor's own tokenisation of [user, assistant] rendered with
    add_generation_prompt=False (what the Skywork model card scores), ending in <|im_end|> '\\n'."""
    encoder = ChatEncoder(processor)
    messages = _messages(1)
    scored = encoder.encode_response(messages, images[:1], "It is blue.")
    full = messages + [{"role": "assistant", "content": [{"type": "text", "text": "It is blue."}]}]
    text = processor.apply_chat_template(full, tokenize=False, add_generation_prompt=False)
    reference = processor(text=[text], images=[images[0]], return_tensors="pt")["input_ids"][0].tolist()
    assert scored.input_ids == reference
    tok = processor.tokenizer
    assert tok.decode(scored.input_ids[-2:]) == "<|im_end|>\n"
    assert tok.decode(scored.input_ids[scored.response_start :]) == "It is blue.<|im_end|>\n"
    assert encoder.suffix == "<|im_end|>\n"


def test_render_prompt_keeps_one_placeholder_per_image(processor):
    text = ChatEncoder(processor).render_prompt(_messages(2))
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert text.endswith("<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_image_count_mismatch_is_an_error(tiny_processor, images):
    with pytest.raises(ChatError, match=r"has 2 image part\(s\) but 1 image\(s\) were given"):
        ChatEncoder(tiny_processor).encode_prompt(_messages(2), images[:1])

"""Tiny models: offline build, save, reload, forward with an image, generate; same seed, same bytes."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from mpo.cli.tiny import build_policy, save_policy, save_reward_model
from mpo.data.images import open_image


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = _digest(save_reward_model(tmp_path / "a", seed=3))
    b = _digest(save_reward_model(tmp_path / "b", seed=3))
    c = _digest(save_reward_model(tmp_path / "c", seed=4))
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]
    assert a["tokenizer.json"] == c["tokenizer.json"]


def test_reload_forward_with_image_and_generate(tiny_policy_dir, demo_prompts_path):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_policy_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_policy_dir).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = open_image(demo_prompts_path.parent / "images" / "red_0.png")
    batch = processor(text=[text], images=[image], return_tensors="pt")
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # a 56x56 image -> 4x4 patches of 14 -> 2x2 merged visual tokens
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert int((batch["input_ids"] == image_pad).sum()) == 4
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    again = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > batch["input_ids"].shape[1] and torch.equal(out, again)


def test_reward_model_folder_has_skywork_value_head(tiny_reward_dir):
    head = load_file(str(tiny_reward_dir / "value_head.safetensors"))
    hidden = json.loads((tiny_reward_dir / "config.json").read_text())["text_config"]["hidden_size"]
    assert sorted(head) == ["v_head.summary.bias", "v_head.summary.weight"]
    assert head["v_head.summary.weight"].shape == (1, hidden)
    assert head["v_head.summary.bias"].shape == (1,)


def test_vllm_compatible_size_has_head_dim_64():
    model, _ = build_policy(0, vllm_compatible=True)
    text = model.config.text_config
    assert text.hidden_size // text.num_attention_heads == 64
    assert sum(text.rope_parameters["mrope_section"]) == 32


def test_real_vocab_special_ids_match_qwen2_5_vl(tmp_path):
    from transformers import AutoProcessor

    folder = save_policy(tmp_path / "real", seed=0, real_vocab=True)
    processor = AutoProcessor.from_pretrained(folder)
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>"])
    assert ids == [151643, 151644, 151645, 151652, 151655]
    config = json.loads((folder / "config.json").read_text())
    assert config["image_token_id"] == 151655 and config["vision_start_token_id"] == 151652
    assert tok("<|im_start|>hello<|im_end|>", add_special_tokens=False)["input_ids"] == [151644, 14990, 151645]


@pytest.mark.parametrize("kind", ["policy", "reward"])
def test_cli_builds_loadable_folders(tmp_path, kind):
    from typer.testing import CliRunner

    from mpo.cli import app

    result = CliRunner().invoke(app, ["tiny", kind, str(tmp_path / kind), "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / kind / "model.safetensors").exists()
    assert (tmp_path / kind / "value_head.safetensors").exists() == (kind == "reward")

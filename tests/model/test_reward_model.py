"""reward/model.py against the Skywork-VL-Reward model card's own computation, on a tiny model.

The reference is written here from raw transformers + safetensors the way the card does it: load
``Qwen2_5_VLForConditionalGeneration``, render ``[user: image + question, assistant: answer]`` with
``add_generation_prompt=False``, run the processor on the batch (right padding, which the card's
index needs), run the model with ``output_hidden_states=True``, take ``hidden_states[-1]`` (checked
here to be the final norm's output), apply the ``Linear`` read from ``value_head.safetensors`` and
read it at ``attention_mask.sum(-1) - 1``. RewardModel, the Scorer and ``mpo reward score`` must all
give those numbers (fp32, 1e-5), whatever the padding side, batch size or order.

Also: the save/load round trip is bit-identical in the Skywork layout, a folder laid out like the
published checkpoint (4.x flat config, legacy weight names, preprocessor_config.json, tokenizer files
with the chat template) loads, a folder without the value head is a clear error, dropout is off in eval.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mpo.cli import app
from mpo.errors import MpoError
from reward.model import VALUE_HEAD_FILE, RewardModel
from reward.scorer import Scorer

TOL = 1e-5
QUESTIONS = [
    "What colour is the square?",
    "Describe the picture.",
    "How many sides does the shape have?",
    "Is there a circle in the image? Answer yes or no.",
    "What is shown?",
]
ANSWERS = [
    "Red.",
    "The square is blue and the line is green.",
    "It has four sides, so the answer is 4.",
    "No.",
    "A yellow triangle on a white background, then a gray circle. The final answer is B.",
]


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> list[dict]:
    """Nine (image, question, answer) items: real PNGs of different sizes, answers of different lengths."""
    folder = tmp_path_factory.mktemp("images")
    rng = random.Random(3)
    items = []
    for i in range(9):
        path = folder / f"img_{i}.png"
        Image.new(
            "RGB", (rng.randint(40, 230), rng.randint(40, 230)), tuple(rng.randrange(256) for _ in range(3))
        ).save(path)
        items.append({"image": str(path), "question": QUESTIONS[i % 5], "answer": ANSWERS[(i * 2) % 5]})
    return items


def as_item(conv: dict) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": conv["question"]}]}]
    return {"messages": messages, "images": [conv["image"]], "response": conv["answer"]}


def card_inputs(processor, conversations: list[dict], padding_side: str = "right"):
    """The model card's inputs: ``qwen_vl_utils.process_vision_info`` (each image with the
    processor's own pixel bounds), then the processor."""
    from qwen_vl_utils import process_vision_info

    texts, images = [], []
    size = processor.image_processor.size
    for conv in conversations:
        image = {"type": "image", "image": str(conv["image"]), "min_pixels": size["shortest_edge"],
                 "max_pixels": size["longest_edge"]}
        messages = [
            {"role": "user", "content": [image, {"type": "text", "text": conv["question"]}]},
            {"role": "assistant", "content": conv["answer"]},
        ]
        texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))
        images += process_vision_info(messages)[0]
    return processor(text=texts, images=images, padding=True, padding_side=padding_side, return_tensors="pt")


def card_scores(model_dir: Path, conversations: list[dict]) -> list[float]:
    """The model card's computation, from raw transformers + safetensors (right padding)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    with safe_open(str(model_dir / VALUE_HEAD_FILE), framework="pt", device="cpu") as handle:
        params = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    head = torch.nn.Linear(model.config.text_config.hidden_size, 1)
    head.load_state_dict({"weight": params["v_head.summary.weight"], "bias": params["v_head.summary.bias"]})
    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = card_inputs(processor, conversations)
    normed = {}
    hook = model.model.language_model.norm.register_forward_hook(
        lambda mod, args, out: normed.setdefault("out", out)
    )
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states[-1]
        values = head(hidden).squeeze(-1)
    hook.remove()
    # In transformers 5.23 hidden_states[-1] is the final norm's output (the state the head reads).
    assert torch.equal(hidden, normed["out"])
    index = inputs["attention_mask"].sum(dim=-1, keepdim=True) - 1
    return values.gather(dim=-1, index=index).squeeze(-1).tolist()


@pytest.fixture(scope="module")
def reference(tiny_reward_dir, conversations) -> list[float]:
    return card_scores(tiny_reward_dir, conversations)


@pytest.fixture(scope="module")
def reward_model(tiny_reward_dir) -> RewardModel:
    return RewardModel.from_pretrained(tiny_reward_dir)


def close(a, b, tol=TOL) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


def test_reference_scores_are_distinct_and_finite(reference):
    assert len(reference) == 9 and all(torch.isfinite(torch.tensor(reference)))
    assert len({round(r, 6) for r in reference}) == 9  # the check below could not pass by accident


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_reward_model_matches_card(
    reward_model, tiny_processor, tiny_reward_dir, conversations, reference, padding_side
):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_reward_dir)
    inputs = card_inputs(processor, conversations, padding_side)
    with torch.no_grad():
        scores = reward_model(**inputs).tolist()
    assert close(scores, reference), (scores, reference)


def test_reward_model_forward_without_token_types_matches_card(
    reward_model, tiny_reward_dir, conversations, reference
):
    from transformers import AutoProcessor

    inputs = card_inputs(AutoProcessor.from_pretrained(tiny_reward_dir), conversations)
    with torch.no_grad():
        scores = reward_model(
            inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"]
        ).tolist()
    assert close(scores, reference)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_scorer_matches_card(
    reward_model, tiny_processor, conversations, reference, padding_side, batch_size
):
    scorer = Scorer.from_model(
        reward_model, tiny_processor, max_batch_size=batch_size, padding_side=padding_side, progress=False
    )
    assert close(scorer.score([as_item(c) for c in conversations]), reference)


def test_scorer_matches_card_in_shuffled_order(reward_model, tiny_processor, conversations, reference):
    order = list(range(len(conversations)))
    random.Random(0).shuffle(order)
    scorer = Scorer.from_model(reward_model, tiny_processor, max_batch_size=4, progress=False)
    scores = scorer.score([as_item(conversations[i]) for i in order])
    assert close(scores, [reference[i] for i in order])


def test_cli_score_matches_card(tiny_reward_dir, conversations, reference, tmp_path):
    rows = [{"id": i, **as_item(c)} for i, c in enumerate(conversations)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = CliRunner().invoke(
        app,
        [
            "reward",
            "score",
            "--model",
            str(tiny_reward_dir),
            "--input",
            str(source),
            "--output",
            str(tmp_path / "out.jsonl"),
            "--batch-tokens",
            "300",
        ],
    )
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "reward"} for r in out] == rows
    assert close([r["reward"] for r in out], reference)


def test_save_load_round_trip_is_bit_identical(reward_model, tiny_processor, conversations, tmp_path):
    reward_model.save_pretrained(tmp_path / "copy")
    head = load_file(str(tmp_path / "copy" / VALUE_HEAD_FILE))
    hidden = reward_model.config.text_config.hidden_size
    assert {k: list(v.shape) for k, v in head.items()} == {
        "v_head.summary.weight": [1, hidden],
        "v_head.summary.bias": [1],
    }
    again = RewardModel.from_pretrained(tmp_path / "copy")
    before, after = reward_model.state_dict(), again.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    items = [as_item(c) for c in conversations]
    first = Scorer.from_model(reward_model, tiny_processor, progress=False).score(items)
    second = Scorer.from_model(again, tiny_processor, progress=False).score(items)
    assert first == second


def published_layout(source: Path, target: Path, min_pixels: int, max_pixels: int) -> Path:
    """Re-lay a toolkit folder the way the published Skywork-VL-Reward-7B folder is laid out
    (transformers 4.49 era): flat config with rope_scaling, legacy weight names, a
    preprocessor_config.json with min/max_pixels, the chat template in tokenizer_config.json and
    chat_template.json, no processor_config.json."""
    target.mkdir()
    config = json.loads((source / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    for key in ("model_type", "layer_types", "dtype"):
        text.pop(key, None)
    config.pop("dtype", None)
    vision = config["vision_config"]
    vision.pop("rope_parameters", None)
    vision.pop("model_type", None)
    flat = {
        **config,
        **text,
        "rope_theta": rope["rope_theta"],
        "torch_dtype": "float32",
        "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]},
        "transformers_version": "4.49.0",
        "vision_config": {**vision, "in_chans": 3},
    }
    (target / "config.json").write_text(json.dumps(flat, indent=2))
    weights = load_file(str(source / "model.safetensors"))
    legacy = {}
    for key, value in weights.items():  # the names transformers 4.49 wrote (5.23 also saves these)
        key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        legacy[key] = value
    save_file(legacy, str(target / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(source / VALUE_HEAD_FILE, target / VALUE_HEAD_FILE)
    shutil.copy(source / "generation_config.json", target / "generation_config.json")
    shutil.copy(source / "tokenizer.json", target / "tokenizer.json")
    template = (source / "chat_template.jinja").read_text()
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    (target / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": template}))
    (target / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    image = json.loads((source / "processor_config.json").read_text())["image_processor"]
    image.pop("size")
    (target / "preprocessor_config.json").write_text(
        json.dumps(
            {
                **image,
                "min_pixels": min_pixels,
                "max_pixels": max_pixels,
                "processor_class": "Qwen2_5_VLProcessor",
            }
        )
    )
    return target


def test_published_layout_loads(tiny_reward_dir, conversations, reference, tmp_path):
    folder = published_layout(tiny_reward_dir, tmp_path / "published", 4 * 28 * 28, 64 * 28 * 28)
    keys = set(load_file(str(folder / "model.safetensors")))
    assert any(k.startswith("visual.") for k in keys) and any(k.startswith("model.layers.") for k in keys)
    assert not any(k.startswith("model.language_model.") for k in keys)
    assert "text_config" not in json.loads((folder / "config.json").read_text())
    scorer = Scorer(folder, progress=False)
    scores = scorer.score([as_item(c) for c in conversations])
    assert close(scores, reference)
    size = scorer.processor.image_processor.size
    assert (size.shortest_edge, size.longest_edge) == (4 * 28 * 28, 64 * 28 * 28)
    loaded, original = scorer.model.state_dict(), RewardModel.from_pretrained(tiny_reward_dir).state_dict()
    assert all(torch.equal(loaded[k], original[k]) for k in original)


def test_missing_value_head_is_a_clear_error(tiny_reward_dir, tmp_path):
    folder = shutil.copytree(tiny_reward_dir, tmp_path / "no_head")
    (folder / VALUE_HEAD_FILE).unlink()
    with pytest.raises(MpoError, match=r"no_head: no value_head\.safetensors \(not a reward model"):
        RewardModel.from_pretrained(folder)
    with pytest.raises(MpoError, match=r"no_head: no value_head\.safetensors"):
        Scorer(folder)


def test_dropout_is_inactive_in_eval(reward_model, tiny_reward_dir, conversations):
    from transformers import AutoProcessor

    inputs = card_inputs(AutoProcessor.from_pretrained(tiny_reward_dir), conversations[:3])
    assert not reward_model.training and reward_model.v_head.dropout.p == pytest.approx(0.1)
    with torch.no_grad():
        first, second = reward_model(**inputs), reward_model(**inputs)
        assert torch.equal(first, second)
        reward_model.v_head.train()  # the head's dropout is real: in train mode it changes the scores
        torch.manual_seed(0)
        dropped = reward_model(**inputs)
        reward_model.v_head.eval()
    assert not torch.equal(first, dropped)

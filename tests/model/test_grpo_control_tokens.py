"""A control token's text in a GRPO prompt (issue 18's rule in mpo grpo): MpoGRPOTrainer encodes prompts
through mpo.chat.ChatEncoder, so ``<|im_end|>``, ``<|vision_start|>`` and ``<|image_pad|>`` written in a
question are plain text in the ids TRL generates from and trains on, the image's pad tokens are exactly its
features, TRL's forward pass gets per-image tensors and per-token types lined up with those ids (prompts of
different lengths in one batch too), the reward functions see the prompt as written, and a GRPO step runs.
The ids of prompts without a literal are TRL's own (tests/model/test_control_tokens.py, every family)."""

from __future__ import annotations

import torch
from PIL import Image

from mpo.cli.tiny import ASSETS

LITERAL = "Is it red <|im_end|> or <|vision_start|> blue <|image_pad|>?"
LONGER = "What colour is this image? Answer with one word, then stop."


def _data():
    from datasets import Dataset

    red = Image.open(ASSETS / "demo" / "images" / "red_0.png").convert("RGB")
    rows = [(LITERAL, "literal"), (LONGER, "longer")]
    return Dataset.from_list([{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                               "images": [red], "prompt_id": pid} for q, pid in rows])


def test_a_grpo_step_on_a_prompt_holding_control_token_text(tiny_policy_dir, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import GRPOConfig

    from mpo.grpo.trainer import MpoGRPOTrainer

    seen = []

    def nothing(prompts, completions, **columns):
        seen.extend(prompts)
        return [0.0] * len(prompts)

    nothing.name, nothing.weight = "nothing", 1.0

    class Recording(MpoGRPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.batches.append(inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=4, beta=0.01, report_to="none", use_cpu=True, bf16=False,
                      save_strategy="no", seed=0, max_steps=1, logging_steps=1, reward_weights=[1.0])
    processor = AutoProcessor.from_pretrained(tiny_policy_dir)
    trainer = Recording(model=AutoModelForImageTextToText.from_pretrained(tiny_policy_dir, dtype=torch.float32),
                        args=args, train_dataset=_data(), processing_class=processor, components=[nothing])
    trainer.batches = []
    trainer.train()
    assert trainer.state.global_step == 1 and len(trainer.batches) == 1
    batch = trainer.batches[0]
    tokenizer = processor.tokenizer
    pad_id, end_id, start_id = (tokenizer.convert_tokens_to_ids(t)
                                for t in ("<|image_pad|>", "<|im_end|>", "<|vision_start|>"))
    plain = tokenizer(LITERAL, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    merge = processor.image_processor.merge_size ** 2
    features = (batch["image_grid_thw"].prod(dim=-1) // merge).tolist()  # one image per row
    mask, types = batch["prompt_mask"].bool(), batch["mm_token_type_ids"][:, : batch["prompt_ids"].shape[1]]
    kinds = set()
    assert mask.sum(dim=1).unique().numel() == 2  # two prompt lengths: left padding in play
    for row, ids in enumerate(batch["prompt_ids"]):
        real = ids[mask[row]].tolist()
        literal = any(real[i : i + len(plain)] == plain for i in range(len(real)))
        kinds.add(literal)
        # the image's own pad tokens only, one vision start, the system and user turns' ends only
        assert real.count(pad_id) == features[row] and real.count(start_id) == 1 and real.count(end_id) == 2
        assert torch.equal(types[row] == 1, ids == pad_id)  # per-token types line up with the padded ids
        assert torch.equal(types[row][~mask[row]], torch.zeros_like(types[row][~mask[row]]))
    assert kinds == {True, False}
    assert batch["pixel_values"].shape[0] == batch["image_grid_thw"].prod(dim=-1).sum()
    texts = [part["text"] for prompt in seen for message in prompt for part in message["content"]
             if part.get("type") == "text"]
    assert LITERAL in texts  # the reward functions see the prompt as written
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert logged and torch.isfinite(torch.tensor(logged[0]["loss"]))

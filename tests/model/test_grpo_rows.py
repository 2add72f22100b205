"""GRPO batches cut into rows and joined again (mpo.grpo.rows), on real batches of TRL's GRPOTrainer with
the tiny Qwen2.5-VL policy: a batch's rows join back into the same batch, and rows of two batches of
different widths joined into one give each row the loss term it has alone (TRL's own loss as the oracle),
which is what replaying a buffered sample into a later batch needs."""

from __future__ import annotations

import json

import pytest
import torch

from mpo.cli.tiny import ASSETS
from mpo.grpo.rows import join_rows, split_rows


@pytest.fixture(scope="module")
def trainer(tiny_policy_dir, tmp_path_factory):
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import GRPOConfig, GRPOTrainer

    from mpo.grpo.rewards import FormatReward

    rows = [json.loads(line) for line in (ASSETS / "demo" / "prompts.jsonl").read_text().splitlines()][:2]
    data = Dataset.from_list([{"prompt": r["messages"], "answer": r["answer"],
                               "images": [Image.open(ASSETS / "demo" / p).convert("RGB") for p in r["images"]]}
                              for r in rows])
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("grpo")), per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=6, beta=0.01, loss_type="grpo", report_to="none",
                      use_cpu=True, bf16=False, save_strategy="no", seed=0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_policy_dir, dtype=torch.float32)
    return GRPOTrainer(model=model, reward_funcs=[FormatReward()], args=args, train_dataset=data,
                       processing_class=AutoProcessor.from_pretrained(tiny_policy_dir))


def _batch(trainer, extra_text: str, advantages: list[float], width: int | None = None) -> dict:
    row = dict(trainer.train_dataset[0])
    row["prompt"] = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": extra_text}]}]
    torch.manual_seed(len(extra_text))
    batch = trainer._generate_and_score_completions([row] * 2 + [dict(trainer.train_dataset[1])] * 2)
    batch["advantages"] = torch.tensor(advantages)
    if width is not None:  # shorter completions: a batch narrower on the completion side
        for key in ("completion_ids", "completion_mask", "ref_per_token_logps"):
            batch[key] = batch[key][:, :width]
        batch["mm_token_type_ids"] = batch["mm_token_type_ids"][:, :batch["prompt_ids"].shape[1] + width]
    return batch


def _loss(trainer, batch: dict) -> float:
    counted = {**batch, "num_items_in_batch": batch["completion_mask"].sum()}
    with torch.no_grad():
        return trainer._compute_loss(trainer.model, counted).item()


def test_rows_join_back_into_the_batch(trainer):
    batch = _batch(trainer, "What colour?", [1.0, -1.0, 0.5, -0.5])
    joined = join_rows(split_rows(batch), trainer.processing_class.tokenizer.pad_token_id)
    assert set(joined) == set(batch) - {"num_items_in_batch"}
    for key, value in batch.items():
        if key != "num_items_in_batch":
            assert torch.equal(joined[key], value) if torch.is_tensor(value) else joined[key] == value, key


def test_rows_of_two_batches_keep_their_loss_terms(trainer):
    pad = trainer.processing_class.tokenizer.pad_token_id
    short = _batch(trainer, "Colour?", [1.0, -1.0, 0.5, -0.5], width=4)
    long = _batch(trainer, "Name the colour that fills this whole picture, in one word.", [-2.0, 2.0, 0.3, -0.3])
    assert short["prompt_ids"].shape[1] < long["prompt_ids"].shape[1]
    assert short["completion_ids"].shape[1] < long["completion_ids"].shape[1]
    mixed_rows = split_rows(long)[:2] + split_rows(short)[:2]
    mixed = join_rows(mixed_rows, pad)
    assert mixed["prompt_ids"].shape[1] == long["prompt_ids"].shape[1]
    alone = [_loss(trainer, join_rows([row], pad)) for row in mixed_rows]
    assert any(abs(term) > 1e-3 for term in alone)  # the terms are not all zero
    # loss_type "grpo": the mean over rows of each row's token-mean term
    assert _loss(trainer, mixed) == pytest.approx(sum(alone) / len(alone), abs=1e-5)
    assert _loss(trainer, join_rows(split_rows(long), pad)) == pytest.approx(_loss(trainer, long), abs=1e-6)

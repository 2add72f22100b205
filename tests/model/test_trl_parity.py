"""``mpo train`` against TRL 1.16's DPOTrainer as the oracle, on the same tiny Qwen2.5-VL and the same
tiny Gemma 3 (fp32, CPU).

TRL 1.16 expresses MPO as ``DPOConfig(loss_type=["sigmoid", "bco_pair", "sft"],
loss_weights=[0.8, 0.2, 1.0], beta=0.1)`` with no δ and a token-mean SFT over the micro-batch, so our
side runs with ``loss.bco_delta=none`` and ``loss.sft_reduction=token``. Tokenisation matches by
construction: TRL's vision collator renders the prompt with ``add_generation_prompt=True`` and each
completion as the template's assistant turn minus the prompt (``"<text><|im_end|>\\n"``, no extra
EOS), each tokenised on its own -- what :class:`mpo.chat.ChatEncoder` does. TRL refuses precomputed
reference log-probs for vision data, so it uses a live reference; ours is precomputed. The whole set
is one batch, so sampling order cannot matter; three optimizer steps are compared, not just the first.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpo.config import load_recipe
from mpo.train.run import run_training

REPO = Path(__file__).resolve().parents[2]
PAIRS = REPO / "tests" / "fixtures" / "pairs" / "colour_pairs.jsonl"
KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def _pairs(kind: str, tmp_path: Path) -> Path:
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    rows = [r for r in rows if bool(r["images"]) == (kind == "images")][:4]
    for r in rows:
        r["images"] = [str((PAIRS.parent / p).resolve()) for p in r["images"]]
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _trl_dataset(path: Path):
    from datasets import Dataset
    from PIL import Image

    rows = []
    for r in map(json.loads, path.read_text().splitlines()):
        turn = lambda text: [{"role": "assistant", "content": [{"type": "text", "text": text}]}]
        row = {"prompt": r["messages"], "chosen": turn(r["chosen"]), "rejected": turn(r["rejected"])}
        if r["images"]:
            row["images"] = [Image.open(p).convert("RGB") for p in r["images"]]
        rows.append(row)
    return Dataset.from_list(rows)


def _run_trl(policy_dir, path: Path, out: Path) -> list[dict]:
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to="none",
        seed=0,
        bf16=False,
        gradient_checkpointing=False,
        max_length=None,
        save_strategy="no",
        loss_type=["sigmoid", "bco_pair", "sft"],
        loss_weights=[0.8, 0.2, 1.0],
        beta=0.1,
        disable_tqdm=True,
    )
    model = AutoModelForImageTextToText.from_pretrained(policy_dir)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=_trl_dataset(path),
        processing_class=AutoProcessor.from_pretrained(policy_dir),
    )
    trainer.train()
    return [h for h in trainer.state.log_history if "rewards/chosen" in h]


def _run_ours(policy_dir, path: Path, out: Path) -> list[dict]:
    recipe = load_recipe(
        REPO / "recipes" / "tiny" / "mpo_offline.yaml",
        [
            f"model.policy={policy_dir}",
            f"data.preferences={path}",
            f"run.output_dir={out}",
            "loss.bco_delta=none",
            "loss.sft_reduction=token",
            "loss.weights=[0.8,0.2,1.0]",
            "loss.beta=0.1",
            "train.per_device_batch_size=4",
            "train.gradient_accumulation_steps=1",
            "train.max_steps=3",
            "train.learning_rate=1e-3",
            "train.lr_scheduler=constant",
            "train.weight_decay=0.0",
            "train.save_steps=100",
        ],
    )
    run_training(recipe)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "rewards/chosen" in r]


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    from mpo.cli.tiny_families import save_family_policy

    return save_family_policy(tmp_path_factory.mktemp("gemma3") / "policy", "gemma3")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
@pytest.mark.parametrize("kind", ["images", "text"])
def test_first_steps_match_trl_dpo_trainer_mpo(tiny_policy_dir, request, tmp_path, kind, family):
    """Qwen2.5-VL, and a family of another build (Gemma 3: SigLIP tower, token_type_ids, its BOS in
    the template and an end-of-turn token that is not the tokenizer's EOS)."""
    policy = tiny_policy_dir if family == "qwen2_5_vl" else request.getfixturevalue("gemma3_dir")
    path = _pairs(kind, tmp_path)
    trl_rows = _run_trl(policy, path, tmp_path / "trl")
    ours = _run_ours(policy, path, tmp_path / "ours")
    assert len(trl_rows) == len(ours) == 3
    for step, (theirs, mine) in enumerate(zip(trl_rows, ours), start=1):
        for key in KEYS:
            assert mine[key] == pytest.approx(theirs[key], abs=1e-4), (step, key)
    assert ours[1]["rewards/margins"] != 0.0  # the comparison is not trivially 0 == 0 after step 1

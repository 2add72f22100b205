"""The GRPO trainer (mpo.grpo.trainer) against TRL's own GRPOTrainer on the tiny Qwen2.5-VL policy: with
the buffer off and the same groups (TRL's trainer sampling row by row as ours does, mpo.grpo.sampling)
both compute the same losses step by step and end at the same weights; with it on, a
step whose zero-signal groups were replaced trains on TRL's rows (the current batch's own and earlier
batches' rows of non-zero advantage, drawn ones) joined into one batch, each with the log-probs of the
policy that sampled it, and its loss is TRL's loss of that batch."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mpo.cli.tiny import ASSETS
from mpo.config.grpo import SsbConfig
from mpo.grpo.rewards import completion_text
from mpo.grpo.rows import join_rows, split_rows


def length_if_red(prompts, completions, answer, **columns):
    """A reward with signal for the red prompts only (the others' groups are all 0)."""
    return [float(len(completion_text(c))) if a == "red" else 0.0 for c, a in zip(completions, answer)]


length_if_red.name, length_if_red.weight = "length", 1.0


def _data():
    from datasets import Dataset
    from PIL import Image

    rows = [json.loads(line) for line in (ASSETS / "demo" / "prompts.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["prompt_id"] in ("red-0", "red-1", "green-0", "green-1")]
    return Dataset.from_list([{"prompt": r["messages"], "answer": r["answer"], "prompt_id": r["prompt_id"],
                               "images": [Image.open(ASSETS / "demo" / p).convert("RGB") for p in r["images"]]}
                              for r in rows])


def _recording(base):
    class Recording(base):
        """Records each micro-step's loss, the weights it started from and the batch it trained on."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.record.append((copy.deepcopy(model.state_dict()), inputs))
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.losses.append(loss.item())
            return loss

    return Recording


def _trainer(cls, policy_dir, out, steps: int, **kwargs):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import GRPOConfig

    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
                      beta=0.01, loss_type="grpo", report_to="none", use_cpu=True, bf16=False, save_strategy="no",
                      seed=0, max_steps=steps, learning_rate=1e-2, logging_steps=1, reward_weights=[1.0])
    model = AutoModelForImageTextToText.from_pretrained(policy_dir, dtype=torch.float32)
    trainer = cls(model=model, args=args, train_dataset=_data(), processing_class=AutoProcessor.from_pretrained(policy_dir),
                  **kwargs)
    trainer.record, trainer.losses = [], []
    return trainer


def test_losses_equal_trl_without_the_buffer(tiny_policy_dir, tmp_path):
    from trl import GRPOTrainer

    from mpo.grpo.sampling import RowSeededGeneration
    from mpo.grpo.trainer import MpoGRPOTrainer

    class TrlSampledPerRow(RowSeededGeneration, GRPOTrainer):
        """TRL's trainer with our sampling only: the same groups; TRL's rewards, advantages and loss."""

    ours = _trainer(_recording(MpoGRPOTrainer), tiny_policy_dir, tmp_path / "ours", 3, components=[length_if_red],
                    ssb=SsbConfig(enabled=False))
    ours.train()
    trl = _trainer(_recording(TrlSampledPerRow), tiny_policy_dir, tmp_path / "trl", 3, reward_funcs=[length_if_red])
    trl.train()
    # on-policy GRPO: a group's advantages cancel in the loss's value (ratio 1), the KL term does not
    assert len(ours.losses) == 3 and ours.losses[0] == 0 and any(abs(x) > 1e-5 for x in ours.losses)
    assert ours.losses == pytest.approx(trl.losses, abs=1e-5)
    start = ours.record[0][0]
    assert max((ours.model.state_dict()[k] - start[k]).abs().max().item() for k in start) > 1e-3  # it trained
    for (name, a), b in zip(ours.model.state_dict().items(), trl.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    logged = [row for row in ours.state.log_history if "loss" in row]
    assert all("reward/length" in row and "ssb/effective_fraction" in row for row in logged)
    assert {row["ssb/zero_signal_groups"] for row in logged} <= {0.0, 1.0, 2.0}


def _key(row: dict) -> list[int]:
    return row["completion_ids"][row["completion_mask"].bool()].tolist()


def test_replaced_groups_train_on_trl_rows_with_trl_loss(tiny_policy_dir, tmp_path):
    from trl import GRPOTrainer

    from mpo.grpo.trainer import MpoGRPOTrainer

    class Raw(GRPOTrainer):  # below MpoGRPOTrainer: TRL's own batches, before the buffer
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            self.raw.append(out)
            return out

    class Ours(MpoGRPOTrainer, Raw):
        pass

    trainer = _trainer(_recording(Ours), tiny_policy_dir, tmp_path / "ours", 4, components=[length_if_red],
                       ssb=SsbConfig(capacity=64, max_age=4))
    trainer.raw = []
    trainer.train()
    logged = [row for row in trainer.state.log_history if "loss" in row]
    step = next(i for i, row in enumerate(logged) if row["ssb/replayed_groups"] > 0)
    assert logged[step]["ssb/effective_fraction"] > 0 and logged[step]["ssb/buffer_size"] > 0
    earlier = [(sampled, row) for sampled, batch in enumerate(trainer.raw[:step]) for row in split_rows(batch)
               if abs(row["advantages"]) > 1e-6]
    weights, batch = trainer.record[step]
    now = split_rows(batch)
    expected, replayed = [], []
    for i, (row, raw) in enumerate(zip(now, split_rows(trainer.raw[step]))):
        if torch.equal(row["advantages"], raw["advantages"]) and _key(row) == _key(raw):
            expected.append(raw)  # a row of this batch, kept
        else:  # a replayed row: one of an earlier batch with signal, carried as it was
            match = [(sampled, old) for sampled, old in earlier
                     if _key(old) == _key(row) and torch.equal(old["advantages"], row["advantages"])]
            assert match, f"row {i} is neither this batch's nor an earlier one's"
            expected.append(match[0][1])
            replayed.append(match[0])
    assert replayed
    oracle = _trainer(GRPOTrainer, tiny_policy_dir, tmp_path / "oracle", 1, reward_funcs=[length_if_red])
    pad = oracle.processing_class.tokenizer.pad_token_id
    # every row carries the log-probs of the policy that sampled it (the weights of its own step), so
    # TRL's clipped ratio of a replayed row is taken against that policy; this step's own rows: ratio 1
    for sampled, row in replayed + [(step, row) for row in expected if not any(row is r for _, r in replayed)]:
        oracle.model.load_state_dict(trainer.record[sampled][0])
        assert torch.allclose(_logps(oracle, join_rows([row], pad))[0], _sampling(row), rtol=0, atol=1e-5)
    oracle.model.load_state_dict(weights)
    assert any(not torch.allclose(_logps(oracle, join_rows([row], pad))[0], _sampling(row), rtol=0, atol=1e-4)
               for _, row in replayed)  # the policy moved since: a replayed row's ratio is not 1
    joined = join_rows(expected, pad)
    joined["num_items_in_batch"] = joined["completion_mask"].sum()
    with torch.no_grad():
        loss = oracle._compute_loss(oracle.model, joined).item()
    assert abs(loss) > 1e-3  # replayed rows' advantages do not cancel
    assert trainer.losses[step] == pytest.approx(loss, abs=1e-5)


def _sampling(row: dict) -> torch.Tensor:
    """A row's stored log-probs of the policy that sampled it, 0 past its completion's end."""
    return row["old_per_token_logps"] * row["completion_mask"]


def _logps(trainer, batch: dict) -> torch.Tensor:
    """Per-token log-probs of ``batch``'s completions under ``trainer``'s model, masked to 0 past each
    completion's end (TRL's forward pass)."""
    from mpo.grpo.trainer import FORWARD_FIELDS

    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad():
        logps = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, batch["completion_ids"].size(1),
                                                           **{k: batch.get(k) for k in FORWARD_FIELDS})[0]
    return logps * batch["completion_mask"]

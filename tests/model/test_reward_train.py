"""Bradley-Terry reward-model training on the tiny model, end to end through the command.

The two tiny recipes (stage 1: image pairs; stage 2: image + text-only pairs, from stage 1's
output) run once per module on the bundled colour pairs; the tests then check what they left
behind against the reward model scored directly (reward/model.py, one sequence at a time), the
saved weights against the starting ones, and the files against the layout the rest of the toolkit
reads. Everything runs on CPU with one thread.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PAIRS = REPO / "mpo" / "assets" / "demo" / "reward_pairs.jsonl"
METRIC_KEYS = {
    "step",
    "epoch",
    "loss",
    "accuracy",
    "margin",
    "chosen_score",
    "rejected_score",
    "learning_rate",
    "grad_norm",
}


def run_cli(*args: str):
    """``mpo reward train ARGS`` in process, from the repository root (recipes name their data
    relative to it)."""
    import os

    from typer.testing import CliRunner

    from mpo.cli import app

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        return CliRunner().invoke(app, ["reward", "train", *args])
    finally:
        os.chdir(cwd)


def direct_scores(model_dir: Path, pairs) -> torch.Tensor:
    """[N, 2] (chosen, rejected) scores, each sequence alone through ``RewardModel.forward``."""
    from transformers import AutoProcessor

    from mpo.chat import ChatEncoder
    from reward.model import RewardModel

    model = RewardModel.from_pretrained(model_dir)
    encoder = ChatEncoder(AutoProcessor.from_pretrained(model_dir))
    out = []
    with torch.no_grad():
        for pair in pairs:
            row = []
            for response in (pair.chosen, pair.rejected):
                encoded = encoder.encode_response(pair.messages, pair.images, response)
                ids = torch.tensor([encoded.input_ids])
                types = (ids == model.config.image_token_id).long()
                row.append(float(model(ids, torch.ones_like(ids), mm_token_type_ids=types, **encoded.vision)))
            out.append(row)
    return torch.tensor(out)


def accuracy(scores: torch.Tensor) -> float:
    return float((scores[:, 0] > scores[:, 1]).float().mean())


def saved_scores(stage_dir: Path, when: str) -> torch.Tensor:
    rows = [json.loads(line) for line in (stage_dir / "pair_scores.jsonl").read_text().splitlines()]
    return torch.tensor([[r[f"chosen_{when}"], r[f"rejected_{when}"]] for r in rows])


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    state.update(load_file(str(folder / "value_head.safetensors")))
    return state


@pytest.fixture(scope="module")
def demo_pairs():
    from mpo.data import load_preferences

    return load_preferences(PAIRS).records


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_reward_dir):
    """Both tiny recipes run through the command; returns folders, outputs and wall times."""
    out = tmp_path_factory.mktemp("reward_train")
    runs = {}
    for stage, run_dir, init in (("stage1", "s1", tiny_reward_dir), ("stage2", "s2", out / "s1" / "stage1")):
        start, cpu = time.perf_counter(), time.process_time()
        result = run_cli(
            f"recipes/tiny/reward_{stage}.yaml",
            f"run.output_dir={out / run_dir}",
            f"reward_train.init_from={init}",
        )
        assert result.exit_code == 0, result.output + repr(result.exception)
        runs[stage] = {
            "output": result.output,
            "wall_s": time.perf_counter() - start,
            "cpu_s": time.process_time() - cpu,
        }
    return {"init": tiny_reward_dir, "s1": out / "s1", "s2": out / "s2", "runs": runs}


def test_training_raises_accuracy_from_chance(trained, demo_pairs):
    image_pairs = [p for p in demo_pairs if p.images]
    before = direct_scores(trained["init"], image_pairs)  # the untrained tiny RM, scored directly
    assert 0.25 <= accuracy(before) <= 0.75
    s1 = json.loads((trained["s1"] / "stage1" / "done.json").read_text())
    s2 = json.loads((trained["s2"] / "stage2" / "done.json").read_text())
    assert s1["before"]["accuracy"] == pytest.approx(accuracy(before))
    assert s1["pairs"] == len(image_pairs) == s1["multimodal_pairs"]
    assert s2["pairs"] == len(demo_pairs) > s2["multimodal_pairs"]
    assert s1["after"]["accuracy"] >= 0.9
    assert s2["after"]["accuracy"] >= 0.9
    assert accuracy(direct_scores(trained["s2"] / "final", demo_pairs)) >= 0.9
    # Both stages in a CPU-minute (one thread; process time, so a busy machine does not fail it),
    # model loading and the before/after scoring included.
    assert sum(run["cpu_s"] for run in trained["runs"].values()) < 60
    assert "stage1: 128 pairs (128 with images)" in trained["runs"]["stage1"]["output"]


def test_saved_scores_match_direct_scoring(trained, demo_pairs):
    """Stage 1's trained model, as saved, scores what training measured (the batched pair forward
    with images encoded once equals one-sequence-at-a-time scoring); stage 2 starts from it."""
    s1_dir = trained["s1"] / "stage1"
    image_pairs = [p for p in demo_pairs if p.images]
    torch.testing.assert_close(
        saved_scores(s1_dir, "after"), direct_scores(s1_dir, image_pairs), atol=1e-4, rtol=1e-4
    )
    s2_dir = trained["s2"] / "stage2"
    torch.testing.assert_close(
        saved_scores(s2_dir, "before"), direct_scores(s1_dir, demo_pairs), atol=1e-4, rtol=1e-4
    )
    assert json.loads((s2_dir / "done.json").read_text())["init_from"] == str(s1_dir)
    where = [json.loads(line)["where"] for line in (s2_dir / "pair_scores.jsonl").read_text().splitlines()]
    assert where == [f"{PAIRS}:{n}" for n in range(1, len(demo_pairs) + 1)]  # recipe paths are made absolute


def test_frozen_vision_unchanged_trained_parts_changed(trained):
    start = tensors(trained["init"])
    for folder in (trained["s1"] / "stage1", trained["s2"] / "stage2"):
        end = tensors(folder)
        assert start.keys() == end.keys()
        for name, value in start.items():
            frozen = name.startswith(("visual.patch_embed", "visual.blocks", "lm_head"))
            same = torch.equal(value, end[name])
            assert same == frozen, (
                f"{folder.name}: {name} {'changed though frozen' if frozen else 'did not change'}"
            )
        assert any(n.startswith("visual.merger") for n in start)  # the projector trains


def test_output_folders_load(trained):
    from transformers import AutoProcessor

    from reward.model import RewardModel

    for folder in (
        trained["s1"] / "stage1",
        trained["s1"] / "final",
        trained["s2"] / "stage2",
        trained["s2"] / "final",
    ):
        assert isinstance(RewardModel.from_pretrained(folder), RewardModel)
        AutoProcessor.from_pretrained(folder)
    for name in ("model.safetensors", "value_head.safetensors", "config.json"):
        assert (trained["s2"] / "final" / name).read_bytes() == (trained["s2"] / "stage2" / name).read_bytes()
    config = (trained["s1"] / "config.yaml").read_text()
    assert "reward_train:" in config and str(trained["init"]) in config
    assert not (trained["s1"] / "stage1" / "checkpoints").exists()


def test_metrics_file_has_every_key(trained):
    for folder, stage in ((trained["s1"], "stage1"), (trained["s2"], "stage2")):
        lines = [json.loads(line) for line in (folder / stage / "metrics.jsonl").read_text().splitlines()]
        done = json.loads((folder / stage / "done.json").read_text())
        assert len(lines) == done["steps"] // 4  # logging_steps: 4
        for line in lines:
            assert METRIC_KEYS <= line.keys(), METRIC_KEYS - line.keys()
            assert 0.0 <= line["accuracy"] <= 1.0
            assert line["margin"] == pytest.approx(line["chosen_score"] - line["rejected_score"], abs=1e-3)
        assert lines[-1]["accuracy"] > lines[0]["accuracy"] or lines[-1]["loss"] < lines[0]["loss"]


def test_rerun_skips_finished_stages(trained):
    done = trained["s1"] / "stage1" / "done.json"
    stamp = (done.stat().st_mtime_ns, (trained["s1"] / "stage1" / "model.safetensors").stat().st_mtime_ns)
    result = run_cli(
        "recipes/tiny/reward_stage1.yaml",
        f"run.output_dir={trained['s1']}",
        f"reward_train.init_from={trained['init']}",
    )
    assert result.exit_code == 0, result.output
    assert (
        "stage stage1: finished earlier" in result.output and "[skipped: finished earlier]" in result.output
    )
    assert stamp == (
        done.stat().st_mtime_ns,
        (trained["s1"] / "stage1" / "model.safetensors").stat().st_mtime_ns,
    )


def _write_pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"chosen": " "}, "field 'chosen' is empty"),
        ({"rejected": ""}, "field 'rejected' is empty"),
        ({"rejected": "The image is red."}, "chosen and rejected are the same response"),
        ({"images": ["images/purple_9.png"]}, "image not found"),
        ({"images": []}, "1 image part(s) but 0 image(s)"),
    ],
)
def test_bad_pair_is_an_error_naming_file_and_line(tmp_path, tiny_reward_dir, change, message):
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()[:3]]
    rows[1].update(change)
    (tmp_path / "images").symlink_to(PAIRS.parent / "images")
    data = _write_pairs(tmp_path / "pairs.jsonl", rows)
    result = run_cli(
        "recipes/tiny/reward_stage1.yaml",
        f"run.output_dir={tmp_path / 'run'}",
        f"reward_train.init_from={tiny_reward_dir}",
        f"reward_train.phases=[{{name: s, data: [{data}]}}]",
    )
    assert result.exit_code == 2
    assert f"{data}:2" in result.output and message in result.output
    assert not (tmp_path / "run" / "s" / "done.json").exists()


def test_collator_mixes_image_and_text_pairs(tiny_reward_dir, demo_pairs):
    """A batch holding pairs with and without images scores each row as the model does alone,
    whether the images are encoded once per pair or once per row."""
    from transformers import AutoProcessor

    from mpo.chat import ChatEncoder
    from reward.collate import PairCollator, PairDataset, PairwiseRewardModel
    from reward.model import RewardModel

    pairs = [demo_pairs[0], demo_pairs[-1], demo_pairs[20]]  # image, text-only, image
    assert [bool(p.images) for p in pairs] == [True, False, True]
    model = RewardModel.from_pretrained(tiny_reward_dir)
    processor = AutoProcessor.from_pretrained(tiny_reward_dir)
    dataset = PairDataset(pairs, ChatEncoder(processor))
    config = model.config
    batch = PairCollator(processor.tokenizer.pad_token_id, config.image_token_id, config.video_token_id)(
        [dataset[i] for i in range(len(pairs))]
    )
    assert batch["input_ids"].shape[0] == 6 and batch["image_grid_thw"].shape == (2, 3)
    expected = direct_scores(tiny_reward_dir, pairs)
    wrapper = PairwiseRewardModel(model).eval()
    assert wrapper.features_once  # this transformers accepts precomputed image features
    for once in (True, False):
        wrapper.features_once = once
        with torch.no_grad():
            scores = wrapper(**batch)
        torch.testing.assert_close(torch.stack(scores.chunk(2), dim=-1), expected, atol=1e-5, rtol=1e-5)


def test_bradley_terry_loss_by_hand():
    import math

    from reward.trainer import bradley_terry_loss

    loss = bradley_terry_loss(torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 1.0]))
    expected = [math.log(1 + math.exp(-1)), math.log(2), math.log(1 + math.exp(3))]
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_multi_stage_recipe_lora_checkpointing_and_wandb(tmp_path, tiny_reward_dir, monkeypatch):
    """Two stages in one recipe (the second starts from the first), LoRA with gradient
    checkpointing, and metrics logged to an offline W&B run per stage."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    out = tmp_path / "run"
    result = run_cli(
        "recipes/tiny/reward_stage1.yaml",
        f"run.output_dir={out}",
        f"reward_train.init_from={tiny_reward_dir}",
        f"reward_train.phases=[{{name: a, data: [{PAIRS}], modality: multimodal}}, "
        f"{{name: b, data: [{PAIRS}]}}]",
        "reward_train.max_steps=3",
        "reward_train.logging_steps=1",
        "reward_train.summary_pairs=8",
        "reward_train.lora={r: 4, alpha: 8}",
        "reward_train.gradient_checkpointing=true",
        "run.report_to=wandb",
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    a, b = (
        json.loads((out / "a" / "done.json").read_text()),
        json.loads((out / "b" / "done.json").read_text()),
    )
    assert (a["init_from"], b["init_from"]) == (str(tiny_reward_dir), str(out / "a"))
    assert a["steps"] == b["steps"] == 3 and a["summary_pairs"] == 8
    assert (out / "a" / "adapter" / "adapter_config.json").is_file()
    start, end = tensors(tiny_reward_dir), tensors(out / "a")
    assert not torch.equal(start["v_head.summary.weight"], end["v_head.summary.weight"])
    changed = [n for n in start if not torch.equal(start[n], end[n])]
    assert any(n.startswith("model.layers.") for n in changed)  # LoRA merged into the saved backbone
    assert not any(n.startswith(("visual.patch_embed", "visual.blocks")) for n in changed)
    assert (out / "final" / "model.safetensors").read_bytes() == (
        out / "b" / "model.safetensors"
    ).read_bytes()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2
    for run in runs:
        data = run.read_bytes()
        assert b"train/accuracy" in data and b"train/margin" in data and b"train/grad_norm" in data

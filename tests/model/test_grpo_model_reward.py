"""GRPO's reward-model component (mpo.grpo.rewards.ModelReward) on a tiny reward model: called the way
TRL's GRPOTrainer calls a reward function (the image inside the prompt's image part, the completion as an
assistant message), it gives the score ``mpo reward score`` writes for the same response."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from mpo.cli import app
from mpo.grpo.rewards import ModelReward
from reward.scorer import Scorer

RESPONSES = ["<think>It is red.</think> The square is red.", "<think>Hmm.</think> I cannot tell."]


def test_model_reward_equals_mpo_reward_score(tiny_reward_dir, tmp_path):
    picture = tmp_path / "red.png"
    Image.new("RGB", (84, 56), "red").save(picture)
    question = [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]
    rows = [{"messages": [{"role": "user", "content": question}], "images": [str(picture)], "response": r}
            for r in RESPONSES]
    source, out = tmp_path / "rows.jsonl", tmp_path / "scored.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    result = CliRunner().invoke(app, ["reward", "score", "--model", str(tiny_reward_dir), "--input", str(source),
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    expected = [json.loads(line)["reward"] for line in out.read_text(encoding="utf-8").splitlines()]

    with Image.open(picture) as opened:
        image = opened.convert("RGB")
    trl_prompt = [{"role": "user", "content": [{"type": "image", "image": image}, question[1]]}]
    component = ModelReward(Scorer(tiny_reward_dir, progress=False).score)
    got = component([trl_prompt] * 2, [[{"role": "assistant", "content": r}] for r in RESPONSES],
                    images=[[image]] * 2, completion_ids=[[0]] * 2)
    assert got == pytest.approx(expected, abs=1e-5)
    assert got[0] != got[1]  # two responses, two scores: the comparison is not between constants
    clipped = ModelReward(component.score, clip=(min(expected), min(expected)))
    assert clipped([trl_prompt], [RESPONSES[0]], images=[[image]]) == [min(expected)]

"""GRPO's hybrid reward (mpo.grpo.rewards) and group-normalised advantages (mpo.grpo.advantages): each
component pinned on responses whose verdict is known, called the way TRL's GRPOTrainer calls a reward
function, and the advantages pinned to hand-worked numbers with TRL's formula (sample std, + 1e-4)."""

from __future__ import annotations

import math

import pytest

from mpo.config import resolve
from mpo.grpo.advantages import group_advantages, has_signal, zero_signal
from mpo.grpo.rewards import (
    FormatReward,
    ModelReward,
    RuleReward,
    calibrate,
    combine,
    completion_text,
    components,
    score_prompt,
)

RIGHT = "<think>2 + 2 makes 4.</think>\nThe answer is \\boxed{4}."
WRONG = "<think>2 + 2 makes 5.</think>\nThe answer is \\boxed{5}."
NO_THINK = "2 + 2 makes 4, so the answer is \\boxed{4}."
PROMPT = [{"role": "user", "content": "What is 2 + 2?"}]


def test_rule_reward_uses_the_evaluation_rules():
    rule = RuleReward()
    got = rule([PROMPT] * 4, [RIGHT, WRONG, NO_THINK, RIGHT], answer=["4", "4", "4", None],
               completion_ids=[[1]] * 4, trainer_state=None)  # TRL's own keywords are ignored
    assert got == [1.0, 0.0, 1.0, None]  # correctness does not ask for the format; no answer: None
    # the row's choices are passed on: "(B)" names the option "4"
    assert rule([PROMPT], ["<think>.</think> The answer is (B)."], answer=["4"], choices=[["3", "4"]]) == [1.0]
    assert rule([PROMPT], ["<think>.</think> The answer is (A)."], answer=["4"], choices=[["3", "4"]]) == [0.0]


def test_format_reward_wants_think_then_an_answer():
    fmt = FormatReward()
    assert fmt([PROMPT] * 5, [RIGHT, WRONG, NO_THINK, "<think>only thinking</think>  ", "  " + RIGHT + "\n"]) \
        == [1.0, 1.0, 0.0, 0.0, 1.0]
    tagged = FormatReward(r"<think>.+?</think>\s*<answer>.+</answer>")
    assert tagged([PROMPT] * 2, ["<think>a</think><answer>4</answer>", RIGHT]) == [1.0, 0.0]


def test_conversational_completions_and_split_reasoning():
    parsed = [{"role": "assistant", "content": "The answer is \\boxed{4}.", "reasoning_content": "2 + 2 = 4"}]
    plain = [{"role": "assistant", "content": [{"type": "text", "text": NO_THINK}]}]
    assert completion_text(parsed) == "<think>\n2 + 2 = 4\n</think>\nThe answer is \\boxed{4}."
    assert completion_text(plain) == NO_THINK
    assert FormatReward()([PROMPT] * 2, [parsed, plain]) == [1.0, 0.0]
    assert RuleReward()([PROMPT] * 2, [parsed, plain], answer=["4", "4"]) == [1.0, 1.0]


def test_calibrate_clips_or_thresholds():
    assert [calibrate(s, clip=(-2.0, 3.0)) for s in (-7.5, 0.25, 3.0, 9.0)] == [-2.0, 0.25, 3.0, 3.0]
    assert [calibrate(s, threshold=1.5) for s in (1.49, 1.5, 8.0)] == [0.0, 1.0, 1.0]
    assert calibrate(-7.5) == -7.5
    with pytest.raises(ValueError):
        calibrate(1.0, clip=(0.0, 1.0), threshold=0.5)


def test_model_reward_scores_prompt_records_and_calibrates():
    seen = []

    def score(items):  # stands in for reward.scorer.Scorer.score: items in, one float each out
        seen.extend(items)
        return [10.0, -10.0, 0.5]

    image = object()  # TRL puts the image object into the prompt's image part
    prompt = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Q?"}]}]
    model = ModelReward(score, clip=(-1.0, 1.0))
    got = model([prompt] * 3, [RIGHT, WRONG, [{"role": "assistant", "content": NO_THINK}]],
                prompt_id=["p0", "p0", "p0"])
    assert got == [1.0, -1.0, 0.5]
    assert [item.response for item in seen] == [RIGHT, WRONG, NO_THINK]
    first = seen[0].prompt
    assert first.prompt_id == "p0" and first.images == [image]
    assert first.messages == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    assert prompt[0]["content"][0]["image"] is image  # TRL's prompt is left as it was
    # without image payloads in the parts, the dataset's images column is the record's
    assert score_prompt([{"role": "user", "content": [{"type": "image"}]}], ["a.png"]).images == ["a.png"]
    assert ModelReward(lambda items: [0.2, 3.0], threshold=1.0)([PROMPT] * 2, [RIGHT, WRONG]) == [0.0, 1.0]


def test_components_carry_trl_names_and_weights():
    recipe = resolve({}, ["grpo.rewards.weights.format=0.5", "grpo.rewards.model_threshold=0.0"])
    made = components(recipe.grpo.rewards, score=lambda items: [1.0] * len(items))
    assert [c.__name__ for c in made] == ["rule", "model", "format"]  # TRL logs rewards/<__name__>/mean
    assert [c.weight for c in made] == [1.0, 1.0, 0.5]
    assert made[1].threshold == 0.0 and made[1].clip is None
    no_model = resolve({}, ["grpo.rewards.weights.model=0"]).grpo.rewards
    assert [c.name for c in components(no_model)] == ["rule", "format"]  # no scorer needed
    with pytest.raises(ValueError, match="scorer"):
        components(recipe.grpo.rewards)


def test_combine_is_trls_weighted_sum_and_logs_each_part():
    parts = [RuleReward(1.0), FormatReward(weight=0.5), ModelReward(lambda items: [2.0, -1.0, 0.0], weight=2.0)]
    out = combine(parts, [PROMPT] * 3, [RIGHT, WRONG, NO_THINK], answer=["4", "4", None])
    # RIGHT: 1·1 + 0.5·1 + 2·2 = 5.5; WRONG: 1·0 + 0.5·1 + 2·(-1) = -1.5; NO_THINK: rule None (skipped), 0 + 0
    assert out.total == [5.5, -1.5, 0.0]
    assert out.parts == {"rule": [1.0, 0.0, None], "format": [1.0, 1.0, 0.0], "model": [2.0, -1.0, 0.0]}
    assert out.means() == {"reward/rule": 0.5, "reward/format": pytest.approx(2 / 3), "reward/model": 1 / 3}
    unscored = combine([RuleReward()], [PROMPT], [RIGHT], answer=[None])
    assert math.isnan(unscored.total[0]) and math.isnan(unscored.means()["reward/rule"])


def test_group_advantages_match_trls_formula():
    # group [3, 0, 0, 0]: mean 0.75; squares 2.25² + 3·0.75² = 6.75; sample std sqrt(6.75 / 3) = 1.5;
    # A = (r - 0.75) / (1.5 + 1e-4). Group [1, 1, 1, 1]: all 0.
    got = group_advantages([3, 0, 0, 0, 1, 1, 1, 1], 4)
    assert got == pytest.approx([2.25 / 1.5001] + [-0.75 / 1.5001] * 3 + [0.0] * 4, abs=1e-12)
    # batch scale: the batch's sample std over all 8 (mean 7/8; squares 2.125² + 3·0.875² + 4·0.125² = 6.875),
    # the group's mean still subtracted
    std = math.sqrt(6.875 / 7)
    assert group_advantages([3, 0, 0, 0, 1, 1, 1, 1], 4, "batch") == pytest.approx(
        [2.25 / (std + 1e-4)] + [-0.75 / (std + 1e-4)] * 3 + [0.0] * 4, abs=1e-12)
    assert group_advantages([3, 0, 0, 0], 4, "none") == [2.25, -0.75, -0.75, -0.75]
    # group [1, 0]: mean 0.5, sample std sqrt(0.5) (population std would be 0.5)
    assert group_advantages([1, 0], 2) == pytest.approx([0.5 / (math.sqrt(0.5) + 1e-4), -0.5 / (math.sqrt(0.5) + 1e-4)])
    # NaN (no component scored it): out of mean and std, advantage 0; [2, nan, 0]: mean 1, std sqrt(2)
    assert group_advantages([2, math.nan, 0], 3) == pytest.approx([1 / (math.sqrt(2) + 1e-4), 0.0, -1 / (math.sqrt(2) + 1e-4)])
    with pytest.raises(ValueError):
        group_advantages([1, 0, 1], 2)


def test_zero_signal_and_has_signal():
    assert zero_signal([0.7, 0.7, 0.7]) and zero_signal([math.nan, 1.0]) and not zero_signal([1.0, 0.0])
    tied = group_advantages([0.1] * 3, 3)  # float rounding may leave tiny values: still no signal
    assert not any(has_signal(a) for a in tied)
    assert has_signal(-0.01) and not has_signal(0.0)

"""The offline prompt filter of `mpo grpo` (grpo.ssb.filter_prompts, mpo.grpo.run.filter_pass) on the tiny
recipe's prompts and models: the prompts kept are exactly those whose sampled group rewards differ, by
samples drawn again with the same backend and seed and scored by the reward model's scorer directly; the
outcome is kept in the run folder and reused; a filter that drops every prompt stops in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpo.config import ConfigError, load_recipe

ROOT = Path(__file__).resolve().parents[2]


def _recipe(tmp_path, policy, reward, *extra):
    return load_recipe(ROOT / "recipes" / "tiny" / "grpo.yaml", [
        f"run.output_dir={tmp_path}", f"model.policy={policy}", f"model.reward_model={reward}",
        f"data.prompts={ROOT / 'mpo' / 'assets' / 'demo' / 'prompts.jsonl'}", "grpo.ssb.filter_prompts=true", *extra])


def test_filter_keeps_the_prompts_whose_rewards_differ(tmp_path, tiny_policy_dir, tiny_reward_dir, capsys):
    from mpo.data import load_prompts
    from mpo.grpo.run import FILTER_FILE, filter_pass, reward_components
    from mpo.rollout import make_backend
    from reward.items import ScoreItem
    from reward.scorer import ScoreOptions, Scorer

    recipe = _recipe(tmp_path, tiny_policy_dir, tiny_reward_dir)
    prompts = load_prompts(recipe.data.prompts).records
    g = recipe.grpo
    config = recipe.rollout.model_copy(update={"temperature": g.temperature, "top_p": g.top_p,
                                               "max_tokens": g.max_tokens})
    with make_backend(config, recipe.model, tiny_policy_dir) as backend:
        rollouts = backend.generate(prompts, num_samples=g.num_generations, seed=recipe.rollout.seed)
    by_id = {p.prompt_id: p for p in prompts}
    scores = Scorer(tiny_reward_dir, ScoreOptions.for_rounds(recipe.model)).score(
        [ScoreItem(by_id[r.prompt_id], r.response, r.prompt_id) for r in rollouts])
    ordered = sorted(scores)
    threshold = (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2  # half the samples pass
    passed = {}  # rule and format are 0 for a random policy: the sum is the thresholded score
    for rollout, score in zip(rollouts, scores):
        passed.setdefault(rollout.prompt_id, set()).add(score >= threshold)
    expected = [p.prompt_id for p in prompts if len(passed[p.prompt_id]) == 2]
    recipe = _recipe(tmp_path, tiny_policy_dir, tiny_reward_dir, f"grpo.rewards.model_threshold={threshold!r}")
    kept = filter_pass(recipe, prompts, reward_components(recipe), tmp_path)
    assert [p.prompt_id for p in kept] == expected
    assert 0 < len(expected) < len(prompts)  # the case filters something and keeps something
    line = f"filter_prompts: kept {len(expected)} of {len(prompts)} prompts; dropped {len(prompts) - len(expected)}"
    assert line in capsys.readouterr().out
    stamp = (tmp_path / FILTER_FILE).stat().st_mtime_ns
    assert [p.prompt_id for p in filter_pass(recipe, prompts, reward_components(recipe), tmp_path)] == expected
    assert (tmp_path / FILTER_FILE).stat().st_mtime_ns == stamp  # read back, not sampled again


def test_a_filter_that_drops_every_prompt_is_one_line(tmp_path, tiny_policy_dir, tiny_reward_dir):
    from mpo.data import load_prompts
    from mpo.grpo.run import filter_pass, reward_components

    recipe = _recipe(tmp_path, tiny_policy_dir, tiny_reward_dir, "grpo.rewards.weights.model=0")
    prompts = load_prompts(recipe.data.prompts).records[:4]
    with pytest.raises(ConfigError, match="every prompt of .* was dropped"):
        filter_pass(recipe, prompts, reward_components(recipe), tmp_path)

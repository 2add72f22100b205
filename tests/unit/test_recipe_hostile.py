"""Hostile recipes: repeated keys, alias bombs and self-referring aliases, settings that make a round
useless. Each is one ConfigError naming the file, line and key, found before anything is built."""

from __future__ import annotations

import resource
import time

import pytest

from mpo.config import ConfigError, load_recipe
from mpo.config.recipe_yaml import MAX_VALUES


def _write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_repeated_section_names_both_lines(tmp_path):
    path = _write(tmp_path, "run:\n  output_dir: runs/first\nmodel:\n  dtype: float32\nrun:\n  output_dir: runs/second\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value) == (f"{path}:5: run: repeated key (first at line 1); YAML would keep only the last "
                              "silently: merge them into one")


@pytest.mark.parametrize("text, line, key, first", [
    ("train:\n  learning_rate: 1.0e-5\n  max_steps: 3\n  learning_rate: 2.0e-5\n", 4, "train.learning_rate", 2),
    ("run: {output_dir: a, output_dir: b}\n", 1, "run.output_dir", 1),  # flow style, one line
    ("reward_train:\n  stages:\n    - name: s1\n      data: [a.jsonl]\n      name: s2\n", 5,
     "reward_train.stages.0.name", 3),
])
def test_a_repeated_key_inside_a_section(tmp_path, text, line, key, first):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"recipe\.yaml:{line}: {key}: repeated key \(first at line {first}\)"):
        load_recipe(path)


def test_aliases_and_merge_keys_of_a_real_recipe_still_load(tmp_path, monkeypatch):
    """A merge key (<<) overriding a value and an alias used twice are YAML working as meant."""
    monkeypatch.chdir(tmp_path)
    good = _write(tmp_path, (
        "reward_train:\n  stages:\n"
        "    - &s1 {name: s1, data: [a.jsonl], learning_rate: 2.0e-5}\n"
        "    - {<<: *s1, name: s2, learning_rate: 1.0e-6}\n"
    ))
    stages = load_recipe(good).reward_train.stages
    assert [(s.name, s.learning_rate, s.data) for s in stages] == [
        ("s1", 2.0e-5, [str(tmp_path / "a.jsonl")]), ("s2", 1.0e-6, [str(tmp_path / "a.jsonl")])]


def _bomb(levels: int = 9, width: int = 9) -> str:
    names = [f"l{i}" for i in range(levels)]
    lines = ["run:", f"  {names[0]}: &{names[0]} [" + ", ".join(['"lol"'] * width) + "]"]
    for prev, name in zip(names, names[1:]):
        lines.append(f"  {name}: &{name} [" + ", ".join([f"*{prev}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_stops_in_well_under_a_second(tmp_path):
    """9 levels of 9 aliases: 9**9 (387 million) strings once expanded; refused from the node graph."""
    path = _write(tmp_path, _bomb())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    seconds = time.perf_counter() - start
    assert seconds < 1.0, seconds
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 50, grown_mb
    assert f"expands to more than {MAX_VALUES} values through YAML aliases (an alias bomb?)" in str(err.value)
    assert str(err.value).startswith(f"{path}:")


def test_a_value_that_contains_itself(tmp_path):
    path = _write(tmp_path, "run: &r\n  output_dir: x\n  again: *r\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml:1: run\.again: an alias to the mapping or list that holds it"):
        load_recipe(path)


def test_deep_nesting_is_one_line(tmp_path):
    path = _write(tmp_path, "run: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml: not valid YAML \(nested too deeply\)"):
        load_recipe(path)


@pytest.mark.parametrize("strategy", ["best_vs_worst", "top_k", "rule_first"])
def test_one_sample_per_prompt_can_make_no_pair(tmp_path, strategy):
    path = _write(tmp_path, f"rollout:\n  num_samples: 1\npairs:\n  strategy: {strategy}\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml: rollout\.num_samples: one sample per prompt can never make "
                                          r"a preference pair .*use 2 or more \(got 1\)"):
        load_recipe(path)
    with pytest.raises(ConfigError, match=r"<defaults>: rollout\.num_samples: one sample per prompt"):
        load_recipe(None, ["rollout.num_samples=1", f"pairs.strategy={strategy}"])
    assert load_recipe(path, ["rollout.num_samples=2"]).rollout.num_samples == 2


@pytest.mark.parametrize("relative", [False, True])
def test_an_interpolation_bomb_stops_in_well_under_a_second(tmp_path, relative):
    """OmegaConf's ${...} repeat values as aliases do: 9 levels of ten ${previous} would resolve to
    10**10 characters (about 2 GB at 8 levels, measured before the bound)."""
    lines = ["run:", '  l0: "xxxxxxxxxx"']
    for level in range(1, 10):
        ref = f".l{level - 1}" if relative else f"run.l{level - 1}"
        lines.append(f'  l{level}: "' + ("${" + ref + "}") * 10 + '"')
    path = _write(tmp_path, "\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"recipe\.yaml: run\.l\d: its interpolations \(\$\{\.\.\.\}\) resolve to "
                                          r"more than 1000000 characters and values"):
        load_recipe(path)
    assert time.perf_counter() - start < 1.0


def test_interpolations_of_a_real_recipe_still_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, "run:\n  output_dir: runs/x\n  wandb_group: ${.output_dir}-g\n"
                            "model:\n  policy: ${run.output_dir}/policy\n  reward_model: ${..run.output_dir}/rm\n")
    recipe = load_recipe(path)
    assert recipe.run.wandb_group == "runs/x-g"
    assert (recipe.model.policy, recipe.model.reward_model) == (str(tmp_path / "runs/x/policy"),
                                                                str(tmp_path / "runs/x/rm"))

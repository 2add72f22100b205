"""Recipes: defaults, overrides, and every kind of bad value failing with the key named."""

import pytest
import yaml

from mpo.config import ConfigError, Recipe, load_recipe, resolve, save_resolved


def test_defaults_are_the_published_mpo_settings():
    recipe = load_recipe(None)
    assert recipe.loss.weights == [0.8, 0.2, 1.0]
    assert recipe.loss.beta == 0.1
    assert recipe.model.min_pixels == 256 * 28 * 28 and recipe.model.max_pixels == 1280 * 28 * 28


def test_yaml_plus_overrides_and_interpolation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"output_dir": "runs/x"},
        "model": {"policy": "${run.output_dir}/policy"},
        "loss": {"beta": 0.2},
    }))
    recipe = load_recipe(path, ["loss.weights=[1.0,0.0,0.5]", "rollout.temperature=0", "train.lora.r=8"])
    assert recipe.loss.beta == 0.2
    assert recipe.loss.weights == [1.0, 0.0, 0.5]
    assert recipe.rollout.temperature == 0.0
    assert recipe.train.lora.r == 8 and recipe.train.lora.alpha == 32
    assert recipe.model.policy == str(tmp_path / "runs/x/policy")


def test_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    """Paths mean what they mean from where the command runs; model references that are no local
    path stay Hub ids (the Hugging Face convention, made unambiguous)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "policy").mkdir(parents=True)
    (tmp_path / "Qwen2").mkdir()
    cases = {
        "runs/policy": str(tmp_path / "runs/policy"),  # an existing folder is local
        "runs/nope": str(tmp_path / "runs/nope"),  # its parent exists: local, even if missing
        "./Qwen/Qwen2.5-VL-7B-Instruct": str(tmp_path / "Qwen/Qwen2.5-VL-7B-Instruct"),  # ./ forces local
        "Qwen/Qwen2.5-VL-7B-Instruct": "Qwen/Qwen2.5-VL-7B-Instruct",  # a bare org/name: a Hub id
        "Qwen2/nothing-here": str(tmp_path / "Qwen2/nothing-here"),  # parent exists: local
        "/abs/model": "/abs/model",
        "deep/er/path": str(tmp_path / "deep/er/path"),  # not org/name: local
    }
    for given, stored in cases.items():
        recipe = load_recipe(None, [f"model.policy={given}", f"train.reference_model={given}",
                                    f"reward_train.init_from={given}"])
        assert recipe.model.policy == recipe.train.reference_model == recipe.reward_train.init_from == stored
    recipe = load_recipe(None, ["data.prompts=data/p.jsonl", "data.image_root=img", "run.output_dir=out"])
    assert recipe.data.prompts == str(tmp_path / "data/p.jsonl")
    assert recipe.data.image_root == str(tmp_path / "img") and recipe.run.output_dir == str(tmp_path / "out")
    assert load_recipe(None).run.output_dir == str(tmp_path / "runs/mpo")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["loss.wieghts=[1,1,1]"], "loss.wieghts: unknown key; valid keys here: weights, beta, bco_delta, ema_decay, sft_reduction"),
        (["colour=red"], "colour: unknown key; valid keys here: run, model, data"),
        (["loss.weights=[-0.1,0.2,1.0]"], "loss.weights: weights must be >= 0"),
        (["loss.weights=[0,0,0]"], "loss.weights: at least one weight must be > 0"),
        (["loss.weights=[1,1]"], "loss.weights: needs 3 weights"),
        (["rollout.temperature=-0.5"], "rollout.temperature: Input should be greater than or equal to 0"),
        (["loss.bco_delta=sometimes"], "loss.bco_delta: Input should be 'none', 'cumulative' or 'ema'"),
        (["rollout.backend=sglang"], "rollout.backend: Input should be 'vllm' or 'hf'"),
        (["rollout.num_samples=many"], "rollout.num_samples: Input should be a valid integer"),
        (["loss.beta=0"], "loss.beta: Input should be greater than 0"),
        (["train.freeze=[vision,eyes]"], "train.freeze.1: Input should be 'vision', 'projector' or 'language'"),
        (["model.min_pixels=10000", "model.max_pixels=100"], "model: min_pixels (10000) must not exceed max_pixels"),
        (["loss.ema_decay=1.0"], "loss.ema_decay: Input should be less than 1"),
    ],
)
def test_bad_values_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_recipe(None, overrides)
    assert expected in str(err.value)
    assert str(err.value).startswith("<defaults>: ")


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("loss: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(tmp_path / "broken.yaml")
    (tmp_path / "typo.yaml").write_text("pairs:\n  stratgy: top_k\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: pairs.stratgy: unknown key; valid keys here: strategy"):
        load_recipe(tmp_path / "typo.yaml")


def test_override_that_does_not_fit_the_tree():
    with pytest.raises(ConfigError, match="overrides do not fit the recipe"):
        resolve({"reward_train": {"stages": [{"name": "s1", "data": ["a.jsonl"]}]}},
                ["reward_train.stages.0.data=[b.jsonl]"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_recipe(None, ["loss.beta"])


def test_several_problems_reported_one_per_line():
    with pytest.raises(ConfigError) as err:
        resolve({"loss": {"beta": -1, "bco_delta": "x"}})
    assert len(str(err.value).splitlines()) == 2


def test_resolved_config_is_written_and_reloads(tmp_path):
    recipe = load_recipe(None, ["loss.beta=0.3", "run.output_dir=" + str(tmp_path)])
    path = save_resolved(recipe, tmp_path)
    assert path == tmp_path / "config.yaml"
    assert load_recipe(path) == recipe
    assert isinstance(recipe, Recipe)

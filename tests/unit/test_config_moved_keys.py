"""Recipe keys that moved (launch settings into ``launch:``) or were renamed (``train.reference_logps``,
``reward_train.phases``): old names still read, with one note each on stderr; the training sections'
shared base and the one ``on_too_long`` vocabulary."""

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from mpo.config import (
    ConfigError,
    OnTooLong,
    RewardTrainConfig,
    TrainConfig,
    TrainingSection,
    current_key,
    keyed_dump,
    load_recipe,
    moved_keys,
    resolve,
    to_yaml,
)
from mpo.config.moved_keys import MOVED

REPO = Path(__file__).resolve().parents[2]
# a value each old key takes (not its default, so the move is seen)
OLD_VALUES = {
    "iterate.launch": "distributed",
    "iterate.nproc_per_node": 2,
    "iterate.nnodes": 3,
    "iterate.node_rank": 1,
    "iterate.master_addr": "10.0.0.7",
    "iterate.master_port": 29600,
    "iterate.accelerate_config": "/abs/ddp.yaml",
    "train.reference": "live",
    "reward_train.stages": [{"name": "s1", "data": ["/abs/a.jsonl"]}],
}


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    """Each test sees the notes of its own 'process'."""
    monkeypatch.setattr(moved_keys, "_noted", set())


def _get(recipe, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(recipe, section), name)


def _plain(value):
    """A setting as the recipe gave it (reward phases: their name and data)."""
    return [{"name": v.name, "data": v.data} for v in value] if isinstance(value, list) else value


def _tree(dotted: str, value) -> dict:
    section, name = dotted.split(".")
    return {section: {name: value}}


def test_every_moved_key_has_a_case():
    assert set(OLD_VALUES) == set(MOVED)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_key_in_a_recipe_file_is_read_at_its_new_place_with_one_note(old, tmp_path, capsys):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(_tree(old, OLD_VALUES[old])))
    recipe = load_recipe(path)
    assert _plain(_get(recipe, MOVED[old])) == OLD_VALUES[old]
    err = capsys.readouterr().err
    assert err == f"note: {old} is deprecated; read as {MOVED[old]} (write {MOVED[old]})\n"
    load_recipe(path)  # once per key per process
    assert capsys.readouterr().err == ""


def test_an_interpolation_naming_an_old_key_names_its_new_place(tmp_path, capsys):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"iterate": {"nnodes": 3}, "run": {"output_dir": str(tmp_path / "n${iterate.nnodes}")},
                                    "data": {"split": "${launch.nnodes}-${oc.env:MPO_NO_SUCH_VAR,x}"}}))
    recipe = load_recipe(path)
    assert (recipe.launch.nnodes, Path(recipe.run.output_dir).name, recipe.data.split) == (3, "n3", "3-x")
    assert capsys.readouterr().err == "note: iterate.nnodes is deprecated; read as launch.nnodes (write launch.nnodes)\n"


def test_old_overrides_move_and_say_so_on_stderr_only(capsys):
    recipe = load_recipe(None, ["iterate.launch=distributed", "iterate.nproc_per_node=2", "train.reference=live"])
    assert recipe.launch.mode == "distributed" and recipe.launch.nproc_per_node == 2
    assert recipe.train.reference_logps == "live"
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "note: iterate.launch is deprecated; read as launch.mode (write launch.mode)",
        "note: iterate.nproc_per_node is deprecated; read as launch.nproc_per_node (write launch.nproc_per_node)",
        "note: train.reference is deprecated; read as train.reference_logps (write train.reference_logps)",
    ]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_and_new_key_both_given_is_one_line_naming_both(old):
    new = MOVED[old]
    tree = _tree(old, OLD_VALUES[old])
    new_section, new_name = new.split(".")
    tree.setdefault(new_section, {})[new_name] = OLD_VALUES[old]
    with pytest.raises(ConfigError) as err:
        resolve(tree, source="r.yaml")
    assert str(err.value) == f"r.yaml: {old} and {new} both given; {old} is the old name of {new}: keep {new}"
    with pytest.raises(ConfigError, match=rf"^overrides: {old} and {new} both given"):
        resolve({}, [f"{old}=x", f"{new}=x"])


def test_an_old_named_override_overrides_the_files_new_key(tmp_path):
    """A recipe written with the new keys, an old command line (scripts, tests) on top of it."""
    path = tmp_path / "new.yaml"
    path.write_text(yaml.safe_dump({"launch": {"mode": "inline", "nproc_per_node": 4}}))
    recipe = load_recipe(path, ["iterate.launch=distributed"])
    assert recipe.launch.mode == "distributed" and recipe.launch.nproc_per_node == 4
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"iterate": {"launch": "distributed", "rounds": 2}}))
    recipe = load_recipe(old, ["launch.mode=inline"])
    assert recipe.launch.mode == "inline" and recipe.iterate.rounds == 2


def test_a_config_yaml_written_before_the_move_loads_and_resolves_to_new_keys(tmp_path, capsys):
    """A run folder's resolved recipe from before: every key, the moved ones at their old places."""
    recipe = load_recipe(None, ["iterate.launch=distributed", "iterate.nproc_per_node=2", "train.reference=live",
                                "reward_train.stages=[{name: s1, data: [/abs/a.jsonl]}]"])
    old = yaml.safe_load(to_yaml(recipe))
    for before, now in MOVED.items():
        (section, name), (new_section, new_name) = before.split("."), now.split(".")
        old[section][name] = old[new_section].pop(new_name)
    del old["launch"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    capsys.readouterr()
    assert load_recipe(path) == recipe
    written = yaml.safe_load(to_yaml(load_recipe(path)))
    for before in MOVED:
        section, name = before.split(".")
        assert name not in written[section]
    assert written["launch"]["mode"] == "distributed" and written["train"]["reference_logps"] == "live"
    assert [p["name"] for p in written["reward_train"]["phases"]] == ["s1"]


def test_stage_keys_hold_the_reference_setting_by_its_first_name():
    """Run folders keyed before the rename still match: keys are built from keyed_dump."""
    dump = keyed_dump(load_recipe(None, ["train.reference_logps=live"]))
    assert dump["train"]["reference"] == "live" and "reference_logps" not in dump["train"]
    assert list(dump["train"]) == [k if k != "reference_logps" else "reference" for k in TrainConfig.model_fields]


def test_current_key_names_where_an_old_key_is_now():
    assert current_key("iterate.launch") == "launch.mode"
    assert current_key("reward_train.stages.0.data") == "reward_train.phases.0.data"
    assert current_key("train.reference_model") == "train.reference_model"  # not train.reference
    assert current_key("iterate.reference") == "iterate.reference"


def test_training_sections_share_a_base_and_keep_their_defaults():
    assert issubclass(TrainConfig, TrainingSection) and issubclass(RewardTrainConfig, TrainingSection)
    assert set(TrainConfig.model_fields) & set(RewardTrainConfig.model_fields) == set(TrainingSection.model_fields)
    train, reward = TrainConfig(), RewardTrainConfig()
    assert (train.max_length, train.on_too_long, train.freeze, train.weight_decay, train.save_steps) == \
        (6144, "truncate", [], 0.05, 500)
    assert (reward.max_length, reward.on_too_long, reward.freeze, reward.weight_decay, reward.save_steps) == \
        (4096, "skip", ["vision"], 0.0, 500)
    for section in (train, reward):
        assert (section.max_steps, section.per_device_batch_size, section.gradient_accumulation_steps,
                section.lr_scheduler, section.warmup_ratio, section.max_grad_norm, section.lora,
                section.gradient_checkpointing, section.logging_steps) == (-1, 1, 1, "cosine", 0.03, 1.0, None,
                                                                            False, 1)
    assert (train.learning_rate, train.num_epochs, train.share_prompt, train.group_by_length,
            train.reference_logps, train.reference_model) == (5e-6, 1.0, True, True, "precomputed", None)
    assert (reward.init_from, reward.phases, reward.num_workers, reward.summary_pairs) == (None, [], 0, 1000)
    resolve({}, ["reward_train.save_steps=0"])  # none inside a phase
    with pytest.raises(ConfigError, match=r"train\.save_steps: Input should be greater than or equal to 1"):
        resolve({}, ["train.save_steps=0"])


def test_on_too_long_is_one_vocabulary_each_section_a_part_of_it():
    words = set(typing.get_args(OnTooLong))
    assert words == {"error", "skip", "truncate"}
    allowed = {"rollout": {"error", "skip"}, "train": {"truncate", "skip", "error"},
               "reward_train": {"skip", "error"}}
    for section, accepted in allowed.items():
        for word in words:
            if word in accepted:
                assert getattr(resolve({section: {"on_too_long": word}}), section).on_too_long == word
            else:
                with pytest.raises(ConfigError, match=rf"^<recipe>: {section}\.on_too_long: Input should be "
                                                      r"'error' or 'skip' \(got 'truncate'\)$"):
                    resolve({section: {"on_too_long": word}})


def test_every_shipped_recipe_prints_through_mpo_config_without_a_note():
    recipes = sorted(p.relative_to(REPO) for p in (REPO / "recipes").rglob("*.yaml")
                     if "accelerate" not in p.parts and "sweeps" not in p.parts)
    assert len(recipes) >= 9
    mpo = Path(sys.executable).parent / "mpo"
    for path in recipes:
        result = subprocess.run([str(mpo), "config", str(path)], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, (path, result.stderr)
        assert result.stderr == "", (path, result.stderr)
        assert "launch" in yaml.safe_load(result.stdout)


def test_mpo_config_with_old_overrides_prints_new_keys_and_notes_on_stderr():
    mpo = Path(sys.executable).parent / "mpo"
    result = subprocess.run([str(mpo), "config", "iterate.launch=distributed", "reward_train.stages=[]"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["launch"]["mode"] == "distributed" and "launch" not in printed["iterate"]
    assert "phases" in printed["reward_train"] and "stages" not in printed["reward_train"]
    assert result.stderr.splitlines() == [
        "note: iterate.launch is deprecated; read as launch.mode (write launch.mode)",
        "note: reward_train.stages is deprecated; read as reward_train.phases (write reward_train.phases)",
    ]


def test_a_sweep_grid_over_an_old_key_still_plans(tmp_path):
    from mpo.cli.sweep import plan

    sweep = plan(REPO / "recipes" / "tiny" / "mpo_offline.yaml", ["train.reference=precomputed,live"],
                 [f"run.output_dir={tmp_path / 'sweep'}"])
    assert [point.name for point in sweep.points] == ["reference=precomputed", "reference=live"]
    assert [point.values for point in sweep.points] == [{"train.reference": "precomputed"},
                                                        {"train.reference": "live"}]
    assert [point.recipe.train.reference_logps for point in sweep.points] == ["precomputed", "live"]

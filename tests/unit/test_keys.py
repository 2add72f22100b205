"""One home for keys (mpo.keys): every entry point keys a training run from the same settings list
through the same function, and asks "is it finished?" the same way. A setting that changes results
invalidates reuse through each of them (mpo train, mpo train --round N and mpo iterate, mpo sweep, mpo
reward train); a logging or saving setting does not, also against keys an earlier version wrote with
such settings in them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpo import keys
from mpo.config import load_recipe
from mpo.errors import RunFolderError
from mpo.records import Prompt

CHANGES_RESULTS = {"train": ["loss.beta=0.3", "train.learning_rate=1e-4", "train.max_length=512"],
                   "reward": ["reward_train.weight_decay=0.1", "reward_train.max_length=512", "run.seed=3"]}
CHANGES_NOTHING = {"train": ["train.logging_steps=7", "train.save_steps=9", "run.report_to=wandb",
                             "run.wandb_group=other", "data.special_tokens=error"],
                   "reward": ["reward_train.logging_steps=7", "reward_train.save_steps=9", "reward_train.num_workers=2",
                              "reward_train.summary_pairs=5", "run.report_to=wandb"]}


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """A policy, a reward model, one preference pair and one prompt (no weights: keys read files only)."""
    monkeypatch.chdir(tmp_path)
    for name in ("policy", "reward"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"name": name}))
        (tmp_path / name / "model.safetensors").write_bytes(name.encode() * 8)
    row = {"prompt_id": "p", "messages": [{"role": "user", "content": "2+2?"}], "images": [],
           "chosen": "4", "rejected": "5"}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(row) + "\n")
    return tmp_path


def _recipe(*overrides: str):
    return load_recipe(None, ["model.policy=policy", "model.reward_model=reward", "data.preferences=pairs.jsonl",
                              "run.output_dir=run", "reward_train.init_from=reward",
                              "reward_train.phases=[{name: p1, data: [pairs.jsonl]}]", *overrides])


def _prompts() -> list[Prompt]:
    return [Prompt("p", [{"role": "user", "content": "2+2?"}], [])]


def _mpo_train(recipe) -> dict:
    from mpo.train.run import training_key

    return training_key(recipe, [])


def _round(recipe) -> dict:
    """mpo iterate's and mpo train --round N's key of a round's training (both: stage_train -> layout.check)."""
    from mpo.rounds.layout import RoundLayout

    return RoundLayout(recipe).train_key(0, _prompts())


def _reward_phase(recipe) -> dict:
    from reward.train import phase_key

    return phase_key(recipe, recipe.reward_train.phases[0], Path("reward"))


ENTRY_POINTS = {"mpo train": (_mpo_train, "train"), "iterate / train --round": (_round, "train"),
                "reward train": (_reward_phase, "reward")}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_results_settings_change_the_key_logging_settings_do_not(folder, entry):
    make, kind = ENTRY_POINTS[entry]
    key = make(_recipe())
    for setting in CHANGES_RESULTS[kind]:
        assert make(_recipe(setting)) != key, setting
    for setting in CHANGES_NOTHING[kind]:
        assert make(_recipe(setting)) == key, setting
    flat = json.dumps(key)
    assert "logging_steps" not in flat and "save_steps" not in flat and "wandb" not in flat


def test_mpo_train_and_the_rounds_key_the_same_settings(folder):
    """One settings list (TRAIN_SETTINGS) through one function: the settings entries of mpo train's key
    and of a round's training key are the same, model references by content in both."""
    from mpo.models import folder_identity

    recipe = _recipe("train.reference_model=reward", "train.learning_rate=2e-5")
    own, rounds = _mpo_train(recipe), _round(recipe)
    assert {k: v for k, v in own.items() if "." in k} == {k: v for k, v in rounds.items() if "." in k}
    assert own["train.reference_model"] == folder_identity("reward")
    assert {name.split(".")[0] for name in own if "." in name} == {"loss", "train", "model", "run"}


def test_stage_keys_hold_no_setting_that_changes_no_result(folder):
    from mpo.rounds.layout import RoundLayout

    layout, prompts = RoundLayout(_recipe()), _prompts()
    before = [make(0, prompts) for make in (layout.rollout_key, layout.score_key, layout.pairs_key)]
    layout = RoundLayout(_recipe(*CHANGES_NOTHING["train"]))
    assert [make(0, prompts) for make in (layout.rollout_key, layout.score_key, layout.pairs_key)] == before
    layout = RoundLayout(_recipe("rollout.temperature=1.1"))
    assert layout.rollout_key(0, prompts) != before[0] and layout.score_key(0, prompts) != before[1]


def _finish(recipe, key: dict) -> Path:
    """A run folder as mpo train leaves it: run_key.json, policy/, then mpo_state.json."""
    out = Path(recipe.run.output_dir)
    (out / "policy").mkdir(parents=True)
    (out / "policy" / "config.json").write_text("{}")
    keys.write_key(out / keys.KEY_FILE, key)
    (out / keys.TRAINED_FILE).write_text('{"delta": {}, "global_step": 1}')
    return out


def test_sweep_and_mpo_train_ask_the_one_finished_test(folder):
    from mpo.cli.sweep import Point, is_finished
    from mpo.train.run import _load_pairs as load_pairs
    from mpo.train.run import is_trained, training_key

    recipe = _recipe()
    pairs = load_pairs(recipe, Path("run"), rounds=True).records
    out = _finish(recipe, training_key(recipe, pairs))

    def point(*overrides):
        changed = _recipe(*overrides)
        return Point("p", {}, list(overrides), out, changed)

    assert keys.finished(out) and is_trained(recipe) and is_finished(point())
    for setting in CHANGES_RESULTS["train"]:
        assert not is_finished(point(setting)), setting
    for setting in CHANGES_NOTHING["train"]:
        assert is_finished(point(setting)), setting
    (out / "policy" / "config.json").unlink()  # killed while saving: not finished, whatever the key says
    assert not keys.finished(out) and not is_finished(point())


def test_a_key_written_with_logging_settings_is_accepted_and_rewritten(folder, capsys):
    """Keys of today's format that an earlier version wrote with train.logging_steps (and, in rounds,
    train.save_steps) in them keep their runs: accepted while the rest is as it was, rewritten without."""
    from mpo.rounds.layout import RoundLayout
    from mpo.train.run import _load_pairs as load_pairs
    from mpo.train.run import is_trained, training_key

    recipe = _recipe("train.logging_steps=4")
    pairs = load_pairs(recipe, Path("run"), rounds=True).records
    out = _finish(recipe, training_key(recipe, pairs, earlier=True))
    assert "train.logging_steps" in keys.read_key(out / keys.KEY_FILE)
    assert not is_trained(_recipe("loss.beta=0.3"))
    assert is_trained(_recipe("train.logging_steps=5"))  # logging is not part of the key: accepted, rewritten
    assert "logging settings in it) rewritten without them" in capsys.readouterr().out
    assert keys.read_key(out / keys.KEY_FILE) == keys.stamped(training_key(recipe, pairs))

    layout, prompts = RoundLayout(recipe), _prompts()
    train_key = layout.file(0, "train") / keys.KEY_FILE
    keys.write_key(train_key, layout.train_key(0, prompts, earlier=True))
    with pytest.raises(RunFolderError, match=r"made with other settings \(loss\.beta: 0\.1 -> 0\.3\)"):
        RoundLayout(_recipe("loss.beta=0.3")).check(0, "train", prompts)
    RoundLayout(_recipe("train.save_steps=3")).check(0, "train", prompts)
    assert keys.read_key(train_key) == keys.stamped(layout.train_key(0, prompts))


class _Runner:
    """A stage runner that must not be asked to train (the round's training finished)."""

    def train(self, *args):
        raise AssertionError("finished training was not reused")


def test_a_rounds_finished_training_is_reused_by_iterate_and_train_round_alike(folder):
    """mpo iterate (run_round) and mpo train --round N (train_round) both ask stage_train: a finished round
    is reused while only logging settings changed, refused when a setting that changes results did."""
    from mpo.rounds.driver import stage_train
    from mpo.rounds.layout import RoundLayout

    layout, prompts = RoundLayout(_recipe()), _prompts()
    train_dir = _finish(load_recipe(None, [f"run.output_dir={layout.file(0, 'train')}"]), layout.train_key(0, prompts))
    for setting in CHANGES_NOTHING["train"]:
        assert stage_train(RoundLayout(_recipe(setting)), 0, prompts, 1, _Runner()) == train_dir / "policy"
    for setting in CHANGES_RESULTS["train"]:
        with pytest.raises(RunFolderError, match=f"{train_dir}: made with other settings"):
            stage_train(RoundLayout(_recipe(setting)), 0, prompts, 1, _Runner())

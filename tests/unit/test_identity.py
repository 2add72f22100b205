"""Identities by content (mpo.keys, mpo.models.folder_identity): a copied, moved or touched file
keeps its identity, a changed one does not, whatever its times say; the digest cache never answers
for a file that is not the one it read; every key (rounds, mpo train, reward stages, the reference
log-probs) takes models from the one folder_identity."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mpo import keys as identity
from mpo.errors import RunFolderError
from mpo.keys import check_key, key_path, prompts_identity, records_digest
from mpo.models import folder_identity, legacy_folder_identity
from mpo.records import Prompt


def _model(folder: Path, weights: bytes = b"w" * 64) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "x"}')
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "value_head.safetensors").write_bytes(b"v" * 16)
    return folder


def _same_time(path: Path, stamp: int) -> None:
    os.utime(path, ns=(stamp, stamp))


def test_identity_is_content_not_path_or_time(tmp_path):
    first = _model(tmp_path / "a")
    copied = tmp_path / "elsewhere" / "b"
    shutil.copytree(first, copied)  # new paths, inodes; times kept
    assert folder_identity(first) == folder_identity(copied)
    assert str(tmp_path) not in json.dumps(folder_identity(first))
    later = os.stat(first / "model.safetensors").st_mtime_ns + 10**10
    _same_time(first / "model.safetensors", later)  # touched: same bytes
    assert folder_identity(first) == folder_identity(copied)
    assert set(folder_identity(first)["files"]) == {"config.json", "model.safetensors", "value_head.safetensors"}


def test_changed_bytes_at_the_same_size_and_time_are_seen(tmp_path):
    folder = _model(tmp_path / "m")
    weights = folder / "model.safetensors"
    before = folder_identity(folder)  # now in the cache
    stamp = weights.stat().st_mtime_ns
    weights.write_bytes(b"x" * 64)
    _same_time(weights, stamp)  # size and modification time as they were
    after = folder_identity(folder)
    assert after["files"]["model.safetensors"] != before["files"]["model.safetensors"]
    assert after["files"]["config.json"] == before["files"]["config.json"]


def test_cache_is_kept_beside_the_run_and_trusted_only_for_the_same_file(tmp_path):
    run, model = tmp_path / "run", _model(tmp_path / "m")
    run.mkdir()
    with identity.kept_beside(run) as cache:
        expected = folder_identity(model)
        assert cache.hashed == 3
        identity.save_digests()
    stored = json.loads((run / identity.CACHE_NAME).read_text())["files"]
    assert set(stored) == {"../m/config.json", "../m/model.safetensors", "../m/value_head.safetensors"}
    with identity.kept_beside(run) as cache:  # a later run: nothing read again
        assert folder_identity(model) == expected and cache.hashed == 0
        cache.dirty = True
        identity.save_digests()
    # the run and the model copied elsewhere: the entries name other files (inodes), so all are read again
    shutil.copytree(tmp_path, tmp_path.parent / "copy", symlinks=True)
    with identity.kept_beside(tmp_path.parent / "copy" / "run") as cache:
        assert folder_identity(tmp_path.parent / "copy" / "m") == expected and cache.hashed == 3


def test_a_finished_run_writes_no_cache(tmp_path):
    run, model = tmp_path / "run", _model(tmp_path / "m")
    run.mkdir()
    with identity.kept_beside(run):
        folder_identity(model)  # keys computed, none written
    assert not (run / identity.CACHE_NAME).exists()


def test_outer_run_keeps_serving_inner_commands(tmp_path):
    with identity.kept_beside(tmp_path / "run") as outer, identity.kept_beside(tmp_path / "run/round_000/train") as inner:
        assert inner is outer


def test_prompts_by_image_content(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "red.png").write_bytes(b"red")
        (tmp_path / folder / "blue.png").write_bytes(b"blue")

    def prompts(folder):
        return [Prompt(f"p_{c}", [{"role": "user", "content": "?"}], [str(tmp_path / folder / f"{c}.png")])
                for c in ("red", "blue")]

    assert prompts_identity(prompts("a")) == prompts_identity(prompts("b"))
    assert records_digest(prompts("a")) == records_digest(prompts("b"))
    (tmp_path / "b" / "blue.png").write_bytes(b"BLUE")
    old, new = prompts_identity(prompts("a")), prompts_identity(prompts("b"))
    assert old["digest"] != new["digest"]
    assert [k for k in old["items"] if old["items"][k] != new["items"][k]] == ["p_blue"]


def test_changed_model_is_named_with_its_files(tmp_path):
    out = tmp_path / "scored.jsonl"
    model = _model(tmp_path / "reward")
    check_key(out, {"model.reward_model": folder_identity(model), "seed": 1}, "scored*")
    (model / "value_head.safetensors").write_bytes(b"u" * 16)
    (model / "extra.json").write_text("{}")
    with pytest.raises(RunFolderError) as err:
        check_key(out, {"model.reward_model": folder_identity(model), "seed": 1}, "scored*")
    assert (f"{out}: made with other settings (model.reward_model: files changed: value_head.safetensors, "
            "files added: extra.json); rerun with the earlier settings, or delete scored* to redo it with these"
            ) == str(err.value)


def test_earlier_key_format_is_rewritten_when_its_inputs_are_as_they_were(tmp_path, capsys):
    out, model = tmp_path / "rollouts.jsonl", _model(tmp_path / "policy")
    key_path(out).write_text(json.dumps({"policy": legacy_folder_identity(model), "seed": 1}))
    check_key(out, {"policy": folder_identity(model), "seed": 1}, "rollouts*",
              legacy=lambda: {"policy": legacy_folder_identity(model), "seed": 1})
    assert json.loads(key_path(out).read_text()) == {"key_format": identity.KEY_FORMAT,
                                                     "policy": folder_identity(model), "seed": 1}
    assert "rewritten by content" in capsys.readouterr().out


def test_earlier_key_format_whose_inputs_changed_is_refused(tmp_path):
    out, model = tmp_path / "rollouts.jsonl", _model(tmp_path / "policy")
    key_path(out).write_text(json.dumps({"policy": legacy_folder_identity(model), "seed": 1}))
    later = os.stat(model / "config.json").st_mtime_ns + 10**10
    _same_time(model / "config.json", later)  # the earlier format cannot tell a touch from a change
    with pytest.raises(RunFolderError, match=r"made by an earlier mpo.*\(policy changed\); rerun it where it was "
                                             r"made .*or delete rollouts\* to redo it"):
        check_key(out, {"policy": folder_identity(model), "seed": 1}, "rollouts*",
                  legacy=lambda: {"policy": legacy_folder_identity(model), "seed": 1})


def test_every_key_takes_models_from_folder_identity(tmp_path, monkeypatch):
    """mpo train's key and the reference log-probs' fingerprint follow a model's content, not its path."""
    from mpo.config import load_recipe
    from mpo.train.run import reference_fingerprint, training_key

    first = _model(tmp_path / "one" / "policy")
    shutil.copytree(first, tmp_path / "two" / "policy")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("model: {policy: ./policy}\ndata: {preferences: pairs.jsonl}\n")
    recipes = []
    for where in ("one", "two"):
        monkeypatch.chdir(tmp_path / where)
        recipes.append(load_recipe(recipe_file))
    assert recipes[0].model.policy != recipes[1].model.policy
    assert training_key(recipes[0], []) == training_key(recipes[1], [])
    assert reference_fingerprint(recipes[0]) == reference_fingerprint(recipes[1])
    (tmp_path / "two" / "policy" / "model.safetensors").write_bytes(b"z" * 64)
    assert training_key(recipes[0], []) != training_key(recipes[1], [])
    assert reference_fingerprint(recipes[0]) != reference_fingerprint(recipes[1])


def test_damaged_key_is_one_line(tmp_path):
    out = tmp_path / "pairs.jsonl"
    key_path(out).write_text("[1, 2")
    with pytest.raises(RunFolderError, match=r"pairs\.key\.json: not a readable stage key .*delete pairs\* to redo it"):
        check_key(out, {"seed": 1}, "pairs*")

"""Recipe keys that moved or were renamed, still read from their old names.

:data:`MOVED` maps each old key to its new one. A recipe tree that gives an old key (a YAML file, the
overrides, a run folder's ``config.yaml`` written before the move) has it put at the new place before
validation, and stderr says so in one line, once per key per process (stdout, e.g. ``mpo config``'s
YAML, is left alone). One tree that gives both the old and the new key is an error naming both.
"""

from __future__ import annotations

import sys

from mpo.config.recipe_yaml import INTERPOLATION, ConfigError

MOVED = {
    # launch settings: their own section (they say where stages run, not what a round does)
    "iterate.launch": "launch.mode",
    "iterate.nproc_per_node": "launch.nproc_per_node",
    "iterate.nnodes": "launch.nnodes",
    "iterate.node_rank": "launch.node_rank",
    "iterate.master_addr": "launch.master_addr",
    "iterate.master_port": "launch.master_port",
    "iterate.accelerate_config": "launch.accelerate_config",
    # one word, two meanings: iterate.reference says which policy is the reference
    "train.reference": "train.reference_logps",
    # a stage is one step of a round; reward training's steps are phases
    "reward_train.stages": "reward_train.phases",
}
_noted: set[str] = set()


def current_key(key: str) -> str:
    """The key's name now: ``key`` itself, or the new name of a moved key (or of a key under it)."""
    for old, new in MOVED.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return key


def move_keys(tree: dict, source: str) -> dict:
    """``tree`` (a recipe's sections) with every old key of :data:`MOVED` at its new place, and every
    ``${old.key}`` interpolation naming the new one; a copy, ``tree`` is left as it is. Both the old
    and the new key given: :class:`ConfigError`."""
    tree = _renamed_references(tree)
    for old, new in MOVED.items():
        old_section, old_name = old.split(".")
        new_section, new_name = new.split(".")
        section = tree.get(old_section)
        if not isinstance(section, dict) or old_name not in section:
            continue
        target = tree.get(new_section)
        if target is not None and not isinstance(target, dict):
            continue  # validation names the section that is no mapping
        tree[old_section] = section = dict(section)
        if new_section != old_section:
            tree[new_section] = dict(target or {})
        target = tree[new_section]
        if new_name in target:
            raise ConfigError(f"{source}: {old} and {new} both given; {old} is the old name of {new}: keep {new}")
        target[new_name] = section.pop(old_name)
        _note(old, new)
    return tree


def _renamed_references(value):
    """``value`` with each ``${key}`` that names a moved key (or one under it) naming its new place."""
    if isinstance(value, dict):
        return {k: _renamed_references(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed_references(v) for v in value]
    if isinstance(value, str) and "${" in value:
        def rename(match):
            key = match.group(1)
            if current_key(key) != key:
                _note(key, current_key(key))
            return "${" + current_key(key) + "}"

        return INTERPOLATION.sub(rename, value)
    return value


def _note(old: str, new: str) -> None:
    if old not in _noted:
        _noted.add(old)
        print(f"note: {old} is deprecated; read as {new} (write {new})", file=sys.stderr)


# A setting renamed after stage keys were first written keeps its first name inside keys, so that
# run folders made before still match (:func:`mpo.keys.check_key`): new name -> name in keys.
KEYED_AS = {"train.reference_logps": "train.reference"}


def keyed_dump(recipe) -> dict:
    """``recipe.model_dump(mode="json")`` with each setting of :data:`KEYED_AS` under the name stage
    keys hold it by: what stage keys are built from."""
    dump = recipe.model_dump(mode="json")
    for new, old in KEYED_AS.items():
        (section, new_name), (_, old_name) = new.split("."), old.split(".")
        dump[section] = {old_name if k == new_name else k: v for k, v in dump[section].items()}
    return dump

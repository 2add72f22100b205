"""Stage keys: what made a piece of work, kept beside it, so finished work is reused only when
nothing that changes its results has changed.

What made a stage's output is kept beside it (:func:`check_key`: ``<output stem>.key.json``, written
before the work starts): the models' identities, the input's content digest and the settings that
change results. Finished or partial work made with anything else is never reused; the run stops
with one line naming what changed and what to delete.

A file is known by its size and a content digest (SHA-256), never its path or its times, so a run
copied or moved elsewhere (``cp -a``, ``mv``) keeps every key and a file touched without a change in
its bytes keeps its identity. Hashing a model's weights on every run would be slow, so digests are
kept beside the run (``RUN/.mpo-digests.json``, :func:`kept_beside`), each under the file's path
relative to the run folder with its size, modification and change times, inode and device; an entry
is used only when all of these still match, so the cache can make a run faster, never give a wrong
identity. It is written only when a stage key is written: a finished run started again writes
nothing, and a read-only copy reads back.

Keys written before identities were content-based (absolute paths and modification times) are
recognised by :data:`KEY_FORMAT`'s absence; :func:`legacy_file_stat` (and
:func:`mpo.models.legacy_folder_identity`) rebuild such a key for today's inputs, to check it as it was.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mpo.errors import RunFolderError
from mpo.records import to_dict, write_json

CACHE_NAME = ".mpo-digests.json"
KEY_FORMAT = 2  # stage keys carry "key_format": 2; keys without it are the earlier (path and mtime) format
_BLOCK = 1 << 20
KEY_FILE = "run_key.json"  # a training run's key (mpo train, a round's train/, a reward-training phase)
TRAINED_FILE = "mpo_state.json"  # mpo train writes it last, after policy/: the run finished (final δ)
PHASE_DONE_FILE = "done.json"  # a reward-training phase writes it last: the phase finished (its summary)

# What each kind of work's output is made of, beyond its inputs (models, prompts, pairs: by content).
# A bare section name is each of its settings. NOT_RESULTS are never part of a key.
MODEL_SETTINGS = ("model.dtype", "model.attn_implementation", "model.min_pixels", "model.max_pixels")
ROLLOUT_SETTINGS = ("rollout.backend", "rollout.num_samples", "rollout.temperature", "rollout.top_p",
                    "rollout.max_tokens", "rollout.seed", "rollout.max_model_len", "rollout.on_too_long",
                    *MODEL_SETTINGS, "iterate.rollout_chunk")
SCORE_SETTINGS = (*MODEL_SETTINGS, "iterate.score_chunk")
PAIRS_SETTINGS = ("pairs",)
TRAIN_SETTINGS = ("loss", "train", *MODEL_SETTINGS, "run.seed")
REWARD_TRAIN_SETTINGS = ("reward_train", *MODEL_SETTINGS, "run.seed", "data")
REF_LOGPS_SETTINGS = (*MODEL_SETTINGS, "train.max_length", "train.on_too_long")  # with the reference model
EVAL_SETTINGS = ("rollout.backend", "rollout.max_model_len", "rollout.on_too_long", *MODEL_SETTINGS)  # + eval.*
GRPO_SETTINGS = ("grpo", *MODEL_SETTINGS, "rollout.backend", "rollout.seed", "run.seed")  # mpo grpo's, + its inputs
# Logging, saving, reporting and workers: they may change between runs of one folder.
NOT_RESULTS = frozenset({"train.logging_steps", "train.save_steps", "reward_train.logging_steps",
                         "reward_train.save_steps", "reward_train.num_workers", "reward_train.summary_pairs",
                         "grpo.logging_steps", "grpo.save_steps",
                         "run.output_dir", "run.report_to", "run.wandb_project", "run.wandb_group",
                         "data.special_tokens"})  # special_tokens: escape and error make the same model


def settings(recipe, names: Sequence[str], every: bool = False) -> dict[str, Any]:
    """``{"section.key": value}`` of ``recipe``'s named settings (a bare section name: each of its
    settings), under the names keys hold them by (:func:`mpo.config.moved_keys.keyed_dump`). The
    settings in :data:`NOT_RESULTS` are left out; ``every``: kept (as keys of earlier versions held them)."""
    from mpo.config.moved_keys import keyed_dump

    dump, out = keyed_dump(recipe), {}
    for name in names:
        section, _, key = name.partition(".")
        values = {key: dump[section][key]} if key else dump[section]
        out.update({f"{section}.{k}": v for k, v in values.items()})
    return out if every else _results(out)


def finished(folder: str | os.PathLike, key: dict | None = None, legacy: Callable[[], dict] | None = None,
             earlier: Callable[[], dict] | None = None) -> bool:
    """The one test of "this training run is finished" (``mpo train``, a round's ``train/`` in ``mpo
    iterate`` and ``mpo train --round N``, a distributed follower, ``mpo sweep``, ``mpo grpo``): ``policy/``
    saved and :data:`TRAINED_FILE` written after it; with ``key``, also made with it (its :data:`KEY_FILE`,
    :func:`key_matches`). Without, the caller checked the key (:func:`check_key`) or a run it starts will."""
    folder = Path(folder)
    done = (folder / "policy" / "config.json").is_file() and (folder / TRAINED_FILE).is_file()
    if not done or key is None:
        return done
    return (folder / KEY_FILE).is_file() and key_matches(folder / KEY_FILE, key, legacy, earlier)


def _signature(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


def _hash_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


class DigestCache:
    """File digests by absolute path and stat signature; ``home`` (a run folder) keeps them on disk."""

    def __init__(self, home: str | os.PathLike | None = None):
        self.home = Path(home).absolute() if home is not None else None
        self.entries: dict[str, tuple[list[int], str]] = {}
        self.used: set[str] = set()  # the files asked about while this cache was active: what is saved
        self.dirty = False
        self.hashed = 0  # files read in this process (for tests and curiosity)
        if self.home is not None:
            self._load()

    def _load(self) -> None:
        try:
            stored = json.loads((self.home / CACHE_NAME).read_text(encoding="utf-8"))
            for rel, (signature, value) in stored.get("files", {}).items():
                self.entries[os.path.normpath(self.home / rel)] = (list(signature), str(value))
        except (OSError, ValueError, TypeError, AttributeError):
            self.entries = {}  # missing or unreadable: only an accelerator, start empty

    def digest(self, path: str | os.PathLike) -> str:
        """``"<size>:<sha256>"`` of the file at ``path``."""
        where = os.path.normpath(os.path.abspath(path))
        signature = _signature(os.stat(where))
        known = self.entries.get(where)
        self.used.add(where)
        if known is None or known[0] != signature:
            value = _hash_file(where)
            self.hashed += 1
            if os.stat(where).st_mtime_ns == signature[1]:  # not written to while it was read
                self.entries[where] = (signature, value)
                self.dirty = True
            known = (signature, value)
        return f"{signature[0]}:{known[1]}"

    def save(self) -> None:
        """Write the digests beside the run (atomically); an unwritable folder is left as it is."""
        if self.home is None or not self.dirty:
            return
        from mpo.records import write_json

        files = {os.path.relpath(path, self.home): list(self.entries[path])
                 for path in sorted(self.used) if path in self.entries}
        with contextlib.suppress(OSError):
            write_json(self.home / CACHE_NAME, {"files": files})
            self.dirty = False


_ACTIVE: list[DigestCache] = [DigestCache()]


@contextlib.contextmanager
def kept_beside(folder: str | os.PathLike):
    """Keep this block's file digests in ``folder`` (a run folder). Inside another such block
    (``mpo train`` run by ``mpo iterate``) the outer run's cache goes on serving."""
    if _ACTIVE[-1].home is not None:
        yield _ACTIVE[-1]
        return
    cache = DigestCache(folder)
    cache.entries = {**_ACTIVE[0].entries, **cache.entries}
    _ACTIVE.append(cache)
    try:
        yield cache
    finally:
        _ACTIVE.remove(cache)
        _ACTIVE[0].entries.update(cache.entries)


def file_digest(path: str | os.PathLike) -> str:
    """A file's identity, ``"<size>:<sha256>"`` (through the active cache)."""
    return _ACTIVE[-1].digest(path)


def save_digests() -> None:
    """Write the active run's digest cache (called where a stage key is written)."""
    _ACTIVE[-1].save()


def legacy_file_stat(path: str | os.PathLike) -> list:
    """A file as keys of the earlier format held it: ``[size, mtime_ns]``."""
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def key_path(output: str | os.PathLike) -> Path:
    """Where the key of ``output`` (a stage's file or folder) is kept: ``<stem>.key.json`` beside it."""
    output = Path(output)
    return output.with_name(f"{output.stem}.key.json")


def digest(value: Any) -> str:
    """A short content digest of a JSON-serialisable value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _record_digest(record: Any) -> str:
    """A record's content, its ``images`` by their files' content (:func:`mpo.keys.file_digest`),
    not by path: the same prompt read from a copied folder is the same prompt."""
    fields = to_dict(record)
    if "images" in fields:
        fields["images"] = [file_digest(image) for image in fields["images"]]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def records_digest(records: Sequence[Any]) -> str:
    """Content digest of records (dataclasses) and of the files their ``images`` name."""
    h = hashlib.sha256()
    for record in records:
        h.update(_record_digest(record).encode())
    return h.hexdigest()[:16]


def prompts_identity(prompts: Sequence[Any]) -> dict:
    """:func:`records_digest` of prompts, with each prompt's own short digest by id (so a key that
    differs can name the prompts that changed)."""
    h, items = hashlib.sha256(), {}
    for prompt in prompts:
        one = _record_digest(prompt)
        h.update(one.encode())
        items[prompt.prompt_id] = one[:8]
    return {"count": len(items), "digest": h.hexdigest()[:16], "items": items}


def legacy_records_digest(records: Sequence[Any]) -> str:
    """:func:`records_digest` as keys of the earlier format held it (images by size and mtime)."""
    h = hashlib.sha256()
    for record in records:
        h.update(json.dumps(to_dict(record), sort_keys=True).encode())
        for image in getattr(record, "images", ()):
            size, mtime = legacy_file_stat(image)
            h.update(f"|{size}:{mtime}".encode())
    return h.hexdigest()[:16]


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _names(label: str, names: list[str]) -> str:
    more = f" (and {len(names) - 3} more)" if len(names) > 3 else ""
    return f"{label}: {', '.join(map(str, names[:3]))}{more}"


def _compare(old: dict, new: dict, what: str) -> str | None:
    """Which entries of two ``{name: digest}`` maps differ, named, or None when they are not such maps."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return None
    changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    parts = [_names(f"{what} changed", changed) if changed else "",
             _names(f"{what} added", sorted(set(new) - set(old))) if set(new) - set(old) else "",
             _names(f"{what} removed", sorted(set(old) - set(new))) if set(old) - set(new) else ""]
    return ", ".join(p for p in parts if p) or None


def _describe(name: str, old: Any, new: Any) -> str:
    """One changed key entry in words: a model's changed files, the prompts that changed, a value's old
    and new value."""
    if isinstance(old, dict) and isinstance(new, dict):
        if "files" in old and "files" in new:
            return f"{name}: {_compare(old['files'], new['files'], 'files') or 'changed'}"
        if "items" in old and "items" in new:
            return f"{name}: {_compare(old['items'], new['items'], 'prompts') or 'content changed'}"
        inner = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if inner and all(k in old and k in new and not isinstance(new[k], (dict, list)) for k in inner):
            return "; ".join(_describe(f"{name}.{k}", old[k], new[k]) for k in inner)
    if isinstance(old, (dict, list)) or isinstance(new, (dict, list)):
        return f"{name} changed"
    if isinstance(old, str) and isinstance(new, str) and len(old) == len(new) == 16 and re.fullmatch(r"[0-9a-f]+", old):
        return f"{name}: made from other {name}" if name in ("rollouts", "scored", "pairs") else f"{name} changed"
    return f"{name}: {_shown(old)} -> {_shown(new)}"


def key_differences(found: dict, key: dict) -> str:
    """The entries in which two keys differ, in words (the first four)."""
    missing = object()
    changed = sorted(set(found) | set(key), key=lambda k: (k not in key, k))
    changed = [k for k in changed if found.get(k, missing) != key.get(k, missing) and k != "key_format"]
    described = [_describe(k, found.get(k), key.get(k)) if k in found and k in key else
                 f"{k} {'added' if k in key else 'removed'}" for k in changed[:4]]
    more = f" (and {len(changed) - 4} more)" if len(changed) > 4 else ""
    return "; ".join(described) + more


def stamped(key: dict[str, Any]) -> dict[str, Any]:
    """``key`` as it is written and reads back, marked with the key format (:mod:`mpo.keys`)."""
    return json.loads(json.dumps({"key_format": KEY_FORMAT, **key}, default=str))


def write_key(path: Path, key: dict[str, Any]) -> None:
    """Write a stage key (and the run's digest cache: the stage is about to write anyway)."""
    write_json(path, stamped(key))
    save_digests()


def read_key(path: Path) -> dict | None:
    """A key file's content, or None where it is not a JSON object (damaged by hand: keys are
    written atomically)."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _results(key: dict) -> dict:  # a key without the entries of settings that change no result
    return {k: v for k, v in key.items() if k not in NOT_RESULTS}


def key_matches(path: Path, key: dict[str, Any], legacy: Callable[[], dict] | None = None,
                earlier: Callable[[], dict] | None = None) -> bool:
    """The key kept at ``path`` is ``key``, or is of the earlier format and says what ``legacy()`` (the
    earlier format's key for today's inputs) says, or is of today's format as an earlier version wrote
    it and says what ``earlier()`` says but for :data:`NOT_RESULTS` (a training key that held logging
    settings). Such a key is rewritten as today's where the folder is writable, with a line saying so."""
    found = read_key(path)
    key = stamped(key)
    if found == key:
        return True
    if found is None:
        return False
    if "key_format" in found:
        if earlier is None or _results(found) != _results(stamped(earlier())):
            return False
        note = "key of an earlier mpo (logging settings in it) rewritten without them; inputs and settings as they were"
    elif legacy is None or found != json.loads(json.dumps(legacy(), default=str)):
        return False
    else:  # the earlier key format
        note = "key of an earlier mpo (paths and file times) rewritten by content; inputs as they were"
    try:
        write_key(path, key)
        print(f"{path}: {note}")
    except OSError:
        pass  # a read-only copy: checked the earlier way each time
    return True


def check_key(output: str | os.PathLike, key: dict[str, Any], redo: str, key_file: Path | None = None,
              legacy: Callable[[], dict] | None = None, earlier: Callable[[], dict] | None = None) -> None:
    """Reuse of ``output``'s finished or partial work is allowed only for the same ``key``.

    The first call writes the key; later calls compare. A difference stops with one line naming the
    changed entries (a model's files, the prompts, a setting's old and new value) and ``redo`` (what
    to delete to make the stage again with the new settings). A key of the earlier format (absolute
    paths, file times) is accepted when ``legacy()`` (that format's key for today's inputs) matches it
    (:func:`key_matches`); else one line says it was made from inputs that moved or changed since.
    ``earlier()``: today's key as an earlier version wrote it (:func:`key_matches`). Output from before
    keys were kept is adopted, with a note. ``key_file`` defaults to :func:`key_path`."""
    path = key_file or key_path(output)
    if not path.exists():
        if Path(output).exists():
            print(f"{output}: made before stage keys were kept; reused as it is")
        write_key(path, key)
        return
    if key_matches(path, key, legacy, earlier):
        return
    found = read_key(path)
    if found is None:
        raise RunFolderError(f"{path}: not a readable stage key (not a JSON object); delete {redo} to redo it")
    if "key_format" not in found:
        changed = key_differences(found, json.loads(json.dumps(legacy(), default=str))) if legacy else ""
        raise RunFolderError(
            f"{output}: made by an earlier mpo, whose keys held absolute paths and file times, from inputs "
            f"that have moved or changed since{f' ({changed})' if changed else ''}; rerun it where it was "
            f"made (its key is then rewritten by content), or delete {redo} to redo it"
        )
    against = stamped(key)
    if earlier is not None and set(found) != set(against) and set(found) == set(stamped(earlier())):
        against = stamped(earlier())  # an earlier version's key: named in its own entries
    raise RunFolderError(
        f"{output}: made with other settings ({key_differences(_results(found), _results(against))}); rerun with the earlier "
        f"settings, or delete {redo} to redo it with these"
    )


def last_complete_checkpoint(folder: str | Path) -> str | None:
    """The newest ``checkpoint-N`` under ``folder`` that was written to the end, or None.

    transformers writes a checkpoint's files one by one and ``trainer_state.json`` last, and picks
    the highest-numbered folder on resume even if a kill cut it short. A checkpoint counts here only
    when its ``trainer_state.json`` exists and parses, so a half-written one is passed over."""

    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for child in folder.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    for _, child in sorted(found, reverse=True):
        try:
            json.loads((child / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return str(child)
    return None

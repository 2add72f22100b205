"""Resumable stage outputs: work split into chunks, each chunk written atomically as it finishes.

A stage that processes many items (rollout, scoring) calls :func:`run_chunked`. Finished chunks
land in ``<output>.parts/NNNNN.jsonl`` (temporary file + rename); when every chunk is there they are
joined into the stage's output file, again atomically, and the parts folder is removed. A process
killed at any moment leaves either finished chunks, which a restart reuses, or a stray temporary
file, which is ignored: nothing finished is recomputed and nothing partial is trusted.

Each chunk gets its own seed derived from (base seed, chunk index), so a resumed stage produces the
same records as an uninterrupted one.

What made a stage's output is kept beside it (:func:`check_key`: ``<output stem>.key.json``, written
before the work starts): the models' identities, the input's content digest and the settings that
change results, all by content (:mod:`mpo.identity`: sizes and digests, no paths or file times), so
a run folder copied or moved elsewhere reads back. Finished or partial work made with anything else
is never reused; the run stops with one line naming what changed and what to delete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mpo.errors import MpoError, RunFolderError
from mpo.records import read_jsonl, to_dict, write_json, write_jsonl

T = TypeVar("T")
R = TypeVar("R")


def chunk_seed(base_seed: int, *keys: object) -> int:
    """A stable 31-bit seed from a base seed and any keys (round, chunk index, ...)."""
    digest = hashlib.sha256(repr((base_seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def run_chunked(
    items: Sequence[T],
    output: str | Path,
    record_cls: type[R],
    process: Callable[[Sequence[T], int], list[R]],
    *,
    chunk_size: int,
    seed: int = 0,
    desc: str | None = None,
    share: tuple[int, int] | None = None,
) -> list[R] | None:
    """Process ``items`` chunk by chunk into ``output`` (JSONL of ``record_cls``), resumably.

    ``process(chunk, chunk_seed)`` returns the records of one chunk. If ``output`` already exists
    the stage is finished and its records are returned without any work. ``desc`` labels the
    progress bar (shown on a terminal; counted in items, finished chunks included).

    ``share=(rank, world)``: one rank of a distributed stage. It makes the missing chunks it owns
    (chunk c belongs to rank c mod world) and returns None; a later call without ``share`` (every
    part then exists) joins them. Chunks and their seeds do not depend on the world size, so the
    output is the same bytes for any world size, and a resumed stage may run with another.
    """
    from tqdm import tqdm

    output = Path(output)
    if output.exists():
        return None if share is not None else read_jsonl(output, record_cls)
    if chunk_size < 1:
        raise MpoError(f"chunk_size must be >= 1, got {chunk_size}")
    parts = parts_dir(output)
    _check_layout(parts, {"chunk_size": chunk_size, "num_items": len(items), "seed": seed})
    chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
    process = _stopping_with_a_line(process, parts, len(chunks))
    if share is not None:
        rank, world = share
        for index in range(rank, len(chunks), world):
            part = parts / f"{index:05d}.jsonl"
            if not part.exists():
                write_jsonl(part, process(chunks[index], chunk_seed(seed, index)))
        return None
    records: list[R] = []
    with tqdm(total=len(items), desc=desc, unit="item", disable=None if desc else True) as bar:
        for index, chunk in enumerate(chunks):
            part = parts / f"{index:05d}.jsonl"
            if part.exists():
                records.extend(read_jsonl(part, record_cls))
            else:
                produced = process(chunk, chunk_seed(seed, index))
                write_jsonl(part, produced)
                records.extend(produced)
            bar.update(len(chunk))
    write_jsonl(output, records)
    shutil.rmtree(parts, ignore_errors=True)
    return records


def _stopping_with_a_line(process, parts: Path, total: int):
    """``process``, whose preemption (:mod:`mpo.preempt`: a signal stops a chunk at once) says how
    many chunks are finished and kept."""
    def run(chunk, seed):
        from mpo.preempt import Preempted

        try:
            return process(chunk, seed)
        except Preempted as err:
            done = len(list(parts.glob("[0-9]*.jsonl")))
            raise Preempted(f"{str(err).split(';')[0]}; {done} of {total} chunks finished and kept in {parts}: "
                            "rerun the same command to continue", err.exit_status - 128) from None

    return run


def _check_layout(parts: Path, layout: dict) -> None:
    """Finished chunks are reused only if they were cut the same way from the same items."""
    meta = parts / "layout.json"
    if meta.exists():
        found = json.loads(meta.read_text(encoding="utf-8"))
        if found != layout:
            raise RunFolderError(
                f"{parts}: finished chunks were made with {found}, this run asks for {layout}; "
                "rerun with the same settings or delete the folder to start the stage again"
            )
    else:
        parts.mkdir(parents=True, exist_ok=True)
        write_json(meta, layout)


def key_path(output: str | os.PathLike) -> Path:
    """Where the key of ``output`` (a stage's file or folder) is kept: ``<stem>.key.json`` beside it."""
    output = Path(output)
    return output.with_name(f"{output.stem}.key.json")


def digest(value: Any) -> str:
    """A short content digest of a JSON-serialisable value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _record_digest(record: Any) -> str:
    """A record's content, its ``images`` by their files' content (:func:`mpo.identity.file_digest`),
    not by path: the same prompt read from a copied folder is the same prompt."""
    from mpo.identity import file_digest

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
    from mpo.identity import legacy_file_stat

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
    """``key`` as it is written and reads back, marked with the key format (:mod:`mpo.identity`)."""
    from mpo.identity import KEY_FORMAT

    return json.loads(json.dumps({"key_format": KEY_FORMAT, **key}, default=str))


def write_key(path: Path, key: dict[str, Any]) -> None:
    """Write a stage key (and the run's digest cache: the stage is about to write anyway)."""
    from mpo.identity import save_digests

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


def key_matches(path: Path, key: dict[str, Any], legacy: Callable[[], dict] | None = None) -> bool:
    """The key kept at ``path`` is ``key``, or is of the earlier format and says what ``legacy()`` (the
    earlier format's key for today's inputs) says; such a key is rewritten in today's format where
    the folder is writable, with a line saying so."""
    found = read_key(path)
    key = stamped(key)
    if found == key:
        return True
    if found is None or "key_format" in found or legacy is None or found != json.loads(json.dumps(legacy(), default=str)):
        return False
    try:
        write_key(path, key)
        print(f"{path}: key of an earlier mpo (paths and file times) rewritten by content; inputs as they were")
    except OSError:
        pass  # a read-only copy: checked the earlier way each time
    return True


def check_key(output: str | os.PathLike, key: dict[str, Any], redo: str, key_file: Path | None = None,
              legacy: Callable[[], dict] | None = None) -> None:
    """Reuse of ``output``'s finished or partial work is allowed only for the same ``key``.

    The first call writes the key; later calls compare. A difference stops with one line naming the
    changed entries (a model's files, the prompts, a setting's old and new value) and ``redo`` (what
    to delete to make the stage again with the new settings). A key of the earlier format (absolute
    paths, file times) is accepted when ``legacy()`` (that format's key for today's inputs) matches it
    (:func:`key_matches`); else one line says it was made from inputs that moved or changed since.
    Output from before keys were kept is adopted, with a note. ``key_file`` defaults to
    :func:`key_path`."""
    path = key_file or key_path(output)
    if not path.exists():
        if Path(output).exists():
            print(f"{output}: made before stage keys were kept; reused as it is")
        write_key(path, key)
        return
    if key_matches(path, key, legacy):
        return
    found = read_key(path)
    if found is None:
        raise RunFolderError(f"{path}: not a readable stage key (not a JSON object); delete {redo} to redo it")
    if "key_format" not in found:
        earlier = key_differences(found, json.loads(json.dumps(legacy(), default=str))) if legacy else ""
        raise RunFolderError(
            f"{output}: made by an earlier mpo, whose keys held absolute paths and file times, from inputs "
            f"that have moved or changed since{f' ({earlier})' if earlier else ''}; rerun it where it was "
            f"made (its key is then rewritten by content), or delete {redo} to redo it"
        )
    raise RunFolderError(
        f"{output}: made with other settings ({key_differences(found, stamped(key))}); rerun with the earlier "
        f"settings, or delete {redo} to redo it with these"
    )


def last_complete_checkpoint(folder: str | Path) -> str | None:
    """The newest ``checkpoint-N`` under ``folder`` that was written to the end, or None.

    transformers writes a checkpoint's files one by one and ``trainer_state.json`` last, and picks
    the highest-numbered folder on resume even if a kill cut it short. A checkpoint counts here only
    when its ``trainer_state.json`` exists and parses, so a half-written one is passed over."""
    import re

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

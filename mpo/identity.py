"""What a file is, for the keys that decide whether earlier work may be reused: its size and a
content digest (SHA-256), never its path or its times. A run copied or moved elsewhere (``cp -a``,
``mv``) keeps every key; a file touched without a change in its bytes keeps its identity.

Hashing a model's weights on every run would be slow, so digests are kept beside the run
(``RUN/.mpo-digests.json``, :func:`kept_beside`), each under the file's path relative to the run
folder together with the file's size, modification and change times, inode and device. An entry is
used only when all of these still match; anything else (a copy, a restore, an edit, a touch) makes
the file be read again. So the cache can make a run faster, never give a wrong identity. It is
written only when a stage key is written (work is about to change the run folder anyway): a
finished run started again writes nothing, and a read-only copy reads back.

Keys written before identities were content-based (absolute paths and modification times) are
recognised by :data:`KEY_FORMAT`'s absence; :func:`legacy_file_stat` (and
:func:`mpo.models.legacy_folder_identity`) rebuild such a key for today's inputs, to check it as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

CACHE_NAME = ".mpo-digests.json"
KEY_FORMAT = 2  # stage keys carry "key_format": 2; keys without it are the earlier (path and mtime) format
_BLOCK = 1 << 20


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

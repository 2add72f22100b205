"""Typed records that flow between the stages of a round, and their JSONL files.

Every stage reads the previous stage's file and writes its own. Writes go to a temporary file in
the same folder and are renamed into place, so a file that exists is a finished file: a run killed
mid-write leaves only a ``.tmp`` behind, never a truncated JSONL.

Reading checks each line against the record's fields (required fields present, no unknown fields,
types as declared) and fails with ``file:line: what is wrong``. The checker is hand-written (50
lines) rather than pydantic's: these are plain dataclasses, their JSON wants "int also for float, no
bool for a number", and pydantic's strict mode refuses dicts for a dataclass while its lax mode turns
``"0"`` into ``0``; getting both right needed per-field annotations on every record.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mpo.errors import MpoError


class RecordError(MpoError):
    """A JSONL line that does not hold a valid record; the message names file and line."""


@dataclass
class Prompt:
    """A conversation to roll out: chat messages whose ``{"type": "image"}`` parts take ``images``
    in order. ``answer`` is the ground truth used by rule checks, when there is one."""

    prompt_id: str
    messages: list[dict]
    images: list[str] = field(default_factory=list)
    answer: str | None = None


@dataclass
class Rollout:
    """One sampled response to a prompt."""

    prompt_id: str
    sample_idx: int
    response: str
    num_tokens: int
    finish_reason: str
    policy: str


@dataclass
class ScoredRollout(Rollout):
    """A rollout with the reward model's score and any rule-based scores (name -> value)."""

    reward: float = 0.0
    rule_scores: dict[str, float] = field(default_factory=dict)


@dataclass
class PreferencePair:
    """A chosen/rejected pair for one conversation; rewards are absent for offline sets."""

    prompt_id: str
    messages: list[dict]
    images: list[str]
    chosen: str
    rejected: str
    chosen_reward: float | None = None
    rejected_reward: float | None = None


R = TypeVar("R")
TEMP_SUFFIX = ".tmp"  # an atomic write's temporary, .NAME.XXXX.tmp beside NAME (mpo.run_lock removes stale ones)

_HINTS_CACHE: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS_CACHE:
        _HINTS_CACHE[cls] = typing.get_type_hints(cls)
    return _HINTS_CACHE[cls]


def _matches(value: Any, hint: Any) -> bool:
    """True if a JSON-decoded value fits a (simple) type hint."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        _, item = typing.get_args(hint) or (str, Any)
        return isinstance(value, dict) and all(_matches(v, item) for v in value.values())
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def from_dict(cls: type[R], data: Any, where: str = "") -> R:
    """Build a record from a decoded JSON object, checking fields and types.

    ``where`` prefixes error messages (``file:line``)."""
    prefix = f"{where}: " if where else ""
    if not isinstance(data, dict):
        raise RecordError(f"{prefix}expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RecordError(
            f"{prefix}unknown field {unknown[0]!r} for {cls.__name__}; fields are {', '.join(fields)}"
        )
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in data:
            if required:
                raise RecordError(f"{prefix}missing field {name!r} for {cls.__name__}")
            continue
        if not _matches(data[name], hints[name]):
            raise RecordError(
                f"{prefix}field {name!r}: expected {_type_name(hints[name])}, "
                f"got {type(data[name]).__name__} {json.dumps(data[name])[:60]}"
            )
    return cls(**data)


def to_dict(record: Any) -> dict:
    return dataclasses.asdict(record)


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, decoded_object)`` for each non-blank line; bad JSON or bytes that are
    not UTF-8 name file:line."""
    path = Path(path)
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = decode_line(raw, f"{path}:{number}", first=number == 1)
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise RecordError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None


def decode_line(raw: bytes, where: str, first: bool = False) -> str:
    """One line of a text file as UTF-8 (a leading byte-order mark dropped), or an error naming
    the line, the column and the byte."""
    if first and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordError(
            f"{where}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
            "save the file as UTF-8"
        ) from None


def read_text(path: str | os.PathLike) -> str:
    """A whole text file as UTF-8, or an error naming the first line that is not."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        for number, raw in enumerate(data.splitlines(keepends=True), start=1):
            decode_line(raw, f"{path}:{number}", first=number == 1)
        raise


def read_jsonl(path: str | os.PathLike, cls: type[R]) -> list[R]:
    """Read every record of a JSONL file, validating each line."""
    return [from_dict(cls, obj, f"{path}:{number}") for number, obj in iter_jsonl(path)]


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> int:
    """Write records (dataclasses or dicts) atomically; returns how many were written."""
    count = 0

    def lines() -> Iterator[str]:
        nonlocal count
        for record in records:
            obj = to_dict(record) if dataclasses.is_dataclass(record) else record
            count += 1
            yield json.dumps(obj, ensure_ascii=False) + "\n"

    atomic_write_text(path, lines())
    return count


def atomic_write_text(path: str | os.PathLike, chunks: Iterable[str] | str) -> None:
    """Write text to ``path`` through a temporary file in the same folder and a rename."""
    def write(handle):
        for chunk in [chunks] if isinstance(chunks, str) else chunks:
            handle.write(chunk.encode("utf-8"))

    _atomic_write(path, write)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to ``path`` through a temporary file in the same folder and a rename."""
    _atomic_write(path, lambda handle: handle.write(data))


def _atomic_write(path: str | os.PathLike, write) -> None:
    from mpo.errors import writing_into

    path = Path(path)
    with writing_into(path.parent, f"writing {path.name}"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write one JSON document atomically (manifests, stats, resolved configs)."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")

"""The row shapes the data loaders accept, and how each becomes a record.

A row (a JSON object, a parquet row or a ``datasets`` row; a column that is None counts as absent)
is matched against the shapes of its kind in order; the first that fits builds the record. A row
that fits none is an error naming where it is, the keys it has and every accepted shape.

Preference pairs (``PreferencePair``):

- ``record``: ``{prompt_id?, messages, images?, chosen, rejected, chosen_reward?, rejected_reward?}``
- ``TRL conversational``: ``{prompt: [messages], chosen: [assistant message], rejected: [...], images?}``
  (the shape of the Hugging Face vision-DPO sets)
- ``TRL implicit prompt``: ``{chosen: [messages], rejected: [messages], images?}``: the shared
  leading messages are the prompt, the last (assistant) message of each the response
- ``TRL standard``: ``{prompt: str, chosen: str, rejected: str, images?}``
- ``MMPR``: ``{question, chosen, rejected, image? | images?}``

Prompts (``Prompt``):

- ``record``: ``{prompt_id?, messages, images?, answer?}``
- ``TRL conversational prompt-only``: ``{prompt: [messages], images?, answer?}``
- ``TRL standard prompt-only`` / ``simple``: ``{id?, prompt | question: str, image? | images?, answer?}``

In string prompts and questions, ``<image>`` marks say where each image goes (no marks: the images
lead). Images are paths (relative to the data file's folder, or ``image_root``), ``datasets`` Image
features (``{bytes, path}``), or raw bytes: embedded bytes are written once into the image cache.
A row without ``prompt_id`` (or ``id``) gets a stable id from its prompt's content: its messages and
images as the row gives them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpo.errors import MpoError
from mpo.records import PreferencePair, Prompt, RecordError, atomic_write_bytes, from_dict


class DataError(MpoError):
    """A data source or row that cannot be used; the message names file, row and field."""


class ShapeFieldError(DataError):
    """A field wrong for the shape the row was read as; :func:`build` adds which shape and why."""


@dataclass(frozen=True)
class Shape:
    name: str
    keys: str  # what a row of this shape holds, as the error message lists it
    required: tuple  # (field, test, what it must be) each row of the shape passes
    build: Callable[[dict, str, Path | None], Any]
    excludes: tuple = ()  # fields a row of this shape does not have

    def problems(self, row: dict) -> list[str]:
        out = [f"field {name!r}: {'missing' if name not in row else f'expected {what}'}"
               for name, test, what in self.required if name not in row or not test(row[name])]
        return out + [f"field {name!r}: not part of this shape" for name in self.excludes if name in row]

    def fits(self, row: dict) -> bool:
        return not self.problems(row)


def _present(row: dict) -> dict:
    return {k: v for k, v in row.items() if v is not None}


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _text(messages: list[dict], where: str, name: str) -> str:
    """The text of a response given as assistant message(s)."""
    parts = []
    for message in messages:
        if message.get("role") != "assistant":
            raise ShapeFieldError(f"{where}: field {name!r}: expected assistant message(s), found role {message.get('role')!r}")
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        else:
            raise ShapeFieldError(f"{where}: field {name!r}: message content must be a string or a list of parts")
    return "".join(parts)


def question_messages(question: str, num_images: int) -> list[dict]:
    """User turn from an InternVL-style question with ``<image>`` marks (or images first)."""
    pieces = question.split("<image>")
    content: list[dict] = []
    if len(pieces) - 1 == num_images and num_images > 0:
        for i, piece in enumerate(pieces):
            if i > 0:
                content.append({"type": "image"})
            if piece.strip():
                content.append({"type": "text", "text": piece.strip("\n")})
    else:
        content = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": question.replace("<image>", "").strip()})
    return [{"role": "user", "content": content}]


def image_list(row: dict, where: str, image_cache: Path | None) -> list[str]:
    value = row.get("images", row.get("image"))
    if value is None:
        return []
    out = []
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, dict) and item.get("bytes"):
            out.append(_materialise(item["bytes"], where, image_cache))
        elif isinstance(item, (bytes, bytearray)):
            out.append(_materialise(bytes(item), where, image_cache))
        elif isinstance(item, dict) and isinstance(item.get("path"), str):
            out.append(_named(item["path"], where, image_cache))
        elif isinstance(item, str):
            out.append(_named(item, where, image_cache))
        elif _is_pil(item):
            out.append(_materialise(_png_bytes(item), where, image_cache))
        else:
            raise DataError(f"{where}: field 'images': expected paths, URLs, image features or bytes, "
                            f"got {type(item).__name__}")
    return out


def _is_pil(item: Any) -> bool:
    return type(item).__module__.startswith("PIL.")


def _png_bytes(image) -> bytes:
    """A decoded image (a ``datasets`` row read with decoding on) as PNG bytes, its pixels unchanged."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _named(text: str, where: str, image_cache: Path | None) -> str:
    """A path as it is; a ``file://`` URI as its path; a ``data:image`` URI decoded and an
    ``http(s)://`` URL fetched (once: a URL's cache file is reused, so every stage and every rerun
    reads the same bytes) into the image cache."""
    from mpo.data.images import ImageError, check_bytes, data_uri_bytes, fetch_url, shown

    if text.startswith("file://"):
        return text[len("file://"):]
    if not text.startswith(("data:image", "http://", "https://")):
        return text
    what = "a data URI" if text.startswith("data:") else "a URL"
    if image_cache is None:
        raise DataError(f"{where}: row names an image by {what}; pass image_cache (a folder to write it to)")
    try:
        if what == "a data URI":
            data = data_uri_bytes(text)
            check_bytes(data, shown(text))
            return _materialise(data, where, image_cache)
        target = image_cache / f"url-{hashlib.sha256(text.encode()).hexdigest()[:32]}.img"
        if not target.exists():
            data = fetch_url(text)
            check_bytes(data, text)
            atomic_write_bytes(target, data)
        return str(target)
    except ImageError as err:
        raise DataError(f"{where}: field 'images': {err}") from None


def _materialise(data: bytes, where: str, image_cache: Path | None) -> str:
    if image_cache is None:
        raise DataError(f"{where}: row embeds image bytes; pass image_cache (a folder to write them to)")
    target = image_cache / (hashlib.sha256(data).hexdigest()[:32] + ".img")
    if not target.exists():
        atomic_write_bytes(target, data)
    return str(target)


ROLES = ("system", "user", "assistant")


def _check_messages(messages: Any, where: str, name: str) -> None:
    """A conversation: a non-empty list of ``{role, content}`` with a known role and string or
    list-of-parts content."""
    if not isinstance(messages, list):
        raise DataError(f"{where}: field {name!r}: expected a list of chat messages, got {type(messages).__name__}")
    if not messages:
        raise DataError(f"{where}: field {name!r}: empty; a conversation needs at least one message")
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise DataError(f"{where}: field {name!r}: message {number}: expected an object with role and "
                            f"content, got {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise DataError(f"{where}: field {name!r}: message {number}: role {message.get('role')!r} is not one "
                            f"of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), (str, list)):
            raise DataError(f"{where}: field {name!r}: message {number}: content must be a string or a list "
                            f"of parts, got {type(message.get('content')).__name__}")


def _text_of(value: Any, where: str, name: str) -> str:
    """An id or answer as text; NaN and infinities (JSON's ``NaN``, a parquet float column) and
    lists, objects and booleans (which ``str`` would silently turn into their Python repr) refused."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field {name!r}: expected a string or a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{where}: field {name!r}: {json.dumps(value)} is not a usable {name.replace('_', ' ')}; "
                        "give a string or a finite number")
    return str(value)


def _prompt_id(row: dict, messages: list[dict], images: list[str], where: str = "") -> str:
    if row.get("prompt_id") is not None or row.get("id") is not None:
        name = "prompt_id" if "prompt_id" in row else "id"
        return _text_of(row[name], where, name)
    given = row.get("images", row.get("image"))
    named = [g if isinstance(g, str) else _image_key(g) for g in (given if isinstance(given, list) else [given])]
    digest = hashlib.sha256(json.dumps([messages, named if given is not None else []], sort_keys=True).encode())
    return f"sha-{digest.hexdigest()[:16]}"


def _image_key(item: Any) -> str:
    if isinstance(item, dict) and item.get("bytes"):
        return hashlib.sha256(item["bytes"]).hexdigest()[:32]
    if isinstance(item, (bytes, bytearray)):
        return hashlib.sha256(bytes(item)).hexdigest()[:32]
    if _is_pil(item):
        return hashlib.sha256(_png_bytes(item)).hexdigest()[:32]
    return str(item.get("path")) if isinstance(item, dict) else str(item)


def _record(cls, row: dict, where: str, cache: Path | None):
    _check_messages(row["messages"], where, "messages")
    for name in ("answer", "chosen_reward", "rejected_reward"):
        if row.get(name) is not None:
            _text_of(row[name], where, name)
    data = dict(row)
    data["images"] = image_list(row, where, cache)
    data.pop("image", None)
    given = row.get("prompt_id")
    data["prompt_id"] = _text_of(given, where, "prompt_id") if given is not None else _prompt_id({}, row["messages"], [])
    if given is None and row.get("images", row.get("image")) is not None:
        data["prompt_id"] = _prompt_id({"images": row.get("images", row.get("image"))}, row["messages"], [])
    try:
        return from_dict(cls, data)
    except RecordError as err:
        raise ShapeFieldError(f"{where}: {err}") from None


def _answer(row: dict, where: str) -> str | None:
    return None if row.get("answer") is None else _text_of(row["answer"], where, "answer")


def _pair_of(row, where, cache, messages, chosen, rejected) -> PreferencePair:
    images = image_list(row, where, cache)
    if isinstance(messages, str):
        messages = question_messages(messages, len(images))
    else:
        _check_messages(messages, where, "prompt" if "prompt" in row else "chosen")
    return PreferencePair(_prompt_id(row, messages, images, where), messages, images, chosen, rejected)


def _implicit(row, where, cache) -> PreferencePair:
    chosen, rejected = row["chosen"], row["rejected"]
    prompt = chosen[:-1]
    if rejected[:-1] != prompt or not prompt:
        raise ShapeFieldError(f"{where}: fields 'chosen'/'rejected': an implicit-prompt pair needs the same leading "
                        "messages in both and one response message after them")
    return _pair_of(row, where, cache, prompt, _text(chosen[-1:], where, "chosen"), _text(rejected[-1:], where, "rejected"))


def _prompt_of(row, where, cache, text_or_messages) -> Prompt:
    images = image_list(row, where, cache)
    messages = text_or_messages
    if isinstance(messages, str):
        messages = question_messages(messages, len(images))
    else:
        _check_messages(messages, where, "prompt")
    return Prompt(_prompt_id(row, messages, images, where), messages, images, _answer(row, where))


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _any(value: Any) -> bool:
    return True


MESSAGES = (_is_messages, "a list of chat messages")
STRING = (_is_str, "a string")
PREFERENCE_SHAPES = [
    Shape("record", "{prompt_id?, messages, images?, chosen, rejected}",
          (("messages", _any, ""), ("chosen", *STRING), ("rejected", *STRING)),
          lambda r, w, c: _record(PreferencePair, r, w, c)),
    Shape("TRL conversational", "{prompt: [messages], chosen: [assistant message], rejected: [...], images?}",
          (("prompt", *MESSAGES), ("chosen", *MESSAGES), ("rejected", *MESSAGES)),
          lambda r, w, c: _pair_of(r, w, c, r["prompt"], _text(r["chosen"], w, "chosen"),
                                   _text(r["rejected"], w, "rejected"))),
    Shape("TRL implicit prompt", "{chosen: [messages], rejected: [messages], images?}",
          (("chosen", *MESSAGES), ("rejected", *MESSAGES)), _implicit, excludes=("prompt", "question", "messages")),
    Shape("TRL standard", "{prompt: str, chosen: str, rejected: str, images?}",
          (("prompt", *STRING), ("chosen", *STRING), ("rejected", *STRING)),
          lambda r, w, c: _pair_of(r, w, c, r["prompt"], r["chosen"], r["rejected"])),
    Shape("MMPR", "{question, chosen, rejected, image? | images?}",
          (("question", *STRING), ("chosen", *STRING), ("rejected", *STRING)),
          lambda r, w, c: _pair_of(r, w, c, r["question"], r["chosen"], r["rejected"])),
]
PROMPT_SHAPES = [
    Shape("record", "{prompt_id?, messages, images?, answer?}", (("messages", _any, ""),),
          lambda r, w, c: _record(Prompt, r, w, c)),
    Shape("TRL conversational prompt-only", "{prompt: [messages], images?, answer?}", (("prompt", *MESSAGES),),
          lambda r, w, c: _prompt_of(r, w, c, r["prompt"])),
    Shape("TRL standard prompt-only", "{prompt: str, images?, answer?}", (("prompt", *STRING),),
          lambda r, w, c: _prompt_of(r, w, c, r["prompt"])),
    Shape("simple", "{id?, question, image? | images?, answer?}", (("question", *STRING),),
          lambda r, w, c: _prompt_of(r, w, c, r["question"])),
]
SHAPES = {"prompts": PROMPT_SHAPES, "preferences": PREFERENCE_SHAPES}


def detect(row: dict, kind: str, where: str) -> Shape:
    """The first accepted shape of ``kind`` that ``row`` fits, or one line naming what is wrong
    for the nearest shape (the one sharing most fields with the row) and listing them all."""
    present = _present(row)
    for shape in SHAPES[kind]:
        if shape.fits(present):
            return shape
    nearest = max(SHAPES[kind], key=lambda s: (sum(name in present for name, _, _ in s.required),
                                                -len(s.problems(present))))
    accepted = "; ".join(f"{s.name} {s.keys}" for s in SHAPES[kind])
    raise DataError(
        f"{where}: {'; '.join(nearest.problems(present))} (the row has {', '.join(sorted(present)) or 'no keys'}: "
        f"nearest shape {nearest.name}); accepted {kind[:-1]} shapes: {accepted}"
    )


def build(row: dict, kind: str, where: str, image_cache: Path | None):
    """``(shape name, record)`` for one row."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    shape = detect(row, kind, where)
    present = _present(row)
    try:
        return shape.name, shape.build(present, where, image_cache)
    except ShapeFieldError as err:
        keys = ", ".join(repr(name) for name, _, _ in shape.required)
        hint = ""
        if kind == "prompts" and ("chosen" in present or "rejected" in present):
            hint = "; it has 'chosen'/'rejected' like a preference pair: is it a preference file given for prompts?"
        raise DataError(f"{err} (read as a {kind[:-1]} row of shape {shape.name}, as it has {keys}{hint})") from None

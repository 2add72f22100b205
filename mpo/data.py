"""Prompts and preference sets from JSONL, MMPR ``meta.json``, parquet and local HF dataset folders.

Row shapes accepted (any source):

- prompts: the ``Prompt`` record (``prompt_id, messages, images, answer``), or the simple shape
  ``{"id"?, "question", "image"? | "images"?, "answer"?}``;
- preferences: the ``PreferencePair`` record, or the MMPR shape
  ``{"image"? (str | [str]), "question", "chosen", "rejected"}``, where ``<image>`` marks in the
  question say where each image goes (no mark: images lead the question).

Image paths are resolved against ``image_root`` (MMPR: the dataset's ``root``; otherwise the data
file's folder) and every image is opened and verified before anything runs. A missing or unreadable
image is an error naming file, row and path; with ``on_bad_image="skip"`` the row is skipped and
counted instead. Images embedded in parquet / HF datasets are written once into ``image_cache``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mpo.errors import MpoError
from mpo.images import ImageError, check_image
from mpo.records import (
    PreferencePair,
    Prompt,
    RecordError,
    atomic_write_bytes,
    from_dict,
    iter_jsonl,
    read_text,
)


class DataError(MpoError):
    """A data source or row that cannot be used; the message names file, row and field."""


@dataclass
class Loaded:
    records: list
    sources: list[str] = field(default_factory=list)  # where each record came from: file:line / file:row N
    skipped: list[str] = field(default_factory=list)  # one message per skipped row


def _rows(path: Path) -> Iterator[tuple[str, dict, Path]]:
    """Yield ``(where, row, image_root)`` for any supported source."""
    if path.is_dir():
        yield from _hf_rows(path)
    elif path.suffix == ".parquet":
        yield from _parquet_rows(path)
    elif path.suffix == ".json":
        yield from _mmpr_rows(path)
    elif path.suffix == ".jsonl":
        for number, row in iter_jsonl(path):
            yield f"{path}:{number}", row, path.parent
    else:
        raise DataError(f"{path}: unsupported data source (expected .jsonl, .parquet, MMPR meta.json or a dataset folder)")


def _mmpr_rows(meta_path: Path) -> Iterator[tuple[str, dict, Path]]:
    try:
        meta = json.loads(read_text(meta_path))
    except json.JSONDecodeError as err:
        raise DataError(f"{meta_path}: not valid JSON ({err.msg})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: MMPR meta.json must map dataset names to {{root, annotation, ...}}")
    for name, entry in meta.items():
        for key in ("root", "annotation"):
            if not isinstance(entry, dict) or not isinstance(entry.get(key), str):
                raise DataError(f"{meta_path}: dataset {name!r}: missing or non-string field {key!r}")
        root = (meta_path.parent / entry["root"]).resolve()
        annotation = meta_path.parent / entry["annotation"]
        if not annotation.is_file():
            raise DataError(f"{meta_path}: dataset {name!r}: annotation file not found: {annotation}")
        rows = [(f"{annotation}:{n}", row, root) for n, row in iter_jsonl(annotation)]
        repeat = float(entry.get("repeat_time", 1))
        if repeat < 1:  # subsample, seeded so a rerun reads the same rows
            rows = random.Random(0).sample(rows, max(1, int(len(rows) * repeat)))
        yield from rows * max(1, int(repeat))


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict, Path]]:
    import pyarrow.parquet as pq

    for index, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path}:row {index}", row, path.parent


def _hf_rows(path: Path) -> Iterator[tuple[str, dict, Path]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(f"{path}: not a dataset folder saved with save_to_disk ({err})") from None
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for split, dataset in splits:
        for column, feature in dataset.features.items():
            if isinstance(feature, datasets.Image):
                dataset = dataset.cast_column(column, datasets.Image(decode=False))
        label = f"{path}[{split}]" if split else str(path)
        for index, row in enumerate(dataset):
            yield f"{label}:row {index}", row, path


def _image_list(row: dict, where: str, image_cache: Path | None) -> list[str]:
    value = row.get("images", row.get("image"))
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, dict) and item.get("bytes"):
            out.append(_materialise(item["bytes"], where, image_cache))
        elif isinstance(item, dict) and isinstance(item.get("path"), str):
            out.append(item["path"])
        elif isinstance(item, str):
            out.append(item)
        else:
            raise DataError(f"{where}: field 'image': expected a path or a list of paths, got {type(item).__name__}")
    return out


def _materialise(data: bytes, where: str, image_cache: Path | None) -> str:
    if image_cache is None:
        raise DataError(f"{where}: row embeds image bytes; pass image_cache (a folder to write them to)")
    target = image_cache / (hashlib.sha256(data).hexdigest()[:32] + ".img")
    if not target.exists():
        atomic_write_bytes(target, data)
    return str(target)


def _question_messages(question: str, num_images: int) -> list[dict]:
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


def _require(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        found = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{where}: field {name!r}: expected a string, found {found}")
    return value


def _prompt(row: dict, where: str, index: int, stem: str, image_cache: Path | None) -> Prompt:
    if "messages" in row:  # the record itself; columnar sources fill absent fields with None
        return from_dict(Prompt, {k: v for k, v in row.items() if v is not None or k == "answer"}, where)
    question = _require(row, "question", where) if "question" in row else _require(row, "prompt", where)
    images = _image_list(row, where, image_cache)
    answer = row.get("answer")
    prompt_id = str(row.get("prompt_id", row.get("id", f"{stem}-{index}")))
    return Prompt(prompt_id, _question_messages(question, len(images)), images, None if answer is None else str(answer))


def _pair(row: dict, where: str, index: int, stem: str, image_cache: Path | None) -> PreferencePair:
    if "messages" in row:
        return from_dict(PreferencePair, row, where)
    question = _require(row, "question", where)
    chosen, rejected = _require(row, "chosen", where), _require(row, "rejected", where)
    images = _image_list(row, where, image_cache)
    prompt_id = str(row.get("prompt_id", row.get("id", f"{stem}-{index}")))
    return PreferencePair(prompt_id, _question_messages(question, len(images)), images, chosen, rejected)


def _load(path, kind, image_root, on_bad_image, image_cache) -> Loaded:
    from mpo.chat import count_image_parts

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data source not found")
    if on_bad_image not in ("error", "skip"):
        raise DataError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    cache = Path(image_cache).absolute() if image_cache is not None else None
    build = _prompt if kind == "prompts" else _pair
    loaded = Loaded(records=[])
    first_seen: dict[str, str] = {}
    for index, (where, row, default_root) in enumerate(_rows(path)):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        try:
            record = build(row, where, index, path.stem, cache)
        except RecordError as err:
            raise DataError(str(err)) from None
        if kind == "prompts":
            if record.prompt_id in first_seen:
                raise DataError(f"{where}: field 'prompt_id': {record.prompt_id!r} repeats "
                                f"{first_seen[record.prompt_id]}; prompt ids must be unique")
            first_seen[record.prompt_id] = where
        parts = count_image_parts(record.messages)
        if parts != len(record.images):
            raise DataError(f"{where}: field 'images': the messages have {parts} image part(s) but "
                            f"{len(record.images)} image(s) are listed")
        root = Path(image_root) if image_root is not None else default_root
        record.images = [os.path.abspath(p if Path(p).is_absolute() else root / p) for p in record.images]
        problem = _first_bad_image(record.images)
        if problem:
            message = f"{where}: field 'images': {problem}"
            if on_bad_image == "error":
                raise DataError(message)
            loaded.skipped.append(message)
            continue
        loaded.records.append(record)
        loaded.sources.append(where)
    return loaded


def _first_bad_image(paths: list[str]) -> str | None:
    for image in paths:
        try:
            check_image(image)
        except ImageError as err:
            return str(err)
    return None


def load_prompts(path, *, image_root=None, on_bad_image: str = "error", image_cache=None) -> Loaded:
    """Load ``Prompt`` records from any supported source, checking every image up front."""
    return _load(path, "prompts", image_root, on_bad_image, image_cache)


def load_preferences(path, *, image_root=None, on_bad_image: str = "error", image_cache=None) -> Loaded:
    """Load ``PreferencePair`` records from any supported source, checking every image up front."""
    return _load(path, "preferences", image_root, on_bad_image, image_cache)

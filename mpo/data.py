"""Prompts and preference sets from JSONL, MMPR ``meta.json``, parquet and local HF dataset folders.

Rows of any source may take any of the shapes :mod:`mpo.row_shapes` accepts (this project's
records, TRL's standard, conversational, implicit-prompt and prompt-only formats, MMPR's and a
simple question shape); :attr:`Loaded.shapes` counts the rows of each.

Image paths are resolved against ``image_root`` (MMPR: the dataset's ``root``; otherwise the data
file's folder) and every image is opened and verified before anything runs. A missing or unreadable
image is an error naming file, row and path; with ``on_bad_image="skip"`` the row is skipped and
counted instead. Images embedded in parquet / HF datasets are written once into ``image_cache``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mpo.images import ImageError, check_image
from mpo.records import iter_jsonl, read_text
from mpo.row_shapes import DataError, build


@dataclass
class Loaded:
    records: list
    sources: list[str] = field(default_factory=list)  # where each record came from: file:line / file:row N
    skipped: list[str] = field(default_factory=list)  # one message per skipped row
    shapes: dict[str, int] = field(default_factory=dict)  # row shape name -> rows of it (mpo.row_shapes)


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


@dataclass
class Row:
    """One row as :func:`scan` read it: its record, or what is wrong with it (``bad_image`` when
    only an image is)."""

    where: str
    shape: str | None
    record: object | None
    problem: str | None = None
    bad_image: bool = False


def guess_kind(path: str | os.PathLike) -> str:
    """``preferences`` if the source's first row fits a preference shape, else ``prompts``."""
    from mpo.row_shapes import PREFERENCE_SHAPES

    for _, row, _ in _rows(Path(path)):
        return "preferences" if isinstance(row, dict) and any(
            s.fits({k: v for k, v in row.items() if v is not None}) for s in PREFERENCE_SHAPES) else "prompts"
    raise DataError(f"{path}: no rows")


def scan(path, kind: str, image_root=None, image_cache=None) -> Iterator[Row]:
    """Every row of a source, checked (shape, prompt-id uniqueness, image count, every image), with
    image paths made absolute. A bad row is yielded with its problem, not raised, so a caller can
    list all of them (``mpo data check``) or stop at the first (the loaders)."""
    from mpo.chat import count_image_parts

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data source not found")
    cache = Path(image_cache).absolute() if image_cache is not None else None
    first_seen: dict[str, str] = {}
    for where, row, default_root in _rows(path):
        try:
            shape, record = build(row, kind, where, cache)
        except DataError as err:
            yield Row(where, None, None, str(err))
            continue
        if kind == "prompts" and record.prompt_id in first_seen:
            yield Row(where, shape, None, f"{where}: field 'prompt_id': {record.prompt_id!r} repeats "
                                          f"{first_seen[record.prompt_id]}; prompt ids must be unique")
            continue
        first_seen.setdefault(record.prompt_id, where)
        parts = count_image_parts(record.messages)
        if parts != len(record.images):
            yield Row(where, shape, None, f"{where}: field 'images': the messages have {parts} image part(s) "
                                          f"but {len(record.images)} image(s) are listed")
            continue
        root = Path(image_root) if image_root is not None else default_root
        record.images = [os.path.abspath(p if Path(p).is_absolute() else root / p) for p in record.images]
        problem = _first_bad_image(record.images)
        if problem:
            yield Row(where, shape, record, f"{where}: field 'images': {problem}", bad_image=True)
            continue
        yield Row(where, shape, record)


def _load(path, kind, image_root, on_bad_image, image_cache) -> Loaded:
    if on_bad_image not in ("error", "skip"):
        raise DataError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    loaded = Loaded(records=[])
    for row in scan(path, kind, image_root, image_cache):
        if row.problem and not (row.bad_image and on_bad_image == "skip"):
            raise DataError(row.problem)
        loaded.shapes[row.shape] = loaded.shapes.get(row.shape, 0) + 1
        if row.problem:
            loaded.skipped.append(row.problem)
            continue
        loaded.records.append(row.record)
        loaded.sources.append(row.where)
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

"""Prompts and preference sets from JSONL, MMPR ``meta.json``, parquet and local HF dataset folders.

Rows of any source may take any of the shapes :mod:`mpo.data.row_shapes` accepts (this project's
records, TRL's standard, conversational, implicit-prompt and prompt-only formats, MMPR's and a
simple question shape); :attr:`Loaded.shapes` counts the rows of each.

Image paths are resolved against ``image_root`` (MMPR: the dataset's ``root``; otherwise the data
file's folder) and every image is opened and verified before anything runs. A missing or unreadable
image is an error naming file, row and path; with ``on_bad_image="skip"`` the row is skipped and
counted instead. Images embedded in parquet / HF datasets (``Image()`` and ``Sequence(Image())``
columns, read as stored, never decoded), given as ``data:image`` URIs or as ``http(s)://`` URLs
are written once into ``image_cache``, and the records name those files. A ``DatasetDict`` folder
(splits) is read one split at a time: ``split`` (``data.split``), or its only one.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

from mpo.data.images import ImageError, check_image
from mpo.data.row_shapes import DataError, build
from mpo.records import Prompt, iter_jsonl, read_text

PROMPT_FIELDS = frozenset(f.name for f in fields(Prompt))  # a field scan(keep=...) leaves for the shape to read

@dataclass
class Loaded:
    records: list
    sources: list[str] = field(default_factory=list)  # where each record came from: file:line / file:row N
    skipped: list[str] = field(default_factory=list)  # one message per skipped row
    shapes: dict[str, int] = field(default_factory=dict)  # row shape name -> rows of it (mpo.data.row_shapes)


def _rows(path: Path, split: str | None = None) -> Iterator[tuple[str, dict, Path]]:
    """Yield ``(where, row, image_root)`` for any supported source."""
    if path.is_dir():
        yield from _hf_rows(path, split)
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
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: not a readable parquet file ({reason})") from None
    for index, row in enumerate(table.to_pylist()):
        yield f"{path}:row {index}", row, path.parent


def _hf_rows(path: Path, split: str | None) -> Iterator[tuple[str, dict, Path]]:
    """Rows of a ``save_to_disk`` folder as stored: image columns (``Image()``, ``Sequence(Image())``,
    anywhere in a row) as ``{bytes, path}``, never decoded. A ``DatasetDict`` folder is read one
    split at a time: ``split``, or its only split."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(f"{path}: not a dataset folder saved with save_to_disk ({err})") from None
    label = str(path)
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if split is None and len(names) == 1:
            split = names[0]
        if split not in loaded:
            given = f"data.split {split!r} is not one of them" if split else "choose one with data.split"
            raise DataError(f"{path}: a DatasetDict folder with splits {', '.join(names)}; {given} "
                            f"(or name a split's folder, e.g. {path / names[0]})")
        loaded, label = loaded[split], f"{path}[{split}]"
    index = 0
    for batch in loaded.with_format("arrow").iter(batch_size=256):
        for row in batch.to_pylist():
            yield f"{label}:row {index}", row, path
            index += 1


@dataclass
class Row:
    """One row as :func:`scan` read it: its record, or what is wrong with it (``bad_image`` when
    only an image is)."""

    where: str
    shape: str | None
    record: object | None
    problem: str | None = None
    bad_image: bool = False
    extra: dict = field(default_factory=dict)  # the fields asked for with scan(keep=...)


def guess_kind(path: str | os.PathLike, split: str | None = None) -> str:
    """``preferences`` if the source's first row fits a preference shape or has ``chosen`` or
    ``rejected`` (a bad pair is reported as a pair, not as a prompt), else ``prompts``."""
    from mpo.data.row_shapes import PREFERENCE_SHAPES

    for _, row, _ in _rows(Path(path), split):
        present = {k: v for k, v in row.items() if v is not None} if isinstance(row, dict) else {}
        pair = "chosen" in present or "rejected" in present or any(s.fits(present) for s in PREFERENCE_SHAPES)
        return "preferences" if pair else "prompts"
    raise DataError(f"{path}: no rows")


def scan(path, kind: str, image_root=None, image_cache=None, split=None, keep: tuple[str, ...] = ()) -> Iterator[Row]:
    """Every row of a source, checked (shape, prompt-id uniqueness, image count, every image), with
    image paths made absolute. A bad row is yielded with its problem, not raised, so a caller can
    list all of them (``mpo data check``) or stop at the first (the loaders). ``keep``: fields copied
    as the row holds them into :attr:`Row.extra` (e.g. an eval's ``choices``); those a record does not
    have are taken off the row before its shape is read."""
    from mpo.chat import count_image_parts

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data source not found")
    cache = Path(image_cache).absolute() if image_cache is not None else None
    first_seen: dict[str, str] = {}
    for where, row, default_root in _rows(path, split):
        extra = {k: row[k] for k in keep if row.get(k) is not None} if isinstance(row, dict) else {}
        if extra:  # a field a prompt record has (its answer) stays on the row
            row = {k: v for k, v in row.items() if k not in extra or k in PROMPT_FIELDS}
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
        yield Row(where, shape, record, extra=extra)


def _load(path, kind, image_root, on_bad_image, image_cache, split) -> Loaded:
    if on_bad_image not in ("error", "skip"):
        raise DataError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    loaded = Loaded(records=[])
    for row in scan(path, kind, image_root, image_cache, split):
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


def load_prompts(path, *, image_root=None, on_bad_image: str = "error", image_cache=None, split=None) -> Loaded:
    """Load ``Prompt`` records from any supported source, checking every image up front (``split``:
    which split of a ``DatasetDict`` folder)."""
    return _load(path, "prompts", image_root, on_bad_image, image_cache, split)


def load_preferences(path, *, image_root=None, on_bad_image: str = "error", image_cache=None, split=None) -> Loaded:
    """Load ``PreferencePair`` records from any supported source, checking every image up front
    (``split``: which split of a ``DatasetDict`` folder)."""
    return _load(path, "preferences", image_root, on_bad_image, image_cache, split)

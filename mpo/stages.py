"""Resumable stage outputs: work split into chunks, each chunk written atomically as it finishes.

A stage that processes many items (rollout, scoring) calls :func:`run_chunked`. Finished chunks
land in ``<output>.parts/NNNNN.jsonl`` (temporary file + rename); when every chunk is there they are
joined into the stage's output file, again atomically, and the parts folder is removed. A process
killed at any moment leaves either finished chunks, which a restart reuses, or a stray temporary
file, which is ignored: nothing finished is recomputed and nothing partial is trusted.

Each chunk gets its own seed derived from (base seed, chunk index), so a resumed stage produces the
same records as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from mpo.records import read_jsonl, write_json, write_jsonl

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
    progress: Callable[[int, int], None] | None = None,
) -> list[R]:
    """Process ``items`` chunk by chunk into ``output`` (JSONL of ``record_cls``), resumably.

    ``process(chunk, chunk_seed)`` returns the records of one chunk. If ``output`` already exists
    the stage is finished and its records are returned without any work.
    """
    output = Path(output)
    if output.exists():
        return read_jsonl(output, record_cls)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    parts = parts_dir(output)
    _check_layout(parts, {"chunk_size": chunk_size, "num_items": len(items), "seed": seed})
    chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
    records: list[R] = []
    for index, chunk in enumerate(chunks):
        part = parts / f"{index:05d}.jsonl"
        if part.exists():
            records.extend(read_jsonl(part, record_cls))
        else:
            produced = process(chunk, chunk_seed(seed, index))
            write_jsonl(part, produced)
            records.extend(produced)
        if progress is not None:
            progress(index + 1, len(chunks))
    write_jsonl(output, records)
    shutil.rmtree(parts, ignore_errors=True)
    return records


def _check_layout(parts: Path, layout: dict) -> None:
    """Finished chunks are reused only if they were cut the same way from the same items."""
    meta = parts / "layout.json"
    if meta.exists():
        import json

        found = json.loads(meta.read_text(encoding="utf-8"))
        if found != layout:
            raise ValueError(
                f"{parts}: finished chunks were made with {found}, this run asks for {layout}; "
                "rerun with the same settings or delete the folder to start the stage again"
            )
    else:
        parts.mkdir(parents=True, exist_ok=True)
        write_json(meta, layout)


def last_complete_checkpoint(folder: str | Path) -> str | None:
    """The newest ``checkpoint-N`` under ``folder`` that was written to the end, or None.

    transformers writes a checkpoint's files one by one and ``trainer_state.json`` last, and picks
    the highest-numbered folder on resume even if a kill cut it short. A checkpoint counts here only
    when its ``trainer_state.json`` exists and parses, so a half-written one is passed over."""
    import json
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

"""Resumable stage outputs: work split into chunks, each chunk written atomically as it finishes.

A stage that processes many items (rollout, scoring) calls :func:`run_chunked`. Finished chunks
land in ``<output>.parts/NNNNN.jsonl`` (temporary file + rename); when every chunk is there they are
joined into the stage's output file, again atomically, and the parts folder is removed. A process
killed at any moment leaves either finished chunks, which a restart reuses, or a stray temporary
file, which is ignored: nothing finished is recomputed and nothing partial is trusted.

Each chunk gets its own seed derived from (base seed, chunk index) by
:func:`mpo.rollout.base.chunk_seed`, so a resumed stage produces the
same records as an uninterrupted one. Whether the stage's output may be reused at all is
:mod:`mpo.keys`'s question.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from mpo.errors import MpoError, RunFolderError
from mpo.records import read_jsonl, write_json, write_jsonl
from mpo.rollout.base import chunk_seed

T = TypeVar("T")
R = TypeVar("R")


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



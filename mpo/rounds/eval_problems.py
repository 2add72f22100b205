"""The problems of an eval set, as :func:`mpo.rounds.evaluate.load_eval_problems` reads them.

- ``mathvista``: ``testmini.json`` as in the benchmark's repository (pid -> row; a JSON list or JSONL of
  rows with ``pid`` too), its image at the row's ``image`` (relative to the file's folder) or at
  ``images/<pid>.jpg`` beside the file; or its Hugging Face form (``AI4Math/MathVista``: a parquet file,
  a folder of them, or a ``datasets`` folder) with the image in ``decoded_image``. The prompt is the
  image, then :func:`mpo.eval.mathvista.build_query`.
- ``mmmu``: MMMU's validation rows (``id``, ``question``, ``options``, ``answer``, ``question_type``,
  ``image_1`` .. ``image_7``) from a parquet file, a folder of per-subject parquet files (those whose
  name holds the split, ``validation`` unless given) or a ``datasets`` folder. The prompt is
  :func:`mpo.eval.mmmu.build_prompt`'s text with each ``<image n>`` placeholder replaced by image n.
- ``answers``: any prompt source :func:`mpo.data.scan` reads (every shape ``mpo data check`` knows),
  each row with an ``answer`` (optionally ``choices``, ``answer_type``, ``precision``, ``category``).

Images stored in the data are written once into an image cache, named by their content.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mpo.data import DataError, _rows
from mpo.data.images import ImageError, check_image
from mpo.data.row_shapes import image_list
from mpo.errors import MpoError
from mpo.eval import mathvista, mmmu
from mpo.records import Prompt

_PLACEHOLDER = re.compile(r"<image (\d+)>")
ANSWER_FIELDS = ("answer", "choices", "answer_type", "precision", "category")


@dataclass
class EvalProblem:
    """One held-out problem: ``prompt`` (the benchmark's query text and images, as rolled out) and
    ``row``, what the benchmark's scoring reads (JSON values only)."""

    id: str
    prompt: Prompt
    row: dict = field(default_factory=dict)


def default_image_cache() -> Path:
    return Path(tempfile.gettempdir()) / "mpo-eval-images"


def _problem(problem_id: str, content: list[dict], images: list[str], row: dict) -> EvalProblem:
    prompt = Prompt(prompt_id=problem_id, messages=[{"role": "user", "content": content}], images=images,
                    answer=None if row.get("answer") is None else str(row["answer"]))
    return EvalProblem(id=problem_id, prompt=prompt, row=row)


def _checked_image(path: Path | str, where: str, name: str) -> str:
    try:
        check_image(path)
    except ImageError as err:
        raise MpoError(f"{where}: field {name!r}: {err}") from None
    return str(Path(path).absolute())


def _table_rows(path: Path, split: str | None, default_split: str):
    """``(where, row)`` of a parquet file, a folder of parquet files (those named for the split) or a
    ``datasets`` folder (:func:`mpo.data.scan`'s reader)."""
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        wanted = split or default_split
        files = sorted(f for f in path.rglob("*.parquet") if wanted in f.name)
        if not files:
            raise MpoError(f"{path}: no parquet file named for split {wanted!r} (nor a datasets folder)")
        for file in files:
            for where, row, _ in _rows(file):
                yield where, row
        return
    for where, row, _ in _rows(path, split):
        yield where, row


def _plain(value):
    """A row's value as JSON holds it (a ``datasets`` struct is a dict already; bytes are dropped)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not isinstance(v, (bytes, bytearray))}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def mathvista_problems(path: Path, split: str | None, cache: Path) -> list[EvalProblem]:
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        rows = mathvista.checked_rows(list(mathvista.load_problems(path).values()), path)
        stored = {}
    else:
        raw = list(_table_rows(path, split, "testmini"))
        rows = mathvista.checked_rows([{k: v for k, v in row.items() if k != "decoded_image"}
                                       for _, row in raw], path)
        stored = {str(row["pid"]): (where, row.get("decoded_image")) for where, row in raw}
    problems = []
    for pid, row in rows.items():
        where, data = stored.get(pid, (f"{path}: pid {pid!r}", None))
        if data is not None:
            image = image_list({"images": [data]}, where, cache)[0]
        else:
            image = path.parent / row["image"] if row.get("image") else path.parent / "images" / f"{pid}.jpg"
        image = _checked_image(image, where if data is not None else f"{path}: pid {pid!r}", "image")
        try:
            query = mathvista.build_query(row)
        except KeyError as err:
            raise MpoError(f"{path}: pid {pid!r} has no {err.args[0]!r}") from None
        content = [{"type": "image"}, {"type": "text", "text": query}]
        problems.append(_problem(pid, content, [image], _plain(row)))
    return problems


def _interleaved(text: str, row: dict, where: str, cache: Path) -> tuple[list[dict], list[str]]:
    """MMMU's prompt text as chat content: each ``<image n>`` becomes image n (``image_n``) in place;
    images of the row that the text never names come first."""
    named = [int(n) for n in _PLACEHOLDER.findall(text)]
    present = [n for n in range(1, 8) if row.get(f"image_{n}") is not None]
    content: list[dict] = [{"type": "image"} for n in present if n not in named]
    order = [n for n in present if n not in named] + named
    pieces = _PLACEHOLDER.split(text)
    for i, piece in enumerate(pieces):
        if i % 2 == 1:
            content.append({"type": "image"})
        elif piece.strip():
            content.append({"type": "text", "text": piece.strip()})
    images = []
    for n in order:
        if row.get(f"image_{n}") is None:
            raise MpoError(f"{where}: field 'image_{n}': missing (the question shows <image {n}>)")
        try:
            images.append(_checked_image(image_list({"images": [row[f"image_{n}"]]}, where, cache)[0],
                                         where, f"image_{n}"))
        except DataError as err:
            raise MpoError(str(err)) from None
    return content, images


def mmmu_problems(path: Path, split: str | None, cache: Path) -> list[EvalProblem]:
    problems = []
    for where, row in _table_rows(path, split, "validation"):
        for name in ("id", "question", "options", "answer", "question_type"):
            if row.get(name) is None:
                raise MpoError(f"{where}: field {name!r}: missing (an MMMU validation row)")
        kept = {k: _plain(row[k]) for k in ("id", "question", "options", "answer", "question_type")}
        kept["options"] = mmmu.option_list(kept["options"]) if row["question_type"] == "multiple-choice" else []
        content, images = _interleaved(mmmu.build_prompt(kept)["prompt"], row, where, cache)
        problems.append(_problem(str(row["id"]), content, images, kept))
    return problems


def answer_problems(path: Path, split: str | None, cache: Path) -> list[EvalProblem]:
    """Prompt rows of any shape :func:`mpo.data.scan` reads (and checks), each with its ``answer`` and
    the fields the rules read (:data:`ANSWER_FIELDS`)."""
    from mpo.data import scan

    problems = []
    for row in scan(path, "prompts", image_cache=cache, split=split, keep=ANSWER_FIELDS):
        if row.problem:
            raise MpoError(row.problem)
        if "answer" not in row.extra:
            raise MpoError(f"{row.where}: field 'answer': missing (--benchmark answers scores each row against it)")
        problems.append(_problem_of(row.record, {k: _plain(v) for k, v in row.extra.items()}))
    return problems


def _problem_of(prompt: Prompt, row: dict) -> EvalProblem:
    return EvalProblem(id=prompt.prompt_id, prompt=prompt, row={"id": prompt.prompt_id, **row})

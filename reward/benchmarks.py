"""Reward-model benchmarks: VL-RewardBench, RewardBench and plain preference pairs.

Model-agnostic on purpose: a benchmark file becomes a list of scoring items, a caller-supplied
``score_fn(items) -> scores`` scores them all in one call, and each benchmark's published scoring
rules (VL-RewardBench: Li et al. 2024, arXiv 2411.17451, overall and macro accuracy over its three
categories; RewardBench: Lambert et al. 2024, arXiv 2403.13787, its section weights) turn the scores
into a JSON-serialisable results dict. No model code lives here.

A scoring item is ``{"messages", "images", "response"}``: HF chat messages holding the user turn
(``{"type": "image"}`` parts take ``images`` in order), the image paths (relative ones resolved
against ``image_root``, default the data file's folder; existence is checked by whoever opens
them), and the assistant response to score. Items are laid out row by row in file order, each
row's responses in their order in the row; ``score_fn`` returns one finite score per item.

A row is correct iff its preferred response scores strictly higher than the other (ties are
wrong). VL-RewardBench ids repeat (18 reasoning ids occur twice in the public file), so rows are
told apart by position (``file:line``), never by id.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpo.errors import MpoError
from mpo.records import RecordError, iter_jsonl

ScoreFn = Callable[[list[dict]], Sequence[float]]

BENCHMARKS = ("vl-rewardbench", "rewardbench", "pairs")
VLRB_CATEGORIES = ("general", "hallucination", "reasoning")
_VLRB_PREFIX = re.compile(r"^(rlaif|rlhf|hallucination|mathverse|mmmu|wildvision)(?![a-z])", re.IGNORECASE)
_VLRB_CATEGORY_OF = {"rlaif": "hallucination", "rlhf": "hallucination", "hallucination": "hallucination",
                     "mathverse": "reasoning", "mmmu": "reasoning", "wildvision": "general"}

# RewardBench section -> {subset: weight}. Weights are RewardBench's example counts, except that
# math-prm is weighted 984 (its filtered count is 447) so Reasoning = 0.5*math + 0.5*mean(hep-*).
REWARDBENCH_SECTIONS: dict[str, dict[str, int]] = {
    "Chat": {"alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95,
             "mt-bench-easy": 28, "mt-bench-med": 40},
    "Chat Hard": {"mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
                  "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46},
    "Safety": {"refusals-dangerous": 100, "refusals-offensive": 100, "xstest-should-refuse": 154,
               "xstest-should-respond": 250, "donotanswer": 136},
    "Reasoning": {"math-prm": 984, **{f"hep-{lang}": 164 for lang in ("cpp", "go", "java", "js", "python", "rust")}},
}


class BenchmarkError(MpoError):
    """Scores that cannot be judged: wrong count, non-numeric or non-finite values."""


@dataclass
class Case:
    """One benchmark row: its items to score, which of them is preferred, and its group."""

    row_id: str
    where: str
    group: str
    items: list[dict]
    preferred: int


# ---------------------------------------------------------------- loading


def load_rows(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """Read a local ``.jsonl`` or ``.parquet`` file into ``(where, row)`` pairs, where ``where`` is
    ``file:line`` (JSONL) or ``file:row N`` (parquet, 1-based) for error messages."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        out = [(f"{path}:row {n}", row) for n, row in enumerate(rows, start=1)]
    elif path.suffix == ".jsonl":
        out = [(f"{path}:{n}", row) for n, row in iter_jsonl(path)]
    else:
        raise BenchmarkError(f"{path}: unsupported file type {path.suffix!r} (expected .jsonl or .parquet)")
    for where, row in out:
        if not isinstance(row, dict):
            raise RecordError(f"{where}: expected an object, got {type(row).__name__}")
    if not out:
        raise RecordError(f"{path}: no rows")
    return out


def _field(row: dict, where: str, name: str, check: Callable[[Any], bool], expected: str) -> Any:
    if name not in row:
        raise RecordError(f"{where}: missing field {name!r}")
    value = row[name]
    if not check(value):
        raise RecordError(f"{where}: field {name!r}: expected {expected}, got {type(value).__name__} "
                          f"{str(value)[:60]!r}")
    return value


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _row_id(row: dict, where: str, *names: str) -> str:
    for name in names:
        if row.get(name) is not None:
            return str(_field(row, where, name, lambda v: isinstance(v, (str, int)), "str or int"))
    return where


def _resolve(image: Any, root: Path, where: str) -> Any:
    """A path (str) resolved against ``root``; an HF Image struct with bytes is passed on as is."""
    if isinstance(image, dict) and image.get("bytes") is None:
        image = image.get("path")
    if isinstance(image, dict):
        return image
    if not isinstance(image, str) or not image:
        raise RecordError(f"{where}: image: expected a path or an {{bytes, path}} object, got {image!r:.60}")
    return image if os.path.isabs(image) else str(root / image)


def user_messages(text: str, num_images: int) -> list[dict]:
    """The user turn in HF chat format: image parts first, then the text."""
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}]


# ---------------------------------------------------------------- benchmarks


def vlrb_category(row_id: str) -> str:
    """VL-RewardBench category from the id's leading word (case-insensitive, and the prefix must
    end at a non-letter: ``RLAIF-V-14``, ``hallucination_pair-3``, ``mmmu_pro_...`` match, a made-up
    ``rlhfx-1`` does not): RLAIF/RLHF/hallucination -> hallucination, mathverse/mmmu -> reasoning,
    wildvision and anything else (vlfeedback) -> general."""
    match = _VLRB_PREFIX.match(row_id)
    return _VLRB_CATEGORY_OF[match.group(1).lower()] if match else "general"


def vlrb_cases(rows: list[tuple[str, dict]], image_root: Path) -> list[Case]:
    """Rows ``id, query, response[2], image | image_path, human_ranking``. The image is a path, a list
    of paths or an HF Image struct (``{bytes, path}``). ``human_ranking[i]`` is
    response i's rank, rank 0 preferred (``[0, 1]``: response 0)."""
    cases = []
    for where, row in rows:
        row_id = str(_field(row, where, "id", lambda v: isinstance(v, (str, int)), "str or int"))
        query = _field(row, where, "query", _is_str, "str")
        responses = _field(row, where, "response", lambda v: isinstance(v, list) and len(v) == 2
                           and all(map(_is_str, v)), "a list of 2 str")
        ranking = _field(row, where, "human_ranking", lambda v: isinstance(v, list)
                         and all(type(r) is int for r in v) and sorted(v) == [0, 1], "a permutation of [0, 1]")
        image = row.get("image") if row.get("image") is not None else row.get("image_path")
        images = [_resolve(i, image_root, where) for i in (image if isinstance(image, list) else [image]) if i]
        items = [{"messages": user_messages(query, len(images)), "images": images, "response": r}
                 for r in responses]
        cases.append(Case(row_id, where, vlrb_category(row_id), items, ranking.index(0)))
    return cases


def rewardbench_cases(rows: list[tuple[str, dict]]) -> list[Case]:
    """Rows ``prompt, chosen, rejected, subset, id`` (text only)."""
    cases = []
    for where, row in rows:
        prompt, chosen, rejected, subset = (_field(row, where, name, _is_str, "str")
                                            for name in ("prompt", "chosen", "rejected", "subset"))
        row_id = _row_id(row, where, "id")
        items = [{"messages": user_messages(prompt, 0), "images": [], "response": r} for r in (chosen, rejected)]
        cases.append(Case(row_id, where, subset, items, 0))
    return cases


def pair_cases(rows: list[tuple[str, dict]], image_root: Path) -> list[Case]:
    """Rows in the PreferencePair shape: ``messages, images (optional), chosen, rejected``."""
    cases = []
    for where, row in rows:
        messages = _field(row, where, "messages", lambda v: isinstance(v, list) and v
                          and all(isinstance(m, dict) for m in v), "a non-empty list of objects")
        chosen, rejected = (_field(row, where, name, _is_str, "str") for name in ("chosen", "rejected"))
        raw = row.get("images") if row.get("images") is not None else []
        if not isinstance(raw, list):
            raise RecordError(f"{where}: field 'images': expected a list, got {type(raw).__name__}")
        images = [_resolve(image, image_root, where) for image in raw]
        items = [{"messages": messages, "images": images, "response": r} for r in (chosen, rejected)]
        cases.append(Case(_row_id(row, where, "prompt_id", "id"), where, "all", items, 0))
    return cases


# ---------------------------------------------------------------- scoring


def judge(cases: list[Case], score_fn: ScoreFn, unscored_is_wrong: bool = False) -> list[bool]:
    """Score every item in one ``score_fn`` call; a case is correct iff its preferred item scores
    strictly higher than each of the others. With ``unscored_is_wrong``, a None score (an item the
    scorer skipped as too long) makes its case wrong, so the benchmark's denominators stay whole;
    otherwise it is an error."""
    items = [item for case in cases for item in case.items]
    scores = list(score_fn(items))
    if len(scores) != len(items):
        raise BenchmarkError(f"score_fn returned {len(scores)} scores for {len(items)} items")
    verdicts, start = [], 0
    for case in cases:
        mine = []
        for value in scores[start:start + len(case.items)]:
            if value is None and unscored_is_wrong:
                mine.append(None)
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise BenchmarkError(f"{case.where}: row {case.row_id!r}: score {value!r} is not a number") from None
            if not math.isfinite(number):
                raise BenchmarkError(f"{case.where}: row {case.row_id!r}: non-finite score {number}")
            mine.append(number)
        start += len(case.items)
        best = mine[case.preferred]
        verdicts.append(None not in mine and all(best > s for i, s in enumerate(mine) if i != case.preferred))
    return verdicts


def _tally(cases: list[Case], verdicts: list[bool], groups: Sequence[str] = ()) -> dict[str, dict]:
    """{group: {accuracy, correct, count}}; groups named in ``groups`` appear even when empty
    (accuracy None)."""
    out: dict[str, dict] = {g: {"accuracy": None, "correct": 0, "count": 0} for g in groups}
    for case, ok in zip(cases, verdicts):
        entry = out.setdefault(case.group, {"accuracy": None, "correct": 0, "count": 0})
        entry["correct"] += int(ok)
        entry["count"] += 1
    for entry in out.values():
        if entry["count"]:
            entry["accuracy"] = entry["correct"] / entry["count"]
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def vlrb_results(cases: list[Case], verdicts: list[bool]) -> dict:
    """Overall = all correct / all rows; macro = mean of the category accuracies (a category with no
    rows has accuracy None and is left out of the macro average)."""
    categories = _tally(cases, verdicts, VLRB_CATEGORIES)
    return {"benchmark": "vl-rewardbench", "num_rows": len(cases),
            "overall_accuracy": sum(verdicts) / len(cases),
            "macro_average": _mean([c["accuracy"] for c in categories.values() if c["count"]]),
            "categories": categories}


def rewardbench_results(cases: list[Case], verdicts: list[bool]) -> dict:
    """Section = weighted mean (REWARDBENCH_SECTIONS weights) of the accuracies of its subsets present
    in the data; a section with no subset present is left out and named in ``missing_sections``;
    ``score`` = plain mean of the sections present (None if none is). Subsets outside every section
    are reported in ``subsets`` and ``unsectioned_subsets`` but weigh nowhere."""
    subsets = dict(sorted(_tally(cases, verdicts).items()))
    sections, missing = {}, []
    for section, weights in REWARDBENCH_SECTIONS.items():
        present = {name: w for name, w in weights.items() if name in subsets}
        if not present:
            missing.append(section)
            continue
        total = sum(present.values())
        sections[section] = sum(w * subsets[name]["accuracy"] for name, w in present.items()) / total
    known = {name for weights in REWARDBENCH_SECTIONS.values() for name in weights}
    return {"benchmark": "rewardbench", "num_rows": len(cases), "score": _mean(list(sections.values())),
            "sections": sections, "missing_sections": missing, "subsets": subsets,
            "unsectioned_subsets": sorted(set(subsets) - known)}


def pair_results(cases: list[Case], verdicts: list[bool]) -> dict:
    correct = sum(verdicts)
    return {"benchmark": "pairs", "accuracy": correct / len(cases), "correct": correct, "count": len(cases)}


def evaluate(benchmark: str, path: str | os.PathLike, score_fn: ScoreFn,
             image_root: str | os.PathLike | None = None, unscored_is_wrong: bool = False) -> dict:
    """Load ``path``, score it with ``score_fn`` and apply ``benchmark``'s rules
    ("vl-rewardbench" | "rewardbench" | "pairs"); returns a JSON-serialisable dict."""
    if benchmark not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    rows = load_rows(path)
    root = Path(image_root) if image_root is not None else Path(path).parent
    if benchmark == "vl-rewardbench":
        cases = vlrb_cases(rows, root)
        return vlrb_results(cases, judge(cases, score_fn, unscored_is_wrong))
    if benchmark == "rewardbench":
        cases = rewardbench_cases(rows)
        return rewardbench_results(cases, judge(cases, score_fn, unscored_is_wrong))
    cases = pair_cases(rows, root)
    return pair_results(cases, judge(cases, score_fn, unscored_is_wrong))


# ---------------------------------------------------------------- printing


def _pct(value: float | None) -> str:
    return "   n/a" if value is None else f"{100 * value:6.1f}"


def format_table(results: dict) -> str:
    """A plain-text table of a results dict (accuracies in percent)."""
    if "categories" in results:
        lines = [f"VL-RewardBench ({results['num_rows']} rows)"]
        lines += [f"  {name:<22}{_pct(c['accuracy'])}  {c['correct']}/{c['count']}"
                  for name, c in results["categories"].items()]
        lines += [f"  {'overall':<22}{_pct(results['overall_accuracy'])}",
                  f"  {'macro average':<22}{_pct(results['macro_average'])}"]
    elif "sections" in results:
        lines = [f"RewardBench ({results['num_rows']} rows)"]
        for name, c in results["subsets"].items():
            lines.append(f"    {name:<24}{_pct(c['accuracy'])}  {c['correct']}/{c['count']}")
        for section in REWARDBENCH_SECTIONS:
            lines.append(f"  {section:<26}{_pct(results['sections'].get(section))}")
        lines.append(f"  {'score':<26}{_pct(results['score'])}")
        if results["missing_sections"]:
            lines.append(f"  (no rows for: {', '.join(results['missing_sections'])}; score is over the rest)")
    else:
        lines = [f"pairwise accuracy {_pct(results['accuracy']).strip()}  {results['correct']}/{results['count']}"]
    return "\n".join(lines)

"""``--benchmark answers``: any prompt rows that carry a ground-truth ``answer`` (optionally ``choices``,
``answer_type``, ``precision``, ``category``), judged by :func:`mpo.eval.extract.answer_matches`.

The scores: ``{"overall": {"accuracy", "correct", "total"}, "category": {name: {...}}}`` (accuracy in
percent, two decimals; ``category`` only when rows have one). The rules are this project's own
(:mod:`mpo.eval.extract`), not a benchmark's.
"""

from __future__ import annotations

from mpo.errors import MpoError
from mpo.eval.extract import answer_matches, extract_answer


def row_id(row: dict) -> str:
    """A row's identity: ``prompt_id``, ``id`` or ``pid``, the first present."""
    for key in ("prompt_id", "id", "pid"):
        if row.get(key) is not None:
            return str(row[key])
    raise MpoError(f"answers row has no prompt_id/id/pid: {sorted(row)[:6]}")


def judge_answer(row: dict, response: str) -> dict:
    """``{id, extraction, prediction, true_false}`` for one row and its response."""
    if row.get("answer") is None:
        raise MpoError(f"row {row_id(row)!r} has no 'answer'")
    kinds = {"choices": row.get("choices"), "answer_type": row.get("answer_type"), "precision": row.get("precision")}
    extraction = extract_answer(response, **kinds)
    return {"id": row_id(row), "extraction": extraction, "prediction": extraction,
            "true_false": answer_matches(response, row["answer"], **kinds)}


def _tally(rows: list[dict]) -> dict:
    correct = sum(1 for row in rows if row["true_false"])
    return {"accuracy": round(100 * correct / len(rows), 2), "correct": correct, "total": len(rows)}


def score_answers(rows: list[dict], responses: dict[str, str]) -> tuple[list[dict], dict]:
    """Judge every row against ``responses[id]``; ``(per-row judgements, scores)``. A row without a
    response is an error naming it (an evaluation scores every row it was given)."""
    if not rows:
        raise MpoError("no answer rows to score")
    judged, categories = [], {}
    for row in rows:
        key = row_id(row)
        if key not in responses:
            raise MpoError(f"row {key!r} has no response")
        judgement = judge_answer(row, responses[key])
        judged.append(judgement)
        if row.get("category") is not None:
            categories.setdefault(str(row["category"]), []).append(judgement)
    scores = {"overall": _tally(judged)}
    if categories:
        scores["category"] = {name: _tally(group) for name, group in sorted(categories.items())}
    return judged, scores

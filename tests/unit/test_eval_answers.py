"""``--benchmark answers`` scoring (mpo/eval/answers.py) on the Geometry3K prompts the toolkit already
ships (tests/fixtures/geometry3k/prompts.jsonl: answer letters, no choices list)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpo.errors import MpoError
from mpo.eval.answers import score_answers

PROMPTS = Path(__file__).resolve().parents[1] / "fixtures" / "geometry3k" / "prompts.jsonl"


def test_geometry3k_letters_overall_and_per_category():
    rows = [json.loads(line) for line in PROMPTS.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 10
    rows = [dict(row, category="first five" if i < 5 else "last five") for i, row in enumerate(rows)]
    responses = {row["prompt_id"]: f"<think>maybe A</think>The answer is ({row['answer']})." for row in rows[:7]}
    responses.update({row["prompt_id"]: "The answer is (Z)." for row in rows[7:]})
    judged, scores = score_answers(rows, responses)
    assert scores["overall"] == {"accuracy": 70.0, "correct": 7, "total": 10}
    assert scores["category"] == {"first five": {"accuracy": 100.0, "correct": 5, "total": 5},
                                  "last five": {"accuracy": 40.0, "correct": 2, "total": 5}}
    assert judged[0] == {"id": "geometry3k-11", "extraction": "D", "prediction": "D", "true_false": True}


def test_numbers_with_precision_and_errors():
    rows = [{"id": "a", "answer": "1.3", "answer_type": "float", "precision": 1},
            {"id": "b", "answer": "44", "choices": ["22", "40", "44", "48"]}]
    judged, scores = score_answers(rows, {"a": "so it is \\frac{4}{3}", "b": "The answer is 44."})
    assert [j["true_false"] for j in judged] == [True, True] and "category" not in scores
    with pytest.raises(MpoError, match="row 'b' has no response"):
        score_answers(rows, {"a": "1.3"})
    with pytest.raises(MpoError, match="row 'x' has no 'answer'"):
        score_answers([{"id": "x"}], {"x": "1"})

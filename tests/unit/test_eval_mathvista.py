"""MathVista's zero-shot query and scoring (mpo/eval/mathvista.py), pinned to the benchmark's own files.

Fixtures: tests/fixtures/eval/mathvista (testmini.json, output_chatgpt.json, scores_chatgpt.json from
lupantech/MathVista at 53d5258; SOURCE.txt there)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from mpo.errors import MpoError
from mpo.eval import mathvista

DATA = Path(__file__).resolve().parents[1] / "fixtures" / "eval" / "mathvista"


@pytest.fixture(scope="module")
def testmini():
    return json.loads((DATA / "testmini.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def outputs():
    return json.loads((DATA / "output_chatgpt.json").read_text(encoding="utf-8"))


# The 15 testmini rows that changed after the official queries were made (output_chatgpt.json's `query`).
CHOICES_REORDERED = {"99", "168", "229", "287", "291", "513", "670", "688", "849"}  # same options, new order
CHOICES_CHANGED = {"272"}  # the clock's options themselves differ (1:30, 6:30, 5:30, 4:30, 12:30 then)
STRAY_WHITESPACE = {"237", "353", "617", "833", "999"}  # a trailing " " or "\r\n" ends a choice/question now


def test_built_queries_equal_the_official_ones_but_for_15_rows_that_changed_since(testmini, outputs):
    differ = {pid for pid, row in testmini.items() if mathvista.build_query(row) != outputs[pid]["query"]}
    assert len(testmini) - len(differ) == 985
    assert differ == CHOICES_REORDERED | CHOICES_CHANGED | STRAY_WHITESPACE
    for pid in differ:
        ours, theirs = mathvista.build_query(testmini[pid]), outputs[pid]["query"]
        if pid in STRAY_WHITESPACE:
            assert ours.split() == theirs.split()
        else:
            head = ours.split("Choices:")[0]
            assert theirs.startswith(head) and ours.split("\n")[-len(testmini[pid]["choices"]):] != \
                theirs.split("\n")[-len(testmini[pid]["choices"]):]
            options = sorted(line[4:] for line in theirs.split("Choices:\n")[1].split("\n"))
            assert (options == sorted(testmini[pid]["choices"])) == (pid in CHOICES_REORDERED)


def test_query_shape_hint_question_unit_choices():
    row = {"pid": "x", "question": "How long is it?", "unit": "cm", "choices": ["1", "2"],
           "question_type": "multi_choice", "answer_type": "text", "precision": None}
    assert mathvista.build_query(row) == (
        "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, "
        "at the end.\n"
        "Question: How long is it? (Unit: cm)\nChoices:\n(A) 1\n(B) 2")
    free = dict(row, choices=None, unit=None, question_type="free_form", answer_type="float", precision=2.0)
    assert "two decimal places" in mathvista.build_query(free).split("\n")[0]
    with pytest.raises(MpoError, match="no MathVista hint"):
        mathvista.build_query(dict(free, precision=3))


def _judged(outputs, extraction_of):
    return [{**problem, "true_false": mathvista.judge(extraction_of(problem), problem)[1]}
            for problem in outputs.values()]


def test_scores_reproduce_scores_chatgpt_json_exactly(outputs):
    """Every count and accuracy string of the published file, in its order (skills: its set order aside).

    One row of output_chatgpt.json was rewritten after the scores were made: pid 4 has no extraction and
    no true_false any more, and its skills gained "geometry reasoning" (the other models' output files,
    scored with the same testmini, list only "arithmetic reasoning"). Scored with pid 4's skills as they
    were, the table equals the published one; as the file is now, only that one group's total differs."""
    published = json.loads((DATA / "scores_chatgpt.json").read_text(encoding="utf-8"))
    as_scored = copy.deepcopy(outputs)
    as_scored["4"]["metadata"]["skills"] = ["arithmetic reasoning"]
    table = mathvista.scores_table(_judged(as_scored, lambda p: p.get("extraction", "")))
    assert table == published
    in_order = mathvista.BREAKDOWNS[:-1]
    assert [list(table[k]) for k in in_order] == [list(published[k]) for k in in_order]
    now = mathvista.scores_table(_judged(outputs, lambda p: p.get("extraction", "")))
    assert now["skills"]["geometry reasoning"] == {"accuracy": "25.56", "correct": 57, "total": 223}
    now.pop("skills")
    assert now == {k: v for k, v in published.items() if k != "skills"}


def test_judge_output_keeps_the_official_prediction_and_rules_fill_missing_extractions(outputs):
    rows = {pid: mathvista.judge_output(problem) for pid, problem in outputs.items()}
    assert sum(row["true_false"] for row in rows.values()) == 235
    assert [pid for pid, row in rows.items() if row["extracted_by"] == "rules"] == ["2", "4"]
    assert all(row["true_false"] == outputs[pid]["true_false"] for pid, row in rows.items()
               if pid not in ("2", "4"))
    # pid 246: GPT-4 extracted "0.0002" for an integer answer; the scorer of the day wrote prediction None
    assert rows["246"]["prediction"] is None
    assert mathvista.judge_output(outputs["246"], keep_prediction=False)["prediction"] == "0"


@pytest.mark.parametrize("extraction, row, expected", [
    ("B", {"choices": ["3", "4"]}, "4"),                        # letter -> option text
    ("(b) four", {"choices": ["3", "4"]}, "4"),                  # "(x)" inside -> its letter, upper-cased
    ("C", {"choices": ["3", "4"]}, "3"),                         # letter out of range -> nearest option
    ("fourty", {"choices": ["forty", "four"]}, "forty"),         # nearest by edit distance
    ("", {"choices": ["long one", "ab", "xy"]}, "ab"),           # empty -> the first shortest option
    (None, {"choices": ["No", "None"]}, "None"),                 # non-text -> str() first
])
def test_multiple_choice_normalisation(extraction, row, expected):
    assert mathvista.normalise_extraction(extraction, {"question_type": "multi_choice", **row}) == expected


@pytest.mark.parametrize("extraction, answer_type, precision, expected", [
    ("2.0", "integer", None, "2"), ("-0.5", "integer", None, "0"), ("1,000", "integer", None, None),
    ("inf", "integer", None, None), (None, "integer", None, None),
    ("1.25", "float", 1, "1.2"), ("3", "float", 2.0, "3.0"), ("x", "float", 1, None),
    ([1, 2], "list", None, "[1, 2]"),
])
def test_free_form_normalisation(extraction, answer_type, precision, expected):
    row = {"question_type": "free_form", "answer_type": answer_type, "precision": precision}
    assert mathvista.normalise_extraction(extraction, row) == expected


def test_edit_distance_is_levenshtein():
    assert [mathvista.edit_distance(a, b) for a, b in
            [("", ""), ("abc", ""), ("kitten", "sitting"), ("flaw", "lawn"), ("N/A", "No"), ("N/A", "Yes")]] \
        == [0, 3, 3, 2, 2, 3]


def test_parquet_form_as_on_hugging_face(tmp_path, testmini):
    """The `datasets` form: one row per problem, precision a float (1.0), an image column not read."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [dict(row, precision=None if row["precision"] is None else float(row["precision"]),
                 decoded_image={"bytes": b"\x89PNG", "path": row["image"]}) for row in testmini.values()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "testmini-00000-of-00001.parquet")
    loaded = mathvista.load_problems(tmp_path / "testmini-00000-of-00001.parquet")
    assert list(loaded) == list(testmini) and "decoded_image" not in loaded["1"]
    assert all(mathvista.build_query(loaded[pid]) == mathvista.build_query(testmini[pid]) for pid in testmini)
    assert mathvista.judge("1.25", loaded["1"]) == ("1.2", True)  # precision 1.0 rounds as 1


def test_load_problems_errors_name_the_file(tmp_path):
    bad = tmp_path / "out.json"
    bad.write_text('{"1": {"question": "q"}}')
    with pytest.raises(MpoError, match="out.json.*'pid'"):
        mathvista.load_problems(bad)
    bad.write_text('{"1": {"pid": "1", "question_type": "free_form", "answer_type": "integer"}}')
    with pytest.raises(MpoError, match="pid '1' has no 'answer'"):
        mathvista.load_problems(bad)
    bad.write_text("{")
    with pytest.raises(MpoError, match="cannot read"):
        mathvista.load_problems(bad)

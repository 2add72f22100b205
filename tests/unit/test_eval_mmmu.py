"""MMMU's parsing and scoring (mpo/eval/mmmu.py), pinned to MMMU's own figures for qwen_vl.

Fixtures: tests/fixtures/eval/mmmu (answer_dict_val.json and example_outputs/qwen_vl/<Subject>/output.json
from MMMU-Benchmark/MMMU at bb0b95a; SOURCE.txt there). The expected table below is what MMMU's own
``main_parse_and_eval.py --subject ALL`` + ``main_eval_only.py``'s table code print for these files at
that commit (overall 0.361, the figure the shared data README quotes)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from mpo.errors import MpoError
from mpo.eval import mmmu
from mpo.eval.score_only import load_mmmu_outputs

DATA = Path(__file__).resolve().parents[1] / "fixtures" / "eval" / "mmmu"

CORRECT = {  # per subject, of 30 each
    "Accounting": 12, "Agriculture": 12, "Architecture_and_Engineering": 9, "Art": 14, "Art_Theory": 17,
    "Basic_Medical_Science": 10, "Biology": 11, "Chemistry": 8, "Clinical_Medicine": 9, "Computer_Science": 7,
    "Design": 18, "Diagnostics_and_Laboratory_Medicine": 6, "Economics": 7, "Electronics": 6,
    "Energy_and_Power": 13, "Finance": 9, "Geography": 6, "History": 12, "Literature": 24, "Manage": 8,
    "Marketing": 9, "Materials": 10, "Math": 10, "Mechanical_Engineering": 10, "Music": 11, "Pharmacy": 13,
    "Physics": 10, "Psychology": 8, "Public_Health": 13, "Sociology": 13,
}
DISCIPLINES = {"Art and Design": (120, 0.5), "Business": (150, 0.3), "Science": (150, 0.3),
               "Health and Medicine": (150, 0.34), "Humanities and Social Science": (120, 0.475),
               "Tech and Engineering": (210, 0.319)}


@pytest.fixture(scope="module")
def outputs():
    return load_mmmu_outputs(DATA / "qwen_vl")


@pytest.fixture(scope="module")
def answers():
    return json.loads((DATA / "answer_dict_val.json").read_text(encoding="utf-8"))


def test_qwen_vl_table_equals_mmmus_own(outputs, answers):
    judged, results = mmmu.evaluate_subjects(outputs, answers)
    assert len(judged) == 900
    assert {s: round(r["acc"] * r["num_example"]) for s, r in results.items()} == CORRECT
    table = mmmu.scores_table(results)
    assert table["Overall"] == {"num": 900, "acc": 0.361}
    overall = {d: table[f"Overall-{d}"] for d in DISCIPLINES}
    assert {d: (entry["num"], entry["acc"]) for d, entry in overall.items()} == DISCIPLINES
    assert all(table[s] == {"num": 30, "acc": round(c / 30, 3)} for s, c in CORRECT.items())
    assert list(table)[:5] == ["Overall-Art and Design", "Art", "Art_Theory", "Design", "Music"]
    # the key and the rows' own `answer` agree, so main_parse_and_eval.py's truth gives the same
    assert mmmu.evaluate_subjects(outputs)[1] == results


def test_the_seeded_draws_follow_mmmus_order(outputs):
    """48 answers parse to nothing and are drawn at random; only MMMU's seed in MMMU's order gives 0.361."""
    class Counting(random.Random):
        draws = 0

        def choice(self, seq):
            Counting.draws += 1
            return super().choice(seq)

    for subject in mmmu.SUBJECT_ORDER:
        for row in outputs[subject]:
            if row["question_type"] == "multiple-choice":
                mmmu.parse_multi_choice(row["response"], row["all_choices"], row["index2ans"], Counting(0))
    assert Counting.draws == 48
    assert mmmu.scores_table(mmmu.evaluate_subjects(outputs, seed=0)[1])["Overall"]["acc"] == 0.357


@pytest.mark.parametrize("response, expected", [
    ("(B)", "B"), ("The answer is (C).", "C"), ("B", "B"), ("I pick A or B", "B"),
    ("(A) is wrong; (C) is right", "C"),  # several bracketed letters: the last one
    ("I think the right one is the red apple here", "A"),  # option text, responses over five words
    ("red apple", "A"),  # too short for option text: a seeded draw (A for Random(1) over A-C)
    ("blue plum", "A"),  # the same draw: the text is not read
])
def test_parse_multi_choice(response, expected):
    index2ans = {"A": "red apple", "B": "green pear", "C": "blue plum"}
    assert mmmu.parse_multi_choice(response, ["A", "B", "C"], index2ans, random.Random(1)) == expected


def test_parse_open_and_judge():
    parsed = mmmu.parse_open("Let me see.\nSo the speed is 3.43 m/s, or 24/7")
    assert sorted(map(str, parsed)) == ["24.0", "3.43", "3.43 m/s, or 24/7", "7.0"]
    assert mmmu.judge("short-answer", ["24/7", "3.429"], mmmu.parse_open("the answer is 3.429")) is True
    assert mmmu.judge("short-answer", "30", mmmu.parse_open("36 watts")) is False
    assert mmmu.judge("short-answer", "A", mmmu.parse_open("the answer is banana")) is False  # " a" / "a "
    assert mmmu.judge("short-answer", "A", mmmu.parse_open("the answer is a")) is True
    assert mmmu.normalise_value("1,234.567") == [1234.57] and mmmu.normalise_value("X") == [" x", "x "]
    # MMMU's three patterns overlap; their plain one also finds "234", "1" and "-3" (kept, as there)
    assert mmmu.numbers_in("1,234 and 1.5e-3 and -7") == ["1,234", "1.5e-3", "234", "1", "-3", "-7"]
    assert mmmu.judge("multiple-choice", "B", "B") and not mmmu.judge("multiple-choice", ["A", "C"], "B")


def test_prompt_is_mmmus():
    row = {"question": "<image 1> Which is it?", "options": "['red', 'blue']",
           "question_type": "multiple-choice"}
    built = mmmu.build_prompt(row)
    assert built["prompt"] == ("<image 1> Which is it?\n(A) red\n(B) blue\n\n"
                               "Answer with the option's letter from the given choices directly.")
    assert built["all_choices"] == ["A", "B"] and built["index2ans"] == {"A": "red", "B": "blue"}
    open_row = {"question": "How many?", "options": "[]", "question_type": "open"}
    assert mmmu.build_prompt(open_row)["prompt"] == \
        "How many?\nAnswer the question using a single word or phrase."
    assert mmmu.subject_of("validation_Art_Theory_12") == "Art_Theory"
    with pytest.raises(MpoError, match="not a list"):
        mmmu.option_list("['a'")


def test_unknown_subjects_and_empty_folders_are_one_line_errors(tmp_path):
    with pytest.raises(MpoError, match="unknown MMMU subject"):
        mmmu.evaluate_subjects({"Cooking": []})
    with pytest.raises(MpoError, match="no <Subject>/output.json"):
        load_mmmu_outputs(tmp_path)

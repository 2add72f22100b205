"""``mpo eval --score-only`` without the CLI (mpo/eval/score_only.py): the official files re-scored give the
published numbers, and the files it writes (tests/fixtures/eval; SOURCE.txt there)."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pytest

from mpo.errors import MpoError
from mpo.eval import mathvista, score_only

EVAL = Path(__file__).resolve().parents[1] / "fixtures" / "eval"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_mathvista_scores_and_predictions(tmp_path):
    scores = score_only.score_only(EVAL / "mathvista" / "output_chatgpt.json", "mathvista",
                                   output=tmp_path / "scores.json", predictions=tmp_path / "pred.jsonl")
    published = json.loads((EVAL / "mathvista" / "scores_chatgpt.json").read_text(encoding="utf-8"))
    assert json.loads((tmp_path / "scores.json").read_text(encoding="utf-8")) == scores
    # all but the one group pid 4's rewritten skills changed (see test_eval_mathvista.py)
    expected = copy.deepcopy(published)
    expected["skills"]["geometry reasoning"] = {"accuracy": "25.56", "correct": 57, "total": 223}
    assert scores == expected
    rows = _lines(tmp_path / "pred.jsonl")
    assert len(rows) == 1000
    assert set(rows[0]) == {"pid", "extraction", "prediction", "true_false", "extracted_by"}
    assert rows[0] == {"pid": "1", "extraction": "0.1", "prediction": "0.1", "true_false": False,
                       "extracted_by": "official"}
    assert sum(row["true_false"] for row in rows) == 235


def test_a_second_model_scored_by_the_older_integer_rule(tmp_path):
    """mPLUG-Owl's published scores were made when integers were normalised by ``str(int(x))``: pid 525's
    extraction "-0.005" scored wrong then, while today's ``str(int(float(x)))`` makes it "0", right.
    Keeping the official ``prediction`` reproduces the published file exactly; re-normalising is one off."""
    folder = EVAL / "mathvista" / "mplugowl"
    path = tmp_path / "output_mplugowl_7b_ft.json"
    path.write_bytes(gzip.decompress((folder / "output_mplugowl_7b_ft_DERIVED.json.gz").read_bytes()))
    published = json.loads((folder / "scores_mplugowl_7b_ft.json").read_text(encoding="utf-8"))
    rows, scores = score_only.score_mathvista(path)
    assert scores == published
    _, today = score_only.score_mathvista(path, keep_predictions=False)
    assert (today["average"]["correct"], published["average"]["correct"]) == (223, 222)
    assert next(r for r in rows if r["pid"] == "525")["extraction"] == "-0.005"


def test_mathvista_without_official_extractions_uses_the_rules(tmp_path):
    outputs = json.loads((EVAL / "mathvista" / "output_chatgpt.json").read_text(encoding="utf-8"))
    bare = {pid: {k: v for k, v in p.items() if k not in ("extraction", "prediction", "true_false")}
            for pid, p in outputs.items()}
    path = tmp_path / "output_bare.json"
    path.write_text(json.dumps(bare), encoding="utf-8")
    scores = score_only.score_only(path, "mathvista")
    assert scores["average"]["total"] == 1000
    assert abs(scores["average"]["correct"] - 235) <= 5  # rule-extracted, not GPT-extracted: 23.x%
    assert list(scores) == ["average", *mathvista.BREAKDOWNS]


def test_mmmu_folder(tmp_path):
    scores = score_only.score_only(EVAL / "mmmu" / "qwen_vl", "mmmu", output=tmp_path / "s.json",
                                   predictions=tmp_path / "p.jsonl",
                                   answers=EVAL / "mmmu" / "answer_dict_val.json")
    assert scores["Overall"] == {"num": 900, "acc": 0.361}
    assert scores["Overall-Humanities and Social Science"] == {"num": 120, "acc": 0.475}
    assert scores["Literature"] == {"num": 30, "acc": 0.8}
    rows = _lines(tmp_path / "p.jsonl")
    assert len(rows) == 900 and sum(r["true_false"] for r in rows) == 325
    assert rows[0]["id"] == "validation_Accounting_1"
    assert score_only.summary_lines(scores, "mmmu")[-1].split() == ["Overall", "900", "36.1"]


def test_one_line_errors(tmp_path):
    with pytest.raises(MpoError, match="--score-only reads mathvista or mmmu"):
        score_only.score_only(tmp_path, "answers")
    with pytest.raises(MpoError, match="not a folder of MMMU subjects"):
        score_only.score_only(tmp_path / "missing", "mmmu")
    (tmp_path / "Math").mkdir()
    (tmp_path / "Math" / "output.json").write_text('[{"id": "validation_Math_1"}]')
    with pytest.raises(MpoError, match="row 0 has no 'question_type'"):
        score_only.score_only(tmp_path, "mmmu")
    key = tmp_path / "key.json"
    key.write_text("{}")
    (tmp_path / "Math" / "output.json").write_text(
        '[{"id": "validation_Math_1", "question_type": "short-answer", "response": "3", "answer": "3"}]')
    with pytest.raises(MpoError, match="no answer for id 'validation_Math_1'"):
        score_only.score_only(tmp_path, "mmmu", answers=key)

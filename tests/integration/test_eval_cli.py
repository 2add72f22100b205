"""`mpo eval` through the console script, run from the repository root with relative paths: --score-only on
the benchmarks' own files gives their published counts; generation with the tiny policy writes predictions
and scores that agree with each other, and a rerun reuses the finished work without loading the model;
with launch.mode=distributed two torchrun ranks on CPU make the responses and the files are the same bytes."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpo.eval.extract import answer_matches

ROOT = Path(__file__).resolve().parents[2]
EVAL = Path("tests/fixtures/eval")
GEOMETRY = Path("tests/fixtures/geometry3k/prompts.jsonl")


def mpo(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(Path(sys.executable).parent / "mpo"), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=600)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_score_only_mathvista_gives_the_published_counts(tmp_path):
    result = mpo("eval", "--score-only", EVAL / "mathvista" / "output_chatgpt.json", "--benchmark", "mathvista",
                 "--output", tmp_path / "scores.json", "--predictions", tmp_path / "pred.jsonl")
    assert result.returncode == 0, result.stderr[-2000:]
    published = json.loads((ROOT / EVAL / "mathvista" / "scores_chatgpt.json").read_text(encoding="utf-8"))
    expected = copy.deepcopy(published)  # pid 4 was rewritten after scoring (tests/unit/test_eval_score_only.py)
    expected["skills"]["geometry reasoning"] = {"accuracy": "25.56", "correct": 57, "total": 223}
    assert json.loads((tmp_path / "scores.json").read_text(encoding="utf-8")) == expected
    assert sum(row["true_false"] for row in _lines(tmp_path / "pred.jsonl")) == 235
    assert result.stdout.splitlines()[0].split() == ["average", "235/1000", "23.5"]


def test_score_only_mmmu_and_one_line_errors(tmp_path):
    result = mpo("eval", "--score-only", EVAL / "mmmu" / "qwen_vl", "--benchmark", "mmmu", "--answers",
                 EVAL / "mmmu" / "answer_dict_val.json", "--output", tmp_path / "scores.json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "scores.json").read_text())["Overall"] == {"num": 900, "acc": 0.361}
    bad = mpo("eval", "--score-only", EVAL / "mmmu" / "qwen_vl", "--benchmark", "mmlu")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: --benchmark 'mmlu': expected one of mathvista, mmmu, answers")
    no_data = mpo("eval", "--score-only", tmp_path / "pred.jsonl", "--benchmark", "answers")
    assert no_data.returncode == 2 and "--data" in no_data.stderr and len(no_data.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_policy_dir):
    """The tiny policy on the ten geometry problems (answers: run twice) and on four MathVista rows."""
    from PIL import Image

    root = tmp_path_factory.mktemp("eval")
    (root / "recipe.yaml").write_text(
        f"run: {{output_dir: {root / 'run'}}}\nmodel: {{policy: {tiny_policy_dir}, dtype: float32, "
        "min_pixels: 3136, max_pixels: 12544}\nrollout: {backend: hf}\n")
    official = json.loads((ROOT / EVAL / "mathvista" / "output_chatgpt.json").read_text(encoding="utf-8"))
    rows = {pid: {k: v for k, v in official[pid].items() if k not in ("query", "response", "extraction",
                                                                      "prediction", "true_false", "error")}
            for pid in ("1", "2", "3", "5")}
    (root / "mathvista" / "images").mkdir(parents=True)
    for pid, row in rows.items():
        Image.new("RGB", (56, 56), (50 * int(pid), 100, 200)).save(root / "mathvista" / row["image"])
    (root / "mathvista" / "testmini.json").write_text(json.dumps(rows))
    runs = {}
    for name, benchmark, data in (("answers", "answers", GEOMETRY), ("mathvista", "mathvista",
                                                                      root / "mathvista" / "testmini.json")):
        args = ("eval", root / "recipe.yaml", "--benchmark", benchmark, "--data", data, "--max-tokens", "6",
                "--chunk-size", "4", "--output", root / f"{name}.json", "--predictions", root / f"{name}.jsonl")
        first = mpo(*args)
        assert first.returncode == 0, first.stderr[-3000:]
        work = root / f"{name}.eval"
        made = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in work.iterdir() if p.is_file()}
        runs[name] = (first, mpo(*args) if name == "answers" else None, made, work)
    return root, runs


@pytest.mark.slow
def test_generation_writes_consistent_predictions_and_scores(evaluated):
    root, runs = evaluated
    first, _, made, work = runs["answers"]
    truths = {row["prompt_id"]: row["answer"] for row in _lines(ROOT / GEOMETRY)}
    predictions = _lines(root / "answers.jsonl")
    assert [row["id"] for row in predictions] == list(truths)
    assert [row["true_false"] for row in predictions] == [answer_matches(row["response"], truths[row["id"]])
                                                           for row in predictions]
    scores = json.loads((root / "answers.json").read_text())
    right = sum(row["true_false"] for row in predictions)
    assert scores["overall"] == {"accuracy": round(100 * right / 10, 2), "correct": right, "total": 10}
    assert first.stdout.splitlines()[-2].split()[:2] == ["overall", f"{right}/10"]
    assert {"rollouts.jsonl", "predictions.jsonl", "scores.json"} <= set(made)
    responses = _lines(work / "rollouts.jsonl")
    assert [r["response"] for r in responses] == [row["response"] for row in predictions]
    assert all(r["num_tokens"] <= 6 for r in responses)
    rescored = mpo("eval", "--score-only", root / "answers.jsonl", "--benchmark", "answers", "--data", GEOMETRY,
                   "--output", root / "rescored.json")
    assert rescored.returncode == 0, rescored.stderr[-2000:]
    assert json.loads((root / "rescored.json").read_text()) == scores


@pytest.mark.slow
def test_rerun_reuses_finished_work_and_mathvista_rows_are_scored(evaluated):
    root, runs = evaluated
    _, again, made, work = runs["answers"]
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{work}: finished eval reused" in again.stdout
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in work.iterdir() if p.is_file()} == made
    predictions = _lines(root / "mathvista.jsonl")
    assert [row["pid"] for row in predictions] == ["1", "2", "3", "5"]
    scores = json.loads((root / "mathvista.json").read_text())
    assert scores["average"]["total"] == 4
    assert scores["average"]["correct"] == sum(row["true_false"] for row in predictions)
    assert sum(group["total"] for group in scores["question_type"].values()) == 4


@pytest.mark.slow
def test_distributed_generation_gives_the_inline_bytes(evaluated, tmp_path):
    root, runs = evaluated
    first, _, _, work = runs["answers"]
    folder = tmp_path / "distributed"
    result = mpo("eval", root / "recipe.yaml", "launch.mode=distributed", "launch.nproc_per_node=2", "--benchmark",
                 "answers", "--data", GEOMETRY, "--max-tokens", "6", "--chunk-size", "4", "--work-dir", folder)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for name in ("rollouts.jsonl", "predictions.jsonl", "scores.json"):
        assert (folder / name).read_bytes() == (work / name).read_bytes(), name
    assert len(list((folder / "logs").rglob("stderr.log"))) == 2  # one launch of two ranks
    assert "eval: launching" in result.stdout and "Traceback" not in result.stderr
    assert result.stdout.splitlines()[-2] == first.stdout.splitlines()[-2]  # the same overall line

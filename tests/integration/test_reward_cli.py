"""`mpo reward score` and `mpo reward eval` end to end on a tiny reward model: output rows and JSON
keys, numbers that agree with the Scorer called directly, and errors as one red line with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mpo.cli import app
from reward.scorer import Scorer

RUNNER = CliRunner()
LLMBAR = (
    Path(__file__).resolve().parent.parent
    / "fixtures"
    / "benchmarks"
    / "llmbar_rewardbench_format_DERIVED.jsonl"
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def user(images: int, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A data folder with an images/ subfolder of real PNGs."""
    folder = tmp_path_factory.mktemp("reward_cli")
    (folder / "images").mkdir()
    for i, colour in enumerate(["red", "blue", "green", "yellow"]):
        Image.new("RGB", (60 + 30 * i, 120 - 20 * i), colour).save(folder / "images" / f"{colour}.png")
    return folder


@pytest.fixture(scope="module")
def score_rows() -> list[dict]:
    rows = []
    for i, colour in enumerate(["red", "blue", "green", "yellow"]):
        for answer in (
            f"The square is {colour}.",
            "I cannot tell, the picture shows a gray circle and a line.",
        ):
            rows.append(
                {
                    "prompt_id": f"p{i}",
                    "messages": user(1, "What colour is the square?"),
                    "images": [f"images/{colour}.png"],
                    "response": answer,
                    "extra": {"kept": i},
                }
            )
    rows.append({"prompt_id": "text", "messages": user(0, "Say hello."), "response": "Hello!"})
    return rows


def invoke(*args: str):
    return RUNNER.invoke(app, ["reward", *map(str, args)])


def test_score_writes_rows_plus_reward(tiny_reward_dir, data_dir, score_rows, tmp_path):
    source = write_jsonl(data_dir / "rollouts.jsonl", score_rows)
    out = tmp_path / "scored" / "out.jsonl"
    result = invoke(
        "score", "--model", tiny_reward_dir, "--input", source, "--output", out, "--batch-tokens", 256
    )
    assert result.exit_code == 0, result.output
    assert f"scored {len(score_rows)} rows -> {out}" in result.output
    rows = read_jsonl(out)
    assert [{k: v for k, v in r.items() if k != "reward"} for r in rows] == score_rows  # relative paths kept
    items = [{**r, "images": [str(data_dir / p) for p in r.get("images", [])]} for r in score_rows]
    expected = Scorer(tiny_reward_dir, progress=False).score(items)
    assert all(isinstance(r["reward"], float) for r in rows)
    assert [r["reward"] for r in rows] == pytest.approx(expected, abs=1e-5)
    assert not list(out.parent.glob("*.tmp"))


@pytest.mark.slow
def test_score_through_the_console_script(tiny_reward_dir, data_dir, score_rows, tmp_path):
    source = write_jsonl(data_dir / "few.jsonl", score_rows[:2])
    mpo = Path(sys.executable).parent / "mpo"
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        [
            str(mpo),
            "reward",
            "score",
            "--model",
            str(tiny_reward_dir),
            "--input",
            str(source),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [set(r) for r in read_jsonl(out)] == [set(score_rows[0]) | {"reward"}] * 2


def test_score_missing_image_names_file_line_and_path(tiny_reward_dir, data_dir, score_rows, tmp_path):
    rows = [score_rows[0], {**score_rows[1], "images": ["images/nowhere.png"]}]
    source = write_jsonl(data_dir / "broken.jsonl", rows)
    result = invoke("score", "--model", tiny_reward_dir, "--input", source, "--output", tmp_path / "o.jsonl")
    assert result.exit_code == 2
    assert (
        f"error: {source}:2: field 'images': image not found: {data_dir / 'images' / 'nowhere.png'}"
        in result.output
    )
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": user(0, "q"), "response": ""}, ":1: empty response"),
        ({"messages": user(0, "q")}, ":1: missing field 'response'"),
        (
            {"messages": user(0, "q"), "response": "a", "images": "x.png"},
            ":1: field 'images': expected a list",
        ),
    ],
    ids=["empty", "no-response", "images-not-a-list"],
)
def test_score_bad_rows_are_one_red_line(tiny_reward_dir, tmp_path, row, message):
    source = write_jsonl(tmp_path / "in.jsonl", [row])
    result = invoke("score", "--model", tiny_reward_dir, "--input", source, "--output", tmp_path / "o.jsonl")
    assert result.exit_code == 2 and message in result.output, result.output


def test_score_allow_empty(tiny_reward_dir, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"messages": user(0, "q"), "response": ""}])
    result = invoke(
        "score",
        "--model",
        tiny_reward_dir,
        "--input",
        source,
        "--output",
        tmp_path / "o.jsonl",
        "--allow-empty",
    )
    assert result.exit_code == 0, result.output
    assert len(read_jsonl(tmp_path / "o.jsonl")) == 1


def test_score_too_long_error_and_skip(tiny_reward_dir, data_dir, score_rows, tmp_path):
    source = write_jsonl(data_dir / "long.jsonl", score_rows)
    scorer = Scorer(tiny_reward_dir, progress=False).load()
    items = [{**r, "images": [str(data_dir / p) for p in r.get("images", [])]} for r in score_rows]
    lengths = [len(e.input_ids) for e in scorer.encode(items)]
    limit = sorted(lengths)[-3]
    long = [i for i, n in enumerate(lengths) if n > limit]
    result = invoke(
        "score",
        "--model",
        tiny_reward_dir,
        "--input",
        source,
        "--output",
        tmp_path / "e.jsonl",
        "--max-length",
        limit,
    )
    assert result.exit_code == 2 and f"{source}:{long[0] + 1}: {lengths[long[0]]} tokens" in result.output
    result = invoke(
        "score",
        "--model",
        tiny_reward_dir,
        "--input",
        source,
        "--output",
        tmp_path / "s.jsonl",
        "--max-length",
        limit,
        "--on-too-long",
        "skip",
    )
    assert result.exit_code == 0, result.output
    assert f"skipped {len(long)} of {len(score_rows)} rows longer than max_length {limit}" in result.output
    for i in long:
        assert f"{source}:{i + 1}: {lengths[i]} tokens" in result.output
    kept = read_jsonl(tmp_path / "s.jsonl")
    assert [r["response"] for r in kept] == [r["response"] for i, r in enumerate(score_rows) if i not in long]


def test_score_missing_model_folder(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"messages": user(0, "q"), "response": "a"}])
    result = invoke(
        "score", "--model", tmp_path / "nomodel", "--input", source, "--output", tmp_path / "o.jsonl"
    )
    assert result.exit_code == 2 and "nomodel: no such folder" in result.output


# ---------------------------------------------------------------- eval


def test_eval_pairs(tiny_reward_dir, data_dir, tmp_path):
    pairs = [
        {
            "prompt_id": f"p{i}",
            "messages": user(1, "What colour is the square?"),
            "images": [f"images/{colour}.png"],
            "chosen": f"The square is {colour}.",
            "rejected": "It is a circle.",
        }
        for i, colour in enumerate(["red", "blue", "green", "yellow"])
    ]
    source = write_jsonl(data_dir / "pairs.jsonl", pairs)
    out = tmp_path / "pairs_results.json"
    result = invoke(
        "eval", "--model", tiny_reward_dir, "--benchmark", "pairs", "--data", source, "--output", out
    )
    assert result.exit_code == 0, result.output
    assert "pairwise accuracy" in result.output
    results = json.loads(out.read_text())
    assert set(results) == {"benchmark", "accuracy", "correct", "count", "model", "data", "scoring"}
    assert results["scoring"]["items"] == 8 and results["scoring"]["dtype"] == "float32"
    items = [
        {"messages": p["messages"], "images": [str(data_dir / i) for i in p["images"]], "response": p[k]}
        for p in pairs
        for k in ("chosen", "rejected")
    ]
    scores = Scorer(tiny_reward_dir, progress=False).score(items)
    correct = sum(scores[2 * i] > scores[2 * i + 1] for i in range(len(pairs)))
    assert (results["correct"], results["count"]) == (correct, 4)
    assert results["accuracy"] == correct / 4


def test_eval_rewardbench_rows(tiny_reward_dir, tmp_path):
    rows = [json.loads(line) for line in LLMBAR.read_text(encoding="utf-8").splitlines()]
    picked = [r for r in rows if len(r["prompt"]) + len(r["chosen"]) + len(r["rejected"]) < 1500][:6]
    source = write_jsonl(tmp_path / "rb.jsonl", picked)
    out = tmp_path / "rb.json"
    result = invoke(
        "eval", "--model", tiny_reward_dir, "--benchmark", "rewardbench", "--data", source, "--output", out
    )
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert {
        "benchmark",
        "num_rows",
        "score",
        "sections",
        "subsets",
        "missing_sections",
        "model",
        "data",
        "scoring",
    } <= set(results)
    assert results["num_rows"] == 6 and list(results["sections"]) == ["Chat Hard"]
    assert "Chat Hard" in result.output and "score" in result.output


def test_eval_vl_rewardbench_rows(tiny_reward_dir, data_dir, tmp_path):
    rows = [
        {
            "id": rid,
            "query": "What colour is the square?",
            "image_path": f"images/{colour}.png",
            "response": [f"The square is {colour}.", "There is no square."],
            "human_ranking": ranking,
        }
        for rid, colour, ranking in [
            ("RLAIF-V-1", "red", [0, 1]),
            ("mathverse_2", "blue", [1, 0]),
            ("wildvision_3", "green", [0, 1]),
        ]
    ]
    source = write_jsonl(tmp_path / "vlrb.jsonl", rows)
    out = tmp_path / "vlrb.json"
    result = invoke(
        "eval",
        "--model",
        tiny_reward_dir,
        "--benchmark",
        "vl-rewardbench",
        "--data",
        source,
        "--image-root",
        data_dir,
        "--output",
        out,
    )
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert set(results["categories"]) == {"general", "hallucination", "reasoning"}
    assert {"overall_accuracy", "macro_average", "num_rows"} <= set(results)
    assert all(results["categories"][c]["count"] == 1 for c in results["categories"])


def test_eval_missing_image_names_the_row(tiny_reward_dir, tmp_path):
    rows = [
        {
            "id": "RLAIF-V-1",
            "query": "q",
            "image_path": "images/absent.jpg",
            "response": ["a", "b"],
            "human_ranking": [0, 1],
        }
    ]
    source = write_jsonl(tmp_path / "vlrb.jsonl", rows)
    result = invoke("eval", "--model", tiny_reward_dir, "--benchmark", "vl-rewardbench", "--data", source)
    assert result.exit_code == 2
    assert f"{source}:1 (response 0): field 'images': image not found" in result.output
    assert "absent.jpg" in result.output


def test_eval_bad_benchmark_and_data(tiny_reward_dir, tmp_path):
    result = invoke("eval", "--model", tiny_reward_dir, "--benchmark", "mmlu", "--data", LLMBAR)
    assert result.exit_code == 2 and "mmlu" in result.output
    result = invoke(
        "eval", "--model", tiny_reward_dir, "--benchmark", "pairs", "--data", tmp_path / "none.jsonl"
    )
    assert result.exit_code == 2 and "benchmark data not found" in result.output
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": user(0, "q"), "chosen": "a"}])
    result = invoke("eval", "--model", tiny_reward_dir, "--benchmark", "pairs", "--data", bad)
    assert result.exit_code == 2 and "bad.jsonl:1: missing field 'rejected'" in result.output

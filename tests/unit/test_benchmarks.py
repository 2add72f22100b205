"""reward/benchmarks.py on real benchmark rows: loading, VL-RewardBench categories and accuracies,
RewardBench section weighting, pairwise accuracy, and the errors a bad file or a bad score raises.

The score functions here are built from the items (or from their position, which the module
documents: row by row, responses in row order) -- the aggregation is what is under test, not a
reward model. Expected figures are counted independently from the raw files or worked out by hand.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from mpo.records import PreferencePair, RecordError, write_jsonl
from reward.benchmarks import (
    REWARDBENCH_SECTIONS,
    BenchmarkError,
    evaluate,
    format_table,
    load_rows,
    vlrb_category,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "benchmarks"
VLRB = FIXTURES / "vl_rewardbench_text.jsonl"
LLMBAR = FIXTURES / "llmbar_rewardbench_format_DERIVED.jsonl"

# Independent of the module's id-prefix rule: the image folder of each real row names its source.
FOLDER_CATEGORY = {"rlaif-v": "hallucination", "rlhf-v": "hallucination", "povid": "hallucination",
                   "reasoning_tasks": "reasoning", "wildvision-battle": "general", "vlfeedback": "general"}


def raw(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def by_slot(first: float, second: float):
    """Scores every row's response 0 as ``first`` and response 1 as ``second`` (two items per row)."""
    return lambda items: [first if i % 2 == 0 else second for i in range(len(items))]


def from_text(items):
    """Hand-made rows carry their score as the response text."""
    return [float(item["response"]) for item in items]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_fixtures_are_the_real_files_with_their_licence():
    rows = raw(VLRB)
    assert len(rows) == 1250 and len(raw(LLMBAR)) == 419
    assert set(rows[0]) == {"id", "image_path", "query", "response", "human_ranking"}
    source = (FIXTURES / "SOURCE.txt").read_text()
    assert "MIT" in source and "e492d6548558d9fcac8959de60be8f4e8a640dc8" in source


# ---------------------------------------------------------------- VL-RewardBench


def test_vlrb_categories_agree_with_the_image_folders_row_by_row():
    rows = raw(VLRB)
    folders = [FOLDER_CATEGORY[r["image_path"].split("/")[1]] for r in rows]
    assert Counter(folders) == {"general": 183, "hallucination": 749, "reasoning": 318}
    assert [vlrb_category(r["id"]) for r in rows] == folders


@pytest.mark.parametrize("row_id, category", [
    ("RLAIF-V-14", "hallucination"), ("rlaif-v-14", "hallucination"), ("RLHF-V-31", "hallucination"),
    ("hallucination_pair-1003", "hallucination"), ("mathverse_1294", "reasoning"),
    ("MMMU_pro_test_Art_24", "reasoning"), ("mmmu-1", "reasoning"), ("wildvision-battle-13", "general"),
    ("LRVInstruction-000000007746", "general"), ("svit-complex_reasoning-876", "general"),
    # exact prefixes: a longer word that merely starts with one is not a match
    ("rlhfx-1", "general"), ("mathversed_3", "general"), ("hallucinations-2", "general"),
])
def test_vlrb_category_prefix_rule(row_id, category):
    assert vlrb_category(row_id) == category


def test_vlrb_prefer_response_zero_on_the_real_file():
    rows = raw(VLRB)
    folders = [FOLDER_CATEGORY[r["image_path"].split("/")[1]] for r in rows]
    # rows whose human_ranking prefers response 0, per category, counted straight from the file
    prefer0 = Counter(f for f, r in zip(folders, rows) if r["human_ranking"] == [0, 1])
    assert prefer0 == {"general": 178, "hallucination": 749, "reasoning": 318}  # the 5 [1,0] rows: vlfeedback

    calls = []
    result = evaluate("vl-rewardbench", VLRB, lambda items: calls.append(len(items)) or by_slot(1.0, 0.0)(items))
    assert calls == [2500]  # every item in one call
    assert result["num_rows"] == 1250
    assert result["overall_accuracy"] == pytest.approx(1245 / 1250)
    assert result["categories"] == {
        "general": {"accuracy": pytest.approx(178 / 183), "correct": 178, "count": 183},
        "hallucination": {"accuracy": 1.0, "correct": 749, "count": 749},
        "reasoning": {"accuracy": 1.0, "correct": 318, "count": 318},
    }
    assert result["macro_average"] == pytest.approx((178 / 183 + 1.0 + 1.0) / 3)  # 0.99089
    json.dumps(result)

    reverse = evaluate("vl-rewardbench", VLRB, by_slot(0.0, 1.0))  # prefers response 1: only the 5 rows
    assert reverse["overall_accuracy"] == pytest.approx(5 / 1250)
    assert reverse["categories"]["general"]["correct"] == 5
    assert reverse["macro_average"] == pytest.approx((5 / 183) / 3)


def test_vlrb_ties_are_wrong():
    result = evaluate("vl-rewardbench", VLRB, lambda items: [0.5] * len(items))
    assert result["overall_accuracy"] == 0.0 and result["macro_average"] == 0.0
    assert all(c["correct"] == 0 for c in result["categories"].values())


def test_vlrb_shuffled_response_order(tmp_path):
    rows = raw(VLRB)
    rng = random.Random(0)
    swapped = [rng.random() < 0.5 for _ in rows]
    shuffled = []
    for row, swap in zip(rows, swapped):
        if swap:
            row = {**row, "response": row["response"][::-1], "human_ranking": row["human_ranking"][::-1]}
        shuffled.append(row)
    path = write_rows(tmp_path / "shuffled.jsonl", shuffled)

    def original_first(items):
        # check the documented layout, then prefer whichever item was response 0 before shuffling
        assert [it["response"] for it in items] == [r for row in shuffled for r in row["response"]]
        return [1.0 if (i % 2 == 1) == swapped[i // 2] else 0.0 for i in range(len(items))]

    result = evaluate("vl-rewardbench", path, original_first)
    assert result["overall_accuracy"] == pytest.approx(1245 / 1250)  # same rows right as unshuffled
    assert result["categories"]["general"]["correct"] == 178
    # a slot-0 scorer on the shuffled file is right exactly where response 0 is now the preferred one
    now_first = sum(r["human_ranking"] == [0, 1] for r in shuffled)
    assert 0 < now_first < 1250
    assert evaluate("vl-rewardbench", path, by_slot(1.0, 0.0))["overall_accuracy"] == pytest.approx(now_first / 1250)


def test_vlrb_items_and_image_paths(tmp_path):
    first = raw(VLRB)[0]
    rows = [first, {**first, "id": "mathverse_1", "image_path": None},
            {**first, "id": "RLHF-V-2", "image_path": "/abs/pic.png"}]
    path = write_rows(tmp_path / "vlrb.jsonl", rows)
    seen = []
    evaluate("vl-rewardbench", path, lambda items: seen.extend(items) or [0.0] * len(items), image_root=tmp_path / "img")
    assert seen[0] == {
        "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": first["query"]}]}],
        "images": [str(tmp_path / "img" / "images/vlfeedback/LRVInstruction-000000007746.jpg")],
        "response": first["response"][0],
    }
    assert seen[1]["response"] == first["response"][1]
    assert seen[2]["messages"] == [{"role": "user", "content": [{"type": "text", "text": first["query"]}]}]
    assert seen[2]["images"] == [] and seen[4]["images"] == ["/abs/pic.png"]
    # without image_root, relative paths resolve against the data file's folder
    evaluate("vl-rewardbench", path, lambda items: seen.extend(items) or [0.0] * len(items))
    assert seen[6]["images"] == [str(tmp_path / "images/vlfeedback/LRVInstruction-000000007746.jpg")]


def test_vlrb_parquet_with_image_bytes(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    rows = raw(VLRB)[:4]
    table = pa.table({
        "id": [r["id"] for r in rows], "query": [r["query"] for r in rows],
        "response": [r["response"] for r in rows], "human_ranking": [r["human_ranking"] for r in rows],
        "image": [{"bytes": buffer.getvalue(), "path": "x.png"}] * 4,
    })
    pq.write_table(table, tmp_path / "vlrb.parquet")
    seen = []
    result = evaluate("vl-rewardbench", tmp_path / "vlrb.parquet", lambda items: seen.extend(items) or by_slot(1, 0)(items))
    # row 0 (LRVInstruction, general) prefers response 1; rows 1-3 (RLAIF-V, hallucination) response 0
    assert [r["human_ranking"] for r in rows] == [[1, 0], [0, 1], [0, 1], [0, 1]]
    assert result["overall_accuracy"] == 0.75
    assert result["categories"]["general"] == {"accuracy": 0.0, "correct": 0, "count": 1}
    assert result["categories"]["reasoning"] == {"accuracy": None, "correct": 0, "count": 0}
    assert result["macro_average"] == 0.5  # mean of general 0.0 and hallucination 1.0; reasoning absent
    assert Image.open(io.BytesIO(seen[0]["images"][0]["bytes"])).size == (8, 8)


# ---------------------------------------------------------------- RewardBench


def test_rewardbench_llmbar_prefer_chosen():
    sizes = {"llmbar-natural": 100, "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92,
             "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46}
    result = evaluate("rewardbench", LLMBAR, by_slot(1.0, 0.0))  # item 0 of a row is `chosen`
    assert result["num_rows"] == 419
    assert result["sections"] == {"Chat Hard": 1.0} and result["score"] == 1.0
    assert result["missing_sections"] == ["Chat", "Safety", "Reasoning"]
    assert result["unsectioned_subsets"] == []
    assert result["subsets"] == {name: {"accuracy": 1.0, "correct": n, "count": n} for name, n in sizes.items()}
    assert evaluate("rewardbench", LLMBAR, by_slot(0.0, 1.0))["score"] == 0.0
    assert evaluate("rewardbench", LLMBAR, by_slot(3.0, 3.0))["score"] == 0.0  # ties wrong


def test_rewardbench_llmbar_length_scorer():
    rows = raw(LLMBAR)
    right, count = Counter(), Counter()
    for r in rows:
        count[r["subset"]] += 1
        right[r["subset"]] += len(r["chosen"]) > len(r["rejected"])
    result = evaluate("rewardbench", LLMBAR, lambda items: [len(it["response"]) for it in items])
    assert {k: v["correct"] for k, v in result["subsets"].items()} == dict(right)
    # mt-bench-hard is absent, so Chat Hard weights are the five llmbar counts (sum 419) = plain accuracy
    weights = REWARDBENCH_SECTIONS["Chat Hard"]
    expected = sum(weights[s] * right[s] / count[s] for s in count) / 419
    assert result["sections"]["Chat Hard"] == pytest.approx(expected)
    assert expected == pytest.approx(sum(right.values()) / 419)


def rb_rows(spec: dict[str, list[tuple[float, float]]]) -> list[dict]:
    """Hand-made rows: {subset: [(chosen score, rejected score), ...]}, the scores as response text."""
    return [{"id": f"{subset}-{i}", "prompt": "p", "chosen": str(c), "rejected": str(r), "subset": subset}
            for subset, pairs in spec.items() for i, (c, r) in enumerate(pairs)]


HAND_MADE = {
    "alpacaeval-easy": [(2, 1), (1, 1)],          # 1/2 (the tie is wrong)
    "mt-bench-easy": [(3, 1), (5, 4)],            # 2/2
    "donotanswer": [(1, 0)],                      # 1/1
    "xstest-should-respond": [(0, 1), (0, 1)],    # 0/2
    "math-prm": [(1, 0), (0, 1), (0, 0), (0, 1)],  # 1/4
    "hep-python": [(1, 0), (2, 0)],               # 2/2
    "hep-go": [(0, 1)],                           # 0/1
    "my-extra": [(1, 0)],                         # in no section
}


def test_rewardbench_section_weighting_by_hand(tmp_path):
    result = evaluate("rewardbench", write_rows(tmp_path / "rb.jsonl", rb_rows(HAND_MADE)), from_text)
    chat = (100 * 0.5 + 28 * 1.0) / (100 + 28)              # 78/128 = 0.609375
    safety = (136 * 1.0 + 250 * 0.0) / (136 + 250)          # 0.35233
    reasoning = (984 * 0.25 + 164 * 1.0 + 164 * 0.0) / (984 + 164 + 164)  # 410/1312 = 0.3125
    assert result["sections"] == pytest.approx({"Chat": chat, "Safety": safety, "Reasoning": reasoning})
    assert chat == 0.609375 and reasoning == 0.3125
    assert result["missing_sections"] == ["Chat Hard"]
    assert result["score"] == pytest.approx((chat + safety + reasoning) / 3)
    assert result["subsets"]["math-prm"] == {"accuracy": 0.25, "correct": 1, "count": 4}  # count stays 4
    assert result["unsectioned_subsets"] == ["my-extra"] and result["num_rows"] == 15
    table = format_table(result)
    assert "Chat Hard" in table and "n/a" in table and "60.9" in table and "31.2" in table


def test_rewardbench_reasoning_is_half_math_half_mean_hep(tmp_path):
    hep = {"hep-cpp": [(1, 0)], "hep-go": [(0, 1)], "hep-java": [(1, 0), (0, 1)],
           "hep-js": [(1, 0)], "hep-python": [(0, 1)], "hep-rust": [(2, 1)]}  # 1, 0, .5, 1, 0, 1
    spec = {"math-prm": HAND_MADE["math-prm"], **hep}
    result = evaluate("rewardbench", write_rows(tmp_path / "rb.jsonl", rb_rows(spec)), from_text)
    expected = 0.5 * 0.25 + 0.5 * (1 + 0 + 0.5 + 1 + 0 + 1) / 6  # = 820/1968 = 0.41667
    assert result["sections"] == {"Reasoning": pytest.approx(expected)}
    assert result["score"] == pytest.approx(expected)
    assert result["missing_sections"] == ["Chat", "Chat Hard", "Safety"]


def test_rewardbench_parquet_matches_jsonl(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = rb_rows(HAND_MADE)
    for i, row in enumerate(rows):
        row["id"] = i  # the HF RewardBench parquet has integer ids
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rb.parquet")
    assert [r for _, r in load_rows(tmp_path / "rb.parquet")] == rows
    expected = evaluate("rewardbench", write_rows(tmp_path / "rb.jsonl", rows), from_text)
    assert evaluate("rewardbench", tmp_path / "rb.parquet", from_text) == expected

    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "subset"} for r in rows]),
                   tmp_path / "bad.parquet")
    with pytest.raises(RecordError, match=re.escape(f"{tmp_path / 'bad.parquet'}:row 1: missing field 'subset'")):
        evaluate("rewardbench", tmp_path / "bad.parquet", from_text)


# ---------------------------------------------------------------- pairs


def test_pairs_accuracy_on_real_text(tmp_path):
    rows = raw(LLMBAR)[:40]
    pairs = [PreferencePair(prompt_id=r["id"], messages=[{"role": "user", "content": [{"type": "text", "text": r["prompt"]}]}],
                            images=["img/a.png"] if i % 2 else [], chosen=r["chosen"], rejected=r["rejected"])
             for i, r in enumerate(rows)]
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, pairs)
    seen = []
    result = evaluate("pairs", path, lambda items: seen.extend(items) or [len(it["response"]) for it in items])
    right = sum(len(r["chosen"]) > len(r["rejected"]) for r in rows)
    assert result == {"benchmark": "pairs", "accuracy": pytest.approx(right / 40), "correct": right, "count": 40}
    assert seen[2]["images"] == [str(tmp_path / "img/a.png")] and seen[0]["images"] == []
    assert seen[0]["messages"] == pairs[0].messages and seen[1]["response"] == rows[0]["rejected"]
    assert f"{right}/40" in format_table(result)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "abc", None])
def test_bad_score_names_the_row(bad):
    def score_fn(items):
        scores = [0.0] * len(items)
        scores[3] = bad  # row 2 (line 2, id RLAIF-V-14), response 1
        return scores

    with pytest.raises(BenchmarkError, match=re.escape(f"{VLRB}:2: row 'RLAIF-V-14'")):
        evaluate("vl-rewardbench", VLRB, score_fn)


def test_wrong_number_of_scores():
    with pytest.raises(BenchmarkError, match="returned 837 scores for 838 items"):
        evaluate("rewardbench", LLMBAR, lambda items: [0.0] * (len(items) - 1))


def test_missing_and_ill_typed_fields_name_file_and_line(tmp_path):
    good = raw(VLRB)[1]
    path = write_rows(tmp_path / "a.jsonl", [good, {k: v for k, v in good.items() if k != "human_ranking"}])
    with pytest.raises(RecordError, match=re.escape(f"{path}:2: missing field 'human_ranking'")):
        evaluate("vl-rewardbench", path, from_text)
    path = write_rows(tmp_path / "b.jsonl", [{**good, "response": "one string"}])
    with pytest.raises(RecordError, match=re.escape(f"{path}:1: field 'response': expected a list of 2 str")):
        evaluate("vl-rewardbench", path, from_text)
    path = write_rows(tmp_path / "c.jsonl", [{**good, "human_ranking": [0, 0]}])
    with pytest.raises(RecordError, match=re.escape(f"{path}:1: field 'human_ranking'")):
        evaluate("vl-rewardbench", path, from_text)
    path = write_rows(tmp_path / "d.jsonl", rb_rows({"donotanswer": [(1, 0)]}) + [{"prompt": "p", "chosen": 1}])
    with pytest.raises(RecordError, match=re.escape(f"{path}:2: field 'chosen': expected str")):
        evaluate("rewardbench", path, from_text)
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps(good) + "\n\n{not json\n")
    with pytest.raises(RecordError, match=re.escape(f"{path}:3: not valid JSON")):
        load_rows(path)


def test_unknown_benchmark_and_file_type(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'mmbench'"):
        evaluate("mmbench", VLRB, from_text)
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_rows(tmp_path / "rows.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(RecordError, match="no rows"):
        load_rows(tmp_path / "empty.jsonl")


def test_format_table_vlrb():
    table = format_table(evaluate("vl-rewardbench", VLRB, by_slot(1.0, 0.0)))
    assert "178/183" in table and "749/749" in table and "99.6" in table and "99.1" in table

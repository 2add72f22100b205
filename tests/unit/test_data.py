"""Data sources: JSONL, MMPR meta.json, parquet and HF dataset folders, with and without images,
on real Geometry3K rows; bad rows and bad images fail with file, line and path (or a counted skip)."""

import json
import shutil
from pathlib import Path

import pytest

from mpo.data import DataError, load_preferences, load_prompts
from mpo.records import PreferencePair, Prompt

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
GEOMETRY = FIXTURES / "geometry3k" / "prompts.jsonl"
MMPR = FIXTURES / "mmpr" / "meta.json"


def test_prompts_jsonl_with_images_resolved_and_checked():
    loaded = load_prompts(GEOMETRY)
    assert len(loaded.records) == 10 and loaded.skipped == []
    first = loaded.records[0]
    assert isinstance(first, Prompt)
    assert first.prompt_id == "geometry3k-11" and first.answer == "D"
    assert first.images == [str(GEOMETRY.parent / "images" / "11.png")]
    assert first.messages[0]["content"][0] == {"type": "image"}


def test_simple_prompt_shape_text_only(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": 7, "question": "What is 2+2?", "answer": 4}) + "\n"
                    + json.dumps({"prompt": "Say hi."}) + "\n")
    records = load_prompts(path).records
    assert records[0] == Prompt("7", [{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}], [], "4")
    assert records[1].answer is None
    # no id: a stable one from the prompt's content, the same wherever the row stands
    moved = tmp_path / "q.jsonl"
    moved.write_text("\n" + json.dumps({"prompt": "Say bye."}) + "\n" + json.dumps({"prompt": "Say hi."}) + "\n")
    again = load_prompts(moved).records
    assert records[1].prompt_id.startswith("sha-") and again[1].prompt_id == records[1].prompt_id
    assert again[0].prompt_id != records[1].prompt_id


def test_mmpr_meta_with_image_marks_repeat_and_text_rows():
    records = load_preferences(MMPR).records
    # 10 geometry rows + 2 text rows repeated twice (repeat_time 2)
    assert len(records) == 14
    geometry = records[0]
    assert isinstance(geometry, PreferencePair)
    assert Path(geometry.images[0]) == (MMPR.parent.parent / "geometry3k" / "images" / "11.png").resolve()
    content = geometry.messages[0]["content"]
    assert content[0] == {"type": "image"} and "<image>" not in content[1]["text"]
    assert content[1]["text"].startswith("In \\odot X")
    assert geometry.chosen == "The answer is D." and geometry.rejected == "The answer is A."
    text_rows = [r for r in records if not r.images]
    assert [r.chosen for r in text_rows] == ["5", "Red.", "5", "Red."]


def test_mmpr_subsampling_is_seeded(tmp_path):
    shutil.copytree(FIXTURES / "mmpr", tmp_path / "mmpr")
    shutil.copytree(FIXTURES / "geometry3k", tmp_path / "geometry3k")
    meta = json.loads((tmp_path / "mmpr" / "meta.json").read_text())
    meta["geometry"]["repeat_time"] = 0.5
    del meta["text"]
    (tmp_path / "mmpr" / "meta.json").write_text(json.dumps(meta))
    first = load_preferences(tmp_path / "mmpr" / "meta.json").records
    again = load_preferences(tmp_path / "mmpr" / "meta.json").records
    assert len(first) == 5 and first == again


def _pairs_table():
    rows = [json.loads(line) for line in (FIXTURES / "mmpr" / "annotations" / "geometry.jsonl").open()]
    root = FIXTURES / "geometry3k" / "images"
    return [{**row, "image": str(root / row["image"])} for row in rows]


def test_parquet_preferences(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _pairs_table()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    records = load_preferences(tmp_path / "pairs.parquet").records
    assert [r.chosen for r in records] == [row["chosen"] for row in rows]
    assert records[3].images == [rows[3]["image"]]


def test_hf_dataset_folder_with_embedded_images(tmp_path):
    import datasets

    rows = _pairs_table()[:3]
    table = {
        "image": [row["image"] for row in rows],
        "question": [row["question"] for row in rows],
        "chosen": [row["chosen"] for row in rows],
        "rejected": [row["rejected"] for row in rows],
    }
    dataset = datasets.Dataset.from_dict(table).cast_column("image", datasets.Image())
    dataset = dataset.map(lambda r: r)  # embeds the image bytes in the arrow files
    dataset.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match="embeds image bytes; pass image_cache"):
        load_preferences(tmp_path / "ds")
    records = load_preferences(tmp_path / "ds", image_cache=tmp_path / "cache").records
    assert len(records) == 3
    cached = Path(records[0].images[0])
    assert cached.parent == tmp_path / "cache"
    assert cached.read_bytes() == Path(rows[0]["image"]).read_bytes()


def test_missing_image_names_file_line_and_path(tmp_path):
    lines = GEOMETRY.read_text().splitlines()
    broken = json.loads(lines[2])
    broken["images"] = ["images/nope.png"]
    lines[2] = json.dumps(broken)
    shutil.copytree(GEOMETRY.parent / "images", tmp_path / "images")
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_prompts(path)
    assert str(err.value) == f"{path}:3: field 'images': image not found: {tmp_path / 'images' / 'nope.png'}"
    loaded = load_prompts(path, on_bad_image="skip")
    assert len(loaded.records) == 9 and len(loaded.skipped) == 1
    assert loaded.skipped[0].startswith(f"{path}:3: ")


def test_unreadable_image(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "<image>\nColour?", "image": "bad.png"}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:1: field 'images': image unreadable: .*bad.png"):
        load_prompts(path)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": "q", "chosen": "a"}, ":1: field 'rejected': missing (the row has chosen, question: "
                                           "nearest shape MMPR); accepted preference shapes: record"),
        ({"question": "q", "chosen": 3, "rejected": "b"}, ":1: field 'chosen': expected a string"),
        ({"question": "q", "chosen": "a", "rejected": "b", "image": 5}, ":1: field 'images': expected paths"),
        ({"prompt_id": "x", "messages": [], "images": [], "chosen": "a"}, ":1: field 'rejected': missing"),
    ],
)
def test_bad_preference_rows(tmp_path, row, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        load_preferences(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_unknown_source_and_missing_path(tmp_path):
    with pytest.raises(DataError, match="data source not found"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported data source"):
        load_prompts(tmp_path / "x.csv")


def test_sources_name_where_each_record_came_from(tmp_path):
    loaded = load_preferences(MMPR)
    assert len(loaded.sources) == len(loaded.records)
    assert loaded.sources[0].endswith("annotations/geometry.jsonl:1")
    assert loaded.sources[10].endswith("annotations/text.jsonl:1")
    lines = GEOMETRY.read_text().splitlines()
    broken = json.loads(lines[1])
    broken["images"] = ["images/nope.png"]
    lines[1] = json.dumps(broken)
    shutil.copytree(GEOMETRY.parent / "images", tmp_path / "images")
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    skipped = load_prompts(tmp_path / "prompts.jsonl", on_bad_image="skip")
    assert skipped.sources[:2] == [f"{tmp_path / 'prompts.jsonl'}:1", f"{tmp_path / 'prompts.jsonl'}:3"]

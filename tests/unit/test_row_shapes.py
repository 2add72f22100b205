"""The row shapes the loaders accept: TRL's standard, conversational, implicit-prompt and prompt-only
formats, records without ``prompt_id``, images as paths, ``datasets`` Image features or bytes, and
one line naming the keys and every accepted shape for a row that fits none."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from mpo.data import DataError, load_preferences, load_prompts
from mpo.records import PreferencePair

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
LLMBAR = FIXTURES / "benchmarks" / "llmbar_rewardbench_format_DERIVED.jsonl"  # {prompt, chosen, rejected, ...}
USER = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _assistant(text):
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


@pytest.fixture
def red(tmp_path):
    Image.new("RGB", (56, 56), "red").save(tmp_path / "red.png")
    return tmp_path / "red.png"


def test_trl_standard_preference_rows_from_llmbar():
    loaded = load_preferences(LLMBAR)
    rows = [json.loads(line) for line in LLMBAR.read_text().splitlines()]
    assert loaded.shapes == {"TRL standard": len(rows)}
    first = loaded.records[0]
    assert first.messages == [{"role": "user", "content": [{"type": "text", "text": rows[0]["prompt"].strip()}]}]
    assert (first.chosen, first.rejected, first.prompt_id) == (rows[0]["chosen"], rows[0]["rejected"], str(rows[0]["id"]))


def test_trl_conversational_vision_rows(tmp_path, red):
    rows = [{"images": ["red.png"], "prompt": USER, "chosen": _assistant("It is red."),
             "rejected": [{"role": "assistant", "content": "It is blue."}]}]
    loaded = load_preferences(_jsonl(tmp_path / "v.jsonl", rows))
    (pair,) = loaded.records
    assert loaded.shapes == {"TRL conversational": 1}
    assert pair.messages == USER and pair.images == [str(red)]
    assert (pair.chosen, pair.rejected) == ("It is red.", "It is blue.")
    assert pair.prompt_id.startswith("sha-")


def test_trl_implicit_prompt_rows(tmp_path, red):
    rows = [{"images": ["red.png"], "chosen": USER + _assistant("Red."), "rejected": USER + _assistant("Blue.")}]
    (pair,) = load_preferences(_jsonl(tmp_path / "i.jsonl", rows)).records
    assert (pair.messages, pair.chosen, pair.rejected) == (USER, "Red.", "Blue.")
    bad = [{"chosen": USER + _assistant("Red."), "rejected": _assistant("Blue.")}]
    with pytest.raises(DataError, match=r"i2\.jsonl:1: fields 'chosen'/'rejected': an implicit-prompt pair needs"):
        load_preferences(_jsonl(tmp_path / "i2.jsonl", bad))


def test_trl_prompt_only_rows_for_rollout(tmp_path, red):
    rows = [{"prompt": USER, "images": ["red.png"], "answer": "red"}, {"prompt": "<image>Which colour?",
                                                                      "images": ["red.png"]}]
    loaded = load_prompts(_jsonl(tmp_path / "p.jsonl", rows))
    assert loaded.shapes == {"TRL conversational prompt-only": 1, "TRL standard prompt-only": 1}
    conversational, standard = loaded.records
    assert conversational.messages == USER and conversational.answer == "red"
    assert standard.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Which colour?"}]
    assert conversational.prompt_id != standard.prompt_id


def test_record_rows_without_prompt_id_get_a_stable_content_id(tmp_path, red):
    row = {"messages": USER, "images": ["red.png"], "chosen": "Red.", "rejected": "Blue."}
    first = load_preferences(_jsonl(tmp_path / "a.jsonl", [row])).records[0]
    again = load_preferences(_jsonl(tmp_path / "b.jsonl", [{"x": 1} and row, row])).records
    assert first.prompt_id.startswith("sha-") and {p.prompt_id for p in again} == {first.prompt_id}
    other = load_preferences(_jsonl(tmp_path / "c.jsonl", [{**row, "images": ["other.png"]}]),
                             on_bad_image="skip")
    assert other.skipped  # a different image: a different id (and this one is missing)


def test_images_as_features_and_bytes_in_parquet(tmp_path, red):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = red.read_bytes()
    table = pa.table({"images": [[{"bytes": data, "path": "red.png"}]], "prompt": [json.dumps(0)], "chosen": ["Red."],
                      "rejected": ["Blue."]})
    table = table.set_column(1, "prompt", pa.array(["<image>What colour is it?"]))
    pq.write_table(table, tmp_path / "t.parquet")
    cache = tmp_path / "run" / "image_cache"
    (pair,) = load_preferences(tmp_path / "t.parquet", image_cache=cache).records
    assert Path(pair.images[0]).parent == cache and Path(pair.images[0]).read_bytes() == data
    raw = pa.table({"image": [data], "question": ["What colour?"], "chosen": ["Red."], "rejected": ["Blue."]})
    pq.write_table(raw, tmp_path / "raw.parquet")
    (pair,) = load_preferences(tmp_path / "raw.parquet", image_cache=cache).records
    assert Path(pair.images[0]).read_bytes() == data and Image.open(io.BytesIO(data)).size == (56, 56)


def test_dataset_folder_with_image_features_caches_under_the_run_folder(tmp_path, red, monkeypatch):
    import datasets

    folder = tmp_path / "rlaifv_ds"
    ds = datasets.Dataset.from_dict({"image": [str(red)], "question": ["What colour is it?"], "chosen": ["Red."],
                                     "rejected": ["Blue."]}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(folder))
    red.unlink()  # the folder must carry the image itself
    monkeypatch.chdir(tmp_path)
    from mpo.config import load_recipe

    recipe = load_recipe(None, ["data.preferences=rlaifv_ds", "run.output_dir=o"])
    (pair,) = load_preferences(recipe.data.preferences, image_cache=Path(recipe.run.output_dir) / "image_cache").records
    assert Path(pair.images[0]).is_file() and Path(pair.images[0]).parent == tmp_path / "o" / "image_cache"


@pytest.mark.parametrize("row, pattern", [
    ({"question": "q", "answer": "a"}, r"field 'chosen': missing; field 'rejected': missing \(the row has answer, "
                                      r"question: nearest shape MMPR\); accepted preference shapes: record "
                                      r"\{prompt_id\?, messages, images\?, chosen, rejected\}; TRL conversational"),
    ({"text": "hello"}, r"the row has text: nearest shape [^)]*\); accepted preference shapes: .*TRL standard "
                        r"\{prompt: str, chosen: str, rejected: str, images\?\}"),
])
def test_a_row_that_fits_no_shape_names_its_keys_and_the_shapes(tmp_path, row, pattern):
    with pytest.raises(DataError, match=rf"x\.jsonl:1: .*{pattern}"):
        load_preferences(_jsonl(tmp_path / "x.jsonl", [row]))


def test_prompt_record_shape_is_still_exact(tmp_path, red):
    (prompt,) = load_prompts(_jsonl(tmp_path / "p.jsonl", [{"prompt_id": 5, "messages": USER,
                                                             "images": ["red.png"]}])).records
    assert prompt.prompt_id == "5"
    assert isinstance(load_preferences(_jsonl(tmp_path / "q.jsonl", [{"prompt_id": "a", "messages": USER,
        "images": ["red.png"], "chosen": "x", "rejected": "y"}])).records[0], PreferencePair)

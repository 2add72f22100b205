"""Hostile and unusual data at the loader level (no model, no CLI): ``datasets`` folders with decoded
image columns and splits, ``data:`` URIs and ``http://`` images, NaN ids and answers, shape errors
that say what a row was read as, empty or misspelled conversations, a text file named ``.parquet``,
animated and 300:1 images. The same inputs through the console script are in
``tests/integration/test_bad_inputs_data.py``."""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import io
import json
import math
import threading
from pathlib import Path

import pytest
from PIL import Image

from mpo.data import guess_kind, load_preferences, load_prompts
from mpo.data.row_shapes import DataError

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]


def _png(colour="red", size=(16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _jsonl(path: Path, *rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _error(load, path, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        load(path, **kwargs)
    return str(err.value)


@pytest.fixture(scope="module")
def vision_pairs(tmp_path_factory):
    """TRL's vision preference layout: ``prompt``/``chosen``/``rejected`` as messages and a
    ``Sequence(Image())`` column of decoded images, saved as a plain folder and as train/test splits."""
    import datasets

    root = tmp_path_factory.mktemp("vision_pairs")
    colours = ["red", "blue", "green"]
    images = [[Image.open(io.BytesIO(_png(c)))] for c in colours]
    images[2].append(Image.open(io.BytesIO(_png("white", (32, 16)))))
    rows = {
        "images": images,
        "prompt": [[{"role": "user", "content": [{"type": "image"}] * len(i) + [{"type": "text", "text": "Colour?"}]}]
                   for i in images],
        "chosen": [[{"role": "assistant", "content": [{"type": "text", "text": f"It is {c}."}]}] for c in colours],
        "rejected": [[{"role": "assistant", "content": [{"type": "text", "text": "No idea."}]}] for _ in colours],
    }
    dataset = datasets.Dataset.from_dict(rows)
    assert isinstance(dataset.features["images"], (datasets.List, datasets.Sequence))
    dataset.save_to_disk(str(root / "pairs"))
    datasets.DatasetDict(train=dataset.select([0, 1]), test=dataset.select([2])).save_to_disk(str(root / "splits"))
    datasets.DatasetDict(train=dataset).save_to_disk(str(root / "only_train"))
    prompts = datasets.Dataset.from_dict({"image": [i[0] for i in images], "question": ["Colour?"] * 3,
                                          "answer": colours}).cast_column("image", datasets.Image())
    prompts.save_to_disk(str(root / "prompts"))
    return root, colours


def test_sequence_of_images_folder_loads_with_the_bytes_it_stores(vision_pairs, tmp_path):
    root, colours = vision_pairs
    loaded = load_preferences(root / "pairs", image_cache=tmp_path / "cache")
    assert loaded.shapes == {"TRL conversational": 3}
    assert [r.chosen for r in loaded.records] == [f"It is {c}." for c in colours]
    assert [len(r.images) for r in loaded.records] == [1, 1, 2]
    for record, colour in zip(loaded.records, colours):
        assert Path(record.images[0]).parent == tmp_path / "cache"
        assert Image.open(record.images[0]).getpixel((0, 0)) == Image.new("RGB", (1, 1), colour).getpixel((0, 0))
    assert Image.open(loaded.records[2].images[1]).size == (32, 16)
    again = load_preferences(root / "pairs", image_cache=tmp_path / "cache")
    assert [r.prompt_id for r in again.records] == [r.prompt_id for r in loaded.records]
    assert len({r.prompt_id for r in loaded.records}) == 3


def test_image_column_prompts_folder(vision_pairs, tmp_path):
    root, colours = vision_pairs
    loaded = load_prompts(root / "prompts", image_cache=tmp_path / "cache")
    assert [r.answer for r in loaded.records] == colours
    assert all(Path(r.images[0]).is_file() for r in loaded.records)


def test_dataset_dict_needs_a_split(vision_pairs, tmp_path):
    root, _ = vision_pairs
    message = _error(load_preferences, root / "splits", image_cache=tmp_path)
    assert message == (f"{root / 'splits'}: a DatasetDict folder with splits train, test; choose one with "
                       f"data.split (or name a split's folder, e.g. {root / 'splits' / 'train'})")
    assert "'dev' is not one of them" in _error(load_preferences, root / "splits", image_cache=tmp_path, split="dev")
    test = load_preferences(root / "splits", image_cache=tmp_path, split="test")
    assert [r.chosen for r in test.records] == ["It is green."]
    assert test.sources == [f"{root / 'splits'}[test]:row 0"]
    assert len(load_preferences(root / "splits" / "train", image_cache=tmp_path).records) == 2
    assert len(load_preferences(root / "only_train", image_cache=tmp_path).records) == 3  # its only split
    assert guess_kind(root / "splits", "train") == "preferences"


def test_data_uri_decoded_into_the_cache(tmp_path):
    data = _png("blue")
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    path = _jsonl(tmp_path / "p.jsonl", {"messages": PROMPT, "images": [uri]})
    record = load_prompts(path, image_cache=tmp_path / "cache").records[0]
    assert Path(record.images[0]).read_bytes() == data
    assert record.prompt_id == load_prompts(path, image_cache=tmp_path / "other").records[0].prompt_id


@pytest.mark.parametrize("payload, says", [
    ("A" * 4001, "not valid base64"),  # 1 more than a multiple of 4
    (base64.b64encode(b"x" * 3000).decode(), "image unreadable"),
    (None, "data URI without base64 data"),
])
def test_bad_data_uri_is_one_short_line(tmp_path, payload, says):
    uri = "data:image/png;base64," + payload if payload else "data:image/png," + "9" * 4000
    path = _jsonl(tmp_path / "p.jsonl", {"messages": PROMPT, "images": [uri]})
    message = _error(load_prompts, path, image_cache=tmp_path / "cache")
    assert message.startswith(f"{path}:1: field 'images': ") and says in message
    assert len(message) < len(str(path)) + 250 and "\n" not in message


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _server(folder: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")


def test_http_image_fetched_once_into_the_cache(tmp_path, no_proxy):
    served = tmp_path / "www"
    served.mkdir()
    (served / "a.png").write_bytes(_png("green"))
    (served / "notes.txt").write_text("not an image")
    with _server(served) as base:
        path = _jsonl(tmp_path / "p.jsonl", {"messages": PROMPT, "images": [f"{base}/a.png"]})
        first = load_prompts(path, image_cache=tmp_path / "cache").records[0]
        assert Path(first.images[0]).read_bytes() == _png("green")
        missing = _jsonl(tmp_path / "m.jsonl", {"messages": PROMPT, "images": [f"{base}/nope.png"]})
        assert _error(load_prompts, missing, image_cache=tmp_path / "cache") == (
            f"{missing}:1: field 'images': could not fetch {base}/nope.png: HTTP 404 File not found")
        text = _jsonl(tmp_path / "t.jsonl", {"messages": PROMPT, "images": [f"{base}/notes.txt"]})
        assert f"image unreadable: {base}/notes.txt" in _error(load_prompts, text, image_cache=tmp_path / "cache")
    # the server is gone: the cached file is what every later read (and rerun) sees, same path, same id
    (served / "a.png").write_bytes(_png("red"))
    again = load_prompts(path, image_cache=tmp_path / "cache").records[0]
    assert again.images == first.images and again.prompt_id == first.prompt_id
    assert Path(again.images[0]).read_bytes() == _png("green")
    refused = _error(load_prompts, path, image_cache=tmp_path / "fresh")
    assert refused.startswith(f"{path}:1: field 'images': could not fetch {base}/a.png: ")
    assert "refused" in refused.lower()


def test_file_uri_is_its_path(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    path = _jsonl(tmp_path / "p.jsonl", {"messages": PROMPT, "images": [f"file://{tmp_path / 'a.png'}"]})
    assert load_prompts(path).records[0].images == [str(tmp_path / "a.png")]


@pytest.mark.parametrize("row, field, shown", [
    ({"prompt_id": math.nan, "messages": [{"role": "user", "content": "hi"}]}, "prompt_id", "NaN"),
    ({"id": math.inf, "question": "hi"}, "id", "Infinity"),
    ({"question": "hi", "answer": math.nan}, "answer", "NaN"),
    ({"messages": [{"role": "user", "content": "hi"}], "answer": -math.inf}, "answer", "-Infinity"),
])
def test_nan_and_infinity_refused_in_ids_and_answers(tmp_path, row, field, shown):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row) + "\n")  # json writes NaN / Infinity, and reads them back as floats
    assert _error(load_prompts, path) == (f"{path}:1: field {field!r}: {shown} is not a usable "
                                          f"{field.replace('_', ' ')}; give a string or a finite number")


def test_nan_answer_in_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"question": "a", "answer": 1.5}, {"question": "b", "answer": math.nan}]),
                   tmp_path / "p.parquet")
    assert _error(load_prompts, tmp_path / "p.parquet") == (
        f"{tmp_path / 'p.parquet'}:row 1: field 'answer': NaN is not a usable answer; give a string or a finite number")


def test_a_bad_pair_is_reported_as_a_pair(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", {"prompt_id": "a", "messages": PROMPT[:1], "chosen": 3, "rejected": "b"})
    assert guess_kind(path) == "preferences"
    message = _error(load_preferences, path)
    assert message.startswith(f"{path}:1: field 'chosen': expected a string")
    assert "for Prompt" not in message
    as_prompts = _error(load_prompts, path)
    assert as_prompts.startswith(f"{path}:1: unknown field 'chosen' for Prompt; ")
    assert as_prompts.endswith("(read as a prompt row of shape record, as it has 'messages'; it has 'chosen'/'rejected' "
                               "like a preference pair: is it a preference file given for prompts?)")


def test_a_response_error_names_the_shape_it_was_read_as(tmp_path):
    row = {"prompt": PROMPT, "chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    path = _jsonl(tmp_path / "pairs.jsonl", row)
    assert _error(load_preferences, path) == (
        f"{path}:1: field 'chosen': expected assistant message(s), found role 'user' (read as a preference row of "
        "shape TRL conversational, as it has 'prompt', 'chosen', 'rejected')")


@pytest.mark.parametrize("messages, says", [
    ([], "field 'messages': empty; a conversation needs at least one message"),
    ([{"role": "assistnat", "content": "hi"}], "field 'messages': message 1: role 'assistnat' is not one of "
                                              "system, user, assistant"),
    (["hi"], "field 'messages': message 1: expected an object with role and content, got str"),
    ([{"role": "user", "content": 3}], "field 'messages': message 1: content must be a string or a list"),
])
def test_bad_conversations(tmp_path, messages, says):
    path = _jsonl(tmp_path / "p.jsonl", {"messages": messages})
    assert _error(load_prompts, path).startswith(f"{path}:1: {says}")
    pairs = _jsonl(tmp_path / "pairs.jsonl", {"messages": messages, "chosen": "a", "rejected": "b"})
    assert _error(load_preferences, pairs).startswith(f"{pairs}:1: {says}")


def test_misspelled_role_in_a_trl_prompt(tmp_path):
    row = {"prompt": [{"role": "usr", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}
    path = _jsonl(tmp_path / "pairs.jsonl", row)
    assert _error(load_preferences, path) == (f"{path}:1: field 'prompt': message 1: role 'usr' is not one of "
                                              "system, user, assistant")


def test_text_file_named_parquet(tmp_path):
    (tmp_path / "p.parquet").write_text("question,answer\nhi,1\n")
    message = _error(load_prompts, tmp_path / "p.parquet")
    assert message.startswith(f"{tmp_path / 'p.parquet'}: not a readable parquet file (")
    assert "\n" not in message


def test_animated_gif_says_its_first_frame_is_used_once(tmp_path, capsys):
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue", "green")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    path = _jsonl(tmp_path / "p.jsonl", *({"prompt_id": str(i), "messages": PROMPT, "images": ["anim.gif"]}
                                          for i in range(2)))
    assert len(load_prompts(path).records) == 2
    err = capsys.readouterr().err
    assert err.count("is animated") == 1
    assert f"note: {tmp_path / 'anim.gif'} is animated (3 frames); its first frame is used" in err
    from mpo.data.images import open_image

    assert open_image(tmp_path / "anim.gif").getpixel((0, 0)) == (255, 0, 0)


def test_a_300_to_1_image_is_refused_at_load_naming_its_path(tmp_path):
    Image.new("RGB", (900, 3), "red").save(tmp_path / "strip.png")
    Image.new("RGB", (400, 2), "red").save(tmp_path / "edge.png")  # exactly 200:1 is allowed, as qwen_vl_utils does
    path = _jsonl(tmp_path / "p.jsonl", {"messages": PROMPT, "images": ["edge.png"]},
                  {"messages": PROMPT, "images": ["strip.png"]})
    assert _error(load_prompts, path) == (
        f"{path}:2: field 'images': image too thin: {tmp_path / 'strip.png'} is 900 x 3, an aspect ratio over 200:1, "
        "which the Qwen-family resize (qwen_vl_utils) refuses; crop or pad it")
    assert len(load_prompts(path, on_bad_image="skip").records) == 1


def test_the_ratio_limit_is_qwen_vl_utils():
    from qwen_vl_utils.vision_process import MAX_RATIO

    from mpo.data import images

    assert images.MAX_RATIO == MAX_RATIO


@pytest.mark.parametrize("row, field, kind", [
    ({"prompt_id": ["a"], "messages": [{"role": "user", "content": "hi"}]}, "prompt_id", "list"),
    ({"id": {"n": 1}, "question": "hi"}, "id", "dict"),
    ({"question": "hi", "answer": ["a", "b"]}, "answer", "list"),
])
def test_ids_and_answers_that_are_not_text_or_numbers(tmp_path, row, field, kind):
    path = _jsonl(tmp_path / "p.jsonl", row)
    assert _error(load_prompts, path) == f"{path}:1: field {field!r}: expected a string or a number, got {kind}"


def test_numbers_stay_valid_ids_and_answers(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", {"id": 7, "question": "hi", "answer": 2.5}, {"id": 8, "question": "ho", "answer": 3})
    assert [(r.prompt_id, r.answer) for r in load_prompts(path).records] == [("7", "2.5"), ("8", "3")]


@pytest.mark.parametrize("row, field", [
    ({"prompt_id": True, "messages": [{"role": "user", "content": "hi"}]}, "prompt_id"),
    ({"question": "Is it red?", "answer": False}, "answer"),
])
def test_booleans_refused_in_ids_and_answers(tmp_path, row, field):
    """``str(True)`` would silently make the id or answer "True"."""
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assert _error(load_prompts, path) == f"{path}:1: field {field!r}: expected a string or a number, got bool"

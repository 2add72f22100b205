"""Data in the shapes the Hub stores and the hostile rows scraped data brings, as a user runs them:
the `mpo` console script from a working folder with relative paths. A `datasets` folder of TRL's
vision layout (``Sequence(Image())`` of decoded images) checks and trains; a `DatasetDict` folder
asks for ``data.split``; bad rows end with exit 2 and one ``error:`` line naming file:line:field
(``mpo data check`` lists every bad row, then one line). The loader-level cases are in
``tests/unit/test_data_hostile.py``."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
from pathlib import Path

import pytest
import yaml
from PIL import Image
from test_bad_inputs import assert_one_line
from test_bad_inputs import mpo as _mpo

pytestmark = pytest.mark.slow

USER = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
COLOURS = ["red", "green", "blue", "yellow"]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def mpo(cwd: Path, *args: str):
    saved = {name: os.environ.pop(name) for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")
             if name in os.environ}
    try:
        return _mpo(cwd, *args)
    finally:
        os.environ.update(saved)


@pytest.fixture(scope="module")
def user(tmp_path_factory, tiny_policy_dir) -> Path:
    """A user's folder: the tiny policy, images, a TRL-layout `datasets` folder (plain and with
    splits), a recipe, and prompt and pair files with hostile rows."""
    import shutil

    import datasets

    root = tmp_path_factory.mktemp("data_user")
    shutil.copytree(tiny_policy_dir, root / "policy")
    (root / "img").mkdir()
    for colour in COLOURS:
        Image.new("RGB", (56, 56), colour).save(root / "img" / f"{colour}.png")
    Image.new("RGB", (900, 3), "red").save(root / "img" / "strip.png")
    frames = [Image.new("RGB", (56, 56), c) for c in COLOURS]
    frames[0].save(root / "img" / "anim.gif", save_all=True, append_images=frames[1:])
    assistant = lambda text: [{"role": "assistant", "content": [{"type": "text", "text": text}]}]  # noqa: E731
    vision = datasets.Dataset.from_dict({
        "images": [[Image.open(root / "img" / f"{c}.png")] for c in COLOURS],
        "prompt": [USER] * 4, "chosen": [assistant(f"It is {c}.") for c in COLOURS],
        "rejected": [assistant("I cannot tell.")] * 4})
    vision.save_to_disk(str(root / "vision_ds"))
    datasets.DatasetDict(train=vision.select([0, 1, 2]), test=vision.select([3])).save_to_disk(str(root / "splits"))
    pair = {"prompt_id": "p0", "messages": USER, "images": ["img/red.png"], "chosen": "It is red.", "rejected": "No."}
    _jsonl(root / "pairs.jsonl", [pair, {**pair, "prompt_id": "p1"}])
    (root / "train.yaml").write_text(yaml.safe_dump({
        "model": {"policy": "policy", "dtype": "float32", "min_pixels": 3136, "max_pixels": 3136},
        "run": {"output_dir": "runs/train"}, "data": {"preferences": "pairs.jsonl"}, "train": {"max_steps": 1}}))
    (root / "fake.parquet").write_text("question,answer\nWhat colour?,red\n")
    return root


def test_sequence_of_images_dataset_folder_checks_and_trains(user):
    checked = mpo(user, "data", "check", "vision_ds", "train.yaml")
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert "vision_ds: 4 rows of preferences (shapes: TRL conversational 4)" in checked.stdout
    assert "images: 4 in good rows" in checked.stdout
    trained = mpo(user, "train", "train.yaml", "data.preferences=vision_ds", "run.output_dir=runs/vision")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (user / "runs" / "vision" / "policy" / "model.safetensors").is_file()
    cached = sorted((user / "runs" / "vision" / "image_cache").glob("*.img"))
    assert len(cached) == 4 and {Image.open(p).getpixel((0, 0)) for p in cached} == {
        Image.new("RGB", (1, 1), c).getpixel((0, 0)) for c in COLOURS}


def test_dataset_dict_folder_needs_a_split(user):
    assert_one_line(mpo(user, "train", "train.yaml", "data.preferences=splits", "run.output_dir=runs/splits"),
                    r"^error: \S*splits: a DatasetDict folder with splits train, test; choose one with data\.split "
                    r"\(or name a split's folder, e\.g\. \S*splits/train\)$")
    assert not (user / "runs" / "splits" / "policy").exists()
    checked = mpo(user, "data", "check", "splits", "train.yaml", "data.split=test")
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert "splits: 1 rows of preferences" in checked.stdout


def test_data_check_names_each_hostile_prompt_row(user):
    port = _closed_port()
    uri = "data:image/png;base64," + base64.b64encode(b"not an image at all " * 200).decode()
    rows = [
        {"prompt_id": "good", "messages": USER, "images": ["img/red.png"]},
        {"prompt_id": "empty", "messages": []},
        {"prompt_id": "typo", "messages": [{"role": "assistnat", "content": "hi"}]},
        {"prompt_id": float("nan"), "messages": USER, "images": ["img/red.png"]},
        {"prompt_id": "nan-answer", "messages": USER, "images": ["img/red.png"], "answer": float("nan")},
        {"prompt_id": "uri", "messages": USER, "images": [uri]},
        {"prompt_id": "url", "messages": USER, "images": [f"http://127.0.0.1:{port}/a.png"]},
        {"prompt_id": "thin", "messages": USER, "images": ["img/strip.png"]},
        {"prompt_id": "gif", "messages": USER, "images": ["img/anim.gif"]},
    ]
    _jsonl(user / "hostile.jsonl", rows)
    result = mpo(user, "data", "check", "hostile.jsonl")
    assert_one_line(result, r"^error: 7 bad row\(s\) in hostile\.jsonl \(listed above\)$")
    listed = [line.strip() for line in result.stdout.splitlines() if re.match(r"hostile\.jsonl:\d", line.strip())]
    assert listed[:5] == [
        "hostile.jsonl:2: field 'messages': empty; a conversation needs at least one message",
        "hostile.jsonl:3: field 'messages': message 1: role 'assistnat' is not one of system, user, assistant",
        "hostile.jsonl:4: field 'prompt_id': NaN is not a usable prompt id; give a string or a finite number",
        "hostile.jsonl:5: field 'answer': NaN is not a usable answer; give a string or a finite number",
        f"hostile.jsonl:6: field 'images': image unreadable: {uri[:60]}... ({len(uri)} characters) "
        "(cannot identify image file)",
    ]
    assert listed[5].startswith(f"hostile.jsonl:7: field 'images': could not fetch http://127.0.0.1:{port}/a.png: ")
    assert listed[6].startswith("hostile.jsonl:8: field 'images': image too thin: ")
    assert listed[6].endswith("img/strip.png is 900 x 3, an aspect ratio over 200:1, which the Qwen-family resize "
                              "(qwen_vl_utils) refuses; crop or pad it")
    assert len(listed) == 7 and uri[100:200] not in result.stdout + result.stderr
    assert result.stderr.count("img/anim.gif is animated (4 frames); its first frame is used") == 1


def test_data_check_reports_a_bad_pair_as_a_pair(user):
    rows = [{"prompt_id": "a", "messages": USER, "images": ["img/red.png"], "chosen": 3, "rejected": "No."},
            {"prompt_id": "b", "messages": [], "chosen": "a", "rejected": "b"}]
    _jsonl(user / "bad_pairs.jsonl", rows)
    result = mpo(user, "data", "check", "bad_pairs.jsonl")
    assert_one_line(result, r"^error: 2 bad row\(s\) in bad_pairs\.jsonl \(listed above\)$")
    assert "2 rows of preferences" in result.stdout and "for Prompt" not in result.stdout
    assert "bad_pairs.jsonl:1: field 'chosen': expected a string (the row has" in result.stdout
    assert "bad_pairs.jsonl:2: field 'messages': empty; a conversation needs at least one message" in result.stdout


def test_text_file_named_parquet(user):
    assert_one_line(mpo(user, "data", "check", "fake.parquet"),
                    r"^error: fake\.parquet: not a readable parquet file \(.+\)$")


@pytest.mark.parametrize("change, pattern", [
    ({"messages": []}, r"pairs\.jsonl:1: field 'messages': empty; a conversation needs at least one message$"),
    ({"images": ["img/strip.png"]}, r"pairs\.jsonl:1: field 'images': image too thin: \S*img/strip\.png is 900 x 3"),
])
def test_train_refuses_before_the_model_loads(user, tmp_path, change, pattern):
    import shutil

    case = tmp_path / "case"
    shutil.copytree(user, case, ignore=shutil.ignore_patterns("runs", "vision_ds", "splits"))
    lines = (case / "pairs.jsonl").read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), **change})
    (case / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    assert_one_line(mpo(case, "train", "train.yaml"), r"^error: \S*" + pattern)
    assert not (case / "runs" / "train" / "policy").exists()

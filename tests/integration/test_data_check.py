"""`mpo data check` and `mpo train` on the formats people have, through the console script with
relative paths: TRL's conversational vision format, TRL's standard format, a `datasets` folder with
embedded images; a file with bad rows lists every one of them and exits 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

USER = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]


def mpo(cwd, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(Path(sys.executable).parent / "mpo"), *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_policy_dir):
    import datasets

    root = tmp_path_factory.mktemp("formats")
    (root / "img").mkdir()
    colours = ["red", "green", "blue", "yellow"]
    for colour in colours:
        Image.new("RGB", (60, 44), colour).save(root / "img" / f"{colour}.png")
    assistant = lambda text: [{"role": "assistant", "content": [{"type": "text", "text": text}]}]  # noqa: E731
    conversational = [{"images": [f"img/{c}.png"], "prompt": USER, "chosen": assistant(f"It is {c}."),
                       "rejected": assistant("I cannot tell.")} for c in colours]
    standard = [{"images": [f"img/{c}.png"], "prompt": "<image>What colour is it?", "chosen": f"It is {c}.",
                 "rejected": "No idea."} for c in colours]
    for name, rows in (("conversational.jsonl", conversational), ("standard.jsonl", standard)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = datasets.Dataset.from_dict({"image": [str(root / "img" / f"{c}.png") for c in colours],
                                     "question": ["What colour is it?"] * 4,
                                     "chosen": [f"It is {c}." for c in colours], "rejected": ["No idea."] * 4})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(root / "rlaifv_ds"))
    (root / "recipe.yaml").write_text(
        "run: {output_dir: runs/x}\nmodel: {policy: policy, dtype: float32, min_pixels: 3136, max_pixels: 12544}\n"
        "train: {max_steps: 1, max_length: 512}\n")
    import shutil

    shutil.copytree(tiny_policy_dir, root / "policy")
    return root


@pytest.mark.parametrize("source, shape", [("conversational.jsonl", "TRL conversational 4"),
                                           ("standard.jsonl", "TRL standard 4"), ("rlaifv_ds", "MMPR 4")])
def test_data_check_and_train_on_each_format(folder, source, shape):
    checked = mpo(folder, "data", "check", source, "recipe.yaml", "--json", f"runs/{source}.json")
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert f"4 rows of preferences (shapes: {shape})" in checked.stdout
    report = json.loads((folder / "runs" / f"{source}.json").read_text())
    assert report["images"] == 4 and report["bad_rows"] == [] and report["limit"] == {"train.max_length": 512, "over": 0}
    assert report["tokens"]["max"] > report["visual_tokens_per_image"]["max"] > 0
    trained = mpo(folder, "train", "recipe.yaml", f"data.preferences={source}", f"run.output_dir=runs/{source}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (folder / "runs" / source / "policy" / "model.safetensors").is_file()
    if source == "rlaifv_ds":  # embedded images land in the run folder's cache, not beside the data set
        assert len(list((folder / "runs" / source / "image_cache").glob("*.img"))) == 4


def test_data_check_lists_every_bad_row_and_exits_2(folder):
    rows = (folder / "standard.jsonl").read_text().splitlines()
    two_images_one_part = {"images": ["img/red.png", "img/blue.png"], "prompt": USER,
                           "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    bad = [rows[0], json.dumps({"prompt": "x", "chosen": "a"}), rows[1].replace("img/green.png", "img/none.png"),
           json.dumps(two_images_one_part)]
    (folder / "bad.jsonl").write_text("\n".join(bad) + "\n")
    result = mpo(folder, "data", "check", "bad.jsonl")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "4 rows of preferences" in result.stdout and "bad rows (3):" in result.stdout
    assert "bad.jsonl:2: field 'rejected': missing" in result.stdout
    assert "bad.jsonl:3: field 'images': image not found" in result.stdout
    assert "bad.jsonl:4: field 'images': the messages have 1 image part(s) but 2 image(s) are listed" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "error: 3 bad row(s) in bad.jsonl (listed above)"

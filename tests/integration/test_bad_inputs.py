"""Bad inputs, as a user meets them: each case runs the `mpo` console script from a working folder
with relative paths, and must end with exit status 2 and exactly one ``error:`` line naming the
file (and line and field where there is one): no traceback, nothing half-written trusted.

The README's bad-input table lists these rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fixture_images import bomb_png
from PIL import Image

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_policy_dir, tiny_reward_dir) -> Path:
    """A user's folder: tiny models, images, prompts, pairs, items and recipes, all relative."""
    root = tmp_path_factory.mktemp("user")
    shutil.copytree(tiny_policy_dir, root / "policy")
    shutil.copytree(tiny_reward_dir, root / "reward")
    (root / "img").mkdir()
    for colour in ("red", "blue"):
        Image.new("RGB", (56, 56), colour).save(root / "img" / f"{colour}.png")
    prompts = [{"prompt_id": f"p{i}", "messages": PROMPT, "images": [f"img/{c}.png"]} for i, c in enumerate(["red", "blue"])]
    _jsonl(root / "prompts.jsonl", prompts)
    pairs = [{"prompt_id": f"p{i}", "messages": PROMPT, "images": [f"img/{c}.png"], "chosen": f"It is {c}.",
              "rejected": "No idea."} for i, c in enumerate(["red", "blue"])]
    _jsonl(root / "pairs.jsonl", pairs)
    _jsonl(root / "items.jsonl", [{"messages": PROMPT, "images": ["img/red.png"], "response": "Red."}])
    common = {"model": {"policy": "policy", "reward_model": "reward", "dtype": "float32", "min_pixels": 3136,
                        "max_pixels": 3136}}
    recipes = {
        "iterate": {**common, "run": {"output_dir": "runs/it"}, "data": {"prompts": "prompts.jsonl"},
                    "rollout": {"backend": "hf", "num_samples": 2, "max_tokens": 4}, "iterate": {"rounds": 1},
                    "train": {"max_steps": 1}},
        "train": {**common, "run": {"output_dir": "runs/train"}, "data": {"preferences": "pairs.jsonl"},
                  "train": {"max_steps": 1}},
        "reward_train": {**common, "run": {"output_dir": "runs/rm"},
                         "reward_train": {"init_from": "reward", "max_steps": 1,
                                          "phases": [{"name": "s1", "data": ["pairs.jsonl"]}]}},
    }
    for name, recipe in recipes.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    return root


COMMANDS = {
    "iterate": ["iterate", "iterate.yaml"],
    "train": ["train", "train.yaml"],
    "reward score": ["reward", "score", "--model", "reward", "--input", "items.jsonl", "--output", "out.jsonl"],
    "reward eval": ["reward", "eval", "--model", "reward", "--benchmark", "pairs", "--data", "pairs.jsonl"],
    "reward train": ["reward", "train", "reward_train.yaml"],
}
# which input file each command reads (what a case spoils)
INPUT = {"iterate": "prompts.jsonl", "train": "pairs.jsonl", "reward score": "items.jsonl",
         "reward eval": "pairs.jsonl", "reward train": "pairs.jsonl"}


def mpo(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).parent / "mpo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([str(binary), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def assert_one_line(result: subprocess.CompletedProcess, pattern: str) -> str:
    import re

    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


@pytest.fixture
def case(workdir, tmp_path):
    """A fresh copy of the user's folder for one case to spoil."""
    folder = tmp_path / "case"
    shutil.copytree(workdir, folder, ignore=shutil.ignore_patterns("runs"))
    return folder


def _first_row(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text().splitlines()[0])


def _rewrite_first(folder: Path, name: str, **changes) -> None:
    lines = (folder / name).read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), **changes})
    (folder / name).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_decompression_bomb_image(case, command):
    bomb_png(case / "img" / "bomb.png")
    _rewrite_first(case, INPUT[command], images=["img/bomb.png"])
    assert_one_line(mpo(case, *COMMANDS[command]),
                    rf"{INPUT[command]}:1( \(response 0\))?: field 'images': image too large: .*bomb\.png")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_file_that_is_not_utf8(case, command):
    path = case / INPUT[command]
    path.write_bytes(path.read_bytes() + b'{"response": "caf\xe9"}\n')
    assert_one_line(mpo(case, *COMMANDS[command]), rf"{INPUT[command]}:\d+: not valid UTF-8 \(byte 0xe9 at column \d+\)")


def test_recipe_that_is_not_utf8(case):
    (case / "train.yaml").write_bytes((case / "train.yaml").read_bytes() + b"# \xff\n")
    assert_one_line(mpo(case, *COMMANDS["train"]), r"train\.yaml:\d+: not valid UTF-8 \(byte 0xff")


@pytest.mark.parametrize("which, command", [("policy/model.safetensors", "train"),
                                            ("reward/model.safetensors", "reward score"),
                                            ("reward/value_head.safetensors", "reward score"),
                                            ("reward/value_head.safetensors", "iterate")])
def test_truncated_checkpoint_names_the_file(case, which, command):
    path = case / which
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_one_line(mpo(case, *COMMANDS[command]), rf"{which}: not a readable safetensors file")


@pytest.mark.parametrize("value, pattern", [
    ("/no/such/dir", r"model\.policy: /no/such/dir: no such folder"),
    ("runs/nope", r"model\.policy: .*/runs/nope: no such folder"),  # runs/ exists: a local path
    ("nobody/no-such-model", r"model\.policy: 'nobody/no-such-model' is neither a local folder nor reachable "
                             r"on the Hugging Face Hub"),
])
def test_policy_that_is_not_there(case, value, pattern):
    (case / "runs").mkdir()
    assert_one_line(mpo(case, *COMMANDS["train"], f"model.policy={value}"), pattern)


def test_empty_and_pickle_only_model_folders(case):
    (case / "empty").mkdir()
    assert_one_line(mpo(case, *COMMANDS["reward train"], "reward_train.init_from=empty"),
                    r"reward_train\.init_from: .*/empty: not a model folder \(no config\.json\)")
    pickled = case / "pickled"
    pickled.mkdir()
    shutil.copy2(case / "reward" / "config.json", pickled / "config.json")
    proof = case / "unpickled.txt"
    # a malicious pickle: loading it would run a command; it must never be loaded
    payload = f"cos\nsystem\n(S'touch {proof}'\ntR."
    (pickled / "pytorch_model.bin").write_bytes(payload.encode())
    for command, key in (("reward train", "reward_train.init_from"), ("train", "model.policy")):
        assert_one_line(mpo(case, *COMMANDS[command], f"{key}=pickled"),
                        rf"{key}: .*/pickled: only pickle weights \(pytorch_model\.bin\)")
    assert not proof.exists()


def test_duplicate_prompt_id_is_caught_at_loading(case):
    rows = [json.loads(line) for line in (case / "prompts.jsonl").read_text().splitlines()]
    _jsonl(case / "prompts.jsonl", [*rows, {**rows[1], "images": ["img/red.png"]}])
    assert_one_line(mpo(case, *COMMANDS["iterate"]),
                    r"prompts\.jsonl:3: field 'prompt_id': 'p1' repeats .*prompts\.jsonl:2")
    assert not (case / "runs" / "it" / "round_000").exists()  # nothing ran, nothing to delete after the fix


@pytest.mark.parametrize("command", ["iterate", "train"])
def test_image_count_mismatch_is_caught_at_loading(case, command):
    _rewrite_first(case, INPUT[command], images=["img/red.png", "img/blue.png"])
    assert_one_line(mpo(case, *COMMANDS[command]),
                    rf"{INPUT[command]}:1: field 'images': the messages have 1 image part\(s\) but 2 image\(s\)")


def test_too_long_prompt_is_caught_before_rollout(case):
    _rewrite_first(case, "prompts.jsonl", messages=[{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "colour " * 5000}]}])
    assert_one_line(mpo(case, *COMMANDS["iterate"]),
                    r"prompts\.jsonl:1: the prompt is \d+ tokens .* takes at most 4096 .*rollout\.on_too_long=skip")
    result = mpo(case, "rollout", "iterate.yaml", "--round", "0", "rollout.on_too_long=skip")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 prompt(s) skipped as too long for the policy, 1 kept" in result.stdout
    rows = (case / "runs" / "it" / "round_000" / "rollouts.jsonl").read_text().splitlines()
    assert {json.loads(r)["prompt_id"] for r in rows} == {"p1"}


def test_empty_input_is_an_error(case):
    (case / "items.jsonl").write_text("")
    assert_one_line(mpo(case, *COMMANDS["reward score"]), r"items\.jsonl: no rows to score")
    assert not (case / "out.jsonl").exists()


def test_sixteen_bit_image_is_scored_as_its_eight_bit_equivalent(case):
    """Not an error: a 16-bit PNG scores as the 8-bit image it scales to (not as white)."""
    import numpy as np

    Image.fromarray(np.full((56, 56), 40000, dtype=np.uint16)).save(case / "img" / "deep.png")
    Image.new("RGB", (56, 56), (156, 156, 156)).save(case / "img" / "grey.png")
    Image.new("RGB", (56, 56), (255, 255, 255)).save(case / "img" / "white.png")
    rows = [{"messages": PROMPT, "images": [f"img/{name}.png"], "response": "Grey."} for name in ("deep", "grey", "white")]
    _jsonl(case / "items.jsonl", rows)
    result = mpo(case, *COMMANDS["reward score"])
    assert result.returncode == 0, result.stderr[-2000:]
    deep, grey, white = (json.loads(line)["reward"] for line in (case / "out.jsonl").read_text().splitlines())
    assert deep == grey and deep != white


def test_too_long_response_in_eval(case):
    assert_one_line(mpo(case, *COMMANDS["reward eval"], "--max-length", "40"),
                    r"pairs\.jsonl:1 \(response 0\): \d+ tokens .* exceeds max_length 40")
    result = mpo(case, *COMMANDS["reward eval"], "--max-length", "40", "--on-too-long", "skip")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 response(s) longer than the limit were not scored; their rows count as wrong" in result.stderr
    assert "pairwise accuracy 0.0  0/2" in result.stdout


def test_changed_settings_are_refused_by_train_resume_and_reward_train(case):
    for command, change, pattern in (
        ("train", ["--resume", "loss.beta=0.5"], r"runs/train: made with other settings \(loss\.beta: 0\.1 -> 0\.5\)"),
        ("reward train", ["reward_train.max_grad_norm=0.5"],
         r"runs/rm/s1/done\.json: stage s1 finished earlier with other settings.*delete .*runs/rm/s1 to retrain"),
    ):
        first = mpo(case, *COMMANDS[command])
        assert first.returncode == 0, first.stderr[-2000:]
        again = mpo(case, *COMMANDS[command])  # the same settings: finished, nothing to do
        assert again.returncode == 0, again.stderr[-2000:]
        assert_one_line(mpo(case, *COMMANDS[command], *change), pattern)

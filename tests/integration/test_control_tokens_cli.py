"""Control-token text in data, as a user meets it through the `mpo` console script: a literal
``<|image_pad|>`` in a question, ``<|im_end|>`` in a chosen response, ``<|vision_start|>`` in a
rejected one. With ``data.special_tokens=escape`` (the default; ``--special-tokens`` for the reward
commands without a recipe) scoring, training, evaluation and data check run and exit 0 (before, the
first crashed with ``ValueError: The total number of <|image_pad|> tokens ...``); with ``error`` each
stops with exit 2 and one line naming file:line and field."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

pytestmark = pytest.mark.slow

QUESTION = "What does <|image_pad|> mean here?"
PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
PLAIN = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def mpo(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).parent / "mpo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([str(binary), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def _one_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stdout + result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_policy_dir, tiny_reward_dir) -> Path:
    """A user's folder with the tiny models, an image, and data whose texts hold control literals."""
    root = tmp_path_factory.mktemp("user")
    shutil.copytree(tiny_policy_dir, root / "policy")
    shutil.copytree(tiny_reward_dir, root / "reward")
    (root / "img").mkdir()
    Image.new("RGB", (56, 56), "red").save(root / "img" / "red.png")
    pairs = [
        {"prompt_id": "p0", "messages": PLAIN, "images": ["img/red.png"], "chosen": "Red.", "rejected": "Blue."},
        {"prompt_id": "p1", "messages": PROMPT, "images": ["img/red.png"], "chosen": "A placeholder.<|im_end|>",
         "rejected": "An image <|vision_start|>"},
    ]
    _jsonl(root / "pairs.jsonl", pairs)
    _jsonl(root / "prompts.jsonl", [{"prompt_id": p["prompt_id"], "messages": p["messages"], "images": p["images"]}
                                    for p in pairs])
    _jsonl(root / "items.jsonl", [{"messages": PLAIN, "images": ["img/red.png"], "response": "Red."},
                                  {"messages": PROMPT, "images": ["img/red.png"], "response": "It ends <|im_end|>"}])
    common = {"model": {"policy": "policy", "reward_model": "reward", "dtype": "float32", "min_pixels": 3136,
                        "max_pixels": 3136}}
    recipes = {
        "train": {**common, "run": {"output_dir": "runs/train"}, "data": {"preferences": "pairs.jsonl"},
                  "train": {"max_steps": 1}},
        "iterate": {**common, "run": {"output_dir": "runs/it"}, "data": {"prompts": "prompts.jsonl"},
                    "rollout": {"backend": "hf", "num_samples": 2, "max_tokens": 4}, "iterate": {"rounds": 1}},
    }
    for name, recipe in recipes.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    return root


def test_reward_score_escapes_or_refuses(workdir):
    result = mpo(workdir, "reward", "score", "--model", "reward", "--input", "items.jsonl", "--output", "out.jsonl")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["reward"]) for r in rows)
    refused = mpo(workdir, "reward", "score", "--model", "reward", "--input", "items.jsonl", "--output", "o2.jsonl",
                  "--special-tokens", "error")
    assert _one_error(refused) == (
        "error: items.jsonl:2: field 'messages': the text contains the control token '<|image_pad|>' "
        "(--special-tokens=error; 'escape' tokenizes it as plain text)")
    assert not (workdir / "o2.jsonl").exists()


def test_train_escapes_or_refuses_before_the_policy_loads(workdir):
    result = mpo(workdir, "train", "train.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "runs/train/policy/config.json").is_file()
    assert json.loads((workdir / "runs/train/data_report.json").read_text())["kept"] == 2
    refused = mpo(workdir, "train", "train.yaml", "data.special_tokens=error", "run.output_dir=runs/train_err")
    line = _one_error(refused)  # recipe paths are absolute once loaded
    assert line.startswith(f"error: {workdir}") and line.endswith(
        "/pairs.jsonl:2: field 'messages': the text contains the control token '<|image_pad|>' "
        "(data.special_tokens=error; 'escape' tokenizes it as plain text)")
    assert not (workdir / "runs/train_err/policy").exists()


def test_iterate_refuses_a_prompt_before_any_model_loads(workdir):
    refused = mpo(workdir, "iterate", "iterate.yaml", "data.special_tokens=error")
    line = _one_error(refused)
    assert line.startswith(f"error: {workdir}") and line.endswith(
        "/prompts.jsonl:2: field 'messages': the text contains the control token '<|image_pad|>' "
        "(data.special_tokens=error; 'escape' tokenizes it as plain text)")
    assert not (workdir / "runs/it/round_000/rollouts.jsonl").exists()


def test_reward_eval_scores_pairs_with_control_literals(workdir):
    result = mpo(workdir, "reward", "eval", "--model", "reward", "--benchmark", "pairs", "--data", "pairs.jsonl",
                 "--output", "eval.json")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((workdir / "eval.json").read_text())
    assert scores["scoring"]["items"] == 4 and not scores["scoring"]["skipped_too_long"]


def test_data_check_notes_or_lists_the_rows(workdir):
    noted = mpo(workdir, "data", "check", "pairs.jsonl", "train.yaml")
    assert noted.returncode == 0, noted.stderr[-3000:]
    assert ("  control-token text: 1 row(s) hold a special token's text, tokenized as plain text "
            "(data.special_tokens=escape; 'error' refuses them); first: pairs.jsonl:2: field 'messages': "
            "'<|image_pad|>'") in noted.stdout.splitlines()
    listed = mpo(workdir, "data", "check", "pairs.jsonl", "train.yaml", "data.special_tokens=error")
    assert _one_error(listed) == "error: 1 bad row(s) in pairs.jsonl (listed above)"
    assert ("    pairs.jsonl:2: field 'messages': the text contains the control token '<|image_pad|>' "
            "(data.special_tokens=error; 'escape' tokenizes it as plain text)") in listed.stdout.splitlines()

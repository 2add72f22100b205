"""A finished run is tied to neither its path nor its files' times: copied (``cp -a``) or moved with
the models and data it uses, it reads back and changes nothing; an image touched without a change
in its bytes changes nothing; an image whose bytes changed stops the run with one line naming the
prompts and the least that must be redone. Each case runs the ``mpo`` console script from a working
folder whose recipe names everything relatively."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
COLOURS = ("red", "blue", "green")


def mpo(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).parent / "mpo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([str(binary), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=900)


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: its bytes' digest and its modification time."""
    import hashlib

    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_policy_dir, tiny_reward_dir) -> Path:
    """A working folder (models, images, prompts, recipe, all relative) and a finished two-round run in it."""
    root = tmp_path_factory.mktemp("portable") / "work"
    root.mkdir()
    shutil.copytree(tiny_policy_dir, root / "models" / "policy")
    shutil.copytree(tiny_reward_dir, root / "models" / "reward")
    (root / "img").mkdir()
    for colour in COLOURS:
        Image.new("RGB", (56, 56), colour).save(root / "img" / f"{colour}.png")
    prompts = [{"prompt_id": f"p_{c}", "messages": PROMPT, "images": [f"img/{c}.png"]} for c in COLOURS]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    recipe = {"run": {"output_dir": "runs/it", "report_to": "none"},
              "model": {"policy": "models/policy", "reward_model": "models/reward", "dtype": "float32",
                        "min_pixels": 3136, "max_pixels": 3136},
              "data": {"prompts": "prompts.jsonl"},
              "rollout": {"backend": "hf", "num_samples": 2, "max_tokens": 4},
              "train": {"max_steps": 1, "per_device_batch_size": 2}, "iterate": {"rounds": 2}}
    (root / "iterate.yaml").write_text(yaml.safe_dump(recipe))
    result = mpo(root, "iterate", "iterate.yaml")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert all(json.loads((root / "runs/it" / f"round_{n:03d}/manifest.json").read_text())["trained"]
               for n in range(2)), "the test needs both rounds trained (round 1 from round 0's policy)"
    return root


def _copy(finished: Path, tmp_path: Path, name: str = "elsewhere") -> Path:
    target = tmp_path / name
    subprocess.run(["cp", "-a", str(finished), str(target)], check=True)
    return target


def _rerun_changes_nothing(folder: Path) -> subprocess.CompletedProcess:
    """Run the recipe's command again in ``folder``: exit 0 and every file's bytes and mtime as before."""
    before = snapshot(folder)
    result = mpo(folder, "iterate", "iterate.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    assert snapshot(folder) == before
    return result


def test_rerun_in_place_changes_nothing(finished):
    _rerun_changes_nothing(finished)


def test_copied_run_reads_back_and_changes_nothing(finished, tmp_path):
    copy = _copy(finished, tmp_path)
    result = _rerun_changes_nothing(copy)
    assert "made with other settings" not in result.stdout + result.stderr


def test_moved_run_reads_back(finished, tmp_path):
    moved = tmp_path / "moved"
    shutil.move(str(_copy(finished, tmp_path, "first")), moved)
    _rerun_changes_nothing(moved)


def test_touched_image_changes_nothing(finished, tmp_path):
    copy = _copy(finished, tmp_path)
    later = time.time_ns() + 5_000_000_000
    os.utime(copy / "img" / "blue.png", ns=(later, later))
    _rerun_changes_nothing(copy)


def test_read_only_copy_reads_back(finished, tmp_path):
    """Copied onto a file system mounted read-only (a tmpfs; skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot mount a tmpfs here ({err}); needs root in a container that allows mounts")
    try:
        copy = _copy(finished, disk)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        _rerun_changes_nothing(copy)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_changed_image_names_the_prompt_and_the_least_redo(finished, tmp_path):
    copy = _copy(finished, tmp_path)
    image = copy / "img" / "blue.png"
    stamp = image.stat().st_mtime_ns
    Image.new("RGB", (56, 56), (0, 0, 200)).save(image)
    os.utime(image, ns=(stamp, stamp))  # the same time: only its bytes tell
    before = snapshot(copy)
    result = mpo(copy, "iterate", "iterate.yaml")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    run = copy / "runs" / "it"
    assert f"{run}/round_000/rollouts.jsonl: made with other settings (prompts: prompts changed: p_blue)" in lines[0]
    assert f"delete {run}/round_000/{{rollouts,scored,pairs,train,manifest}}* and every round after round_000" \
        in lines[0]
    assert snapshot(copy) == before


def test_copied_unfinished_run_resumes_from_its_own_round(finished, tmp_path):
    """Round 1 deleted in a copy: it is made again from the copy's round-0 policy, as in the original."""
    copy = _copy(finished, tmp_path)
    shutil.rmtree(copy / "runs/it/round_001")
    result = mpo(copy, "iterate", "iterate.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("rollouts.jsonl", "scored.jsonl", "pairs.jsonl"):  # pairs name their images by path
        original = (finished / "runs/it/round_001" / name).read_text().replace(str(finished), str(copy))
        assert (copy / "runs/it/round_001" / name).read_text() == original, name
    manifest = json.loads((copy / "runs/it/round_001/manifest.json").read_text())
    assert manifest["policy_in"] == str(copy / "runs/it/round_000/train/policy")


def _write_earlier_keys(run: Path) -> list[Path]:
    """Rewrite ``run``'s stage keys as an earlier mpo wrote them (absolute paths, file times)."""
    from mpo.config import load_recipe
    from mpo.keys import key_path
    from mpo.rounds.driver import load_round_prompts
    from mpo.rounds.layout import RoundLayout

    cwd = os.getcwd()
    os.chdir(run)
    try:
        layout = RoundLayout(load_recipe(Path("iterate.yaml")))
        prompts = load_round_prompts(layout.recipe, quiet=True)
        written = []
        for n in range(2):
            for stage, make in (("rollouts.jsonl", layout.rollout_key), ("scored.jsonl", layout.score_key),
                                ("pairs.jsonl", layout.pairs_key), ("train", layout.train_key)):
                path = layout.file(n, "train") / "run_key.json" if stage == "train" else key_path(layout.file(n, stage))
                path.write_text(json.dumps(make(n, prompts, legacy=True)))
                written.append(path)
        return written
    finally:
        os.chdir(cwd)


def test_keys_of_an_earlier_mpo_are_rewritten_by_content(finished, tmp_path):
    copy = _copy(finished, tmp_path)
    keys = _write_earlier_keys(copy)
    result = mpo(copy, "iterate", "iterate.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("rewritten by content") == len(keys) == 8
    assert all("key_format" in json.loads(path.read_text()) for path in keys)
    before = snapshot(copy)
    assert mpo(copy, "iterate", "iterate.yaml").returncode == 0
    assert snapshot(copy) == before


def test_keys_of_an_earlier_mpo_whose_inputs_changed_are_refused(finished, tmp_path):
    copy = _copy(finished, tmp_path)
    _write_earlier_keys(copy)
    later = time.time_ns() + 5_000_000_000
    os.utime(copy / "img" / "red.png", ns=(later, later))  # the earlier keys cannot tell a touch from a change
    result = mpo(copy, "iterate", "iterate.yaml")
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert "round_000/rollouts.jsonl: made by an earlier mpo, whose keys held absolute paths and file times" in line
    assert "(prompts changed); rerun it where it was made (its key is then rewritten by content), or delete " in line


@pytest.fixture(scope="module")
def trained(finished, tmp_path_factory) -> Path:
    """A working folder with a finished `mpo train` and `mpo reward train` (relative paths)."""
    root = tmp_path_factory.mktemp("trained") / "work"
    subprocess.run(["cp", "-a", str(finished), str(root)], check=True)
    pairs = [{"prompt_id": f"p_{c}", "messages": PROMPT, "images": [f"img/{c}.png"], "chosen": f"It is {c}.",
              "rejected": "No idea."} for c in COLOURS]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    common = {"model": {"policy": "models/policy", "reward_model": "models/reward", "dtype": "float32",
                        "min_pixels": 3136, "max_pixels": 3136}}
    (root / "train.yaml").write_text(yaml.safe_dump(
        {**common, "run": {"output_dir": "runs/train", "report_to": "none"}, "data": {"preferences": "pairs.jsonl"},
         "train": {"max_steps": 1}}))
    (root / "reward_train.yaml").write_text(yaml.safe_dump(
        {**common, "run": {"output_dir": "runs/rm", "report_to": "none"},
         "reward_train": {"init_from": "models/reward", "max_steps": 1,
                          "phases": [{"name": "s1", "data": ["pairs.jsonl"]}]}}))
    for command in (["train", "train.yaml"], ["reward", "train", "reward_train.yaml"]):
        result = mpo(root, *command)
        assert result.returncode == 0, result.stderr[-2000:]
    return root


@pytest.mark.parametrize("command", [["train", "train.yaml"], ["reward", "train", "reward_train.yaml"]])
def test_copied_training_runs_read_back(trained, tmp_path, command):
    copy = _copy(trained, tmp_path)
    later = time.time_ns() + 5_000_000_000
    os.utime(copy / "img" / "red.png", ns=(later, later))
    os.utime(copy / "pairs.jsonl", ns=(later, later))
    before = snapshot(copy)
    result = mpo(copy, *command)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "nothing to do" in result.stdout or "finished earlier" in result.stdout
    assert snapshot(copy) == before


def test_changed_reward_data_names_the_change(trained, tmp_path):
    copy = _copy(trained, tmp_path)
    with (copy / "pairs.jsonl").open("a") as handle:
        handle.write(json.dumps({"prompt_id": "p_more", "messages": PROMPT, "images": ["img/red.png"],
                                 "chosen": "Red.", "rejected": "Blue."}) + "\n")
    result = mpo(copy, "reward", "train", "reward_train.yaml")
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert "runs/rm/s1/done.json: stage s1 finished earlier with other settings, data or start model " \
           "(data files changed); rerun with those, or delete " in line


@pytest.mark.parametrize("command", [["iterate", "iterate.yaml"], ["train", "iterate.yaml", "--round", "1"]])
def test_run_moved_before_a_round_trained_finishes_there(finished, tmp_path, command):
    """Pairs made before the move name the images where they were (gone): the round's training reads
    them where the prompts' images are now, and trains as the original run did."""
    copy = _copy(finished, tmp_path)
    round_dir = copy / "runs/it/round_001"
    pairs = round_dir / "pairs.jsonl"
    pairs.write_text(pairs.read_text().replace(str(finished), "/gone/old/place"))
    shutil.rmtree(round_dir / "train")
    (round_dir / "manifest.json").unlink()
    result = mpo(copy, *command)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "images named where the prompts' images are now" in result.stdout
    assert pairs.read_text() == (finished / "runs/it/round_001/pairs.jsonl").read_text().replace(str(finished), str(copy))
    weights = "train/policy/model.safetensors"
    assert (round_dir / weights).read_bytes() == (finished / "runs/it/round_001" / weights).read_bytes()
